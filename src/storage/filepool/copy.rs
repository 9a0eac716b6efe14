//! Image copies for snapshots, restores and clones. A reflink (FICLONE) shares the source's
//! extents in O(1) on filesystems that can (XFS with reflink=1, btrfs); elsewhere the data
//! extents are copied (SEEK_DATA/SEEK_HOLE), so holes stay holes. Copies always land under a
//! temporary name first; callers rename them into place only when complete.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Reflink,
    DataCopy,
}

/// Which methods a copy may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reflink when the filesystem supports it, data copy otherwise.
    Auto,
    /// Always copy the data (the fallback path, for measurement and tests).
    DataCopyOnly,
}

/// `_IOW(0x94, 9, int)` from linux/fs.h.
const FICLONE: libc::c_ulong = 0x4004_9409;
const CHUNK: usize = 1 << 20;

/// Copies `src` to the new file `dst` (which must not exist) and returns how. Durability is the
/// caller's choice (a data copy needs an fsync of `dst`; a reflink on an ordered journal is
/// committed by any later fsync in the pool). On error `dst` is removed.
pub fn copy_file(src: &Path, dst: &Path, mode: Mode) -> io::Result<Method> {
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    let res = copy_into(src, &output, mode);
    if res.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    res
}

/// Copies `src` into the empty, open file `output` (a temp file the caller owns and removes on
/// error) and returns how.
pub fn copy_into(src: &Path, output: &File, mode: Mode) -> io::Result<Method> {
    let input = File::open(src)?;
    copy_open(&input, output, mode)
}

fn copy_open(input: &File, output: &File, mode: Mode) -> io::Result<Method> {
    if mode == Mode::Auto {
        // SAFETY: both fds are open for the duration of the call; FICLONE reads only the int
        // argument (the source fd) and has no memory effects on our side.
        let rc = unsafe { libc::ioctl(output.as_raw_fd(), FICLONE as _, input.as_raw_fd()) };
        if rc == 0 {
            return Ok(Method::Reflink);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Not supported here, across filesystems, or not for this file: copy instead.
            Some(libc::EOPNOTSUPP)
            | Some(libc::ENOTTY)
            | Some(libc::EXDEV)
            | Some(libc::EINVAL)
            | Some(libc::ENOSYS) => {}
            _ => return Err(err),
        }
    }
    copy_data(input, output)?;
    Ok(Method::DataCopy)
}

/// Copies only the data extents; all-zero chunks are skipped too, so the copy is at most as
/// allocated as the source.
fn copy_data(input: &File, output: &File) -> io::Result<()> {
    let len = input.metadata()?.len();
    output.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    let mut pos: u64 = 0;
    while pos < len {
        let Some(start) = seek(input, pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(input, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            input.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|&b| b != 0) {
                output.write_all_at(&buf[..n], off)?;
            }
            off += n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` when there is no more data (ENXIO).
fn seek(f: &File, from: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an owned, open fd; no memory is passed.
    let rc = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        return Ok(None);
    }
    Err(err)
}

/// Reserves every byte of `[from, to)` in `f` (thick provisioning).
pub fn reserve(f: &File, from: u64, to: u64) -> io::Result<()> {
    if to <= from {
        return Ok(());
    }
    // SAFETY: fallocate on an owned, open fd; mode 0 allocates and extends nothing beyond `to`.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            0,
            from as libc::off_t,
            (to - from) as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn data_copy_keeps_contents_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&vec![9u8; 3 << 20], 40 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        f.sync_all().unwrap();
        for mode in [Mode::Auto, Mode::DataCopyOnly] {
            let dst = dir.path().join(format!("dst-{mode:?}"));
            let method = copy_file(&src, &dst, mode).unwrap();
            if mode == Mode::DataCopyOnly {
                assert_eq!(method, Method::DataCopy);
            }
            assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
            // Holes preserved: far less allocated than the apparent size.
            let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
            assert!(blocks < 16 << 20, "{mode:?}: {blocks} bytes allocated");
        }
        assert!(
            copy_file(&src, &dir.path().join("dst-Auto"), Mode::Auto).is_err(),
            "never overwrites"
        );
    }

    #[test]
    fn reserve_allocates_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("x")).unwrap();
        f.set_len(8 << 20).unwrap();
        reserve(&f, 0, 8 << 20).unwrap();
        assert!(f.metadata().unwrap().blocks() * 512 >= 8 << 20);
    }
}
