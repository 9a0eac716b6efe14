//! The controller-side storage API. Only `controller/` calls it; a node never does (the node
//! learns what it needs from the publish context, see `contract.rs`). It is async so a backend
//! whose calls go over the network waits without pinning a thread, and a call whose caller gave
//! up can be dropped. A backend decides here what the driver advertises: which optional parts it
//! serves, its topology, its id shapes and its size rules.

use std::collections::BTreeMap;

use super::contract::PublishContext;
use super::{
    Attachment, Capacity, GroupSnapshot, Health, NewVolume, Provisioning, Result, Snapshot, Volume,
};

/// A topology segment set, as CSI carries it.
pub type Segments = BTreeMap<String, String>;

/// The optional parts of the API a backend serves. The controller advertises exactly these
/// (a backend that cannot list volumes or report capacity must not claim it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// ControllerPublish/Unpublish do something (attach to a node).
    pub publish: bool,
    pub list_volumes: bool,
    pub capacity: bool,
    /// ControllerGetVolume and volume conditions.
    pub get_volume: bool,
    pub snapshots: bool,
    pub list_snapshots: bool,
    pub clone: bool,
    pub expand: bool,
    pub modify: bool,
    pub group_snapshots: bool,
    /// A volume carries an accessible topology (the driver advertises topology constraints).
    pub topology: bool,
}

/// One page of a listing and the provider's token for the next one ("" at the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub entries: Vec<T>,
    pub next_token: String,
}

/// A block-storage API as the controller sees it. Every mutating call is idempotent: volumes by
/// CSI name, publications by (volume, node), snapshots by name, so a retry after a timeout
/// returns what the first call made. Optional parts (see [`Features`]) answer
/// [`super::Error::Unsupported`] when the backend does not serve them.
#[tonic::async_trait]
pub trait VolumeProvider: Send + Sync {
    fn features(&self) -> Features;

    /// The topology every volume of this backend is reachable from, when it is one set for all
    /// volumes (the file pool); `None` when it differs per volume.
    fn topology(&self) -> Option<Segments>;

    /// The accessible topology of one volume.
    fn topology_of(&self, volume: &Volume) -> Vec<Segments>;

    /// Whether `s` has the shape of a volume id of this backend (no I/O).
    fn is_volume_id(&self, s: &str) -> bool;

    /// Cheap readiness for Probe: never a network round trip per call.
    async fn ready(&self) -> Result<()>;

    /// Creates a volume (or returns the compatible one made under the same name). Sizes are
    /// rounded by the backend's own rules; `req.min_bytes` is a floor the controller needs.
    async fn create_volume(&self, req: NewVolume) -> Result<Volume>;
    /// Deletes a volume; `NotFound` when there is none.
    async fn delete_volume(&self, id: &str) -> Result<()>;
    async fn volume(&self, id: &str) -> Result<Volume>;
    /// Whether the storage behind a volume is as expected.
    async fn health(&self, volume: &Volume) -> Health;
    /// A page of volumes; `token` is "" or one this provider issued (else `InvalidToken`).
    async fn list_volumes(&self, token: &str, max_entries: usize) -> Result<Page<Volume>>;

    /// Publishes a volume to a node and says what the node needs to stage it.
    async fn publish(&self, id: &str, node: &str, attachment: Attachment)
        -> Result<PublishContext>;
    /// Removes a publication (`NotFound` for an unknown volume is the caller's to forgive).
    async fn unpublish(&self, id: &str, node: &str) -> Result<()>;

    /// Grows a volume to `bytes` (already rounded by the controller with [`Self::round_size`]).
    async fn expand(&self, id: &str, bytes: u64) -> Result<Volume>;
    /// The size a request for `required`..`limit` bytes gets (`OutOfRange` when none fits).
    fn round_size(&self, required: u64, limit: u64, min: u64) -> Result<u64>;
    async fn set_provisioning(&self, id: &str, provisioning: Provisioning) -> Result<Volume>;
    async fn capacity(&self) -> Result<Capacity>;

    async fn create_snapshot(&self, name: &str, source_volume_id: &str) -> Result<Snapshot>;
    async fn delete_snapshot(&self, id: &str) -> Result<()>;
    async fn snapshot(&self, id: &str) -> Result<Snapshot>;
    /// A page of snapshots, optionally of one source volume.
    async fn list_snapshots(
        &self,
        token: &str,
        max_entries: usize,
        source_volume_id: &str,
    ) -> Result<Page<Snapshot>>;

    async fn create_group_snapshot(
        &self,
        name: &str,
        volume_ids: &[String],
    ) -> Result<GroupSnapshot>;
    async fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot>;
    async fn delete_group_snapshot(&self, id: &str) -> Result<()>;
}
