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
//! locks/                     lock files (name-*, volume-*, node-*)
//! ```
//! Crash safety rests on the order of writes. Create: name index, then image, then record; a retry
//! that finds an index without a record finishes the same volume instead of making another.
//! Delete: index, then image, then record; a retry finishes it.

mod gc;
mod signature;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fsutil::{
    create_atomic, hash_name, read_optional, remove_if_exists, sync_dir, write_atomic, FileLock,
};
use super::{
    Attachment, BlockStorage, Capacity, Error, Health, NewVolume, Node, Result, Timestamp, Volume,
};

/// Sizes are multiples of this, so that requested sizes in whole MiB (all Kubernetes quantities
/// in Mi/Gi/Ti) come back exactly as asked.
pub const GRANULARITY: u64 = 1 << 20;
/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Largest image: the file size limit of ext4 pools.
pub const MAX_SIZE: u64 = 16 << 40;

const VOLUME_ID_PREFIX: &str = "vol-";

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

/// True when `id` has the exact shape this pool gives volume ids; anything else is never
/// turned into a path.
pub fn is_volume_id(id: &str) -> bool {
    id.strip_prefix(VOLUME_ID_PREFIX).is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
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
        Ok(FilePool {
            root: root.to_path_buf(),
            id: record.id,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
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
        let path = self.record(id);
        match read_optional(&path)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(from_json(&path, &bytes)?)),
        }
    }

    fn load_existing(&self, id: &str) -> Result<Volume> {
        self.load(id)?
            .ok_or_else(|| Error::NotFound(format!("volume {id}")))
    }

    fn store(&self, volume: &Volume) -> Result<()> {
        write_atomic(&self.record(&volume.id), &to_json(volume)?)
    }

    /// Makes a sparse image of exactly `size` bytes, or reuses the one an interrupted attempt
    /// of the same creation left. The image appears under its final name only when complete.
    fn make_image(&self, id: &str, size: u64) -> Result<()> {
        let path = self.image(id);
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.len() == size {
                return Ok(());
            }
        }
        let mut tmp = super::fsutil::temp_path(&path);
        let res = (|| {
            let (f, t) = super::fsutil::create_temp(&path)?;
            tmp = t;
            f.set_len(size)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(format!("create image {}", path.display()), e));
        }
        sync_dir(&self.root.join("volumes"))
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
                write_atomic(&index_path, &to_json(&index)?)?;
                crate::faults::point("create.after_index");
                id
            }
        };

        let volume = Volume {
            id: id.clone(),
            name: req.name.clone(),
            capacity_bytes: size,
            capabilities: req.capabilities.clone(),
            parameters: req.parameters.clone(),
            created: Timestamp::now(),
            attachments: Default::default(),
            filesystem: None,
            used_as_block: false,
            formatting: None,
        };
        let made = self
            .make_image(&id, size)
            .inspect(|()| crate::faults::point("create.after_image"))
            .and_then(|()| self.store(&volume));
        if let Err(e) = made {
            // Nothing was handed out yet: undo everything so no half volume stays behind.
            let _ = remove_if_exists(&self.image(&id));
            let _ = remove_if_exists(&self.record(&id));
            let _ = remove_if_exists(&index_path);
            return Err(e);
        }
        crate::faults::point("create.after_record");
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
        crate::faults::point("delete.after_index");
        remove_if_exists(&self.image(id))?;
        sync_dir(&self.root.join("volumes"))?;
        crate::faults::point("delete.after_image");
        remove_if_exists(&self.record(id))?;
        sync_dir(&self.root.join("meta/volumes"))?;
        lock.remove()
    }

    fn volume(&self, id: &str) -> Result<Volume> {
        let id = self.checked_id(id)?;
        self.load_existing(id)
    }

    fn volumes(&self) -> Result<Vec<Volume>> {
        let dir = self.root.join("meta/volumes");
        let entries =
            std::fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !is_volume_id(id) {
                continue;
            }
            // A record deleted between readdir and read is simply gone.
            if let Some(v) = self.load(id)? {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
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
        crate::faults::point("attach.after_store");
        Ok(volume)
    }

    fn detach(&self, id: &str, node: &str) -> Result<()> {
        match self
            .update(id, |v| Ok(v.attachments.remove(node).is_some()))
            .inspect(|_| crate::faults::point("detach.after_store"))
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
        if let Some(message) = signature::lost_filesystem(&self.image(&volume.id), volume) {
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
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| Error::Corrupt(e.to_string()))
}

fn from_json<T: for<'de> Deserialize<'de>>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{AccessMode, AccessType, Capability};

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
    fn two_opens_of_a_new_pool_agree_on_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let a = FilePool::open(dir.path()).unwrap();
        let b = FilePool::open(dir.path()).unwrap();
        assert_eq!(a.pool_id(), b.pool_id());
        assert_eq!(a.pool_id().len(), 32);
    }
}
