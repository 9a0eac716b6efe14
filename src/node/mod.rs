//! Node logic: staging (loop attach, fail-closed format, mount), publishing (bind mounts), stats.
//! Nothing is remembered in memory between calls: every call reads the truth from the kernel
//! (`/proc/self/mountinfo`, sysfs) and the pool, so a restarted process, or a machine that lost all
//! its loop devices and mounts, is handled by the same code as the first call.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::controller::check_fits;
use crate::csi::validate;
use crate::daemon::metrics::{time_phase, Phase};
use crate::error::{Error, Result};
use crate::host::{AttachOptions, FileId, FsStats, FsType, Host, LoopDevice, MountEntry, Probe};
use crate::storage::{BlockStorage, Capability, Health, Node, Timestamp, Volume};
use crate::support::guard::OpGuards;

pub struct NodeService {
    backend: Arc<dyn BlockStorage>,
    host: Arc<dyn Host>,
    node_id: String,
    max_volumes: u64,
    default_fs: FsType,
    guards: OpGuards,
}

pub struct StageRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
}

pub struct PublishRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target: PathBuf,
    pub capability: Capability,
    pub read_only: bool,
}

/// What NodeGetVolumeStats reports.
pub enum Usage {
    Filesystem(FsStats),
    Block { total_bytes: u64 },
}

impl NodeService {
    pub fn new(
        backend: Arc<dyn BlockStorage>,
        host: Arc<dyn Host>,
        node_id: String,
        max_volumes: u64,
        default_fs: FsType,
    ) -> NodeService {
        NodeService {
            backend,
            host,
            node_id,
            max_volumes,
            default_fs,
            guards: OpGuards::default(),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn max_volumes(&self) -> u64 {
        self.max_volumes
    }

    pub fn pool_id(&self) -> &str {
        self.backend.pool_id()
    }

    pub fn host(&self) -> &dyn Host {
        &*self.host
    }

    /// Registers this node in the pool (so ControllerPublish knows it) and logs what the kernel
    /// says is attached and mounted from the pool, the state every later call starts from.
    pub fn start(&self) -> Result<()> {
        self.backend.register_node(&Node {
            id: self.node_id.clone(),
            max_volumes: self.max_volumes,
            registered: Timestamp::now(),
        })?;
        let mounts = self.host.mounts()?;
        for dev in self.host.loop_devices()? {
            let Some(id) = self.volume_of_device(&dev) else {
                continue;
            };
            let at: Vec<String> = mounts
                .iter()
                .filter(|m| uses_device(m, &dev))
                .map(|m| m.mount_point.display().to_string())
                .collect();
            info!(volume_id = %id, device = %dev.path.display(), mounts = ?at, deleted = dev.backing_deleted, "found attached volume");
        }
        Ok(())
    }

    /// The volume whose image backs `dev`, if it is one of this pool's: by path, or by inode
    /// when sysfs shows the path cut short (see `loops_of`).
    fn volume_of_device(&self, dev: &LoopDevice) -> Option<String> {
        let id = dev.backing_file.file_stem()?.to_str()?;
        let image = self.backend.image_path(id).ok()?;
        let same = image == dev.backing_file
            || (dev.backing_id.is_some() && FileId::of(&image) == dev.backing_id);
        same.then(|| id.to_string())
    }

    /// The loop devices backed by `image`, including ones whose image was deleted: by path, or
    /// by inode when the path sysfs shows is cut short (the device was attached from a mount namespace that is gone, such as a
    /// previous node plugin container).
    fn loops_of(&self, image: &Path) -> Result<Vec<LoopDevice>> {
        let id = FileId::of(image);
        Ok(self
            .host
            .loop_devices()?
            .into_iter()
            .filter(|d| d.backing_file == image || (id.is_some() && d.backing_id == id))
            .collect())
    }

    fn live_loop(&self, image: &Path) -> Result<Option<LoopDevice>> {
        let loops = self.loops_of(image)?;
        if loops.iter().filter(|d| !d.backing_deleted).count() > 1 {
            warn!(image = %image.display(), "image is attached to several loop devices");
        }
        Ok(loops.into_iter().find(|d| !d.backing_deleted))
    }

    fn published_volume(&self, id: &str) -> Result<Volume> {
        let volume = self.backend.volume(id)?;
        if !volume.attachments.contains_key(&self.node_id) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is not published to node {}",
                self.node_id
            )));
        }
        Ok(volume)
    }

    pub fn stage(&self, req: &StageRequest) -> Result<()> {
        let _guard = self.guards.acquire(&req.volume_id)?;
        validate::no_symlinks(&req.staging_path, "staging_target_path")?;
        let volume = self.published_volume(&req.volume_id)?;
        check_fits(&volume, &req.capability)?;
        let image = self.backend.image_path(&volume.id)?;
        let mounts = self.host.mounts()?;
        let existing = self.live_loop(&image)?;

        if req.capability.is_block() {
            if let Some(m) = top_mount(&mounts, &req.staging_path) {
                if existing.as_ref().is_some_and(|d| d.dev == m.dev) {
                    return Err(Error::AlreadyExists(format!(
                        "volume {} is staged at {} as a filesystem",
                        volume.id,
                        req.staging_path.display()
                    )));
                }
            }
            // Record first: from now on the contents are the user's raw data, never formatted.
            self.backend.record_block_use(&volume.id)?;
            if existing.is_none() {
                let dev = time_phase(Phase::Attach, || self.attach(&image))?;
                crate::support::faults::point("stage.after_attach");
                info!(volume_id = %volume.id, device = %dev.path.display(), "attached for block access");
            }
            return Ok(());
        }

        if let Some(m) = top_mount(&mounts, &req.staging_path) {
            match &existing {
                Some(dev) if dev.dev == m.dev => {
                    return self.check_staged_mount(&volume, req, m);
                }
                _ if self.is_stale(m)? => {
                    // The device under this mount is gone (as after a crash between detach and
                    // unmount): the mount can only return I/O errors, so replace it.
                    warn!(volume_id = %volume.id, path = %req.staging_path.display(), dev = %m.dev, "replacing a stale staging mount");
                    self.host.unmount(&req.staging_path)?;
                }
                _ => {
                    return Err(Error::AlreadyExists(format!(
                        "staging path {} already holds another device ({})",
                        req.staging_path.display(),
                        m.dev
                    )))
                }
            }
        }

        // Checked before attaching, so a bad path costs no attach and no format.
        ensure_dir(&req.staging_path)?;
        let attached_here = existing.is_none();
        let dev = match existing {
            Some(d) => d,
            None => time_phase(Phase::Attach, || self.attach(&image))?,
        };
        crate::support::faults::point("stage.after_attach");
        let res = self.format_and_mount(&volume, req, &dev);
        if res.is_err() && attached_here {
            if let Err(e) = self.host.detach_loop(&dev) {
                warn!(volume_id = %volume.id, error = %e, "detach after a failed stage");
            }
        }
        res
    }

    fn attach(&self, image: &Path) -> Result<LoopDevice> {
        Ok(self.host.attach_loop(
            image,
            AttachOptions {
                read_only: false,
                direct_io: true,
            },
        )?)
    }

    /// A mount whose device is no longer attached.
    fn is_stale(&self, m: &MountEntry) -> Result<bool> {
        const LOOP_MAJOR: u32 = 7;
        Ok(m.dev.major == LOOP_MAJOR && !self.host.loop_devices()?.iter().any(|d| d.dev == m.dev))
    }

    fn check_staged_mount(
        &self,
        volume: &Volume,
        req: &StageRequest,
        m: &MountEntry,
    ) -> Result<()> {
        if let Some(want) = req.capability.fs_type() {
            if want != m.fs_type {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged with {}, not {want}",
                    volume.id, m.fs_type
                )));
            }
        }
        let read_only = req.capability.mode.read_only();
        if m.read_only() != read_only {
            return Err(Error::AlreadyExists(format!(
                "volume {} is staged {}",
                volume.id,
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        Ok(())
    }

    /// The fail-closed core: mkfs runs only when the probe positively says blank and the pool
    /// has never recorded a filesystem or raw use for this volume.
    fn format_and_mount(
        &self,
        volume: &Volume,
        req: &StageRequest,
        dev: &LoopDevice,
    ) -> Result<()> {
        let probe = match self.redo_interrupted_format(volume, req, dev)? {
            Some(fs) => Ok(Probe::Filesystem {
                fs_type: fs.as_str().to_string(),
                uuid: None,
            }),
            None => time_phase(Phase::Probe, || self.host.probe(&dev.path)),
        };
        let fs = match probe {
            Err(e) => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot tell whether volume {} holds data ({e}); refusing to format it",
                    volume.id
                )))
            }
            Ok(Probe::Other { description }) => {
                return Err(Error::FailedPrecondition(format!(
                "volume {} holds {description}, not a filesystem; refusing to format or mount it",
                volume.id
            )))
            }
            Ok(Probe::Filesystem { fs_type, .. }) => {
                let Some(found) = FsType::parse(&fs_type) else {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} holds an unsupported {fs_type} filesystem",
                        volume.id
                    )));
                };
                if let Some(want) = req.capability.fs_type() {
                    if want != found.as_str() {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {} holds {fs_type}, not the requested {want}",
                            volume.id
                        )));
                    }
                }
                if volume.filesystem.is_none() {
                    self.backend.record_filesystem(&volume.id, found.as_str())?;
                }
                if volume.needs_new_uuid {
                    // A restore or clone still has its origin's UUID; both must be mountable
                    // side by side. Any failure leaves the volume untouched and unstaged.
                    self.host
                        .new_fs_uuid(&dev.path, found, &req.staging_path)
                        .map_err(|e| {
                            Error::FailedPrecondition(format!(
                                "could not give the copied filesystem of volume {} its own UUID: {e}",
                                volume.id
                            ))
                        })?;
                    self.backend.record_new_uuid(&volume.id)?;
                    info!(volume_id = %volume.id, "gave the copied filesystem a new UUID");
                }
                if volume.pending_node_expansion && found == FsType::Ext4 {
                    // Growing before the mount needs no online-resize privilege; if it fails,
                    // NodeExpandVolume grows it online later.
                    match self.host.grow_unmounted_fs(&dev.path, found) {
                        Ok(()) => {
                            self.backend.record_node_expanded(&volume.id)?;
                        }
                        Err(e) => {
                            warn!(volume_id = %volume.id, error = %e, "offline grow before mount")
                        }
                    }
                }
                found
            }
            Ok(Probe::Blank) => {
                if let Some(recorded) = &volume.filesystem {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} recorded a {recorded} filesystem but its device reads blank: \
                         data may be at risk, refusing to format",
                        volume.id
                    )));
                }
                if volume.used_as_block {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} was used as a raw block device; refusing to format it",
                        volume.id
                    )));
                }
                let fs = req
                    .capability
                    .fs_type()
                    .and_then(FsType::parse)
                    .unwrap_or(self.default_fs);
                info!(volume_id = %volume.id, device = %dev.path.display(), fs = fs.as_str(), "formatting blank volume");
                self.backend.record_formatting(&volume.id, fs.as_str())?;
                time_phase(Phase::Format, || self.host.mkfs(&dev.path, fs))?;
                crate::support::faults::point("stage.after_mkfs");
                self.backend.record_filesystem(&volume.id, fs.as_str())?;
                if volume.pending_node_expansion {
                    // mkfs filled the whole (already grown) device.
                    self.backend.record_node_expanded(&volume.id)?;
                }
                crate::support::faults::point("stage.after_record_filesystem");
                fs
            }
        };
        let flags = match &req.capability.access {
            crate::storage::AccessType::Mount { mount_flags, .. } => mount_flags.as_slice(),
            crate::storage::AccessType::Block => &[],
        };
        let opts = validate::mount_options(flags, req.capability.mode.read_only())?;
        time_phase(Phase::Mount, || {
            self.host
                .mount(&dev.path, &req.staging_path, fs.as_str(), &opts)
        })?;
        crate::support::faults::point("stage.after_mount");
        info!(volume_id = %volume.id, path = %req.staging_path.display(), fs = fs.as_str(), "staged");
        Ok(())
    }

    /// A format this driver started on a volume that was never mounted (`formatting` without
    /// `filesystem`): the process died during mkfs, and the device may hold a half-written
    /// filesystem that blkid still recognises but that cannot be mounted. Nothing else ever
    /// wrote there, so the format is redone rather than adopted or refused (which would leave
    /// the volume unusable forever).
    fn redo_interrupted_format(
        &self,
        volume: &Volume,
        req: &StageRequest,
        dev: &LoopDevice,
    ) -> Result<Option<FsType>> {
        let (None, Some(started), false) =
            (&volume.filesystem, &volume.formatting, volume.used_as_block)
        else {
            return Ok(None);
        };
        let fs = req
            .capability
            .fs_type()
            .or(Some(started.as_str()))
            .and_then(FsType::parse)
            .unwrap_or(self.default_fs);
        warn!(volume_id = %volume.id, device = %dev.path.display(), fs = fs.as_str(), "redoing a format that was interrupted");
        time_phase(Phase::Format, || self.host.redo_mkfs(&dev.path, fs))?;
        crate::support::faults::point("stage.after_mkfs");
        Ok(Some(fs))
    }

    /// Undoes stage: unmounts the staging path if it holds this volume (or a dead device) and
    /// detaches the volume's loop devices. Not staged is success.
    pub fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let _guard = self.guards.acquire(volume_id)?;
        validate::no_symlinks(staging_path, "staging_target_path")?;
        let image = self.backend.image_path(volume_id)?;
        let loops = self.loops_of(&image)?;
        let mounts = self.host.mounts()?;
        if let Some(m) = top_mount(&mounts, staging_path) {
            if loops.iter().any(|d| d.dev == m.dev) || self.is_stale(m)? {
                self.host.unmount(staging_path)?;
                crate::support::faults::point("unstage.after_unmount");
            } else {
                return Err(Error::FailedPrecondition(format!(
                    "staging path {} holds another device ({}), not volume {volume_id}",
                    staging_path.display(),
                    m.dev
                )));
            }
        }
        let mounts = self.host.mounts()?;
        for dev in &loops {
            if let Some(m) = mounts.iter().find(|m| uses_device(m, dev)) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is still mounted at {}",
                    m.mount_point.display()
                )));
            }
        }
        for dev in &loops {
            self.host.detach_loop(dev)?;
            crate::support::faults::point("unstage.after_detach");
            info!(volume_id, device = %dev.path.display(), "detached");
        }
        Ok(())
    }

    pub fn publish(&self, req: &PublishRequest) -> Result<()> {
        let _guard = self.guards.acquire(&req.volume_id)?;
        validate::no_symlinks(&req.target, "target_path")?;
        validate::no_symlinks(&req.staging_path, "staging_target_path")?;
        let volume = self.published_volume(&req.volume_id)?;
        check_fits(&volume, &req.capability)?;
        let image = self.backend.image_path(&volume.id)?;
        let Some(dev) = self.live_loop(&image)? else {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is not staged on this node",
                volume.id
            )));
        };
        let read_only = req.read_only || req.capability.mode.read_only();
        let mounts = self.host.mounts()?;
        let block = req.capability.is_block();
        if !block {
            match top_mount(&mounts, &req.staging_path) {
                Some(m) if m.dev == dev.dev => {}
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} is not staged at {}",
                        volume.id,
                        req.staging_path.display()
                    )))
                }
            }
        }

        if let Some(m) = top_mount(&mounts, &req.target) {
            if self.mount_is_of(m, &dev, &req.target)? {
                if m.read_only() != read_only {
                    return Err(Error::AlreadyExists(format!(
                        "volume {} is published at {} {}",
                        volume.id,
                        req.target.display(),
                        if m.read_only() {
                            "read-only"
                        } else {
                            "read-write"
                        }
                    )));
                }
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "target {} already holds another mount",
                req.target.display()
            )));
        }

        if req.capability.mode.single_writer() {
            let elsewhere: Vec<&MountEntry> = mounts
                .iter()
                .filter(|m| m.mount_point != req.staging_path && uses_device(m, &dev))
                .collect();
            if let Some(m) = elsewhere.first() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} allows a single writer and is already published at {}",
                    volume.id,
                    m.mount_point.display()
                )));
            }
        }

        let created = if block {
            ensure_file(&req.target)?
        } else {
            ensure_dir(&req.target)?
        };
        crate::support::faults::point("publish.after_target");
        let source = if block { &dev.path } else { &req.staging_path };
        if let Err(e) = self.host.bind_mount(source, &req.target, read_only) {
            if created {
                let _ = remove_target(&req.target);
            }
            return Err(e.into());
        }
        crate::support::faults::point("publish.after_bind");
        info!(volume_id = %volume.id, target = %req.target.display(), read_only, "published");
        Ok(())
    }

    /// Whether mount `m` at `path` shows the volume on loop device `dev`: a filesystem bind
    /// carries the loop device's number, a bound device node refers to it.
    fn mount_is_of(&self, m: &MountEntry, dev: &LoopDevice, path: &Path) -> Result<bool> {
        if m.dev == dev.dev {
            return Ok(true);
        }
        Ok(self.host.device_number(path)? == Some(dev.dev))
    }

    /// Unmounts and removes a publish target. Anything mounted at the target is unmounted (the
    /// path belongs to this volume by contract); the target is removed only when empty, so data
    /// written into an unmounted directory is never deleted.
    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<()> {
        let _guard = self.guards.acquire(volume_id)?;
        self.backend.image_path(volume_id)?; // a malformed id is NOT_FOUND, as everywhere
        validate::no_symlinks(target, "target_path")?;
        // Stacked mounts (a retried publish that raced) are unmounted one by one; each look at
        // the mount table decides both whether to go on and whether the last unmount did it.
        let mut unmounted = 0;
        while top_mount(&self.host.mounts()?, target).is_some() {
            if unmounted == 16 {
                return Err(Error::Internal(format!(
                    "{} is still mounted after 16 unmounts",
                    target.display()
                )));
            }
            self.host.unmount(target)?;
            unmounted += 1;
            crate::support::faults::point("unpublish.after_unmount");
        }
        remove_target(target)?;
        info!(volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    /// Makes the node see a grown image: refreshes the loop device's size and grows the
    /// filesystem mounted at `path` (block volumes: the device only). Returns the device size.
    pub fn expand(&self, volume_id: &str, path: &str) -> Result<u64> {
        let _guard = self.guards.acquire(volume_id)?;
        let (volume, path, dev) = self.volume_at(volume_id, path)?;
        let dev = dev.ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {volume_id} is not staged on this node"))
        })?;
        let not_here =
            || Error::NotFound(format!("volume {volume_id} is not available at {path:?}"));
        time_phase(Phase::Resize, || self.host.refresh_loop_capacity(&dev))?;
        let size = self.host.device_size(&dev.path)?;
        if self.host.device_number(&path)? == Some(dev.dev) {
            self.backend.record_node_expanded(&volume.id)?;
            return Ok(size);
        }
        let mounts = self.host.mounts()?;
        let m = top_mount(&mounts, &path)
            .filter(|m| m.dev == dev.dev)
            .ok_or_else(not_here)?;
        let fs = FsType::parse(&m.fs_type).ok_or_else(|| {
            Error::FailedPrecondition(format!("cannot grow a {} filesystem", m.fs_type))
        })?;
        time_phase(Phase::Resize, || self.host.grow_fs(&dev.path, &path, fs)).map_err(|e| {
            if e.is_missing_tool() { return Error::from(e) }
            Error::Internal(format!(
                "growing the {} filesystem of volume {volume_id} failed (online ext4 growth needs CAP_SYS_RESOURCE): {e}",
                fs.as_str()
            ))
        })?;
        self.backend.record_node_expanded(&volume.id)?;
        info!(volume_id, path = %path.display(), size, "expanded");
        Ok(size)
    }

    /// The volume, its validated `path` (which must exist: NOT_FOUND otherwise, as for a
    /// relative one) and its loop device on this node if it has one.
    fn volume_at(
        &self,
        volume_id: &str,
        path: &str,
    ) -> Result<(Volume, PathBuf, Option<LoopDevice>)> {
        let volume = self.backend.volume(volume_id)?;
        let not_here =
            || Error::NotFound(format!("volume {volume_id} is not available at {path:?}"));
        let path = validate::path(path, "volume_path").map_err(|_| not_here())?;
        if !path.exists() {
            return Err(not_here());
        }
        let image = self.backend.image_path(&volume.id)?;
        let dev = self.live_loop(&image)?;
        Ok((volume, path, dev))
    }

    pub fn stats(&self, volume_id: &str, path: &str) -> Result<(Usage, Health)> {
        let (volume, path, dev) = self.volume_at(volume_id, path)?;
        let not_here =
            || Error::NotFound(format!("volume {volume_id} is not available at {path:?}"));
        let dev = dev.ok_or_else(not_here)?;
        let health = self.backend.health(&volume);
        if self.host.device_number(&path)? == Some(dev.dev) {
            let total_bytes = self.host.device_size(&dev.path)?;
            return Ok((Usage::Block { total_bytes }, health));
        }
        let mounts = self.host.mounts()?;
        match top_mount(&mounts, &path) {
            Some(m) if m.dev == dev.dev => {
                let stats = self.host.fs_stats(&path)?;
                Ok((Usage::Filesystem(stats), health))
            }
            _ => Err(not_here()),
        }
    }
}

/// The mount on top at `path`, if `path` is a mount point.
fn top_mount<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Whether a mount shows the loop device: a filesystem on it (or a bind of one), or a bind of
/// its device node (which mountinfo shows as the devtmpfs entry named after the device).
fn uses_device(m: &MountEntry, dev: &LoopDevice) -> bool {
    if m.dev == dev.dev {
        return true;
    }
    let node = dev.path.file_name().map(|n| Path::new("/").join(n));
    matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs") && node.as_deref() == Some(m.root.as_path())
}

/// Creates a directory whose parent must exist; true when it was created now.
fn ensure_dir(path: &Path) -> Result<bool> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if path.is_dir() {
                Ok(false)
            } else {
                Err(Error::InvalidArgument(format!(
                    "{} exists and is not a directory",
                    path.display()
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound(format!(
            "parent directory of {} does not exist",
            path.display()
        ))),
        Err(e) => Err(Error::Internal(format!("create {}: {e}", path.display()))),
    }
}

/// Creates an empty file (a bind target for a device node); true when it was created now.
fn ensure_file(path: &Path) -> Result<bool> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if path.is_dir() {
                Err(Error::InvalidArgument(format!(
                    "{} is a directory; a block volume needs a file target",
                    path.display()
                )))
            } else {
                Ok(false)
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound(format!(
            "parent directory of {} does not exist",
            path.display()
        ))),
        Err(e) => Err(Error::Internal(format!("create {}: {e}", path.display()))),
    }
}

/// Removes an unmounted target: an empty directory or a file. Missing is fine; a non-empty
/// directory is refused.
fn remove_target(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::Internal(format!("stat {}: {e}", path.display()))),
    };
    let res = if meta.is_dir() {
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            Err(Error::FailedPrecondition(format!(
                "{} is not empty after unmount; leaving it in place",
                path.display()
            )))
        }
        Err(e) => Err(Error::Internal(format!("remove {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;
    use crate::storage::filepool::FilePool;
    use crate::storage::{AccessMode, AccessType, Attachment, NewVolume};

    struct Env {
        dir: tempfile::TempDir,
        pool: Arc<FilePool>,
        host: Arc<FakeHost>,
        node: NodeService,
    }

    fn cap(block: bool, fs: Option<&str>, mode: AccessMode) -> Capability {
        Capability {
            access: if block {
                AccessType::Block
            } else {
                AccessType::Mount {
                    fs_type: fs.map(str::to_string),
                    mount_flags: vec![],
                }
            },
            mode,
        }
    }

    fn mount_cap() -> Capability {
        cap(false, None, AccessMode::SingleNodeWriter)
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(FilePool::open(&dir.path().join("pool")).unwrap());
        let host = Arc::new(FakeHost::new());
        let node = NodeService::new(pool.clone(), host.clone(), "n1".into(), 0, FsType::Ext4);
        node.start().unwrap();
        std::fs::create_dir(dir.path().join("staging")).unwrap();
        std::fs::create_dir(dir.path().join("pods")).unwrap();
        Env {
            dir,
            pool,
            host,
            node,
        }
    }

    impl Env {
        /// A volume created and published to this node with `c`.
        fn volume(&self, name: &str, c: &Capability) -> String {
            let v = self
                .pool
                .create_volume(&NewVolume {
                    name: name.into(),
                    required_bytes: 1 << 20,
                    limit_bytes: 0,
                    min_bytes: 0,
                    capabilities: vec![c.clone()],
                    parameters: Default::default(),
                    source: None,
                    provisioning: Default::default(),
                })
                .unwrap();
            self.pool
                .attach(
                    &v.id,
                    "n1",
                    &Attachment {
                        read_only: false,
                        capability: c.clone(),
                    },
                )
                .unwrap();
            v.id
        }
        fn staging(&self) -> PathBuf {
            self.dir.path().join("staging")
        }
        fn target(&self, name: &str) -> PathBuf {
            self.dir.path().join("pods").join(name)
        }
        fn stage(&self, id: &str, c: &Capability) -> Result<()> {
            self.node.stage(&StageRequest {
                volume_id: id.into(),
                staging_path: self.staging(),
                capability: c.clone(),
            })
        }
        fn publish(&self, id: &str, target: &Path, c: &Capability) -> Result<()> {
            self.node.publish(&PublishRequest {
                volume_id: id.into(),
                staging_path: self.staging(),
                target: target.to_path_buf(),
                capability: c.clone(),
                read_only: false,
            })
        }
        fn image(&self, id: &str) -> PathBuf {
            self.pool.image_path(id).unwrap()
        }
        fn attached(&self) -> usize {
            self.host.loop_devices().unwrap().len()
        }
    }

    #[test]
    fn first_stage_formats_once_and_repeats_are_no_ops() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        e.stage(&id, &mount_cap()).unwrap();
        e.stage(&id, &mount_cap()).unwrap();
        assert_eq!(e.host.count("mkfs"), 1, "{:?}", e.host.call_log());
        assert_eq!(e.host.count("attach_loop"), 1);
        assert_eq!(e.host.count("mount"), 1);
        assert_eq!(
            e.pool.volume(&id).unwrap().filesystem.as_deref(),
            Some("ext4")
        );
    }

    #[test]
    fn stage_of_a_volume_not_published_here_touches_nothing() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        e.pool.detach(&id, "n1").unwrap();
        assert!(matches!(
            e.stage(&id, &mount_cap()),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(e.host.calls().is_empty(), "{:?}", e.host.call_log());
    }

    #[test]
    fn formatting_fails_closed() {
        // (what the device probes as, whether the pool recorded a filesystem, whether it was raw)
        let cases: Vec<(&str, Option<Probe>, Option<&str>, bool)> = vec![
            ("probe error", None, None, false),
            (
                "other signature",
                Some(Probe::Other {
                    description: "a dos partition table".into(),
                }),
                None,
                false,
            ),
            (
                "blank but recorded ext4",
                Some(Probe::Blank),
                Some("ext4"),
                false,
            ),
            (
                "blank but used as raw block",
                Some(Probe::Blank),
                None,
                true,
            ),
            (
                "unsupported filesystem",
                Some(Probe::Filesystem {
                    fs_type: "btrfs".into(),
                    uuid: None,
                }),
                None,
                false,
            ),
        ];
        for (what, probe, recorded, raw) in cases {
            let e = env();
            let id = e.volume("v", &mount_cap());
            match &probe {
                Some(p) => e.host.set_probe(&e.image(&id), p.clone()),
                None => e.host.fail_probe(&e.image(&id)),
            }
            if let Some(fs) = recorded {
                e.pool.record_filesystem(&id, fs).unwrap();
            }
            if raw {
                e.pool.record_block_use(&id).unwrap();
            }
            let res = e.stage(&id, &mount_cap());
            assert!(
                matches!(res, Err(Error::FailedPrecondition(_))),
                "{what}: {res:?}"
            );
            assert_eq!(e.host.count("mkfs"), 0, "{what}: mkfs must never run");
            assert_eq!(e.host.count("mount"), 0, "{what}");
            assert_eq!(
                e.attached(),
                0,
                "{what}: the loop device must be detached again"
            );
        }
    }

    #[test]
    fn recorded_filesystem_with_blank_probe_says_data_may_be_at_risk() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        e.pool.record_filesystem(&id, "xfs").unwrap();
        let msg = e.stage(&id, &mount_cap()).unwrap_err().to_string();
        assert!(msg.contains("data may be at risk"), "{msg}");
    }

    #[test]
    fn an_existing_filesystem_is_adopted_not_formatted() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        e.host.set_probe(
            &e.image(&id),
            Probe::Filesystem {
                fs_type: "xfs".into(),
                uuid: Some("u".into()),
            },
        );
        e.stage(&id, &mount_cap()).unwrap();
        assert_eq!(e.host.count("mkfs"), 0);
        assert_eq!(
            e.pool.volume(&id).unwrap().filesystem.as_deref(),
            Some("xfs")
        );
        let mounts = e.host.mounts().unwrap();
        assert_eq!(top_mount(&mounts, &e.staging()).unwrap().fs_type, "xfs");
        // Asking for ext4 on an xfs volume is refused.
        e.node.unstage(&id, &e.staging()).unwrap();
        let res = e.stage(&id, &cap(false, Some("ext4"), AccessMode::SingleNodeWriter));
        assert!(res.is_err());
        assert_eq!(e.host.count("mkfs"), 0);
    }

    #[test]
    fn after_a_reboot_stage_and_publish_repair_without_formatting() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        let target = e.target("t");
        e.stage(&id, &mount_cap()).unwrap();
        e.publish(&id, &target, &mount_cap()).unwrap();
        e.host.reboot();
        // Publish without the stage is refused: nothing is staged any more.
        assert!(matches!(
            e.publish(&id, &target, &mount_cap()),
            Err(Error::FailedPrecondition(_))
        ));
        e.stage(&id, &mount_cap()).unwrap();
        e.publish(&id, &target, &mount_cap()).unwrap();
        assert_eq!(e.host.count("mkfs"), 1, "{:?}", e.host.call_log());
        assert_eq!(e.host.count("attach_loop"), 2);
    }

    #[test]
    fn failed_mount_or_bind_leaves_no_device_or_target() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        e.host.fail_next("mount");
        assert!(e.stage(&id, &mount_cap()).is_err());
        assert_eq!(e.attached(), 0);
        e.stage(&id, &mount_cap()).unwrap();
        let target = e.target("t");
        e.host.fail_next("bind_mount");
        assert!(e.publish(&id, &target, &mount_cap()).is_err());
        assert!(
            !target.exists(),
            "a target created by a failed publish must be removed"
        );
    }

    #[test]
    fn single_writer_refuses_a_second_target_and_multi_writer_allows_it() {
        for (mode, second_ok) in [
            (AccessMode::SingleNodeSingleWriter, false),
            (AccessMode::SingleNodeMultiWriter, true),
            (AccessMode::SingleNodeWriter, true),
        ] {
            let e = env();
            let c = cap(false, None, mode);
            let id = e.volume("v", &c);
            e.stage(&id, &c).unwrap();
            e.publish(&id, &e.target("a"), &c).unwrap();
            let res = e.publish(&id, &e.target("b"), &c);
            assert_eq!(res.is_ok(), second_ok, "{mode:?}: {res:?}");
            if !second_ok {
                assert!(matches!(res, Err(Error::FailedPrecondition(_))));
                assert!(!e.target("b").exists());
            }
        }
    }

    #[test]
    fn teardown_order_is_enforced_and_idempotent() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        let target = e.target("t");
        e.stage(&id, &mount_cap()).unwrap();
        e.publish(&id, &target, &mount_cap()).unwrap();
        assert!(target.is_dir());
        // Unstage while a pod still uses the volume is refused and keeps the device.
        assert!(matches!(
            e.node.unstage(&id, &e.staging()),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(e.attached(), 1);
        e.node.unpublish(&id, &target).unwrap();
        e.node.unpublish(&id, &target).unwrap();
        assert!(!target.exists());
        e.node.unstage(&id, &e.staging()).unwrap();
        e.node.unstage(&id, &e.staging()).unwrap();
        assert_eq!(e.attached(), 0);
        assert!(e.host.mounts().unwrap().is_empty());
    }

    #[test]
    fn unpublish_removes_stacked_mounts_one_by_one() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        let target = e.target("t");
        e.stage(&id, &mount_cap()).unwrap();
        e.publish(&id, &target, &mount_cap()).unwrap();
        // What a retried publish racing the first can leave: a second bind on the same target.
        e.host.bind_mount(&e.staging(), &target, false).unwrap();
        e.host.clear_calls();
        e.node.unpublish(&id, &target).unwrap();
        assert_eq!(e.host.count("unmount"), 2, "{:?}", e.host.call_log());
        assert!(top_mount(&e.host.mounts().unwrap(), &target).is_none());
        assert!(!target.exists());
        // A target that cannot be unmounted is an error, not a loop.
        e.publish(&id, &target, &mount_cap()).unwrap();
        e.host.fail_next("unmount");
        assert!(e.node.unpublish(&id, &target).is_err());
    }

    #[test]
    fn block_stage_records_raw_use_and_publishes_the_device() {
        let e = env();
        let c = cap(true, None, AccessMode::SingleNodeWriter);
        let id = e.volume("v", &c);
        e.stage(&id, &c).unwrap();
        assert!(e.pool.volume(&id).unwrap().used_as_block);
        let target = e.target("dev");
        e.publish(&id, &target, &c).unwrap();
        e.publish(&id, &target, &c).unwrap();
        assert!(target.is_file());
        assert_eq!(e.host.count("bind_mount"), 1);
        assert_eq!(e.host.count("mkfs") + e.host.count("probe"), 0);
        let (usage, health) = e.node.stats(&id, target.to_str().unwrap()).unwrap();
        assert!(matches!(usage, Usage::Block { .. }));
        assert!(!health.abnormal);
        e.node.unpublish(&id, &target).unwrap();
        assert!(!target.exists());
        e.node.unstage(&id, &e.staging()).unwrap();
        assert_eq!(e.attached(), 0);
    }

    #[test]
    fn a_copied_filesystem_gets_a_new_uuid_once_and_is_never_formatted() {
        let e = env();
        let src = e.volume("src", &mount_cap());
        e.stage(&src, &mount_cap()).unwrap();
        let restored = e
            .pool
            .create_volume(&NewVolume {
                name: "copy".into(),
                required_bytes: 1 << 20,
                limit_bytes: 0,
                min_bytes: 0,
                capabilities: vec![mount_cap()],
                parameters: Default::default(),
                source: Some(crate::storage::VolumeSource::Volume(src.clone())),
                provisioning: Default::default(),
            })
            .unwrap();
        assert!(restored.needs_new_uuid);
        assert_eq!(restored.filesystem.as_deref(), Some("ext4"));
        e.pool
            .attach(
                &restored.id,
                "n1",
                &Attachment {
                    read_only: false,
                    capability: mount_cap(),
                },
            )
            .unwrap();
        // The fake keys contents by image: the copy holds what the source held.
        e.host.set_probe(
            &e.image(&restored.id),
            Probe::Filesystem {
                fs_type: "ext4".into(),
                uuid: Some("same".into()),
            },
        );
        e.node.unstage(&src, &e.staging()).unwrap();
        e.stage(&restored.id, &mount_cap()).unwrap();
        assert_eq!(e.host.count("new_fs_uuid"), 1);
        assert_eq!(
            e.host.count("mkfs"),
            1,
            "only the source was ever formatted"
        );
        assert!(!e.pool.volume(&restored.id).unwrap().needs_new_uuid);
        e.node.unstage(&restored.id, &e.staging()).unwrap();
        e.stage(&restored.id, &mount_cap()).unwrap();
        assert_eq!(e.host.count("new_fs_uuid"), 1, "once only");
    }

    #[test]
    fn expand_refreshes_the_device_and_grows_the_mounted_filesystem() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        let target = e.target("t");
        e.stage(&id, &mount_cap()).unwrap();
        e.publish(&id, &target, &mount_cap()).unwrap();
        e.pool.expand_volume(&id, 2 << 20).unwrap();
        e.node.expand(&id, target.to_str().unwrap()).unwrap();
        assert_eq!(e.host.count("refresh_loop_capacity"), 1);
        assert_eq!(e.host.count("grow_fs"), 1);
        assert!(!e.pool.volume(&id).unwrap().pending_node_expansion);
        assert!(matches!(
            e.node.expand(&id, "some/path"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn stats_find_the_volume_only_where_it_is() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        let target = e.target("t");
        e.stage(&id, &mount_cap()).unwrap();
        e.publish(&id, &target, &mount_cap()).unwrap();
        let (usage, _) = e.node.stats(&id, target.to_str().unwrap()).unwrap();
        assert!(matches!(usage, Usage::Filesystem(_)));
        for path in ["some/path", "/nonexistent/path"] {
            assert!(
                matches!(e.node.stats(&id, path), Err(Error::NotFound(_))),
                "{path}"
            );
        }
        let elsewhere = e.target("empty");
        std::fs::create_dir(&elsewhere).unwrap();
        assert!(matches!(
            e.node.stats(&id, elsewhere.to_str().unwrap()),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            e.node.stats(
                "vol-00000000000000000000000000000000",
                target.to_str().unwrap()
            ),
            Err(Error::NotFound(_))
        ));
    }
}
