//! Controller logic: provisioning, publication records, listing and capacity, on top of a
//! [`BlockStorage`]. Inputs are validated domain values; the gRPC adapter lives in `csi::controller`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::storage::filepool::{is_snapshot_id, is_volume_id, round_size};
use crate::storage::{
    Attachment, BlockStorage, Capability, Capacity, GroupSnapshot, Health, NewVolume, Provisioning,
    Snapshot, Volume, VolumeSource,
};
use crate::support::guard::OpGuards;
use crate::TOPOLOGY_KEY;

/// A topology segment set, as CSI carries it.
pub type Segments = BTreeMap<String, String>;

/// XFS refuses filesystems smaller than this (xfsprogs 5.19 and later).
pub const XFS_MIN_BYTES: u64 = 300 << 20;

pub struct CreateRequest {
    pub volume: NewVolume,
    pub requisite: Vec<Segments>,
    pub preferred: Vec<Segments>,
}

pub struct Controller {
    backend: Arc<dyn BlockStorage>,
    guards: OpGuards,
}

/// One page of ListVolumes.
pub struct Page {
    pub entries: Vec<(Volume, Health)>,
    pub next_token: String,
}

impl Controller {
    pub fn new(backend: Arc<dyn BlockStorage>) -> Controller {
        Controller {
            backend,
            guards: OpGuards::default(),
        }
    }

    pub fn backend(&self) -> &dyn BlockStorage {
        &*self.backend
    }

    /// The topology of every volume of this pool.
    pub fn topology(&self) -> Segments {
        Segments::from([(TOPOLOGY_KEY.to_string(), self.backend.pool_id().to_string())])
    }

    /// A segment set is ours when every key it names is one we know and matches.
    fn reachable(&self, segments: &Segments) -> bool {
        let ours = self.topology();
        segments.iter().all(|(k, v)| ours.get(k) == Some(v))
    }

    pub fn create_volume(&self, mut req: CreateRequest) -> Result<Volume> {
        let _guard = self.guards.acquire(&format!("name {}", req.volume.name))?;
        // A clone reads its source: no expansion or deletion of it may run meanwhile.
        let _source_guard = match &req.volume.source {
            Some(VolumeSource::Volume(v)) => Some(self.guards.acquire(v)?),
            _ => None,
        };
        if !req.requisite.is_empty() && !req.requisite.iter().any(|s| self.reachable(s)) {
            return Err(Error::ResourceExhausted(format!(
                "no requisite topology is reachable from pool {}",
                self.backend.pool_id()
            )));
        }
        // Preferred topologies only rank choices; with one pool there is nothing to rank.
        let _ = &req.preferred;
        if req
            .volume
            .capabilities
            .iter()
            .any(|c| c.fs_type() == Some("xfs"))
        {
            req.volume.min_bytes = req.volume.min_bytes.max(XFS_MIN_BYTES);
        }
        Ok(self.backend.create_volume(&req.volume)?)
    }

    /// Deletes a volume; an unknown or malformed id is already deleted.
    pub fn delete_volume(&self, id: &str) -> Result<()> {
        let _guard = self.guards.acquire(id)?;
        match self.backend.delete_volume(id) {
            Ok(()) | Err(crate::storage::Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn publish(
        &self,
        id: &str,
        node: &str,
        capability: Capability,
        read_only: bool,
    ) -> Result<Volume> {
        let _guard = self.guards.acquire(id)?;
        let volume = self.backend.volume(id)?;
        check_fits(&volume, &capability)?;
        let attachment = Attachment {
            read_only,
            capability,
        };
        Ok(self.backend.attach(id, node, &attachment)?)
    }

    /// Removes a publication; an empty `node` removes it from every node, as the spec allows.
    pub fn unpublish(&self, id: &str, node: &str) -> Result<()> {
        let _guard = self.guards.acquire(id)?;
        if node.is_empty() {
            let volume = match self.backend.volume(id) {
                Ok(v) => v,
                Err(crate::storage::Error::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            for n in volume.attachments.keys() {
                self.backend.detach(id, n)?;
            }
            return Ok(());
        }
        Ok(self.backend.detach(id, node)?)
    }

    pub fn volume(&self, id: &str) -> Result<(Volume, Health)> {
        let volume = self.backend.volume(id)?;
        let health = self.backend.health(&volume);
        Ok((volume, health))
    }

    /// A page of volumes after `start` (an opaque token that is the last id of the previous
    /// page), so that volumes created or deleted between pages are neither skipped nor repeated.
    pub fn list_volumes(&self, max_entries: usize, start: &str) -> Result<Page> {
        let after = decode_after(start, is_volume_id)?;
        let rest = self
            .backend
            .volumes()?
            .into_iter()
            .filter(|v| after.as_ref().is_none_or(|a| v.id.as_str() > a.as_str()));
        let (volumes, next_token) = page(rest, max_entries, |v| &v.id);
        let entries = volumes
            .into_iter()
            .map(|v| {
                let h = self.backend.health(&v);
                (v, h)
            })
            .collect();
        Ok(Page {
            entries,
            next_token,
        })
    }

    /// Grows a volume to the requested size, exactly (whole MiB). Returns the volume and whether
    /// a node must act (refresh the loop device, grow the filesystem).
    pub fn expand(&self, id: &str, required: u64, limit: u64) -> Result<(Volume, bool)> {
        let _guard = self.guards.acquire(id)?;
        let current = self.backend.volume(id)?;
        let wanted = round_size(required, limit, 0)?;
        if limit != 0 && current.capacity_bytes > limit {
            return Err(Error::OutOfRange(format!(
                "volume {id} already has {} bytes, above the limit of {limit}; volumes never shrink",
                current.capacity_bytes
            )));
        }
        let volume = self.backend.expand_volume(id, wanted)?;
        // A block volume nobody has attached picks its new size up at the next attach; every
        // other case needs the node (loop capacity, filesystem growth).
        let node_needed = !(volume.attachments.is_empty()
            && volume.capabilities.iter().all(Capability::is_block));
        Ok((volume, node_needed))
    }

    /// Applies mutable parameters (already validated); unknown volumes are NOT_FOUND.
    pub fn modify(&self, id: &str, provisioning: Option<Provisioning>) -> Result<Volume> {
        let _guard = self.guards.acquire(id)?;
        let volume = self.backend.volume(id)?;
        match provisioning {
            Some(p) => Ok(self.backend.set_provisioning(id, p)?),
            None => Ok(volume),
        }
    }

    pub fn create_snapshot(&self, name: &str, source_volume_id: &str) -> Result<Snapshot> {
        let _guard = self.guards.acquire(&format!("snapshot name {name}"))?;
        let _source = self.guards.acquire(source_volume_id)?;
        Ok(self.backend.create_snapshot(name, source_volume_id)?)
    }

    /// Deletes a snapshot; an unknown or malformed id is already deleted.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        let _guard = self.guards.acquire(id)?;
        match self.backend.delete_snapshot(id) {
            Ok(()) | Err(crate::storage::Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn snapshot(&self, id: &str) -> Result<Snapshot> {
        Ok(self.backend.snapshot(id)?)
    }

    /// A page of snapshots, optionally only one id or one source volume; unknown filters give
    /// an empty page.
    pub fn list_snapshots(
        &self,
        max_entries: usize,
        start: &str,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<(Vec<Snapshot>, String)> {
        let after = decode_after(start, is_snapshot_id)?;
        let all = if !snapshot_id.is_empty() {
            self.backend
                .snapshot(snapshot_id)
                .ok()
                .into_iter()
                .collect()
        } else {
            self.backend.snapshots()?
        };
        let matching = all.into_iter().filter(|s| {
            (source_volume_id.is_empty() || s.source_volume_id == source_volume_id)
                && after.as_ref().is_none_or(|a| s.id.as_str() > a.as_str())
        });
        Ok(page(matching, max_entries, |s| &s.id))
    }

    pub fn create_group_snapshot(
        &self,
        name: &str,
        volume_ids: &[String],
    ) -> Result<GroupSnapshot> {
        let _guard = self.guards.acquire(&format!("group name {name}"))?;
        let mut sources = Vec::new();
        for v in volume_ids {
            sources.push(self.guards.acquire(v)?);
        }
        Ok(self.backend.create_group_snapshot(name, volume_ids)?)
    }

    /// The group and its member snapshots.
    pub fn group_snapshot(&self, id: &str) -> Result<(GroupSnapshot, Vec<Snapshot>)> {
        let group = self.backend.group_snapshot(id)?;
        let members = group
            .snapshot_ids
            .iter()
            .map(|s| self.backend.snapshot(s))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((group, members))
    }

    /// Deletes a group snapshot with its members; an unknown id is already deleted.
    pub fn delete_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<()> {
        let _guard = self.guards.acquire(id)?;
        let group = match self.backend.group_snapshot(id) {
            Ok(g) => g,
            Err(crate::storage::Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if !snapshot_ids.is_empty() {
            let mut given = snapshot_ids.to_vec();
            let mut have = group.snapshot_ids.clone();
            given.sort();
            have.sort();
            if given != have {
                return Err(Error::InvalidArgument(format!(
                    "snapshot_ids do not match the members of group snapshot {id}"
                )));
            }
        }
        match self.backend.delete_group_snapshot(id) {
            Ok(()) | Err(crate::storage::Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Free capacity for the given topology (zero for a topology this pool is not in).
    pub fn capacity(&self, topology: Option<&Segments>) -> Result<Capacity> {
        let cap = self.backend.capacity()?;
        if topology.is_some_and(|t| !self.reachable(t)) {
            return Ok(Capacity {
                available_bytes: 0,
                max_volume_bytes: 0,
                ..cap
            });
        }
        Ok(cap)
    }
}

/// A capability fits a volume when its kind (block or filesystem) is one the volume was created
/// for, and a named filesystem does not contradict the one the volume holds.
pub fn check_fits(volume: &Volume, cap: &Capability) -> Result<()> {
    let same_kind = volume
        .capabilities
        .iter()
        .any(|c| c.is_block() == cap.is_block());
    if !same_kind {
        let kind = if cap.is_block() {
            "block"
        } else {
            "filesystem"
        };
        return Err(Error::InvalidArgument(format!(
            "volume {} was not created for {kind} access",
            volume.id
        )));
    }
    if let (Some(want), Some(have)) = (cap.fs_type(), volume.filesystem.as_deref()) {
        if want != have {
            return Err(Error::InvalidArgument(format!(
                "volume {} holds {have}, not {want}",
                volume.id
            )));
        }
    }
    Ok(())
}

/// Page tokens name the last id of the previous page: ids are ordered, so items created or
/// deleted between calls are neither skipped nor repeated.
const TOKEN_PREFIX: &str = "after:";

fn decode_after(token: &str, valid: fn(&str) -> bool) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(TOKEN_PREFIX)
        .filter(|id| valid(id))
        .map(|id| Some(id.to_string()))
        .ok_or_else(|| {
            Error::Aborted(format!(
                "starting_token {token:?} is not a token this driver issued"
            ))
        })
}

/// Takes up to `max` items (0 = all) and the token for the rest.
fn page<T>(items: impl Iterator<Item = T>, max: usize, id: fn(&T) -> &String) -> (Vec<T>, String) {
    let limit = if max == 0 { usize::MAX } else { max };
    let mut out = Vec::new();
    let mut more = false;
    for item in items {
        if out.len() == limit {
            more = true;
            break;
        }
        out.push(item);
    }
    let token = match (more, out.last()) {
        (true, Some(last)) => format!("{TOKEN_PREFIX}{}", id(last)),
        _ => String::new(),
    };
    (out, token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::filepool::FilePool;
    use crate::storage::{AccessMode, AccessType, Node, Timestamp};

    fn cap(block: bool) -> Capability {
        Capability {
            access: if block {
                AccessType::Block
            } else {
                AccessType::Mount {
                    fs_type: None,
                    mount_flags: vec![],
                }
            },
            mode: AccessMode::SingleNodeWriter,
        }
    }

    fn setup() -> (tempfile::TempDir, Controller) {
        let dir = tempfile::tempdir().unwrap();
        let pool = FilePool::open(dir.path()).unwrap();
        pool.register_node(&Node {
            id: "n1".into(),
            max_volumes: 0,
            registered: Timestamp::now(),
        })
        .unwrap();
        (dir, Controller::new(Arc::new(pool)))
    }

    fn create(c: &Controller, name: &str) -> Volume {
        c.create_volume(CreateRequest {
            volume: NewVolume {
                name: name.into(),
                required_bytes: 1 << 20,
                limit_bytes: 0,
                min_bytes: 0,
                capabilities: vec![cap(false)],
                parameters: Default::default(),
                source: None,
                provisioning: Default::default(),
            },
            requisite: vec![],
            preferred: vec![],
        })
        .unwrap()
    }

    #[test]
    fn pages_survive_deletes_and_creates_between_calls() {
        let (_d, c) = setup();
        let mut ids: Vec<String> = (0..5).map(|i| create(&c, &format!("v{i}")).id).collect();
        ids.sort();
        let first = c.list_volumes(2, "").unwrap();
        assert_eq!(first.entries.len(), 2);
        assert!(!first.next_token.is_empty());
        // The last volume of the page disappears before the next call.
        c.delete_volume(&first.entries[1].0.id).unwrap();
        let rest = c.list_volumes(0, &first.next_token).unwrap();
        let got: Vec<_> = rest.entries.iter().map(|(v, _)| v.id.clone()).collect();
        assert_eq!(got, ids[2..].to_vec());
        assert!(rest.next_token.is_empty());
        assert!(matches!(
            c.list_volumes(1, "garbage"),
            Err(Error::Aborted(_))
        ));
    }

    #[test]
    fn requisite_topology_elsewhere_is_exhausted() {
        let (_d, c) = setup();
        let mut elsewhere = Segments::new();
        elsewhere.insert(TOPOLOGY_KEY.into(), "other-pool".into());
        let res = c.create_volume(CreateRequest {
            volume: NewVolume {
                name: "t".into(),
                required_bytes: 0,
                limit_bytes: 0,
                min_bytes: 0,
                capabilities: vec![cap(false)],
                parameters: Default::default(),
                source: None,
                provisioning: Default::default(),
            },
            requisite: vec![elsewhere.clone()],
            preferred: vec![],
        });
        assert!(matches!(res, Err(Error::ResourceExhausted(_))));
        assert_eq!(c.capacity(Some(&elsewhere)).unwrap().available_bytes, 0);
        assert!(c.capacity(Some(&c.topology())).unwrap().available_bytes > 0);
    }

    #[test]
    fn unknown_ids_delete_fine_and_publish_not_found() {
        let (_d, c) = setup();
        c.delete_volume("not-a-volume").unwrap();
        c.delete_volume("vol-00000000000000000000000000000000")
            .unwrap();
        let err = c.publish(
            "vol-00000000000000000000000000000000",
            "n1",
            cap(false),
            false,
        );
        assert!(matches!(err, Err(Error::NotFound(_))));
        let v = create(&c, "p");
        assert!(matches!(
            c.publish(&v.id, "ghost", cap(false), false),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            c.publish(&v.id, "n1", cap(true), false),
            Err(Error::InvalidArgument(_))
        ));
        c.publish(&v.id, "n1", cap(false), false).unwrap();
        assert!(matches!(
            c.delete_volume(&v.id),
            Err(Error::FailedPrecondition(_))
        ));
        c.unpublish(&v.id, "").unwrap();
        c.delete_volume(&v.id).unwrap();
    }
}
