//! The block-storage API: what the controller asks of a storage system (volumes, attachments,
//! capacity, nodes), as a trait with no knowledge of gRPC. [`filepool::FilePool`] is the embedded
//! implementation; cloud backends implement the same trait.

pub mod contract;
pub mod filepool;
pub mod provider;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How a volume is consumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessType {
    Block,
    Mount {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fs_type: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        mount_flags: Vec<String>,
    },
}

/// The CSI access modes, named as the spec names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// Modes that allow the volume on one node at a time.
    pub fn single_node(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter
                | AccessMode::SingleNodeReaderOnly
                | AccessMode::SingleNodeSingleWriter
                | AccessMode::SingleNodeMultiWriter
        )
    }

    /// Modes that allow writing on at most one target path.
    pub fn single_writer(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeSingleWriter | AccessMode::MultiNodeSingleWriter
        )
    }

    pub fn read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access: AccessType,
    pub mode: AccessMode,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self.access, AccessType::Block)
    }

    pub fn fs_type(&self) -> Option<&str> {
        match &self.access {
            AccessType::Mount { fs_type, .. } => fs_type.as_deref(),
            AccessType::Block => None,
        }
    }
}

/// A volume published to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub read_only: bool,
    pub capability: Capability,
}

/// Seconds and nanoseconds since the Unix epoch, as CSI timestamps carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: i32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    }
}

/// The durable record of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    /// The CSI name the volume was created under: its idempotency key.
    pub name: String,
    pub capacity_bytes: u64,
    pub capabilities: Vec<Capability>,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    pub created: Timestamp,
    /// Node id -> how the volume is published there.
    #[serde(default)]
    pub attachments: BTreeMap<String, Attachment>,
    /// The filesystem a node created or found on the volume. Once set, a blank probe means
    /// lost data, never "format me".
    #[serde(default)]
    pub filesystem: Option<String>,
    /// Set once the volume was staged for raw block access: its contents are the user's,
    /// whatever a probe says, so it is never formatted afterwards.
    #[serde(default)]
    pub used_as_block: bool,
    /// Where the initial contents came from, for restores and clones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<VolumeSource>,
    /// A restored or cloned filesystem still carries its origin's UUID; the node gives it a
    /// fresh one on the first stage, so origin and copy can be mounted side by side.
    #[serde(default)]
    pub needs_new_uuid: bool,
    #[serde(default)]
    pub provisioning: Provisioning,
    /// The image grew since a node last grew the filesystem on it.
    #[serde(default)]
    pub pending_node_expansion: bool,
    /// The filesystem a node set out to create, written just before mkfs runs on a volume that
    /// never held one. With no `filesystem` beside it, the volume was never mounted and
    /// whatever its device holds is the driver's own interrupted format, safe to redo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatting: Option<String>,
}

/// Where a new volume's contents come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeSource {
    Snapshot(String),
    Volume(String),
}

/// How the image reserves space in the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provisioning {
    /// Sparse: space is taken as data is written (the pool can run out under the volume).
    #[default]
    Thin,
    /// Every byte reserved with fallocate: the volume can never hit a full pool.
    Thick,
}

impl Provisioning {
    pub fn parse(s: &str) -> Option<Provisioning> {
        match s {
            "thin" => Some(Provisioning::Thin),
            "thick" => Some(Provisioning::Thick),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Provisioning::Thin => "thin",
            Provisioning::Thick => "thick",
        }
    }
}

/// A point-in-time copy of a volume's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    /// The CSI name: the idempotency key of CreateSnapshot.
    pub name: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    pub created: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
}

/// Snapshots of several volumes taken as one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    pub id: String,
    pub name: String,
    pub snapshot_ids: Vec<String>,
    pub created: Timestamp,
}

/// What the controller asks for in CreateVolume, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    pub name: String,
    /// 0 = not given.
    pub required_bytes: u64,
    /// 0 = not given.
    pub limit_bytes: u64,
    /// A floor the controller needs (for example the smallest XFS filesystem).
    pub min_bytes: u64,
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    pub source: Option<VolumeSource>,
    pub provisioning: Provisioning,
}

/// A node that registered itself with the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    /// 0 = no limit.
    pub max_volumes: u64,
    pub registered: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// The largest volume CreateVolume would accept now.
    pub max_volume_bytes: u64,
    pub min_volume_bytes: u64,
}

/// Whether the storage behind a volume is as its record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub abnormal: bool,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unavailable(String),
    /// The request contradicts the state (for example a single-node volume on a second node).
    #[error("{0}")]
    Conflict(String),
    /// A listing token this backend did not issue.
    #[error("{0}")]
    InvalidToken(String),
    /// An optional part of the API this backend does not serve.
    #[error("{0}")]
    Unsupported(String),
    #[error("corrupt pool metadata: {0}")]
    Corrupt(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::Exhausted(format!("{}: pool is full", context.into()));
        }
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A block-storage system. Every mutating call is idempotent: volumes by CSI name, attachments by
/// (volume, node), so a retry after a timeout returns what the first call made.
pub trait BlockStorage: Send + Sync {
    /// Identifies the pool (the topology segment of every volume in it).
    fn pool_id(&self) -> &str;

    /// Creates a volume, or returns the one already made under the same name when it is
    /// compatible; `AlreadyExists` when it is not.
    fn create_volume(&self, req: &NewVolume) -> Result<Volume>;
    /// Deletes a volume and its data. `NotFound` for an unknown id; `InUse` while attached.
    fn delete_volume(&self, id: &str) -> Result<()>;
    fn volume(&self, id: &str) -> Result<Volume>;
    /// Every volume, ordered by id.
    fn volumes(&self) -> Result<Vec<Volume>>;

    /// Records that `id` is published to `node`. Idempotent for an identical attachment;
    /// `AlreadyExists` for a different one; `Conflict` when the access mode forbids another
    /// node; `Exhausted` when the node's volume limit is reached.
    fn attach(&self, id: &str, node: &str, attachment: &Attachment) -> Result<Volume>;
    /// Removes the record of a publication; a missing one is not an error.
    fn detach(&self, id: &str, node: &str) -> Result<()>;

    fn capacity(&self) -> Result<Capacity>;
    /// Adds or refreshes a node's registration.
    fn register_node(&self, node: &Node) -> Result<()>;
    fn node(&self, id: &str) -> Result<Node>;

    /// Records the filesystem found on or created on a volume (first writer wins).
    fn record_filesystem(&self, id: &str, fs_type: &str) -> Result<Volume>;
    /// Records that a volume was handed out as a raw block device.
    fn record_block_use(&self, id: &str) -> Result<Volume>;
    /// Records that a node is about to format a volume that never held a filesystem.
    fn record_formatting(&self, id: &str, fs_type: &str) -> Result<Volume>;
    /// Checks the storage behind a volume against its record.
    fn health(&self, volume: &Volume) -> Health;
    /// Where a node finds the volume's data: for the file pool, the image file.
    fn image_path(&self, id: &str) -> Result<PathBuf>;
    /// Records that the node gave a restored or cloned filesystem its own UUID.
    fn record_new_uuid(&self, id: &str) -> Result<Volume>;
    /// Records that a node grew the filesystem to the image's size.
    fn record_node_expanded(&self, id: &str) -> Result<Volume>;

    /// Grows a volume to `bytes` (already rounded); a volume already that large is unchanged.
    fn expand_volume(&self, id: &str, bytes: u64) -> Result<Volume>;
    /// Changes how the volume reserves pool space.
    fn set_provisioning(&self, id: &str, provisioning: Provisioning) -> Result<Volume>;

    /// Snapshots a volume, or returns the snapshot already made under `name` from the same
    /// source; `AlreadyExists` when `name` was used for another source.
    fn create_snapshot(&self, name: &str, source_volume_id: &str) -> Result<Snapshot>;
    /// `NotFound` for an unknown id; `InUse` for a member of a group snapshot.
    fn delete_snapshot(&self, id: &str) -> Result<()>;
    fn snapshot(&self, id: &str) -> Result<Snapshot>;
    /// Every snapshot, ordered by id.
    fn snapshots(&self) -> Result<Vec<Snapshot>>;

    /// Snapshots every volume as one group: all or nothing.
    fn create_group_snapshot(&self, name: &str, volume_ids: &[String]) -> Result<GroupSnapshot>;
    fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot>;
    /// Deletes a group snapshot and its member snapshots. `NotFound` for an unknown id.
    fn delete_group_snapshot(&self, id: &str) -> Result<()>;
}
