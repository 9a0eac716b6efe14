//! A cheap look at an image for the filesystem its record names: two superblock magic numbers
//! read straight from the image file. No blkid, no device: the controller can afford it on every
//! ListVolumes and ControllerGetVolume, and it catches the case fail-closed staging refuses (a
//! volume that held a filesystem and now reads blank), so the CO hears of it before a pod does.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::host::signature::magic;
use crate::storage::Volume;

/// A message when the record says the volume holds a filesystem and the image has no trace of
/// it; `None` when it does, when the record names none, or when the image cannot be read (the
/// size check of `health` reports a missing image).
pub fn lost_filesystem(image: &Path, volume: &Volume) -> Option<String> {
    let fs = volume.filesystem.as_deref()?;
    let (offset, want) = magic(fs)?;
    let file = std::fs::File::open(image).ok()?;
    let mut got = vec![0u8; want.len()];
    file.read_exact_at(&mut got, offset).ok()?;
    (got != want).then(|| {
        format!(
            "volume {} recorded a {fs} filesystem but its image holds no {fs} signature: \
             data may be at risk",
            volume.id
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Timestamp;

    fn volume(fs: Option<&str>) -> Volume {
        Volume {
            id: "vol-00000000000000000000000000000001".into(),
            name: "n".into(),
            capacity_bytes: 1 << 20,
            capabilities: vec![],
            parameters: Default::default(),
            created: Timestamp::now(),
            attachments: Default::default(),
            filesystem: fs.map(str::to_string),
            used_as_block: false,
            formatting: None,
            source: None,
            needs_new_uuid: false,
            provisioning: Default::default(),
            pending_node_expansion: false,
        }
    }

    #[test]
    fn magic_numbers_decide() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        let write = |at: u64, bytes: &[u8]| {
            let f = std::fs::File::create(&image).unwrap();
            f.set_len(1 << 20).unwrap();
            f.write_all_at(bytes, at).unwrap();
        };
        write(1080, &[0x53, 0xef]);
        assert_eq!(lost_filesystem(&image, &volume(Some("ext4"))), None);
        assert!(lost_filesystem(&image, &volume(Some("xfs")))
            .unwrap()
            .contains("data may be at risk"));
        assert_eq!(lost_filesystem(&image, &volume(None)), None);
        write(0, b"XFSB");
        assert_eq!(lost_filesystem(&image, &volume(Some("xfs"))), None);
        assert!(lost_filesystem(&image, &volume(Some("ext4"))).is_some());
        // Unknown filesystems and missing images are left to other checks.
        assert_eq!(lost_filesystem(&image, &volume(Some("btrfs"))), None);
        assert_eq!(
            lost_filesystem(&dir.path().join("missing"), &volume(Some("ext4"))),
            None
        );
    }
}
