//! The file pool's ledger: the node's memory of a volume kept in the volume's own pool record,
//! next to what the controller writes there. Controller and node processes share the record
//! under its lock, so the node's history survives the node itself and follows the volume to
//! any node, and the controller sees it (health, ControllerGetVolume).

use std::sync::Arc;

use super::FilePool;
use crate::error::{Error, Result};
use crate::host::FsType;
use crate::node::format::Past;
use crate::node::ledger::{Ledger, Memory};
use crate::storage::{BlockStorage, Volume};

pub struct PoolLedger {
    pool: Arc<FilePool>,
}

impl PoolLedger {
    pub fn new(pool: Arc<FilePool>) -> PoolLedger {
        PoolLedger { pool }
    }
}

fn fs(volume: &Volume, name: &str) -> Result<FsType> {
    // Only nodes write these names, and only ones they can make: anything else is a damaged
    // record, which must not read as "never held a filesystem".
    FsType::parse(name).ok_or_else(|| {
        Error::Internal(format!(
            "volume {} records an unknown filesystem {name:?}",
            volume.id
        ))
    })
}

/// The record's independent flags as one past; a recorded filesystem rules, as in
/// `node::ledger::Entry::past`.
fn past(v: &Volume) -> Result<Past> {
    Ok(match (&v.filesystem, v.used_as_block, &v.formatting) {
        (Some(f), _, _) => Past::Filesystem(fs(v, f)?),
        (None, true, _) => Past::RawBlock,
        (None, false, Some(f)) => Past::Formatting(fs(v, f)?),
        (None, false, None) => Past::Unused,
    })
}

impl Ledger for PoolLedger {
    fn get(&self, volume_id: &str) -> Result<Memory> {
        let v = self.pool.volume(volume_id)?;
        Ok(Memory {
            past: past(&v)?,
            needs_new_uuid: v.needs_new_uuid,
            pending_node_expansion: v.pending_node_expansion,
        })
    }

    /// Each record method applies the forward-only rule under the record's lock.
    fn set(&self, volume_id: &str, past: Past) -> Result<()> {
        match past {
            Past::Unused => {}
            Past::Formatting(f) => {
                self.pool.record_formatting(volume_id, f.as_str())?;
            }
            Past::Filesystem(f) => {
                self.pool.record_filesystem(volume_id, f.as_str())?;
            }
            Past::RawBlock => {
                self.pool.record_block_use(volume_id)?;
            }
        }
        Ok(())
    }

    fn new_uuid_done(&self, volume_id: &str) -> Result<()> {
        self.pool.record_new_uuid(volume_id)?;
        Ok(())
    }

    fn node_expanded(&self, volume_id: &str) -> Result<()> {
        self.pool.record_node_expanded(volume_id)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::ledger::Entry;
    use crate::storage::NewVolume;
    use FsType::{Ext4, Xfs};

    /// The pool's records follow the same forward-only rules as the node-local entries.
    #[test]
    fn pool_records_move_the_past_as_local_entries_do() {
        let steps: Vec<Vec<Past>> = vec![
            vec![],
            vec![Past::Formatting(Ext4)],
            vec![Past::Formatting(Ext4), Past::Formatting(Xfs)],
            vec![Past::Formatting(Xfs), Past::Filesystem(Xfs)],
            vec![Past::Filesystem(Ext4), Past::Formatting(Xfs)],
            vec![Past::Filesystem(Xfs), Past::Filesystem(Ext4)],
            vec![Past::RawBlock, Past::Formatting(Ext4)],
            vec![Past::Filesystem(Ext4), Past::RawBlock],
            vec![Past::RawBlock, Past::Filesystem(Ext4)],
        ];
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(FilePool::open(dir.path()).unwrap());
        let ledger = PoolLedger::new(pool.clone());
        for (i, steps) in steps.into_iter().enumerate() {
            let v = pool
                .create_volume(&NewVolume {
                    name: format!("v{i}"),
                    required_bytes: 1 << 20,
                    limit_bytes: 0,
                    min_bytes: 0,
                    capabilities: vec![],
                    parameters: Default::default(),
                    source: None,
                    provisioning: Default::default(),
                })
                .unwrap();
            let mut entry = Entry::default();
            for s in &steps {
                ledger.set(&v.id, *s).unwrap();
                entry.apply(*s);
            }
            assert_eq!(ledger.get(&v.id).unwrap().past, entry.past(), "{steps:?}");
        }
        assert!(matches!(
            ledger.get("vol-00000000000000000000000000000000"),
            Err(Error::NotFound(_))
        ));
    }
}
