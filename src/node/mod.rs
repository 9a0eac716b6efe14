//! Node logic: staging (attach, fail-closed format, mount), publishing (bind mounts), stats.
//! Nothing is remembered in memory between calls: every call reads the truth from the kernel
//! (`/proc/self/mountinfo`, sysfs), the device source and the ledger, so a restarted process,
//! or a machine that lost all its devices and mounts, is handled by the same code as the first
//! call. The node never calls the controller's storage API: it learns about a volume from the
//! request and its publish context, its [`device::DeviceSource`] and its [`ledger::Ledger`].

pub mod device;
pub mod format;
pub mod ledger;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use self::device::{Admitted, Device, DeviceSource, NodeInfo, VolumeRef};
use self::format::{Decision, Past, Seen};
use self::ledger::{Ledger, Memory};
use crate::csi::validate;
use crate::daemon::metrics::{time_phase, Phase};
use crate::error::{Error, Result};
use crate::host::{FsStats, FsType, Host, MountEntry, Probe};
use crate::storage::contract::PublishContext;
use crate::storage::{AccessType, Capability, Health};
use crate::support::faults::point as fault_point;
use crate::support::guard::OpGuards;

pub struct NodeService {
    devices: Arc<dyn DeviceSource>,
    ledger: Arc<dyn Ledger>,
    host: Arc<dyn Host>,
    default_fs: FsType,
    guards: OpGuards,
}

pub struct StageRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
    /// The publish context ControllerPublishVolume returned; `None` when the request had none.
    pub context: Option<PublishContext>,
}

pub struct PublishRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target: PathBuf,
    pub capability: Capability,
    pub read_only: bool,
    pub context: Option<PublishContext>,
}

/// What NodeGetVolumeStats reports.
pub enum Usage {
    Filesystem(FsStats),
    Block { total_bytes: u64 },
}

/// What a staging path holds before stage touches it.
enum StagingPath {
    /// Nothing, or a stale mount that was removed: stage goes on.
    Free,
    /// This volume, staged as asked: stage is done.
    Staged,
}

impl NodeService {
    pub fn new(
        devices: Arc<dyn DeviceSource>,
        ledger: Arc<dyn Ledger>,
        host: Arc<dyn Host>,
        default_fs: FsType,
    ) -> NodeService {
        NodeService {
            devices,
            ledger,
            host,
            default_fs,
            guards: OpGuards::default(),
        }
    }

    pub fn info(&self) -> &NodeInfo {
        self.devices.node_info()
    }

    pub fn node_id(&self) -> &str {
        &self.info().id
    }

    pub fn host(&self) -> &dyn Host {
        &*self.host
    }

    /// The device source's start-up duties: the file pool registers this node and logs what
    /// the kernel says is attached and mounted, the state every later call starts from.
    pub fn start(&self) -> Result<()> {
        self.devices.start()
    }

    /// Gathers the inputs (publication, ledger), then stages for raw block or filesystem use.
    pub fn stage(&self, req: &StageRequest) -> Result<()> {
        let _guard = self.guards.acquire(&req.volume_id)?;
        validate::no_symlinks(&req.staging_path, "staging_target_path")?;
        let admitted = self.devices.admit(&req.volume_id, req.context.as_ref())?;
        let memory = self.ledger.get(&admitted.volume.id)?;
        if req.capability.is_block() {
            return self.stage_block(req, &admitted.volume);
        }
        let want = requested_fs(&req.capability)?;
        fits(&admitted.volume.id, memory.past, want)?;
        self.stage_filesystem(req, &admitted, memory, want)
    }

    fn stage_block(&self, req: &StageRequest, volume: &VolumeRef) -> Result<()> {
        let existing = self.devices.find(volume)?;
        if let Some(m) = top_mount(&self.host.mounts()?, &req.staging_path) {
            if existing.as_ref().is_some_and(|d| d.dev == m.dev) {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is staged at {} as a filesystem",
                    volume.id,
                    req.staging_path.display()
                )));
            }
        }
        // Record first: from now on the contents are the user's raw data, never formatted.
        self.ledger.set(&volume.id, Past::RawBlock)?;
        if existing.is_none() {
            let dev = time_phase(Phase::Attach, || self.devices.attach(volume))?;
            fault_point("stage.after_attach");
            info!(volume_id = %volume.id, device = %dev.path.display(), "attached for block access");
        }
        Ok(())
    }

    fn stage_filesystem(
        &self,
        req: &StageRequest,
        admitted: &Admitted,
        memory: Memory,
        want: Option<FsType>,
    ) -> Result<()> {
        let volume = &admitted.volume;
        let existing = self.devices.find(volume)?;
        if let StagingPath::Staged = self.check_staging_path(req, volume, existing.as_ref())? {
            return Ok(());
        }
        // Checked before attaching, so a bad path costs no attach and no format.
        ensure_dir(&req.staging_path)?;
        let attached_here = existing.is_none();
        let dev = match existing {
            Some(d) => d,
            None => time_phase(Phase::Attach, || self.devices.attach(volume))?,
        };
        fault_point("stage.after_attach");
        let res = self
            .prepare_filesystem(req, admitted, memory, want, &dev)
            .and_then(|fs| self.mount_staged(req, volume, &dev, fs));
        if res.is_err() && attached_here {
            if let Err(e) = self.devices.release(volume, &dev) {
                warn!(volume_id = %volume.id, error = %e, "detach after a failed stage");
            }
        }
        res
    }

    /// Looks at what is mounted at the staging path: this volume (done, if as asked), a mount
    /// whose device is gone (removed), or anything else (refused).
    fn check_staging_path(
        &self,
        req: &StageRequest,
        volume: &VolumeRef,
        existing: Option<&Device>,
    ) -> Result<StagingPath> {
        let mounts = self.host.mounts()?;
        let Some(m) = top_mount(&mounts, &req.staging_path) else {
            return Ok(StagingPath::Free);
        };
        if existing.is_some_and(|d| d.dev == m.dev) {
            check_staged_mount(&volume.id, req, m)?;
            return Ok(StagingPath::Staged);
        }
        if self.devices.is_stale(m)? {
            // The device under this mount is gone (as after a crash between detach and
            // unmount): the mount can only return I/O errors, so replace it.
            warn!(volume_id = %volume.id, path = %req.staging_path.display(), dev = %m.dev, "replacing a stale staging mount");
            self.host.unmount(&req.staging_path)?;
            return Ok(StagingPath::Free);
        }
        Err(Error::AlreadyExists(format!(
            "staging path {} already holds another device ({})",
            req.staging_path.display(),
            m.dev
        )))
    }

    /// Probes the device, decides (`format::decide`) and carries out the verdict; returns the
    /// filesystem to mount.
    fn prepare_filesystem(
        &self,
        req: &StageRequest,
        admitted: &Admitted,
        memory: Memory,
        want: Option<FsType>,
        dev: &Device,
    ) -> Result<FsType> {
        let id = &admitted.volume.id;
        let seen = self.probe(dev);
        let decision = format::decide(&seen, admitted.grant, memory.past, want, self.default_fs);
        match decision {
            Decision::Refuse(why) => Err(Error::FailedPrecondition(why.message(id))),
            Decision::Format(fs) => self.format(id, memory, dev, fs),
            Decision::RedoFormat(fs) => {
                warn!(volume_id = %id, device = %dev.path.display(), fs = fs.as_str(), "redoing a format that was interrupted");
                time_phase(Phase::Format, || self.host.redo_mkfs(&dev.path, fs))?;
                fault_point("stage.after_mkfs");
                self.adopt(req, id, memory, dev, fs)
            }
            Decision::Adopt(fs) => self.adopt(req, id, memory, dev, fs),
        }
    }

    fn probe(&self, dev: &Device) -> Seen {
        match time_phase(Phase::Probe, || self.host.probe(&dev.path)) {
            Ok(Probe::Blank) => Seen::Blank,
            Ok(Probe::Filesystem { fs_type, .. }) => Seen::Filesystem(fs_type),
            Ok(Probe::Other { description }) => Seen::Other(description),
            Err(e) => Seen::Unreadable(e.to_string()),
        }
    }

    /// Formats a blank volume, with the ledger saying `Formatting` first: a crash during mkfs
    /// then leaves a format the next stage may redo, never a "filesystem" it must adopt.
    fn format(&self, id: &str, memory: Memory, dev: &Device, fs: FsType) -> Result<FsType> {
        info!(volume_id = %id, device = %dev.path.display(), fs = fs.as_str(), "formatting blank volume");
        self.ledger.set(id, Past::Formatting(fs))?;
        time_phase(Phase::Format, || self.host.mkfs(&dev.path, fs))?;
        fault_point("stage.after_mkfs");
        self.ledger.set(id, Past::Filesystem(fs))?;
        if memory.pending_node_expansion {
            // mkfs filled the whole (already grown) device.
            self.ledger.node_expanded(id)?;
        }
        fault_point("stage.after_record_filesystem");
        Ok(fs)
    }

    /// Takes a filesystem that is there: records it, gives a copy its own UUID, and grows it
    /// if the volume grew while unstaged.
    fn adopt(
        &self,
        req: &StageRequest,
        id: &str,
        memory: Memory,
        dev: &Device,
        fs: FsType,
    ) -> Result<FsType> {
        if !matches!(memory.past, Past::Filesystem(_)) {
            self.ledger.set(id, Past::Filesystem(fs))?;
        }
        if memory.needs_new_uuid {
            // A restore or clone still has its origin's UUID; both must be mountable side by
            // side. Any failure leaves the volume untouched and unstaged.
            self.host
                .new_fs_uuid(&dev.path, fs, &req.staging_path)
                .map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "could not give the copied filesystem of volume {id} its own UUID: {e}"
                    ))
                })?;
            self.ledger.new_uuid_done(id)?;
            info!(volume_id = %id, "gave the copied filesystem a new UUID");
        }
        if memory.pending_node_expansion && fs == FsType::Ext4 {
            // Growing before the mount needs no online-resize privilege; if it fails,
            // NodeExpandVolume grows it online later.
            match self.host.grow_unmounted_fs(&dev.path, fs) {
                Ok(()) => self.ledger.node_expanded(id)?,
                Err(e) => warn!(volume_id = %id, error = %e, "offline grow before mount"),
            }
        }
        Ok(fs)
    }

    fn mount_staged(
        &self,
        req: &StageRequest,
        volume: &VolumeRef,
        dev: &Device,
        fs: FsType,
    ) -> Result<()> {
        let flags = match &req.capability.access {
            AccessType::Mount { mount_flags, .. } => mount_flags.as_slice(),
            AccessType::Block => &[],
        };
        let opts = validate::mount_options(flags, req.capability.mode.read_only())?;
        time_phase(Phase::Mount, || {
            self.host
                .mount(&dev.path, &req.staging_path, fs.as_str(), &opts)
        })?;
        fault_point("stage.after_mount");
        info!(volume_id = %volume.id, path = %req.staging_path.display(), fs = fs.as_str(), "staged");
        Ok(())
    }

    /// Undoes stage: unmounts the staging path if it holds this volume (or a dead device) and
    /// releases the volume's devices. Not staged is success.
    pub fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let _guard = self.guards.acquire(volume_id)?;
        validate::no_symlinks(staging_path, "staging_target_path")?;
        let volume = self.devices.volume(volume_id)?;
        let devices = self.devices.all(&volume)?;
        let mounts = self.host.mounts()?;
        if let Some(m) = top_mount(&mounts, staging_path) {
            if devices.iter().any(|d| d.dev == m.dev) || self.devices.is_stale(m)? {
                self.host.unmount(staging_path)?;
                fault_point("unstage.after_unmount");
            } else {
                return Err(Error::FailedPrecondition(format!(
                    "staging path {} holds another device ({}), not volume {volume_id}",
                    staging_path.display(),
                    m.dev
                )));
            }
        }
        let mounts = self.host.mounts()?;
        for dev in &devices {
            if let Some(m) = mounts.iter().find(|m| uses_device(m, dev)) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is still mounted at {}",
                    m.mount_point.display()
                )));
            }
        }
        for dev in &devices {
            self.devices.release(&volume, dev)?;
            fault_point("unstage.after_detach");
            info!(volume_id, device = %dev.path.display(), "detached");
        }
        Ok(())
    }

    pub fn publish(&self, req: &PublishRequest) -> Result<()> {
        let _guard = self.guards.acquire(&req.volume_id)?;
        validate::no_symlinks(&req.target, "target_path")?;
        validate::no_symlinks(&req.staging_path, "staging_target_path")?;
        let admitted = self.devices.admit(&req.volume_id, req.context.as_ref())?;
        let volume = &admitted.volume;
        let block = req.capability.is_block();
        if !block {
            let want = requested_fs(&req.capability)?;
            fits(&volume.id, self.ledger.get(&volume.id)?.past, want)?;
        }
        let Some(dev) = self.devices.find(volume)? else {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is not staged on this node",
                volume.id
            )));
        };
        let read_only = req.read_only || req.capability.mode.read_only();
        let mounts = self.host.mounts()?;
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
        fault_point("publish.after_target");
        let source = if block { &dev.path } else { &req.staging_path };
        if let Err(e) = self.host.bind_mount(source, &req.target, read_only) {
            if created {
                let _ = remove_target(&req.target);
            }
            return Err(e.into());
        }
        fault_point("publish.after_bind");
        info!(volume_id = %volume.id, target = %req.target.display(), read_only, "published");
        Ok(())
    }

    /// Whether mount `m` at `path` shows the volume on device `dev`: a filesystem bind
    /// carries the device's number, a bound device node refers to it.
    fn mount_is_of(&self, m: &MountEntry, dev: &Device, path: &Path) -> Result<bool> {
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
        self.devices.volume(volume_id)?; // a malformed id is NOT_FOUND, as everywhere
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
            fault_point("unpublish.after_unmount");
        }
        remove_target(target)?;
        info!(volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    /// Makes the node see a grown volume: refreshes the device's size and grows the
    /// filesystem mounted at `path` (block volumes: the device only). Returns the device size.
    pub fn expand(&self, volume_id: &str, path: &str) -> Result<u64> {
        let _guard = self.guards.acquire(volume_id)?;
        let (volume, path, dev) = self.volume_at(volume_id, path)?;
        let Some(dev) = dev else {
            if !self.devices.exists(&volume)? {
                return Err(Error::NotFound(format!("volume {volume_id}")));
            }
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is not staged on this node"
            )));
        };
        let not_here =
            || Error::NotFound(format!("volume {volume_id} is not available at {path:?}"));
        time_phase(Phase::Resize, || self.devices.refresh_size(&volume, &dev))?;
        let size = self.host.device_size(&dev.path)?;
        if self.host.device_number(&path)? == Some(dev.dev) {
            self.ledger.node_expanded(&volume.id)?;
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
        self.ledger.node_expanded(&volume.id)?;
        info!(volume_id, path = %path.display(), size, "expanded");
        Ok(size)
    }

    /// The volume, its validated `path` (which must exist: NOT_FOUND otherwise, as for a
    /// relative one) and its device on this node if it has one.
    fn volume_at(
        &self,
        volume_id: &str,
        path: &str,
    ) -> Result<(VolumeRef, PathBuf, Option<Device>)> {
        let volume = self.devices.volume(volume_id)?;
        let not_here =
            || Error::NotFound(format!("volume {volume_id} is not available at {path:?}"));
        let path = validate::path(path, "volume_path").map_err(|_| not_here())?;
        if !path.exists() {
            return Err(not_here());
        }
        let dev = self.devices.find(&volume)?;
        Ok((volume, path, dev))
    }

    pub fn stats(&self, volume_id: &str, path: &str) -> Result<(Usage, Health)> {
        let (volume, path, dev) = self.volume_at(volume_id, path)?;
        let not_here =
            || Error::NotFound(format!("volume {volume_id} is not available at {path:?}"));
        let dev = dev.ok_or_else(not_here)?;
        let health = self.devices.condition(&volume, &dev);
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

/// The requested filesystem. The adapter validated it; one this node cannot make is refused
/// here too rather than replaced by the default.
fn requested_fs(cap: &Capability) -> Result<Option<FsType>> {
    cap.fs_type()
        .map(|s| {
            FsType::parse(s)
                .ok_or_else(|| Error::InvalidArgument(format!("unsupported fs_type {s:?}")))
        })
        .transpose()
}

/// A volume known to hold one filesystem is never staged or published as another.
fn fits(id: &str, past: Past, want: Option<FsType>) -> Result<()> {
    format::fits(past, want).map_err(|(have, want)| {
        Error::InvalidArgument(format!(
            "volume {id} holds {}, not {}",
            have.as_str(),
            want.as_str()
        ))
    })
}

/// Whether the staged mount `m` is what the request asks for.
fn check_staged_mount(id: &str, req: &StageRequest, m: &MountEntry) -> Result<()> {
    if let Some(want) = req.capability.fs_type() {
        if want != m.fs_type {
            return Err(Error::AlreadyExists(format!(
                "volume {id} is staged with {}, not {want}",
                m.fs_type
            )));
        }
    }
    let read_only = req.capability.mode.read_only();
    if m.read_only() != read_only {
        return Err(Error::AlreadyExists(format!(
            "volume {id} is staged {}",
            if m.read_only() {
                "read-only"
            } else {
                "read-write"
            }
        )));
    }
    Ok(())
}

/// The mount on top at `path`, if `path` is a mount point.
fn top_mount<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Whether a mount shows the device: a filesystem on it (or a bind of one), or a bind of
/// its device node (which mountinfo shows as the devtmpfs entry named after the device).
pub(crate) fn uses_device(m: &MountEntry, dev: &Device) -> bool {
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
    use crate::node::device::fake::FakeDevices;
    use crate::node::ledger::MemLedger;
    use crate::storage::contract::FormatGrant;
    use crate::storage::AccessMode;

    struct Env {
        dir: tempfile::TempDir,
        devices: Arc<FakeDevices>,
        ledger: Arc<MemLedger>,
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
        let host = Arc::new(FakeHost::new());
        let devices = Arc::new(FakeDevices::new(host.clone(), dir.path().join("images")));
        let ledger = Arc::new(MemLedger::default());
        let node = NodeService::new(devices.clone(), ledger.clone(), host.clone(), FsType::Ext4);
        node.start().unwrap();
        std::fs::create_dir(dir.path().join("staging")).unwrap();
        std::fs::create_dir(dir.path().join("pods")).unwrap();
        Env {
            dir,
            devices,
            ledger,
            host,
            node,
        }
    }

    impl Env {
        /// A volume published to this node (without a publish context: by its record).
        fn volume(&self, name: &str, _c: &Capability) -> String {
            let id = format!("vol-{name}");
            self.devices.create(&id, true);
            id
        }
        fn staging(&self) -> PathBuf {
            self.dir.path().join("staging")
        }
        fn target(&self, name: &str) -> PathBuf {
            self.dir.path().join("pods").join(name)
        }
        fn stage_with(
            &self,
            id: &str,
            c: &Capability,
            context: Option<PublishContext>,
        ) -> Result<()> {
            self.node.stage(&StageRequest {
                volume_id: id.into(),
                staging_path: self.staging(),
                capability: c.clone(),
                context,
            })
        }
        fn stage(&self, id: &str, c: &Capability) -> Result<()> {
            self.stage_with(id, c, None)
        }
        fn publish(&self, id: &str, target: &Path, c: &Capability) -> Result<()> {
            self.node.publish(&PublishRequest {
                volume_id: id.into(),
                staging_path: self.staging(),
                target: target.to_path_buf(),
                capability: c.clone(),
                read_only: false,
                context: None,
            })
        }
        fn image(&self, id: &str) -> PathBuf {
            self.devices.source(id)
        }
        fn past(&self, id: &str) -> Past {
            self.ledger.get(id).unwrap().past
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
        assert_eq!(e.past(&id), Past::Filesystem(FsType::Ext4));
    }

    #[test]
    fn stage_of_a_volume_not_published_here_touches_nothing() {
        let e = env();
        let id = "vol-v";
        e.devices.create(id, false);
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
                e.ledger
                    .set(&id, Past::Filesystem(FsType::parse(fs).unwrap()))
                    .unwrap();
            }
            if raw {
                e.ledger.set(&id, Past::RawBlock).unwrap();
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
        e.ledger.set(&id, Past::Filesystem(FsType::Xfs)).unwrap();
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
        assert_eq!(e.past(&id), Past::Filesystem(FsType::Xfs));
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
        assert_eq!(e.past(&id), Past::RawBlock);
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
        // What a restore leaves in the ledger: the source's filesystem, and its UUID.
        let restored = e.volume("copy", &mount_cap());
        e.ledger
            .set(&restored, Past::Filesystem(FsType::Ext4))
            .unwrap();
        e.ledger.set_needs_new_uuid(&restored);
        // The fake keys contents by image: the copy holds what the source held.
        e.host.set_probe(
            &e.image(&restored),
            Probe::Filesystem {
                fs_type: "ext4".into(),
                uuid: Some("same".into()),
            },
        );
        e.node.unstage(&src, &e.staging()).unwrap();
        e.stage(&restored, &mount_cap()).unwrap();
        assert_eq!(e.host.count("new_fs_uuid"), 1);
        assert_eq!(
            e.host.count("mkfs"),
            1,
            "only the source was ever formatted"
        );
        assert!(!e.ledger.get(&restored).unwrap().needs_new_uuid);
        e.node.unstage(&restored, &e.staging()).unwrap();
        e.stage(&restored, &mount_cap()).unwrap();
        assert_eq!(e.host.count("new_fs_uuid"), 1, "once only");
    }

    #[test]
    fn expand_refreshes_the_device_and_grows_the_mounted_filesystem() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        let target = e.target("t");
        e.stage(&id, &mount_cap()).unwrap();
        e.publish(&id, &target, &mount_cap()).unwrap();
        e.ledger.set_pending_expansion(&id);
        e.node.expand(&id, target.to_str().unwrap()).unwrap();
        assert_eq!(e.host.count("refresh_loop_capacity"), 1);
        assert_eq!(e.host.count("grow_fs"), 1);
        assert!(!e.ledger.get(&id).unwrap().pending_node_expansion);
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

    #[test]
    fn the_context_admits_the_volume_and_its_grant_is_obeyed() {
        let e = env();
        let id = "vol-ctx";
        // Not in the source's own record: the context alone is the publication.
        e.devices.create(id, false);
        let never = PublishContext {
            device: None,
            format: FormatGrant::Never,
        };
        let res = e.stage_with(id, &mount_cap(), Some(never.clone()));
        assert!(
            matches!(&res, Err(Error::FailedPrecondition(m)) if m.contains("does not allow formatting")),
            "{res:?}"
        );
        assert_eq!(e.host.count("mkfs"), 0);
        assert_eq!(e.attached(), 0);
        assert_eq!(e.past(id), Past::Unused, "a refusal records nothing");
        // Never formats, but adopts what is there.
        e.host.set_probe(
            &e.image(id),
            Probe::Filesystem {
                fs_type: "ext4".into(),
                uuid: None,
            },
        );
        e.stage_with(id, &mount_cap(), Some(never)).unwrap();
        assert_eq!(e.host.count("mkfs"), 0);
        assert_eq!(e.past(id), Past::Filesystem(FsType::Ext4));
    }

    #[test]
    fn a_recorded_filesystem_is_not_staged_or_published_as_another() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        e.stage(&id, &mount_cap()).unwrap();
        let xfs = cap(false, Some("xfs"), AccessMode::SingleNodeWriter);
        e.node.unstage(&id, &e.staging()).unwrap();
        e.host.clear_calls();
        assert!(matches!(e.stage(&id, &xfs), Err(Error::InvalidArgument(_))));
        assert!(e.host.calls().is_empty(), "{:?}", e.host.call_log());
        assert!(matches!(
            e.publish(&id, &e.target("t"), &xfs),
            Err(Error::InvalidArgument(_))
        ));
        // A filesystem the node cannot make is refused, not replaced by the default.
        let odd = cap(false, Some("btrfs"), AccessMode::SingleNodeWriter);
        let other = e.volume("w", &odd);
        assert!(matches!(
            e.stage(&other, &odd),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(e.host.count("mkfs"), 0);
    }

    #[test]
    fn an_interrupted_format_is_redone_and_then_recorded() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        e.ledger.set(&id, Past::Formatting(FsType::Xfs)).unwrap();
        e.host.fail_probe(&e.image(&id));
        e.stage(&id, &mount_cap()).unwrap();
        assert_eq!(e.host.count("mkfs"), 1, "{:?}", e.host.call_log());
        assert_eq!(e.past(&id), Past::Filesystem(FsType::Xfs));
        let mounts = e.host.mounts().unwrap();
        assert_eq!(top_mount(&mounts, &e.staging()).unwrap().fs_type, "xfs");
    }

    #[test]
    fn expand_tells_a_missing_volume_from_an_unstaged_one() {
        let e = env();
        let id = e.volume("v", &mount_cap());
        let here = e.staging();
        let here = here.to_str().unwrap();
        assert!(matches!(
            e.node.expand(&id, here),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            e.node.expand("vol-gone", here),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            e.node.expand("../x", here),
            Err(Error::NotFound(_))
        ));
    }
}
