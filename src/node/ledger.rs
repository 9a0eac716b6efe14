//! The ledger: what the node remembers of each volume across restarts, reboots and lost devices
//! (whether it held a filesystem, was used raw, or had a format under way), which the format
//! decision needs because a probe alone cannot tell a new volume from a wiped one.
//! [`LocalLedger`] keeps it in node-local files; the file pool keeps it in its own records
//! (`storage::filepool::ledger::PoolLedger`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::format::Past;
use crate::error::{Error, Result};
use crate::host::FsType;
use crate::storage::filepool::fsutil::{read_optional, sync_dir, write_atomic};

/// What the ledger knows of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub past: Past,
    /// A restored or cloned filesystem still carries its origin's UUID.
    pub needs_new_uuid: bool,
    /// The volume grew since a node last grew its filesystem.
    pub pending_node_expansion: bool,
}

/// The node's durable memory of volumes. Every write is durable before it returns: stage
/// records `Formatting` before mkfs and `RawBlock` before handing the device out, and the
/// format decision is only fail-closed if those records survive a crash.
///
/// The past only moves forward: `Formatting` is kept only while no filesystem is recorded, the
/// first `Filesystem` wins, and `RawBlock` is never forgotten. Callers hold the node's
/// per-volume guard, so one volume has one writer at a time.
pub trait Ledger: Send + Sync {
    fn get(&self, volume_id: &str) -> Result<Memory>;
    fn set(&self, volume_id: &str, past: Past) -> Result<()>;
    /// The copied filesystem got its own UUID.
    fn new_uuid_done(&self, volume_id: &str) -> Result<()>;
    /// The filesystem was grown to the device's size.
    fn node_expanded(&self, volume_id: &str) -> Result<()>;
}

/// One volume's record, as [`LocalLedger`] stores it. The flags are independent (a volume can
/// have held a filesystem and later been used raw); [`Entry::past`] says which one rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FsType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatting: Option<FsType>,
    #[serde(default)]
    pub used_as_block: bool,
}

impl Entry {
    /// A recorded filesystem rules (a blank device then means lost data), then raw use, then
    /// an unfinished format.
    pub fn past(&self) -> Past {
        match (self.filesystem, self.used_as_block, self.formatting) {
            (Some(fs), _, _) => Past::Filesystem(fs),
            (None, true, _) => Past::RawBlock,
            (None, false, Some(fs)) => Past::Formatting(fs),
            (None, false, None) => Past::Unused,
        }
    }

    /// Applies `past` by the forward-only rules; false when nothing changed.
    pub fn apply(&mut self, past: Past) -> bool {
        match past {
            Past::Unused => false,
            Past::Formatting(fs) => {
                let changed = self.filesystem.is_none() && self.formatting != Some(fs);
                if changed {
                    self.formatting = Some(fs);
                }
                changed
            }
            Past::Filesystem(fs) => {
                let changed = self.filesystem.is_none();
                if changed {
                    self.filesystem = Some(fs);
                }
                changed
            }
            Past::RawBlock => !std::mem::replace(&mut self.used_as_block, true),
        }
    }
}

/// A ledger of one fsynced JSON file per volume in a node-local directory, for backends whose
/// node cannot write the controller's store. It survives restarts and reboots of this node,
/// not the loss of its disk, and another node does not see it: a volume that moves between
/// nodes relies on the publish context's grant for what this node never saw.
pub struct LocalLedger {
    dir: PathBuf,
}

impl LocalLedger {
    pub fn open(dir: &Path) -> Result<LocalLedger> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Internal(format!("create {}: {e}", dir.display())))?;
        sync_dir(dir.parent().unwrap_or(Path::new("/")))?;
        Ok(LocalLedger {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, volume_id: &str) -> Result<PathBuf> {
        let b = volume_id.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c));
        if !ok {
            return Err(Error::NotFound(format!("volume {volume_id:?}")));
        }
        Ok(self.dir.join(format!("{volume_id}.json")))
    }

    fn load(&self, volume_id: &str) -> Result<Entry> {
        let path = self.path(volume_id)?;
        match read_optional(&path)? {
            None => Ok(Entry::default()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                // Guessing would be unsafe: an unreadable entry could be the one that says
                // "this volume holds a filesystem".
                Error::Internal(format!("corrupt ledger entry {}: {e}", path.display()))
            }),
        }
    }
}

impl Ledger for LocalLedger {
    fn get(&self, volume_id: &str) -> Result<Memory> {
        Ok(Memory {
            past: self.load(volume_id)?.past(),
            needs_new_uuid: false,
            pending_node_expansion: false,
        })
    }

    fn set(&self, volume_id: &str, past: Past) -> Result<()> {
        let mut entry = self.load(volume_id)?;
        if entry.apply(past) {
            let bytes = serde_json::to_vec_pretty(&entry)
                .map_err(|e| Error::Internal(format!("encode ledger entry: {e}")))?;
            write_atomic(&self.path(volume_id)?, &bytes)?;
        }
        Ok(())
    }

    // Copies and expansions are the controller's news; a node with only a local ledger never
    // hears of them, so there is nothing to clear.
    fn new_uuid_done(&self, _volume_id: &str) -> Result<()> {
        Ok(())
    }

    fn node_expanded(&self, _volume_id: &str) -> Result<()> {
        Ok(())
    }
}

/// An in-memory ledger for tests, with the controller-side flags settable.
#[cfg(test)]
#[derive(Default)]
pub struct MemLedger {
    entries: std::sync::Mutex<std::collections::HashMap<String, (Entry, bool, bool)>>,
}

#[cfg(test)]
impl MemLedger {
    pub fn set_needs_new_uuid(&self, id: &str) {
        self.entries.lock().unwrap().entry(id.into()).or_default().1 = true;
    }
    pub fn set_pending_expansion(&self, id: &str) {
        self.entries.lock().unwrap().entry(id.into()).or_default().2 = true;
    }
}

#[cfg(test)]
impl Ledger for MemLedger {
    fn get(&self, volume_id: &str) -> Result<Memory> {
        let m = self.entries.lock().unwrap();
        let (e, uuid, grow) = m.get(volume_id).cloned().unwrap_or_default();
        Ok(Memory {
            past: e.past(),
            needs_new_uuid: uuid,
            pending_node_expansion: grow,
        })
    }
    fn set(&self, volume_id: &str, past: Past) -> Result<()> {
        let mut m = self.entries.lock().unwrap();
        m.entry(volume_id.into()).or_default().0.apply(past);
        Ok(())
    }
    fn new_uuid_done(&self, volume_id: &str) -> Result<()> {
        self.entries
            .lock()
            .unwrap()
            .entry(volume_id.into())
            .or_default()
            .1 = false;
        Ok(())
    }
    fn node_expanded(&self, volume_id: &str) -> Result<()> {
        self.entries
            .lock()
            .unwrap()
            .entry(volume_id.into())
            .or_default()
            .2 = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FsType::{Ext4, Xfs};

    #[test]
    fn the_past_only_moves_forward() {
        // (steps applied in order, the past after them)
        let cases: Vec<(Vec<Past>, Past)> = vec![
            (vec![], Past::Unused),
            (vec![Past::Formatting(Ext4)], Past::Formatting(Ext4)),
            (
                vec![Past::Formatting(Ext4), Past::Formatting(Xfs)],
                Past::Formatting(Xfs),
            ),
            (
                vec![Past::Formatting(Ext4), Past::Filesystem(Ext4)],
                Past::Filesystem(Ext4),
            ),
            (
                vec![Past::Filesystem(Ext4), Past::Formatting(Xfs)],
                Past::Filesystem(Ext4),
            ),
            (
                vec![Past::Filesystem(Xfs), Past::Filesystem(Ext4)],
                Past::Filesystem(Xfs),
            ),
            (vec![Past::RawBlock, Past::Unused], Past::RawBlock),
            (vec![Past::RawBlock, Past::Formatting(Ext4)], Past::RawBlock),
            (
                vec![Past::Filesystem(Ext4), Past::RawBlock],
                Past::Filesystem(Ext4),
            ),
            (
                vec![Past::RawBlock, Past::Filesystem(Ext4)],
                Past::Filesystem(Ext4),
            ),
        ];
        for (steps, want) in cases {
            let mut e = Entry::default();
            for s in &steps {
                e.apply(*s);
            }
            assert_eq!(e.past(), want, "{steps:?}");
        }
    }

    #[test]
    fn local_ledger_survives_reopening_and_refuses_bad_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let l = LocalLedger::open(&path).unwrap();
        let id = "vol-0123";
        assert_eq!(l.get(id).unwrap().past, Past::Unused);
        l.set(id, Past::Formatting(Xfs)).unwrap();
        l.set(id, Past::Filesystem(Xfs)).unwrap();
        l.set("other", Past::RawBlock).unwrap();
        drop(l);
        let l = LocalLedger::open(&path).unwrap();
        assert_eq!(l.get(id).unwrap().past, Past::Filesystem(Xfs));
        assert_eq!(l.get("other").unwrap().past, Past::RawBlock);
        let m = l.get(id).unwrap();
        assert!(!m.needs_new_uuid && !m.pending_node_expansion);
        for bad in ["", "../x", "a/b", ".hidden", "nul\0", &"v".repeat(129)] {
            assert!(
                matches!(l.get(bad), Err(Error::NotFound(_))),
                "{bad:?} must not name a file"
            );
            assert!(l.set(bad, Past::RawBlock).is_err());
        }
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["other.json", "vol-0123.json"]);
    }

    #[test]
    fn a_corrupt_entry_is_an_error_not_a_new_volume() {
        let dir = tempfile::tempdir().unwrap();
        let l = LocalLedger::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("v.json"), b"{not json").unwrap();
        assert!(matches!(l.get("v"), Err(Error::Internal(_))));
        assert!(l.set("v", Past::Formatting(Ext4)).is_err());
    }
}
