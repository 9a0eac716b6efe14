//! Where signatures live on a volume, and the cheap checks built on that knowledge: the
//! superblock magics of the filesystems the driver makes (the pool's health check reads them from
//! an image) and the areas any signature blkid knows can occupy (the node proves a device blank
//! by reading them, and asks blkid only when they are not all zero).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

/// Where each filesystem the driver makes keeps its magic number, and the bytes.
pub fn magic(fs: &str) -> Option<(u64, &'static [u8])> {
    match fs {
        // ext2/3/4: s_magic 0xEF53 (little-endian) at 0x38 in the superblock at 1024.
        "ext4" => Some((1024 + 0x38, &[0x53, 0xef])),
        // XFS: sb_magicnum "XFSB" at the start of the primary superblock.
        "xfs" => Some((0, b"XFSB")),
        _ => None,
    }
}

/// The start of a device that holds every signature blkid looks for from the start.
///
/// blkid reads a blank device in a few dozen small pieces: under strace, `blkid -p` of
/// util-linux 2.38.1 on zero-filled loop devices of 1 MiB to 4 TiB, with 512- and 4096-byte
/// sectors, read nothing past 4 MiB + 512 bytes from the start. The farthest is the last of the
/// LUKS2 secondary header offsets (4 MiB; the header is 4 KiB). The others near the start are
/// well inside: VMFS at 2 MiB, UDF anchors at 256 blocks (1 MiB with 4 KiB blocks, and read only
/// after a descriptor at 32 KiB), ZFS labels at 0 and 256 KiB, btrfs and GFS2 at 64 KiB,
/// ISO9660 and JFS at 32 KiB, swap at the end of a page of up to 64 KiB, ext4 at 1 KiB, XFS,
/// LUKS, LVM2 and partition tables in the first sectors. The libblkid of current util-linux
/// sources has no prober reaching farther. 64 KiB of margin covers the whole LUKS2 header and
/// leaves room for a bigger one.
pub const HEAD_BYTES: u64 = (4 << 20) + (64 << 10);

/// The end of a device that holds every signature blkid looks for from the end.
///
/// The farthest from the end blkid reads is Promise FastTrack RAID metadata 3087 sectors
/// (1.51 MiB) before it. The rest are closer: ZFS's two end labels in the last 768 KiB, the md
/// 0.90 superblock in the last 128 KiB, DDF within 257 sectors, NILFS2's backup superblock, md
/// 1.0, DRBD, the GPT backup header and the other firmware RAID formats in the last few sectors.
pub const TAIL_BYTES: u64 = 2 << 20;

/// The ranges [`reads_all_zero`] reads on a device of `size` bytes: the head and the tail.
/// When they meet, the head covers the whole device and the tail is empty.
pub fn checked_ranges(size: u64) -> [Range<u64>; 2] {
    if size <= HEAD_BYTES + TAIL_BYTES {
        return [0..size, size..size];
    }
    [0..HEAD_BYTES, size - TAIL_BYTES..size]
}

/// Bytes read at a time: large enough that a loop device serves each read as one request,
/// small enough to stay a short-lived allocation that goes back to the kernel when freed.
const CHUNK: usize = 256 << 10;

/// Whether every byte of `file` (a block device or an image of `size` bytes) in
/// [`checked_ranges`] is zero. `true` proves blkid would find nothing: none of the places it
/// reads can hold a byte of a signature, and a magic number of all zeros would match every
/// blank disk. `false` proves nothing; blkid must decide. Offsets and lengths are multiples of
/// 4 KiB except where the device ends, and the buffer is 4 KiB aligned, so `file` may be open
/// with `O_DIRECT`.
pub fn reads_all_zero(file: &File, size: u64) -> io::Result<bool> {
    const ALIGN: usize = 4096;
    let mut storage = vec![0u8; CHUNK + ALIGN];
    let skip = storage.as_ptr().align_offset(ALIGN);
    let buf = &mut storage[skip..skip + CHUNK];
    for range in checked_ranges(size) {
        // The tail starts on a 4 KiB boundary: a few more bytes read, an aligned direct read.
        let mut at = range.start / ALIGN as u64 * ALIGN as u64;
        while at < range.end {
            let want = (range.end - at).min(CHUNK as u64) as usize;
            let got = &mut buf[..want];
            file.read_exact_at(got, at)?;
            if !is_zero(got) {
                return Ok(false);
            }
            at += want as u64;
        }
    }
    Ok(true)
}

/// Word-at-a-time, which the compiler vectorises: a byte loop would cost more than the read.
fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    // Every piece is 16 bytes; the fallback (never taken) counts as data, failing closed.
    let whole = words.all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    whole && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A sparse image of `size` bytes with `bytes` written at `at`.
    fn image(dir: &tempfile::TempDir, size: u64, at: u64, bytes: &[u8]) -> File {
        let path = dir.path().join(format!("img-{size}-{at}"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        f.set_len(size).unwrap();
        if !bytes.is_empty() {
            f.write_all_at(bytes, at).unwrap();
        }
        f
    }

    #[test]
    fn ranges_cover_both_ends_and_small_devices_whole() {
        assert_eq!(checked_ranges(0), [0..0, 0..0]);
        assert_eq!(checked_ranges(MIB), [0..MIB, MIB..MIB]);
        // Exactly head plus tail: all of it, nothing skipped.
        let meet = HEAD_BYTES + TAIL_BYTES;
        assert_eq!(checked_ranges(meet), [0..meet, meet..meet]);
        assert_eq!(
            checked_ranges(meet + 1),
            [0..HEAD_BYTES, HEAD_BYTES + 1..meet + 1]
        );
        assert_eq!(
            checked_ranges(1 << 30),
            [0..HEAD_BYTES, (1 << 30) - TAIL_BYTES..1 << 30]
        );
    }

    #[test]
    fn any_byte_where_a_signature_can_live_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let gib = 1u64 << 30;
        let md090 = (gib & !(64 * 1024 - 1)) - 64 * 1024;
        // (what, device size, offset, bytes): bytes where blkid reads. The ext4, btrfs, VMFS,
        // LUKS2, md and Promise magics alone make blkid 2.38 report a signature.
        let cases: &[(&str, u64, u64, &[u8])] = &[
            ("xfs superblock", gib, 0, b"XFSB"),
            ("ext4 magic", gib, 1024 + 0x38, &[0x53, 0xef]),
            ("iso9660 descriptor", gib, 32 * 1024 + 1, b"CD001"),
            ("btrfs magic", gib, 64 * 1024 + 0x40, b"_BHRfS_M"),
            (
                "swap at the end of a 64 KiB page",
                gib,
                64 * 1024 - 10,
                b"SWAPSPACE2",
            ),
            ("vmfs volume", gib, MIB, &[0x0d, 0xd0, 0x01, 0xc0]),
            ("vmfs filesystem", gib, 2 * MIB, &[0x5e, 0xf1, 0xab, 0x2f]),
            (
                "luks2 secondary header at 4 MiB",
                gib,
                4 * MIB,
                b"SKUL\xba\xbe",
            ),
            (
                "last byte of a 4 KiB luks2 header at 4 MiB",
                gib,
                4 * MIB + 4095,
                &[1],
            ),
            ("zfs label 2", gib, gib - 512 * 1024 + 16 * 1024, &[1]),
            ("md 0.90 superblock", gib, md090, &[0xfc, 0x4e, 0x2b, 0xa9]),
            ("gpt backup header", gib, gib - 512, b"EFI PART"),
            (
                "promise raid, 3087 sectors before the end",
                gib,
                gib - 3087 * 512,
                b"Promise Technology, Inc.",
            ),
            ("last byte of the device", gib, gib - 1, &[1]),
            ("the middle of a device read whole", 6 * MIB, 3 * MIB, &[1]),
            (
                "odd-sized device, last byte",
                5 * MIB + 512,
                5 * MIB + 511,
                &[1],
            ),
        ];
        for (what, size, at, bytes) in cases {
            let f = image(&dir, *size, *at, bytes);
            assert!(
                !reads_all_zero(&f, *size).unwrap(),
                "{what} at {at} of {size} must not read as zero"
            );
        }
    }

    #[test]
    fn zero_only_when_every_checked_byte_is() {
        let dir = tempfile::tempdir().unwrap();
        let gib = 1u64 << 30;
        for size in [4096, MIB, HEAD_BYTES + TAIL_BYTES + 4096, gib] {
            assert!(
                reads_all_zero(&image(&dir, size, 0, &[]), size).unwrap(),
                "blank {size}"
            );
        }
        // The middle of a large device is not looked at: there blkid looks neither, so what
        // is there cannot make blkid report a signature.
        let f = image(&dir, gib, gib / 2, b"XFSB");
        assert!(reads_all_zero(&f, gib).unwrap());
        // Just outside each range: still zero; just inside: not.
        let f = image(&dir, gib, HEAD_BYTES, &[1]);
        assert!(reads_all_zero(&f, gib).unwrap());
        let f = image(&dir, gib, HEAD_BYTES - 1, &[1]);
        assert!(!reads_all_zero(&f, gib).unwrap());
        let f = image(&dir, gib, gib - TAIL_BYTES - 1, &[1]);
        assert!(reads_all_zero(&f, gib).unwrap());
        let f = image(&dir, gib, gib - TAIL_BYTES, &[1]);
        assert!(!reads_all_zero(&f, gib).unwrap());
    }

    #[test]
    fn a_short_read_is_an_error_not_blank() {
        // A device that claims more bytes than it can deliver must never pass as blank.
        let dir = tempfile::tempdir().unwrap();
        let f = image(&dir, MIB, 0, &[]);
        assert!(reads_all_zero(&f, 8 * MIB).is_err());
    }

    #[test]
    fn zero_test_finds_a_byte_anywhere_in_a_chunk() {
        for len in [1, 15, 16, 17, 4096, CHUNK] {
            for at in [0, len / 2, len - 1] {
                let mut v = vec![0u8; len];
                assert!(is_zero(&v));
                v[at] = 0x80;
                assert!(!is_zero(&v), "len {len} at {at}");
            }
        }
    }
}
