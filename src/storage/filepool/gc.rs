//! Start-up reconciliation of the pool: removes what a process killed between two steps left
//! behind, and only what is provably abandoned, because other live processes (the controller,
//! other nodes) share the pool:
//! - temp files whose writer is dead (a writer holds a flock on its temp file until the rename);
//! - interrupted creates: a name index whose volume never got a record. The create never
//!   returned, so no CO knows the id; checked under the name lock, so no create is in flight.
//!   The image goes first and the index last, so a crash here leaves the same state again;
//! - images with neither a record nor an index (a create rolled back above, then killed);
//! - lock files of volumes and names that no longer exist.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::{is_volume_id, read_json, FilePool, NameRecord};
use crate::storage::filepool::fsutil::{
    is_temp_name, remove_abandoned_temp, remove_if_exists, sync_dir,
};
use crate::storage::{Error, Result};

/// What one collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    pub temp_files: usize,
    pub interrupted_creates: usize,
    pub orphan_images: usize,
    pub stale_locks: usize,
}

impl Collected {
    pub fn is_empty(&self) -> bool {
        *self == Collected::default()
    }
}

fn file_names(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        if let Some(name) = entry.file_name().to_str() {
            out.push(name.to_string());
        }
    }
    out.sort();
    Ok(out)
}

impl FilePool {
    /// Runs every collection step and logs what it removed. Safe to run while other processes
    /// use the pool; meant for process start, when this process has nothing in flight.
    pub fn collect_garbage(&self) -> Result<Collected> {
        let mut c = Collected::default();
        self.collect_temp_files(&mut c)?;
        // Images are listed before the indexes are read: create writes the index before the
        // image, so an image of a create in flight in another process always has its index.
        let images = self.image_ids()?;
        self.collect_interrupted_creates(&mut c)?;
        self.collect_orphan_images(images, &mut c)?;
        self.collect_stale_locks(&mut c)?;
        if c.is_empty() {
            info!("pool reconciled: nothing to collect");
        } else {
            warn!(
                temp_files = c.temp_files,
                interrupted_creates = c.interrupted_creates,
                orphan_images = c.orphan_images,
                stale_locks = c.stale_locks,
                "pool reconciled: removed what interrupted operations left"
            );
        }
        Ok(c)
    }

    fn pool_dirs(&self) -> Vec<PathBuf> {
        [
            "",
            "volumes",
            "meta/volumes",
            "meta/names",
            "meta/nodes",
            "snapshots",
            "meta/snapshots",
            "meta/groups",
            "meta/groupnames",
        ]
        .iter()
        .map(|d| self.root.join(d))
        .collect()
    }

    fn collect_temp_files(&self, c: &mut Collected) -> Result<()> {
        for dir in self.pool_dirs() {
            let mut removed = false;
            for name in file_names(&dir)? {
                if is_temp_name(&name) && remove_abandoned_temp(&dir.join(&name))? {
                    c.temp_files += 1;
                    removed = true;
                }
            }
            if removed {
                sync_dir(&dir)?;
            }
        }
        Ok(())
    }

    fn image_ids(&self) -> Result<Vec<String>> {
        Ok(file_names(&self.root.join("volumes"))?
            .into_iter()
            .filter_map(|n| n.strip_suffix(".img").map(str::to_string))
            .filter(|id| is_volume_id(id))
            .collect())
    }

    /// Index hashes (file stems of `meta/names`).
    fn index_hashes(&self) -> Result<Vec<String>> {
        Ok(file_names(&self.root.join("meta/names"))?
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .collect())
    }

    fn read_index(&self, hash: &str) -> Result<Option<NameRecord>> {
        read_json(&self.root.join("meta/names").join(format!("{hash}.json")))
    }

    fn collect_interrupted_creates(&self, c: &mut Collected) -> Result<()> {
        for hash in self.index_hashes()? {
            let lock = self.lock("name", &hash)?;
            let Some(index) = self.read_index(&hash)? else {
                continue;
            };
            if !is_volume_id(&index.volume_id) || self.record(&index.volume_id).exists() {
                continue;
            }
            remove_if_exists(&self.image(&index.volume_id))?;
            sync_dir(&self.root.join("volumes"))?;
            remove_if_exists(&self.root.join("meta/names").join(format!("{hash}.json")))?;
            sync_dir(&self.root.join("meta/names"))?;
            lock.remove()?;
            info!(volume_id = %index.volume_id, "rolled back a create that never finished");
            c.interrupted_creates += 1;
        }
        Ok(())
    }

    fn collect_orphan_images(&self, images: Vec<String>, c: &mut Collected) -> Result<()> {
        let mut indexed = HashSet::new();
        for hash in self.index_hashes()? {
            if let Some(index) = self.read_index(&hash)? {
                indexed.insert(index.volume_id);
            }
        }
        for id in images.into_iter().filter(|id| !indexed.contains(id)) {
            let lock = self.lock("volume", &id)?;
            if self.record(&id).exists() {
                continue;
            }
            if remove_if_exists(&self.image(&id))? {
                sync_dir(&self.root.join("volumes"))?;
                info!(volume_id = %id, "removed an image without a record");
                c.orphan_images += 1;
            }
            lock.remove()?;
        }
        Ok(())
    }

    fn collect_stale_locks(&self, c: &mut Collected) -> Result<()> {
        for name in file_names(&self.root.join("locks"))? {
            let Some(stem) = name.strip_suffix(".lock") else {
                continue;
            };
            let stale = if let Some(id) = stem.strip_prefix("volume-") {
                is_volume_id(id) && {
                    let lock = self.lock("volume", id)?;
                    let gone = !self.record(id).exists();
                    if gone {
                        lock.remove()?;
                    }
                    gone
                }
            } else if let Some(hash) = stem.strip_prefix("name-") {
                hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) && {
                    let lock = self.lock("name", hash)?;
                    let gone = self.read_index(hash)?.is_none();
                    if gone {
                        lock.remove()?;
                    }
                    gone
                }
            } else {
                false
            };
            if stale {
                c.stale_locks += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::filepool::fsutil::{create_temp, hash_name, write_atomic};
    use crate::storage::{AccessMode, AccessType, BlockStorage, Capability, NewVolume};

    fn req(name: &str) -> NewVolume {
        NewVolume {
            name: name.into(),
            required_bytes: 1 << 20,
            limit_bytes: 0,
            min_bytes: 0,
            capabilities: vec![Capability {
                access: AccessType::Mount {
                    fs_type: None,
                    mount_flags: vec![],
                },
                mode: AccessMode::SingleNodeWriter,
            }],
            parameters: Default::default(),
            source: None,
            provisioning: Default::default(),
        }
    }

    fn listing(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for d in ["", "volumes", "meta/volumes", "meta/names", "locks"] {
            for n in file_names(&root.join(d)).unwrap() {
                if root.join(d).join(&n).is_file() {
                    out.push(format!("{d}/{n}"));
                }
            }
        }
        out
    }

    #[test]
    fn collects_what_crashes_leave_and_keeps_live_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let pool = FilePool::open(dir.path()).unwrap();
        let live = pool.create_volume(&req("live")).unwrap();
        let clean = listing(dir.path());

        // A create killed after its index (and image): never handed out.
        let lost = "vol-000000000000000000000000000000aa";
        let index = NameRecord {
            name: "lost".into(),
            volume_id: lost.into(),
        };
        write_atomic(
            &pool.name_index("lost"),
            &super::super::to_json(&index).unwrap(),
        )
        .unwrap();
        std::fs::write(pool.image(lost), b"").unwrap();
        // An image with neither record nor index.
        std::fs::write(pool.image("vol-000000000000000000000000000000bb"), b"").unwrap();
        // Temp files of a dead writer, beside records and images.
        for target in [pool.record(&live.id), pool.image(&live.id)] {
            let (f, _) = create_temp(&target).unwrap();
            drop(f);
        }
        // A lock file of a volume that does not exist (a detach of a deleted volume).
        drop(
            pool.lock("volume", "vol-000000000000000000000000000000cc")
                .unwrap(),
        );
        drop(pool.lock("name", &hash_name("gone")).unwrap());
        // A temp file whose writer is alive stays.
        let (held, held_path) =
            create_temp(&pool.record("vol-000000000000000000000000000000dd")).unwrap();

        let c = pool.collect_garbage().unwrap();
        assert_eq!(
            c,
            Collected {
                temp_files: 2,
                interrupted_creates: 1,
                orphan_images: 1,
                stale_locks: 2,
            }
        );
        assert!(held_path.exists());
        drop(held);
        std::fs::remove_file(&held_path).unwrap();
        let mut want = clean;
        // Locks of the rolled-back create are gone too; the live volume's remain.
        want.retain(|p| !p.contains(".tmp-"));
        let mut got = listing(dir.path());
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(pool.volume(&live.id).unwrap(), live);
        // The interrupted name is free again and a second collection finds nothing.
        pool.create_volume(&req("lost")).unwrap();
        assert!(pool.collect_garbage().unwrap().is_empty());
    }
}
