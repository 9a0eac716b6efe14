//! Controller logic: provisioning, publication, listing and capacity, on top of a
//! [`VolumeProvider`]. Inputs are validated domain values; the gRPC adapter lives in
//! `csi::controller`. Everything here is async: a backend's waits never pin a thread.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::storage::contract::PublishContext;
use crate::storage::provider::{Features, Page, VolumeProvider};
use crate::storage::{
    Attachment, Capability, Capacity, GroupSnapshot, Health, NewVolume, Provisioning, Snapshot,
    Volume, VolumeSource,
};
use crate::support::guard::OpGuards;

pub use crate::storage::provider::Segments;

/// XFS refuses filesystems smaller than this (xfsprogs 5.19 and later).
pub const XFS_MIN_BYTES: u64 = 300 << 20;

pub struct CreateRequest {
    pub volume: NewVolume,
    pub requisite: Vec<Segments>,
    pub preferred: Vec<Segments>,
}

pub struct Controller {
    provider: Arc<dyn VolumeProvider>,
    guards: OpGuards,
}

/// Maps "not found" to success, for deletes: an unknown id is already deleted.
fn gone_is_ok(r: crate::storage::Result<()>) -> Result<()> {
    match r {
        Ok(()) | Err(crate::storage::Error::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Controller {
    pub fn new(provider: Arc<dyn VolumeProvider>) -> Controller {
        Controller {
            provider,
            guards: OpGuards::default(),
        }
    }

    pub fn provider(&self) -> &dyn VolumeProvider {
        &*self.provider
    }

    pub fn features(&self) -> Features {
        self.provider.features()
    }

    /// The accessible topology of a volume.
    pub fn topology_of(&self, volume: &Volume) -> Vec<Segments> {
        self.provider.topology_of(volume)
    }

    /// A segment set is reachable when every key it names is one the backend knows and matches.
    fn reachable(&self, segments: &Segments) -> bool {
        match self.provider.topology() {
            Some(ours) => segments.iter().all(|(k, v)| ours.get(k) == Some(v)),
            None => true,
        }
    }

    pub async fn create_volume(&self, mut req: CreateRequest) -> Result<Volume> {
        let _guard = self.guards.acquire(&format!("name {}", req.volume.name))?;
        // A clone reads its source: no expansion or deletion of it may run meanwhile.
        let _source_guard = match &req.volume.source {
            Some(VolumeSource::Volume(v)) => Some(self.guards.acquire(v)?),
            _ => None,
        };
        if !req.requisite.is_empty() && !req.requisite.iter().any(|s| self.reachable(s)) {
            return Err(Error::ResourceExhausted(format!(
                "no requisite topology is reachable from this backend ({:?})",
                self.provider.topology().unwrap_or_default()
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
        Ok(self.provider.create_volume(req.volume).await?)
    }

    /// Deletes a volume; an unknown or malformed id is already deleted.
    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        let _guard = self.guards.acquire(id)?;
        gone_is_ok(self.provider.delete_volume(id).await)
    }

    /// Publishes a volume to a node; the context tells the node how to stage it.
    pub async fn publish(
        &self,
        id: &str,
        node: &str,
        capability: Capability,
        read_only: bool,
    ) -> Result<PublishContext> {
        let _guard = self.guards.acquire(id)?;
        let volume = self.provider.volume(id).await?;
        check_fits(&volume, &capability)?;
        let attachment = Attachment {
            read_only,
            capability,
        };
        Ok(self.provider.publish(id, node, attachment).await?)
    }

    /// Removes a publication; an empty `node` removes it from every node, as the spec allows.
    pub async fn unpublish(&self, id: &str, node: &str) -> Result<()> {
        let _guard = self.guards.acquire(id)?;
        if node.is_empty() {
            return gone_is_ok(self.provider.unpublish(id, node).await);
        }
        Ok(self.provider.unpublish(id, node).await?)
    }

    pub async fn volume(&self, id: &str) -> Result<(Volume, Health)> {
        let volume = self.provider.volume(id).await?;
        let health = self.provider.health(&volume).await;
        Ok((volume, health))
    }

    /// A page of volumes with their conditions. Tokens are the backend's; an entry that exists
    /// for the whole listing is neither skipped nor repeated.
    pub async fn list_volumes(
        &self,
        max_entries: usize,
        start: &str,
    ) -> Result<Page<(Volume, Health)>> {
        let page = self.provider.list_volumes(start, max_entries).await?;
        let mut entries = Vec::with_capacity(page.entries.len());
        for v in page.entries {
            let h = self.provider.health(&v).await;
            entries.push((v, h));
        }
        Ok(Page {
            entries,
            next_token: page.next_token,
        })
    }

    /// Grows a volume to the requested size, exactly (rounded by the backend's rules). Returns
    /// the volume and whether a node must act (refresh the device, grow the filesystem).
    pub async fn expand(&self, id: &str, required: u64, limit: u64) -> Result<(Volume, bool)> {
        let _guard = self.guards.acquire(id)?;
        let current = self.provider.volume(id).await?;
        let wanted = self.provider.round_size(required, limit, 0)?;
        if limit != 0 && current.capacity_bytes > limit {
            return Err(Error::OutOfRange(format!(
                "volume {id} already has {} bytes, above the limit of {limit}; volumes never shrink",
                current.capacity_bytes
            )));
        }
        let volume = self.provider.expand(id, wanted).await?;
        // A block volume nobody has attached picks its new size up at the next attach; every
        // other case needs the node (device capacity, filesystem growth).
        let node_needed = !(volume.attachments.is_empty()
            && volume.capabilities.iter().all(Capability::is_block));
        Ok((volume, node_needed))
    }

    /// Applies mutable parameters (already validated); unknown volumes are NOT_FOUND.
    pub async fn modify(&self, id: &str, provisioning: Option<Provisioning>) -> Result<Volume> {
        let _guard = self.guards.acquire(id)?;
        let volume = self.provider.volume(id).await?;
        match provisioning {
            Some(p) => Ok(self.provider.set_provisioning(id, p).await?),
            None => Ok(volume),
        }
    }

    pub async fn create_snapshot(&self, name: &str, source_volume_id: &str) -> Result<Snapshot> {
        let _guard = self.guards.acquire(&format!("snapshot name {name}"))?;
        let _source = self.guards.acquire(source_volume_id)?;
        Ok(self
            .provider
            .create_snapshot(name, source_volume_id)
            .await?)
    }

    /// Deletes a snapshot; an unknown or malformed id is already deleted.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let _guard = self.guards.acquire(id)?;
        gone_is_ok(self.provider.delete_snapshot(id).await)
    }

    pub async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        Ok(self.provider.snapshot(id).await?)
    }

    /// A page of snapshots, optionally only one id or one source volume; unknown filters give
    /// an empty page.
    pub async fn list_snapshots(
        &self,
        max_entries: usize,
        start: &str,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<Page<Snapshot>> {
        if !snapshot_id.is_empty() {
            let entries: Vec<Snapshot> = self
                .provider
                .snapshot(snapshot_id)
                .await
                .ok()
                .into_iter()
                .filter(|s| source_volume_id.is_empty() || s.source_volume_id == source_volume_id)
                .collect();
            return Ok(Page {
                entries,
                next_token: String::new(),
            });
        }
        Ok(self
            .provider
            .list_snapshots(start, max_entries, source_volume_id)
            .await?)
    }

    pub async fn create_group_snapshot(
        &self,
        name: &str,
        volume_ids: &[String],
    ) -> Result<GroupSnapshot> {
        let _guard = self.guards.acquire(&format!("group name {name}"))?;
        let mut sources = Vec::new();
        for v in volume_ids {
            sources.push(self.guards.acquire(v)?);
        }
        Ok(self
            .provider
            .create_group_snapshot(name, volume_ids)
            .await?)
    }

    /// The group and its member snapshots.
    pub async fn group_snapshot(&self, id: &str) -> Result<(GroupSnapshot, Vec<Snapshot>)> {
        let group = self.provider.group_snapshot(id).await?;
        let mut members = Vec::with_capacity(group.snapshot_ids.len());
        for s in &group.snapshot_ids {
            members.push(self.provider.snapshot(s).await?);
        }
        Ok((group, members))
    }

    /// Deletes a group snapshot with its members; an unknown id is already deleted.
    pub async fn delete_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<()> {
        let _guard = self.guards.acquire(id)?;
        let group = match self.provider.group_snapshot(id).await {
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
        gone_is_ok(self.provider.delete_group_snapshot(id).await)
    }

    /// Free capacity for the given topology (zero for a topology the backend is not in).
    pub async fn capacity(&self, topology: Option<&Segments>) -> Result<Capacity> {
        let cap = self.provider.capacity().await?;
        if topology.is_some_and(|t| !self.reachable(t)) {
            return Ok(Capacity {
                available_bytes: 0,
                max_volume_bytes: 0,
                ..cap
            });
        }
        Ok(cap)
    }

    /// Readiness for Probe: cheap, never a network round trip per call.
    pub async fn ready(&self) -> Result<()> {
        Ok(self.provider.ready().await?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::filepool::provider::FilePoolProvider;
    use crate::storage::filepool::FilePool;
    use crate::storage::BlockStorage;
    use crate::storage::{AccessMode, AccessType, Node, Timestamp};
    use crate::TOPOLOGY_KEY;

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
        (
            dir,
            Controller::new(Arc::new(FilePoolProvider::new(Arc::new(pool)))),
        )
    }

    async fn create(c: &Controller, name: &str) -> Volume {
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
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn pages_survive_deletes_and_creates_between_calls() {
        let (_d, c) = setup();
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(create(&c, &format!("v{i}")).await.id);
        }
        ids.sort();
        let first = c.list_volumes(2, "").await.unwrap();
        assert_eq!(first.entries.len(), 2);
        assert!(!first.next_token.is_empty());
        // The last volume of the page disappears before the next call.
        c.delete_volume(&first.entries[1].0.id).await.unwrap();
        // A volume created after the listing began may or may not appear; none is repeated.
        create(&c, "late").await;
        let rest = c.list_volumes(0, &first.next_token).await.unwrap();
        let got: Vec<_> = rest.entries.iter().map(|(v, _)| v.id.clone()).collect();
        assert_eq!(
            got,
            ids[2..].to_vec(),
            "the listing's own ids, in order, none twice"
        );
        assert!(rest.next_token.is_empty());
        assert!(matches!(
            c.list_volumes(1, "garbage").await,
            Err(Error::Aborted(_))
        ));
    }

    #[tokio::test]
    async fn requisite_topology_elsewhere_is_exhausted() {
        let (_d, c) = setup();
        let mut elsewhere = Segments::new();
        elsewhere.insert(TOPOLOGY_KEY.into(), "other-pool".into());
        let res = c
            .create_volume(CreateRequest {
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
            })
            .await;
        assert!(matches!(res, Err(Error::ResourceExhausted(_))));
        assert_eq!(
            c.capacity(Some(&elsewhere)).await.unwrap().available_bytes,
            0
        );
        assert!(
            c.capacity(Some(&c.provider().topology().unwrap()))
                .await
                .unwrap()
                .available_bytes
                > 0
        );
    }

    #[tokio::test]
    async fn unknown_ids_delete_fine_and_publish_not_found() {
        let (_d, c) = setup();
        c.delete_volume("not-a-volume").await.unwrap();
        c.delete_volume("vol-00000000000000000000000000000000")
            .await
            .unwrap();
        let err = c
            .publish(
                "vol-00000000000000000000000000000000",
                "n1",
                cap(false),
                false,
            )
            .await;
        assert!(matches!(err, Err(Error::NotFound(_))));
        let v = create(&c, "p").await;
        assert!(matches!(
            c.publish(&v.id, "ghost", cap(false), false).await,
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            c.publish(&v.id, "n1", cap(true), false).await,
            Err(Error::InvalidArgument(_))
        ));
        c.publish(&v.id, "n1", cap(false), false).await.unwrap();
        assert!(matches!(
            c.delete_volume(&v.id).await,
            Err(Error::FailedPrecondition(_))
        ));
        c.unpublish(&v.id, "").await.unwrap();
        c.delete_volume(&v.id).await.unwrap();
    }
}
