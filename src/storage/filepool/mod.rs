//! The embedded backend: every volume is a sparse image file in a pool directory, described by a
//! small JSON record. Records are replaced atomically and guarded by flock(2) lock files, so one
//! controller process and any number of node processes can share a pool.
//!
//! Layout of a pool directory:
//! ```text
//! pool.json                  the pool's identity (its id is the topology segment)
//! volumes/<id>.img           volume images (sparse)
//! meta/volumes/<id>.json     volume records
//! meta/names/<sha256>.json   CSI name -> volume id: the idempotency index of CreateVolume
//! meta/nodes/<node>.json     node registrations
//! snapshots/<id>.img         snapshot images (reflinks where the filesystem allows)
//! meta/snapshots/<id>.json   snapshot records
//! meta/groups/<id>.json      group snapshot records
//! meta/groupnames/<sha256>.json CSI group snapshot name -> group id
//! locks/                     lock files (name-*, volume-*, node-*, snapname-*, snapshot-*, ...)
//! ```
//! Crash safety rests on the order of writes. Create: name index, then image, then record; a retry
//! that finds an index without a record finishes the same volume instead of making another.
//! Delete: index, then image, then record; a retry finishes it. On pools whose filesystem
//! journals metadata in order (ext4, XFS) the renames and unlinks before the last step are not
//! synced one by one: the fsyncs of the last step commit them in the same order, so a power cut
//! still leaves a prefix of the sequence. Files get their own fsync before their rename wherever
//! they hold data, since data is outside that order.
//! Snapshots need no index: their id is derived from their name, so a retry finds its own work.
//! Create: clone or copy under a temporary name, rename, then the record; delete: record, then
//! image. On pools whose filesystem journals metadata in order (ext4, XFS) one fsync of the
//! record makes the whole snapshot durable; elsewhere every step is synced.

pub mod copy;
pub mod devices;
pub(crate) mod fsutil;
mod gc;
mod health;
pub mod ledger;
pub mod provider;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use self::copy::Mode as CopyMode;
use self::fsutil::{
    create_atomic, hash_name, read_optional, remove_if_exists, sync_dir, write_atomic,
    write_ordered, write_then_rename, FileLock,
};
use super::{
    Attachment, BlockStorage, Capacity, Error, GroupSnapshot, Health, NewVolume, Node,
    Provisioning, Result, Snapshot, Timestamp, Volume, VolumeSource,
};

/// Sizes are multiples of this, so that requested sizes in whole MiB (all Kubernetes quantities
/// in Mi/Gi/Ti) come back exactly as asked.
pub const GRANULARITY: u64 = 1 << 20;
/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Largest image: the file size limit of ext4 pools.
pub const MAX_SIZE: u64 = 16 << 40;

const VOLUME_ID_PREFIX: &str = "vol-";
const SNAPSHOT_ID_PREFIX: &str = "snap-";
const GROUP_ID_PREFIX: &str = "group-";

#[derive(Debug, Serialize, Deserialize)]
struct PoolRecord {
    id: String,
    created: Timestamp,
}

#[derive(Debug, Serialize, Deserialize)]
struct NameRecord {
    name: String,
    volume_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupNameRecord {
    name: String,
    group_id: String,
}

/// A snapshot and what a restore needs to know about the data in it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotRecord {
    #[serde(flatten)]
    snapshot: Snapshot,
    #[serde(default)]
    filesystem: Option<String>,
    #[serde(default)]
    used_as_block: bool,
}

/// True when `id` has the exact shape this pool gives volume ids; anything else is never
/// turned into a path.
pub fn is_volume_id(id: &str) -> bool {
    has_id_shape(id, VOLUME_ID_PREFIX)
}

pub fn is_snapshot_id(id: &str) -> bool {
    has_id_shape(id, SNAPSHOT_ID_PREFIX)
}

pub fn is_group_id(id: &str) -> bool {
    has_id_shape(id, GROUP_ID_PREFIX)
}

fn has_id_shape(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// Node ids become file names: letters, digits, '.', '_', '-', starting and ending with a
/// letter or digit, at most 128 bytes (every Kubernetes node name qualifies).
pub fn is_node_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Rounds a requested range to the pool's granularity, or says why it cannot be met.
pub fn round_size(required: u64, limit: u64, min: u64) -> Result<u64> {
    let round_up = |n: u64| n.div_ceil(GRANULARITY).saturating_mul(GRANULARITY);
    if limit != 0 && required > limit {
        return Err(Error::OutOfRange(format!(
            "required bytes {required} exceed limit bytes {limit}"
        )));
    }
    let floor = round_up(min.max(1));
    let size = if required == 0 {
        let wanted = DEFAULT_SIZE.max(floor);
        if limit == 0 {
            wanted
        } else {
            wanted.min(limit / GRANULARITY * GRANULARITY)
        }
    } else {
        round_up(required).max(floor)
    };
    if size < floor || (limit != 0 && size > limit) {
        return Err(Error::OutOfRange(format!(
            "no size between {required} and {limit} bytes is a multiple of {GRANULARITY} \
             of at least {floor} bytes"
        )));
    }
    if size > MAX_SIZE {
        return Err(Error::OutOfRange(format!(
            "{size} bytes exceeds the largest volume of {MAX_SIZE} bytes"
        )));
    }
    Ok(size)
}

pub struct FilePool {
    root: PathBuf,
    id: String,
    /// The pool's filesystem commits metadata through one ordered journal (ext4, XFS): an fsync
    /// also makes every earlier rename and clone in the pool durable.
    ordered_journal: bool,
}

/// statfs magic numbers of filesystems whose metadata journal is ordered (linux/magic.h).
const EXT4_MAGIC: i64 = 0xEF53;
const XFS_MAGIC: i64 = 0x5846_5342;

/// Snapshot ids derive from the name, so a retried CreateSnapshot lands on its own work.
fn snapshot_id_for(name: &str) -> String {
    format!("{SNAPSHOT_ID_PREFIX}{}", &hash_name(name)[..32])
}

impl FilePool {
    /// Opens a pool directory, creating its layout and identity on first use. Several processes
    /// may open the same new pool at once: exactly one identity wins.
    pub fn open(root: &Path) -> Result<FilePool> {
        for dir in [
            root.to_path_buf(),
            root.join("volumes"),
            root.join("meta"),
            root.join("meta/volumes"),
            root.join("meta/names"),
            root.join("meta/nodes"),
            root.join("snapshots"),
            root.join("meta/snapshots"),
            root.join("meta/groups"),
            root.join("meta/groupnames"),
            root.join("locks"),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        // The kernel reports loop backing files with symlinks resolved; the pool's own paths
        // must be spelled the same way for the node to recognise its devices.
        let root = &std::fs::canonicalize(root)
            .map_err(|e| Error::io(format!("resolve {}", root.display()), e))?;
        let record_path = root.join("pool.json");
        if read_optional(&record_path)?.is_none() {
            let record = PoolRecord {
                id: uuid::Uuid::new_v4().simple().to_string(),
                created: Timestamp::now(),
            };
            create_atomic(&record_path, &to_json(&record)?)?;
        }
        let bytes = read_optional(&record_path)?
            .ok_or_else(|| Error::Corrupt(format!("{} vanished", record_path.display())))?;
        let record: PoolRecord = from_json(&record_path, &bytes)?;
        let ordered_journal = nix::sys::statfs::statfs(root)
            .map(|st| {
                let magic = st.filesystem_type().0;
                magic == EXT4_MAGIC || magic == XFS_MAGIC
            })
            .unwrap_or(false);
        Ok(FilePool {
            root: root.to_path_buf(),
            id: record.id,
            ordered_journal,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes snapshot images whose record never became durable (or whose delete stopped
    /// after the record). Snapshots have no name index, so an image without a record is only
    /// provably abandoned when no CreateSnapshot runs: call this from the controller (the only
    /// writer of snapshots) at start, before it serves. Returns how many were removed.
    pub fn collect_orphan_snapshots(&self) -> Result<usize> {
        let mut removed = 0;
        let dir = self.root.join("snapshots");
        let entries =
            std::fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".img")) else {
                continue;
            };
            if !is_snapshot_id(id) || self.load_snapshot(id)?.is_some() {
                continue;
            }
            // Another controller on this pool may be between the image's rename and its
            // record: its snapshot lock is held until the record is durable. Wait for it,
            // then look again.
            let lock = self.lock("snapshot", id)?;
            if self.load_snapshot(id)?.is_none() {
                remove_if_exists(&self.snapshot_record(id))?;
                remove_if_exists(&entry.path())?;
                removed += 1;
                lock.remove()?;
            }
        }
        if removed > 0 {
            sync_dir(&dir)?;
        }
        Ok(removed)
    }

    fn checked_id<'a>(&self, id: &'a str) -> Result<&'a str> {
        if is_volume_id(id) {
            Ok(id)
        } else {
            Err(Error::NotFound(format!("volume {id:?}")))
        }
    }

    fn image(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{id}.img"))
    }

    fn record(&self, id: &str) -> PathBuf {
        self.root.join("meta/volumes").join(format!("{id}.json"))
    }

    fn name_index(&self, name: &str) -> PathBuf {
        self.root
            .join("meta/names")
            .join(format!("{}.json", hash_name(name)))
    }

    fn lock(&self, kind: &str, key: &str) -> Result<FileLock> {
        FileLock::acquire(&self.root.join("locks").join(format!("{kind}-{key}.lock")))
    }

    fn load(&self, id: &str) -> Result<Option<Volume>> {
        read_json(&self.record(id))
    }

    /// Every volume id with a record, sorted: one readdir, no record read.
    pub fn volume_ids(&self) -> Result<Vec<String>> {
        self.record_ids("meta/volumes", is_volume_id)
    }

    /// Every snapshot id with a record, sorted: one readdir, no record read.
    pub fn snapshot_ids(&self) -> Result<Vec<String>> {
        self.record_ids("meta/snapshots", is_snapshot_id)
    }

    /// The volume with this id, or `None` when it is gone (deleted since it was listed).
    pub fn volume_if_any(&self, id: &str) -> Result<Option<Volume>> {
        if !is_volume_id(id) {
            return Ok(None);
        }
        self.load(id)
    }

    /// The snapshot with this id, or `None` when it is gone.
    pub fn snapshot_if_any(&self, id: &str) -> Result<Option<Snapshot>> {
        if !is_snapshot_id(id) {
            return Ok(None);
        }
        Ok(self.load_snapshot(id)?.map(|r| r.snapshot))
    }

    /// The ids of the records (`<id>.json`) in a metadata directory, ordered; temp files and
    /// other names are skipped.
    fn record_ids(&self, sub: &str, valid: fn(&str) -> bool) -> Result<Vec<String>> {
        let dir = self.root.join(sub);
        let entries =
            std::fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
            {
                if valid(id) {
                    ids.push(id.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn load_existing(&self, id: &str) -> Result<Volume> {
        self.load(id)?
            .ok_or_else(|| Error::NotFound(format!("volume {id}")))
    }

    /// Makes the renames and unlinks of `dir` durable, unless the pool's journal is ordered:
    /// then the fsync that ends the operation commits them. Callers must end with one.
    fn sync_dir_unless_committed_later(&self, dir: &str) -> Result<()> {
        if self.ordered_journal {
            Ok(())
        } else {
            sync_dir(&self.root.join(dir))
        }
    }

    fn store(&self, volume: &Volume) -> Result<()> {
        write_atomic(&self.record(&volume.id), &to_json(volume)?)
    }

    /// Makes the image of a new volume: `size` bytes, a copy of `from` when given, reserved in
    /// full when thick. An image left complete by an interrupted attempt of the same creation is
    /// reused; the image appears under its final name only when complete.
    fn make_image(
        &self,
        id: &str,
        size: u64,
        from: Option<&Path>,
        provisioning: Provisioning,
    ) -> Result<()> {
        let path = self.image(id);
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.len() == size {
                return Ok(());
            }
        }
        let mut tmp = fsutil::temp_path(&path);
        let res = (|| {
            let (f, t) = fsutil::create_temp(&path)?;
            tmp = t;
            let method = match from {
                Some(src) => Some(copy::copy_into(src, &f, CopyMode::Auto)?),
                None => None,
            };
            f.set_len(size)?;
            if provisioning == Provisioning::Thick {
                copy::reserve(&f, 0, size)?;
            }
            // Size, reservation and reflinked extents are metadata, which an ordered journal
            // commits with the record's fsync; copied data blocks are not, so they get their own.
            if method == Some(copy::Method::DataCopy) || !self.ordered_journal {
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(format!("create image {}", path.display()), e));
        }
        self.sync_dir_unless_committed_later("volumes")
    }

    fn snapshot_image(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(format!("{id}.img"))
    }

    fn snapshot_record(&self, id: &str) -> PathBuf {
        self.root.join("meta/snapshots").join(format!("{id}.json"))
    }

    fn group_record(&self, id: &str) -> PathBuf {
        self.root.join("meta/groups").join(format!("{id}.json"))
    }

    fn group_index(&self, name: &str) -> PathBuf {
        self.root
            .join("meta/groupnames")
            .join(format!("{}.json", hash_name(name)))
    }

    fn load_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        if !is_snapshot_id(id) {
            return Ok(None);
        }
        let path = self.snapshot_record(id);
        match read_optional(&path)? {
            // An empty record is the trace of a crash before its one fsync: the snapshot was
            // never reported made, and a retry of its name remakes it.
            None => Ok(None),
            Some(bytes) if bytes.is_empty() => Ok(None),
            Some(bytes) => Ok(Some(from_json(&path, &bytes)?)),
        }
    }

    /// The image and size a new volume copies from, checked before anything is written.
    fn resolve_source(
        &self,
        source: &VolumeSource,
    ) -> Result<(PathBuf, u64, Option<String>, bool)> {
        match source {
            VolumeSource::Snapshot(sid) => {
                let rec = self
                    .load_snapshot(sid)?
                    .ok_or_else(|| Error::NotFound(format!("snapshot {sid:?}")))?;
                Ok((
                    self.snapshot_image(sid),
                    rec.snapshot.size_bytes,
                    rec.filesystem,
                    rec.used_as_block,
                ))
            }
            VolumeSource::Volume(vid) => {
                let v = self.volume(vid)?;
                Ok((
                    self.image(vid),
                    v.capacity_bytes,
                    v.filesystem,
                    v.used_as_block,
                ))
            }
        }
    }

    /// Copies a volume's image into a new snapshot (image, then record) under the snapshot's
    /// lock. `group` ties it to a group snapshot.
    fn make_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        group: Option<&str>,
    ) -> Result<Snapshot> {
        let id = snapshot_id_for(name);
        let _lock = self.lock("snapshot", &id)?;
        if let Some(rec) = self.load_snapshot(&id)? {
            if rec.snapshot.name != name || rec.snapshot.source_volume_id != source_volume_id {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} exists for volume {}",
                    rec.snapshot.source_volume_id
                )));
            }
            return Ok(rec.snapshot);
        }
        let volume = self.volume(source_volume_id)?;
        let made = self.copy_into_snapshot(&id, name, &volume, group);
        if made.is_err() {
            let _ = remove_if_exists(&self.snapshot_record(&id));
            let _ = remove_if_exists(&self.snapshot_image(&id));
        }
        made
    }

    fn copy_into_snapshot(
        &self,
        id: &str,
        name: &str,
        volume: &Volume,
        group: Option<&str>,
    ) -> Result<Snapshot> {
        let image = self.snapshot_image(id);
        let (out, tmp) = fsutil::create_temp(&image)
            .map_err(|e| Error::io(format!("create {}", image.display()), e))?;
        let synced = (|| {
            let method = copy::copy_into(&self.image(&volume.id), &out, CopyMode::Auto)?;
            // A data copy's blocks are not covered by a journal commit: they get their own fsync.
            if method == copy::Method::DataCopy || !self.ordered_journal {
                out.sync_all()?;
            }
            out.metadata().map(|m| m.len())
        })();
        let size_bytes = match synced {
            Ok(len) => len,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io(format!("snapshot volume {}", volume.id), e));
            }
        };
        if let Err(e) = std::fs::rename(&tmp, &image) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(format!("rename {}", image.display()), e));
        }
        let rec = SnapshotRecord {
            snapshot: Snapshot {
                id: id.to_string(),
                name: name.to_string(),
                source_volume_id: volume.id.clone(),
                size_bytes,
                created: Timestamp::now(),
                group_id: group.map(str::to_string),
            },
            filesystem: volume.filesystem.clone(),
            used_as_block: volume.used_as_block,
        };
        if self.ordered_journal {
            write_ordered(&self.snapshot_record(id), &to_json(&rec)?)?;
        } else {
            sync_dir(&self.root.join("snapshots"))?;
            write_atomic(&self.snapshot_record(id), &to_json(&rec)?)?;
        }
        Ok(rec.snapshot)
    }

    /// Removes a snapshot: record first, so a crash can leave an orphan image (collected at the
    /// next controller start) but never a record without its image.
    fn remove_snapshot(&self, rec: &SnapshotRecord) -> Result<()> {
        let id = &rec.snapshot.id;
        remove_if_exists(&self.snapshot_record(id))?;
        sync_dir(&self.root.join("meta/snapshots"))?;
        remove_if_exists(&self.snapshot_image(id))?;
        sync_dir(&self.root.join("snapshots"))
    }

    fn load_group(&self, id: &str) -> Result<Option<GroupSnapshot>> {
        if !is_group_id(id) {
            return Ok(None);
        }
        read_json(&self.group_record(id))
    }

    fn statvfs(&self) -> Result<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| Error::io(format!("statvfs {}", self.root.display()), e.into()))
    }

    fn attachments_on(&self, node: &str) -> Result<usize> {
        Ok(self
            .volumes()?
            .iter()
            .filter(|v| v.attachments.contains_key(node))
            .count())
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut Volume) -> Result<bool>) -> Result<Volume> {
        let id = self.checked_id(id)?;
        let _lock = self.lock("volume", id)?;
        let mut volume = self.load_existing(id)?;
        if change(&mut volume)? {
            self.store(&volume)?;
        }
        Ok(volume)
    }
}

/// A repeated CreateVolume is the same request when it asks for the same capabilities and
/// parameters and its range admits the size the volume already has.
fn compatible(existing: &Volume, req: &NewVolume) -> std::result::Result<(), String> {
    if req.required_bytes > existing.capacity_bytes
        || (req.limit_bytes != 0 && existing.capacity_bytes > req.limit_bytes)
    {
        return Err(format!(
            "volume {:?} exists with {} bytes, outside the requested range [{}, {}]",
            existing.name, existing.capacity_bytes, req.required_bytes, req.limit_bytes
        ));
    }
    if req
        .capabilities
        .iter()
        .any(|c| !existing.capabilities.contains(c))
    {
        return Err(format!(
            "volume {:?} exists with other capabilities",
            existing.name
        ));
    }
    if req.source != existing.source {
        return Err(format!(
            "volume {:?} exists with another content source",
            existing.name
        ));
    }
    if req.parameters != existing.parameters {
        return Err(format!(
            "volume {:?} exists with other parameters",
            existing.name
        ));
    }
    Ok(())
}

impl BlockStorage for FilePool {
    fn pool_id(&self) -> &str {
        &self.id
    }

    fn create_volume(&self, req: &NewVolume) -> Result<Volume> {
        let size = round_size(req.required_bytes, req.limit_bytes, req.min_bytes)?;
        let index_path = self.name_index(&req.name);
        let _name_lock = self.lock("name", &hash_name(&req.name))?;

        let id = match read_optional(&index_path)? {
            Some(bytes) => {
                let index: NameRecord = from_json(&index_path, &bytes)?;
                if index.name != req.name || !is_volume_id(&index.volume_id) {
                    return Err(Error::Corrupt(format!(
                        "name index {} does not match {:?}",
                        index_path.display(),
                        req.name
                    )));
                }
                if let Some(existing) = self.load(&index.volume_id)? {
                    compatible(&existing, req).map_err(Error::AlreadyExists)?;
                    return Ok(existing);
                }
                // An earlier attempt stopped between index and record: finish that volume.
                index.volume_id
            }
            None => {
                if let Some(src) = &req.source {
                    self.resolve_source(src)?;
                }
                let available = self.capacity()?.available_bytes;
                if size > available {
                    return Err(Error::Exhausted(format!(
                        "{size} bytes requested, {available} bytes free in the pool"
                    )));
                }
                let id = format!("{VOLUME_ID_PREFIX}{}", uuid::Uuid::new_v4().simple());
                let index = NameRecord {
                    name: req.name.clone(),
                    volume_id: id.clone(),
                };
                // Synced before its rename: an empty index would fail this name for good.
                write_then_rename(&index_path, &to_json(&index)?)?;
                self.sync_dir_unless_committed_later("meta/names")?;
                crate::support::faults::point("create.after_index");
                id
            }
        };

        let source = match &req.source {
            Some(src) => Some(self.resolve_source(src)?),
            None => None,
        };
        if let Some((_, source_size, _, _)) = &source {
            if size < *source_size {
                let _ = remove_if_exists(&index_path);
                return Err(Error::OutOfRange(format!(
                    "{size} bytes is smaller than the source's {source_size} bytes"
                )));
            }
        }
        let volume = Volume {
            id: id.clone(),
            name: req.name.clone(),
            capacity_bytes: size,
            capabilities: req.capabilities.clone(),
            parameters: req.parameters.clone(),
            created: Timestamp::now(),
            attachments: Default::default(),
            filesystem: source.as_ref().and_then(|s| s.2.clone()),
            used_as_block: source.as_ref().is_some_and(|s| s.3),
            formatting: None,
            source: req.source.clone(),
            needs_new_uuid: source.as_ref().is_some_and(|s| s.2.is_some()),
            provisioning: req.provisioning,
            // A restore larger than its snapshot holds a filesystem smaller than the image.
            pending_node_expansion: source.as_ref().is_some_and(|s| s.2.is_some() && size > s.1),
        };
        let made = self
            .make_image(
                &id,
                size,
                source.as_ref().map(|s| s.0.as_path()),
                req.provisioning,
            )
            .inspect(|()| crate::support::faults::point("create.after_image"))
            .and_then(|()| self.store(&volume));
        if let Err(e) = made {
            // Nothing was handed out yet: undo everything so no half volume stays behind.
            let _ = remove_if_exists(&self.image(&id));
            let _ = remove_if_exists(&self.record(&id));
            let _ = remove_if_exists(&index_path);
            return Err(e);
        }
        crate::support::faults::point("create.after_record");
        Ok(volume)
    }

    fn delete_volume(&self, id: &str) -> Result<()> {
        let id = self.checked_id(id)?;
        let lock = self.lock("volume", id)?;
        let volume = self.load_existing(id)?;
        if !volume.attachments.is_empty() {
            let nodes: Vec<_> = volume.attachments.keys().cloned().collect();
            return Err(Error::InUse(format!(
                "volume {id} is still published to {}",
                nodes.join(", ")
            )));
        }
        {
            let name_hash = hash_name(&volume.name);
            let name_lock = self.lock("name", &name_hash)?;
            let index_path = self.name_index(&volume.name);
            if let Some(bytes) = read_optional(&index_path)? {
                let index: NameRecord = from_json(&index_path, &bytes)?;
                if index.volume_id == id {
                    remove_if_exists(&index_path)?;
                }
            }
            name_lock.remove()?;
        }
        crate::support::faults::point("delete.after_index");
        remove_if_exists(&self.image(id))?;
        self.sync_dir_unless_committed_later("volumes")?;
        crate::support::faults::point("delete.after_image");
        remove_if_exists(&self.record(id))?;
        // The delete's one commit, of the index, image and record removals in their order.
        sync_dir(&self.root.join("meta/volumes"))?;
        lock.remove()
    }

    fn volume(&self, id: &str) -> Result<Volume> {
        let id = self.checked_id(id)?;
        self.load_existing(id)
    }

    fn volumes(&self) -> Result<Vec<Volume>> {
        let mut out = Vec::new();
        for id in self.record_ids("meta/volumes", is_volume_id)? {
            // A record deleted between readdir and read is simply gone.
            out.extend(self.load(&id)?);
        }
        Ok(out)
    }

    fn attach(&self, id: &str, node: &str, attachment: &Attachment) -> Result<Volume> {
        let id = self.checked_id(id)?;
        let _lock = self.lock("volume", id)?;
        let mut volume = self.load_existing(id)?;
        let registered = self.node(node)?;
        if let Some(existing) = volume.attachments.get(node) {
            if existing == attachment {
                return Ok(volume);
            }
            return Err(Error::AlreadyExists(format!(
                "volume {id} is already published to node {node} with other options"
            )));
        }
        if let Some(other) = volume.attachments.keys().next() {
            if attachment.capability.mode.single_node()
                || volume
                    .attachments
                    .values()
                    .any(|a| a.capability.mode.single_node())
            {
                return Err(Error::Conflict(format!(
                    "volume {id} is published to node {other} and its access mode allows one node"
                )));
            }
        }
        // The node lock makes count-then-attach atomic across volumes published at once.
        let _node_lock = self.lock("node", node)?;
        if registered.max_volumes > 0 && self.attachments_on(node)? as u64 >= registered.max_volumes
        {
            return Err(Error::Exhausted(format!(
                "node {node} already has its maximum of {} volumes",
                registered.max_volumes
            )));
        }
        volume
            .attachments
            .insert(node.to_string(), attachment.clone());
        self.store(&volume)?;
        crate::support::faults::point("attach.after_store");
        Ok(volume)
    }

    fn detach(&self, id: &str, node: &str) -> Result<()> {
        match self
            .update(id, |v| Ok(v.attachments.remove(node).is_some()))
            .inspect(|_| crate::support::faults::point("detach.after_store"))
        {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn capacity(&self) -> Result<Capacity> {
        let st = self.statvfs()?;
        let frsize = st.fragment_size();
        let total = st.blocks().saturating_mul(frsize);
        let available = st.blocks_available().saturating_mul(frsize);
        Ok(Capacity {
            total_bytes: total,
            available_bytes: available,
            max_volume_bytes: (available / GRANULARITY * GRANULARITY).min(MAX_SIZE),
            min_volume_bytes: GRANULARITY,
        })
    }

    fn register_node(&self, node: &Node) -> Result<()> {
        if !is_node_id(&node.id) {
            return Err(Error::Conflict(format!(
                "node id {:?} must be 1-128 letters, digits, '.', '_' or '-'",
                node.id
            )));
        }
        let _lock = self.lock("node", &node.id)?;
        write_atomic(
            &self
                .root
                .join("meta/nodes")
                .join(format!("{}.json", node.id)),
            &to_json(node)?,
        )
    }

    fn node(&self, id: &str) -> Result<Node> {
        if !is_node_id(id) {
            return Err(Error::NotFound(format!("node {id:?}")));
        }
        let path = self.root.join("meta/nodes").join(format!("{id}.json"));
        match read_optional(&path)? {
            Some(bytes) => from_json(&path, &bytes),
            None => Err(Error::NotFound(format!("node {id}"))),
        }
    }

    fn record_filesystem(&self, id: &str, fs_type: &str) -> Result<Volume> {
        self.update(id, |v| {
            if v.filesystem.is_some() {
                return Ok(false);
            }
            v.filesystem = Some(fs_type.to_string());
            Ok(true)
        })
    }

    fn record_block_use(&self, id: &str) -> Result<Volume> {
        self.update(id, |v| Ok(!std::mem::replace(&mut v.used_as_block, true)))
    }

    fn record_formatting(&self, id: &str, fs_type: &str) -> Result<Volume> {
        self.update(id, |v| {
            let changed = v.filesystem.is_none() && v.formatting.as_deref() != Some(fs_type);
            if changed {
                v.formatting = Some(fs_type.to_string());
            }
            Ok(changed)
        })
    }

    fn health(&self, volume: &Volume) -> Health {
        if let Some(message) = health::lost_filesystem(&self.image(&volume.id), volume) {
            return Health {
                abnormal: true,
                message,
            };
        }
        match std::fs::metadata(self.image(&volume.id)) {
            Ok(meta) if meta.len() == volume.capacity_bytes => Health {
                abnormal: false,
                message: "image present with the recorded size".into(),
            },
            Ok(meta) => Health {
                abnormal: true,
                message: format!(
                    "image is {} bytes but the volume records {} bytes",
                    meta.len(),
                    volume.capacity_bytes
                ),
            },
            Err(e) => Health {
                abnormal: true,
                message: format!("image of volume {} is not readable: {e}", volume.id),
            },
        }
    }

    fn image_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.image(self.checked_id(id)?))
    }

    fn record_new_uuid(&self, id: &str) -> Result<Volume> {
        self.update(id, |v| Ok(std::mem::replace(&mut v.needs_new_uuid, false)))
    }

    fn record_node_expanded(&self, id: &str) -> Result<Volume> {
        self.update(id, |v| {
            Ok(std::mem::replace(&mut v.pending_node_expansion, false))
        })
    }

    fn expand_volume(&self, id: &str, bytes: u64) -> Result<Volume> {
        if bytes > MAX_SIZE {
            return Err(Error::OutOfRange(format!(
                "{bytes} bytes exceeds the largest volume of {MAX_SIZE} bytes"
            )));
        }
        let image = self.image(self.checked_id(id)?);
        self.update(id, |v| {
            if bytes <= v.capacity_bytes {
                return Ok(false);
            }
            let f = OpenOptions::new()
                .write(true)
                .open(&image)
                .map_err(|e| Error::io(format!("open image of volume {id}"), e))?;
            let grow = || -> std::io::Result<()> {
                if v.provisioning == Provisioning::Thick {
                    copy::reserve(&f, v.capacity_bytes, bytes)?;
                }
                f.set_len(bytes)?;
                f.sync_all()
            };
            if let Err(e) = grow() {
                // A reservation cut short by ENOSPC has already grown the image and kept the
                // blocks it got: give both back, so the image stays the size its record says.
                let _ = f.set_len(v.capacity_bytes);
                return Err(Error::io(format!("grow image of volume {id}"), e));
            }
            v.capacity_bytes = bytes;
            v.pending_node_expansion = true;
            Ok(true)
        })
    }

    fn set_provisioning(&self, id: &str, provisioning: Provisioning) -> Result<Volume> {
        let image = self.image(self.checked_id(id)?);
        self.update(id, |v| {
            if v.provisioning == provisioning {
                return Ok(false);
            }
            if provisioning == Provisioning::Thick {
                let reserve = || -> std::io::Result<()> {
                    let f = OpenOptions::new().write(true).open(&image)?;
                    copy::reserve(&f, 0, v.capacity_bytes)?;
                    f.sync_all()
                };
                reserve().map_err(|e| Error::io(format!("reserve volume {id}"), e))?;
            }
            // Thin from thick keeps what is allocated; only future growth is sparse.
            v.provisioning = provisioning;
            Ok(true)
        })
    }

    fn create_snapshot(&self, name: &str, source_volume_id: &str) -> Result<Snapshot> {
        self.make_snapshot(name, source_volume_id, None)
    }

    fn delete_snapshot(&self, id: &str) -> Result<()> {
        if !is_snapshot_id(id) {
            return Err(Error::NotFound(format!("snapshot {id:?}")));
        }
        let lock = self.lock("snapshot", id)?;
        let rec = self
            .load_snapshot(id)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {id}")))?;
        if let Some(group) = &rec.snapshot.group_id {
            if self.load_group(group)?.is_some() {
                return Err(Error::InUse(format!(
                    "snapshot {id} belongs to group snapshot {group}; delete the group"
                )));
            }
        }
        self.remove_snapshot(&rec)?;
        lock.remove()
    }

    fn snapshot(&self, id: &str) -> Result<Snapshot> {
        self.load_snapshot(id)?
            .map(|r| r.snapshot)
            .ok_or_else(|| Error::NotFound(format!("snapshot {id:?}")))
    }

    fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for id in self.record_ids("meta/snapshots", is_snapshot_id)? {
            out.extend(self.load_snapshot(&id)?.map(|r| r.snapshot));
        }
        Ok(out)
    }

    fn create_group_snapshot(&self, name: &str, volume_ids: &[String]) -> Result<GroupSnapshot> {
        let mut wanted: Vec<String> = volume_ids.to_vec();
        wanted.sort();
        wanted.dedup();
        let index_path = self.group_index(name);
        let _name_lock = self.lock("groupname", &hash_name(name))?;
        let mut resumed = None;
        if let Some(bytes) = read_optional(&index_path)? {
            let index: GroupNameRecord = from_json(&index_path, &bytes)?;
            if let Some(group) = self.load_group(&index.group_id)? {
                let mut have: Vec<String> = group
                    .snapshot_ids
                    .iter()
                    .filter_map(|s| self.snapshot(s).ok())
                    .map(|s| s.source_volume_id)
                    .collect();
                have.sort();
                if have != wanted {
                    return Err(Error::AlreadyExists(format!(
                        "group snapshot {name:?} exists for other volumes"
                    )));
                }
                return Ok(group);
            }
            // An interrupted attempt: finish it under the same id; members already made are
            // found by their names and reused.
            resumed = Some(index.group_id);
        }
        for v in &wanted {
            self.volume(v)?;
        }
        let id = match resumed {
            Some(id) => id,
            None => {
                let id = new_id(GROUP_ID_PREFIX);
                write_atomic(
                    &index_path,
                    &to_json(&GroupNameRecord {
                        name: name.to_string(),
                        group_id: id.clone(),
                    })?,
                )?;
                id
            }
        };
        let mut made: Vec<Snapshot> = Vec::new();
        let mut failure = None;
        for v in &wanted {
            match self.make_snapshot(&format!("{name}/{v}"), v, Some(&id)) {
                Ok(s) => made.push(s),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let group = GroupSnapshot {
            id: id.clone(),
            name: name.to_string(),
            snapshot_ids: made.iter().map(|s| s.id.clone()).collect(),
            created: made
                .first()
                .map(|s| s.created)
                .unwrap_or_else(Timestamp::now),
        };
        let stored = match failure {
            Some(e) => Err(e),
            None => write_atomic(&self.group_record(&id), &to_json(&group)?),
        };
        if let Err(e) = stored {
            // All or nothing: undo every member made so far.
            for s in &made {
                if let Ok(Some(rec)) = self.load_snapshot(&s.id) {
                    let _ = self.remove_snapshot(&rec);
                }
            }
            let _ = remove_if_exists(&index_path);
            return Err(e);
        }
        Ok(group)
    }

    fn group_snapshot(&self, id: &str) -> Result<GroupSnapshot> {
        self.load_group(id)?
            .ok_or_else(|| Error::NotFound(format!("group snapshot {id:?}")))
    }

    fn delete_group_snapshot(&self, id: &str) -> Result<()> {
        if !is_group_id(id) {
            return Err(Error::NotFound(format!("group snapshot {id:?}")));
        }
        let lock = self.lock("group", id)?;
        let group = self
            .load_group(id)?
            .ok_or_else(|| Error::NotFound(format!("group snapshot {id}")))?;
        {
            let name_lock = self.lock("groupname", &hash_name(&group.name))?;
            remove_if_exists(&self.group_index(&group.name))?;
            name_lock.remove()?;
        }
        for sid in &group.snapshot_ids {
            if let Some(rec) = self.load_snapshot(sid)? {
                self.remove_snapshot(&rec)?;
            }
        }
        remove_if_exists(&self.group_record(id))?;
        sync_dir(&self.root.join("meta/groups"))?;
        lock.remove()
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| Error::Corrupt(e.to_string()))
}

/// Reads a JSON record; `None` when the file does not exist.
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match read_optional(path)? {
        None => Ok(None),
        Some(bytes) => from_json(path, &bytes).map(Some),
    }
}

fn from_json<T: for<'de> Deserialize<'de>>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{AccessMode, AccessType, Capability};

    fn mount_cap(mode: AccessMode) -> Capability {
        Capability {
            access: AccessType::Mount {
                fs_type: None,
                mount_flags: vec![],
            },
            mode,
        }
    }

    fn req(name: &str, required: u64) -> NewVolume {
        NewVolume {
            name: name.into(),
            required_bytes: required,
            limit_bytes: 0,
            min_bytes: 0,
            capabilities: vec![mount_cap(AccessMode::SingleNodeWriter)],
            parameters: Default::default(),
            source: None,
            provisioning: Provisioning::Thin,
        }
    }

    fn pool() -> (tempfile::TempDir, FilePool) {
        let dir = tempfile::tempdir().unwrap();
        let pool = FilePool::open(dir.path()).unwrap();
        (dir, pool)
    }

    fn node(pool: &FilePool, id: &str, max: u64) {
        pool.register_node(&Node {
            id: id.into(),
            max_volumes: max,
            registered: Timestamp::now(),
        })
        .unwrap();
    }

    #[test]
    fn sizes_round_to_granularity_or_fail_out_of_range() {
        const MIB: u64 = 1 << 20;
        let cases: &[(u64, u64, u64, Option<u64>)] = &[
            (0, 0, 0, Some(DEFAULT_SIZE)),
            (10 << 30, 0, 0, Some(10 << 30)),
            (1, 0, 0, Some(MIB)),
            (MIB + 1, 0, 0, Some(2 * MIB)),
            (MIB + 1, MIB + 2, 0, None),
            (0, 5 * MIB, 0, Some(5 * MIB)),
            (0, MIB - 1, 0, None),
            (2 * MIB, MIB, 0, None),
            (MIB, 0, 300 * MIB, Some(300 * MIB)),
            (MIB, 100 * MIB, 300 * MIB, None),
            (MAX_SIZE + 1, 0, 0, None),
        ];
        for &(required, limit, min, want) in cases {
            let got = round_size(required, limit, min).ok();
            assert_eq!(got, want, "required={required} limit={limit} min={min}");
        }
    }

    #[test]
    fn ids_and_node_ids_are_shape_checked() {
        assert!(is_volume_id("vol-0123456789abcdef0123456789abcdef"));
        for bad in [
            "",
            "vol-",
            "vol-0123456789ABCDEF0123456789abcdef",
            "vol-../../../../etc/passwd000000000",
            "x-0123456789abcdef0123456789abcdef",
        ] {
            assert!(!is_volume_id(bad), "{bad:?}");
        }
        assert!(is_node_id("node-1.example"));
        for bad in ["", "-a", "a-", "a/b", "..", ".hidden", &"a".repeat(129)] {
            assert!(!is_node_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn create_is_idempotent_by_name_and_rejects_incompatible_repeat() {
        let (_d, pool) = pool();
        let a = pool.create_volume(&req("pvc-a", 8 << 20)).unwrap();
        let again = pool.create_volume(&req("pvc-a", 8 << 20)).unwrap();
        assert_eq!(a, again);
        let bigger = pool.create_volume(&req("pvc-a", 16 << 20));
        assert!(matches!(bigger, Err(Error::AlreadyExists(_))));
        let image = pool.image_path(&a.id).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 20);
        assert_eq!(pool.volumes().unwrap().len(), 1);
    }

    #[test]
    fn concurrent_creates_of_one_name_make_one_volume() {
        let (_d, pool) = pool();
        let pool = std::sync::Arc::new(pool);
        let ids: Vec<String> = (0..8)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || pool.create_volume(&req("same", 1 << 20)).unwrap().id)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(ids.iter().all(|id| id == &ids[0]));
        assert_eq!(pool.volumes().unwrap().len(), 1);
    }

    #[test]
    fn interrupted_create_is_finished_by_the_retry() {
        let (_d, pool) = pool();
        // Simulate a crash after the name index was written but before image and record.
        let id = "vol-00000000000000000000000000000001";
        let index = NameRecord {
            name: "pvc-crash".into(),
            volume_id: id.into(),
        };
        write_atomic(&pool.name_index("pvc-crash"), &to_json(&index).unwrap()).unwrap();
        let v = pool.create_volume(&req("pvc-crash", 2 << 20)).unwrap();
        assert_eq!(v.id, id);
        assert_eq!(
            std::fs::metadata(pool.image_path(id).unwrap())
                .unwrap()
                .len(),
            2 << 20
        );
    }

    #[test]
    fn delete_removes_everything_and_refuses_while_attached() {
        let (dir, pool) = pool();
        node(&pool, "n1", 0);
        let v = pool.create_volume(&req("pvc-d", 1 << 20)).unwrap();
        let att = Attachment {
            read_only: false,
            capability: mount_cap(AccessMode::SingleNodeWriter),
        };
        pool.attach(&v.id, "n1", &att).unwrap();
        assert!(matches!(pool.delete_volume(&v.id), Err(Error::InUse(_))));
        pool.detach(&v.id, "n1").unwrap();
        pool.delete_volume(&v.id).unwrap();
        assert!(matches!(pool.delete_volume(&v.id), Err(Error::NotFound(_))));
        for sub in ["volumes", "meta/volumes", "meta/names"] {
            let left: Vec<_> = std::fs::read_dir(dir.path().join(sub)).unwrap().collect();
            assert!(left.is_empty(), "{sub} not empty: {left:?}");
        }
        // The name is free again.
        let again = pool.create_volume(&req("pvc-d", 1 << 20)).unwrap();
        assert_ne!(again.id, v.id);
    }

    #[test]
    fn attach_enforces_modes_limits_and_identity() {
        let (_d, pool) = pool();
        node(&pool, "n1", 2);
        node(&pool, "n2", 0);
        let rw = Attachment {
            read_only: false,
            capability: mount_cap(AccessMode::SingleNodeWriter),
        };
        let v = pool.create_volume(&req("v1", 1 << 20)).unwrap();
        pool.attach(&v.id, "n1", &rw).unwrap();
        pool.attach(&v.id, "n1", &rw).unwrap();
        let ro = Attachment {
            read_only: true,
            ..rw.clone()
        };
        assert!(matches!(
            pool.attach(&v.id, "n1", &ro),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            pool.attach(&v.id, "n2", &rw),
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            pool.attach(&v.id, "nope", &rw),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            pool.attach("vol-ffffffffffffffffffffffffffffffff", "n1", &rw),
            Err(Error::NotFound(_))
        ));

        let v2 = pool.create_volume(&req("v2", 1 << 20)).unwrap();
        let v3 = pool.create_volume(&req("v3", 1 << 20)).unwrap();
        pool.attach(&v2.id, "n1", &rw).unwrap();
        assert!(matches!(
            pool.attach(&v3.id, "n1", &rw),
            Err(Error::Exhausted(_))
        ));

        let shared = Attachment {
            read_only: true,
            capability: mount_cap(AccessMode::MultiNodeReaderOnly),
        };
        pool.attach(&v3.id, "n2", &shared).unwrap();
        node(&pool, "n3", 0);
        pool.attach(&v3.id, "n3", &shared).unwrap();
        assert_eq!(pool.volume(&v3.id).unwrap().attachments.len(), 2);
    }

    #[test]
    fn filesystem_record_is_first_writer_wins_and_health_sees_a_missing_image() {
        let (_d, pool) = pool();
        let v = pool.create_volume(&req("fs", 1 << 20)).unwrap();
        assert!(!pool.health(&v).abnormal);
        pool.record_filesystem(&v.id, "ext4").unwrap();
        let v2 = pool.record_filesystem(&v.id, "xfs").unwrap();
        assert_eq!(v2.filesystem.as_deref(), Some("ext4"));
        std::fs::remove_file(pool.image_path(&v.id).unwrap()).unwrap();
        assert!(pool.health(&v).abnormal);
    }

    #[test]
    fn snapshots_are_idempotent_by_name_and_independent_of_their_source() {
        let (_d, pool) = pool();
        let v = pool.create_volume(&req("src", 2 << 20)).unwrap();
        let w = pool.create_volume(&req("other", 2 << 20)).unwrap();
        let s = pool.create_snapshot("s1", &v.id).unwrap();
        assert_eq!(pool.create_snapshot("s1", &v.id).unwrap(), s);
        assert!(matches!(
            pool.create_snapshot("s1", &w.id),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            pool.create_snapshot("s2", "vol-00000000000000000000000000000000"),
            Err(Error::NotFound(_))
        ));
        pool.delete_volume(&v.id).unwrap();
        let restored = pool
            .create_volume(&NewVolume {
                source: Some(VolumeSource::Snapshot(s.id.clone())),
                ..req("restored", 4 << 20)
            })
            .unwrap();
        assert_eq!(restored.capacity_bytes, 4 << 20);
        assert_eq!(pool.snapshots().unwrap().len(), 1);
        pool.delete_snapshot(&s.id).unwrap();
        assert!(matches!(
            pool.delete_snapshot(&s.id),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn a_snapshot_cut_short_by_a_crash_is_absent_and_collected() {
        let (_d, pool) = pool();
        let v = pool.create_volume(&req("src", 1 << 20)).unwrap();
        let s = pool.create_snapshot("s", &v.id).unwrap();
        // What a crash before the record's fsync can leave: an empty record beside the image,
        // and a half copy under a temporary name.
        std::fs::write(pool.snapshot_record(&s.id), b"").unwrap();
        let half = super::fsutil::temp_path(&pool.snapshot_image("snap-x"));
        std::fs::write(&half, b"partial").unwrap();
        assert!(matches!(pool.snapshot(&s.id), Err(Error::NotFound(_))));
        assert!(pool.snapshots().unwrap().is_empty());
        assert_eq!(pool.collect_garbage().unwrap().temp_files, 1);
        assert_eq!(pool.collect_orphan_snapshots().unwrap(), 1);
        assert!(!pool.snapshot_image(&s.id).exists() && !half.exists());
        // The retry of the same name makes it whole.
        assert_eq!(pool.create_snapshot("s", &v.id).unwrap().id, s.id);
    }

    #[test]
    fn a_second_controller_never_collects_a_snapshot_being_made() {
        let (d, pool) = pool();
        let v = pool.create_volume(&req("src", 1 << 20)).unwrap();
        let s = pool.create_snapshot("s", &v.id).unwrap();
        // Another controller's snapshot between the image's rename and its record: the record
        // is not written yet, and its writer holds the snapshot lock.
        let record = pool.snapshot_record(&s.id);
        let saved = std::fs::read(&record).unwrap();
        std::fs::remove_file(&record).unwrap();
        let writer = pool.lock("snapshot", &s.id).unwrap();
        let other = FilePool::open(d.path()).unwrap();
        let collector = std::thread::spawn(move || other.collect_orphan_snapshots().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !collector.is_finished(),
            "the collector waits for the writer's lock"
        );
        std::fs::write(&record, &saved).unwrap();
        drop(writer);
        assert_eq!(
            collector.join().unwrap(),
            0,
            "a finished snapshot is never removed"
        );
        assert!(pool.snapshot_image(&s.id).exists());
        assert_eq!(pool.snapshot(&s.id).unwrap(), s);
    }

    #[test]
    fn expansion_grows_exactly_and_never_shrinks_and_thick_reserves() {
        use std::os::unix::fs::MetadataExt;
        let (_d, pool) = pool();
        let v = pool.create_volume(&req("v", 4 << 20)).unwrap();
        let grown = pool.expand_volume(&v.id, 8 << 20).unwrap();
        assert_eq!(grown.capacity_bytes, 8 << 20);
        assert!(grown.pending_node_expansion);
        assert_eq!(
            pool.expand_volume(&v.id, 2 << 20).unwrap().capacity_bytes,
            8 << 20
        );
        let image = pool.image_path(&v.id).unwrap();
        assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 20);
        assert!(
            std::fs::metadata(&image).unwrap().blocks() * 512 < 1 << 20,
            "thin stays sparse"
        );
        pool.set_provisioning(&v.id, Provisioning::Thick).unwrap();
        assert!(std::fs::metadata(&image).unwrap().blocks() * 512 >= 8 << 20);
        pool.expand_volume(&v.id, 12 << 20).unwrap();
        assert!(
            std::fs::metadata(&image).unwrap().blocks() * 512 >= 12 << 20,
            "thick growth reserves too"
        );
    }

    #[test]
    fn group_snapshots_roll_back_when_a_member_fails() {
        let (_d, pool) = pool();
        let a = pool.create_volume(&req("a", 1 << 20)).unwrap();
        let b = pool.create_volume(&req("b", 1 << 20)).unwrap();
        // Member b's image is gone: its snapshot fails after a's was made.
        std::fs::remove_file(pool.image_path(&b.id).unwrap()).unwrap();
        let res = pool.create_group_snapshot("g", &[a.id.clone(), b.id.clone()]);
        assert!(res.is_err());
        assert!(
            pool.snapshots().unwrap().is_empty(),
            "a's snapshot must be rolled back"
        );
        let c = pool.create_volume(&req("c", 1 << 20)).unwrap();
        let g = pool
            .create_group_snapshot("g", &[a.id.clone(), c.id.clone()])
            .unwrap();
        assert_eq!(
            pool.create_group_snapshot("g", &[c.id.clone(), a.id.clone()])
                .unwrap(),
            g
        );
        assert!(matches!(
            pool.create_group_snapshot("g", std::slice::from_ref(&a.id)),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            pool.delete_snapshot(&g.snapshot_ids[0]),
            Err(Error::InUse(_))
        ));
        pool.delete_group_snapshot(&g.id).unwrap();
        assert!(pool.snapshots().unwrap().is_empty());
    }

    #[test]
    fn two_opens_of_a_new_pool_agree_on_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let a = FilePool::open(dir.path()).unwrap();
        let b = FilePool::open(dir.path()).unwrap();
        assert_eq!(a.pool_id(), b.pool_id());
        assert_eq!(a.pool_id().len(), 32);
    }
}
