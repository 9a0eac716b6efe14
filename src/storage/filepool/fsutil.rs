//! Durable-file helpers for the file pool: atomic replacement of small files, cross-process
//! locks that stay correct when their lock file is removed, and content-free name hashing.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Error, Result};

/// Lower-case hex SHA-256 of `s`: turns arbitrary CSI names into safe file names.
pub fn hash_name(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("sync directory {}", dir.display()), e))
}

/// A unique temporary name beside `path`, hidden (leading dot) so listings skip it.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple());
    path.with_file_name(tmp)
}

/// Creates a fresh temporary file beside `path` and holds an exclusive flock(2) on it until the
/// returned file is dropped. A process killed mid-write leaves the file behind but not the lock,
/// which is how start-up garbage collection tells an abandoned temp file from one in use.
pub fn create_temp(path: &Path) -> std::io::Result<(File, PathBuf)> {
    let tmp = temp_path(path);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&tmp)?;
    flock_exclusive(&f)?;
    Ok((f, tmp))
}

/// Whether a file name is one [`temp_path`] made.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Removes a temp file if no live process holds its lock; true when it was removed.
pub fn remove_abandoned_temp(path: &Path) -> Result<bool> {
    use std::os::fd::AsRawFd;
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
    };
    // SAFETY: the fd is owned by `file` and open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        // Held by a writer that is alive, or interrupted: leave it.
        return Ok(false);
    }
    remove_if_exists(path)
}

/// Replaces `path` with `data` so that a crash leaves either the old or the new content:
/// temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_then_rename(path, data)?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

/// [`write_atomic`] without the fsync of the directory: the content is durable before the name
/// appears, so the file is never seen empty, but the rename is not durable yet. Only for pools
/// with one ordered metadata journal (ext4, XFS), and only in an operation that ends with an
/// fsync in the same pool before it answers: that fsync commits this rename with it.
pub fn write_then_rename(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = temp_path(path);
    let res = (|| {
        let (mut f, t) = create_temp(path)?;
        tmp = t;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("write {}", path.display()), e));
    }
    Ok(())
}

/// Replaces `path` with `data` using one fsync: temp file, rename, then fsync of the renamed
/// file. Only for filesystems with one ordered metadata journal (ext4, XFS), where that fsync
/// commits the rename and every earlier metadata change too. A crash before it returns may leave
/// `path` empty; readers must treat an empty file as absent.
pub fn write_ordered(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = temp_path(path);
    let res = (|| {
        let (mut f, t) = create_temp(path)?;
        tmp = t;
        f.write_all(data)?;
        std::fs::rename(&tmp, path)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(format!("write {}", path.display()), e));
    }
    Ok(())
}

/// Creates `path` with `data` only if it does not exist yet; returns false when another
/// writer got there first. Uses link(2) so the file never appears half-written.
pub fn create_atomic(path: &Path, data: &[u8]) -> Result<bool> {
    let mut tmp = temp_path(path);
    let res = (|| {
        let (mut f, t) = create_temp(path)?;
        tmp = t;
        f.write_all(data)?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    let created = res.map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))?;
    Ok(created)
}

/// Removes a file; a missing one is fine.
pub fn remove_if_exists(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// Reads a file; `None` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
    }
}

fn flock_exclusive(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: the fd is owned by `file` and stays open for the call; flock has no memory effects.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// An exclusive flock(2) on a lock file, shared by every process that uses the pool.
/// Held until dropped: closing the file releases the lock.
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    /// Blocks until the lock is ours. Lock files may be removed by their holder (see
    /// [`FileLock::remove`]); a waiter that then wins the lock on the unlinked inode notices that
    /// the path now names another file (or none) and tries again, so two processes can never
    /// both believe they hold the lock of one path.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| Error::io(format!("open lock {}", path.display()), e))?;
            flock_exclusive(&file).map_err(|e| Error::io(format!("lock {}", path.display()), e))?;
            let held = file
                .metadata()
                .map_err(|e| Error::io(format!("stat lock {}", path.display()), e))?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(FileLock {
                        file,
                        path: path.to_path_buf(),
                    })
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("stat lock {}", path.display()), e)),
            }
        }
    }

    /// Unlinks the lock file while still holding it, for objects that no longer exist.
    pub fn remove(self) -> Result<()> {
        remove_if_exists(&self.path)?;
        drop(self.file);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_hex() {
        let h = hash_name("pvc-1");
        assert_eq!(h.len(), 64);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(h, hash_name("pvc-1"));
        assert_ne!(h, hash_name("pvc-2"));
    }

    #[test]
    fn atomic_write_replaces_and_create_refuses_second_writer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        assert!(create_atomic(&p, b"one").unwrap());
        assert!(!create_atomic(&p, b"two").unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"three").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        // No temp files remain.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("rec.json")]);
    }

    #[test]
    fn only_unlocked_temp_files_count_as_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("rec.json");
        let (held, live) = create_temp(&target).unwrap();
        let name = live.file_name().unwrap().to_str().unwrap();
        assert!(is_temp_name(name), "{name}");
        assert!(!is_temp_name("rec.json"));
        assert!(
            !remove_abandoned_temp(&live).unwrap(),
            "a held temp file is in use"
        );
        assert!(live.exists());
        drop(held);
        assert!(remove_abandoned_temp(&live).unwrap());
        assert!(!live.exists());
        assert!(!remove_abandoned_temp(&live).unwrap());
    }

    #[test]
    fn lock_excludes_other_holders_and_survives_removal() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let inside = Arc::new(AtomicUsize::new(0));
        let max_seen = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (path, inside, max_seen) = (path.clone(), inside.clone(), max_seen.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let lock = FileLock::acquire(&path).unwrap();
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        max_seen.fetch_max(n, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        if i % 2 == 0 {
                            lock.remove().unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(max_seen.load(Ordering::SeqCst), 1);
    }
}
