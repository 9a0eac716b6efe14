//! [`FakeHost`]: an in-memory, recording [`Host`] for tests of the node logic without root.
//! It models what the node relies on (loop devices, a mount table shaped like mountinfo, device
//! signatures that live with the image file) and never touches the disk.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{
    AttachOptions, DevId, Error, FsStats, FsType, Host, LoopDevice, MountEntry, MountOptions,
    Probe, Result,
};

const LOOP_MAJOR: u32 = 7;
/// What a bind of a device node shows in mountinfo: the devtmpfs that holds the node.
pub const DEVTMPFS_DEV: DevId = DevId { major: 0, minor: 6 };
/// The filesystem of paths no fake mount covers.
pub const ROOT_DEV: DevId = DevId {
    major: 254,
    minor: 0,
};
const ROOT_MOUNT_ID: u32 = 1;
const FIRST_MOUNT_ID: u32 = 100;
const DEFAULT_SIZE: u64 = 1 << 30;

/// The operations `fail_next` accepts: the [`Host`] methods by name.
pub const OPS: [&str; 16] = [
    "loop_devices",
    "attach_loop",
    "detach_loop",
    "refresh_loop_capacity",
    "probe",
    "mkfs",
    "mount",
    "bind_mount",
    "unmount",
    "mounts",
    "device_number",
    "device_size",
    "fs_stats",
    "grow_fs",
    "new_fs_uuid",
    "grow_unmounted_fs",
];

/// A call that changes (or probes) the machine. Queries (`mounts`, `loop_devices`,
/// `device_number`, `device_size`, `fs_stats`) are not recorded: they would drown the log.
/// Calls are recorded even when they fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    AttachLoop {
        image: PathBuf,
        opts: AttachOptions,
    },
    DetachLoop {
        device: PathBuf,
    },
    RefreshLoopCapacity {
        device: PathBuf,
    },
    Probe {
        device: PathBuf,
    },
    Mkfs {
        device: PathBuf,
        fs: FsType,
    },
    Mount {
        device: PathBuf,
        target: PathBuf,
        fs: String,
        opts: MountOptions,
    },
    BindMount {
        source: PathBuf,
        target: PathBuf,
        read_only: bool,
    },
    Unmount {
        target: PathBuf,
    },
    GrowFs {
        device: PathBuf,
        mount_point: PathBuf,
        fs: FsType,
    },
    NewFsUuid {
        device: PathBuf,
        fs: FsType,
    },
    GrowUnmountedFs {
        device: PathBuf,
        fs: FsType,
    },
}

impl Call {
    /// The [`Host`] method this call went to, as [`OPS`] names it.
    pub fn op(&self) -> &'static str {
        match self {
            Call::AttachLoop { .. } => "attach_loop",
            Call::DetachLoop { .. } => "detach_loop",
            Call::RefreshLoopCapacity { .. } => "refresh_loop_capacity",
            Call::Probe { .. } => "probe",
            Call::Mkfs { .. } => "mkfs",
            Call::Mount { .. } => "mount",
            Call::BindMount { .. } => "bind_mount",
            Call::Unmount { .. } => "unmount",
            Call::GrowFs { .. } => "grow_fs",
            Call::NewFsUuid { .. } => "new_fs_uuid",
            Call::GrowUnmountedFs { .. } => "grow_unmounted_fs",
        }
    }
}

/// One line a call: `attach_loop /pool/x.img`, `mkfs /dev/loop0 ext4`,
/// `mount /dev/loop0 /stage ext4`, with ` ro` appended for read-only requests.
impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ro = |read_only: bool| if read_only { " ro" } else { "" };
        let op = self.op();
        match self {
            Call::AttachLoop { image, opts } => {
                write!(f, "{op} {}{}", image.display(), ro(opts.read_only))
            }
            Call::DetachLoop { device }
            | Call::RefreshLoopCapacity { device }
            | Call::Probe { device } => write!(f, "{op} {}", device.display()),
            Call::Mkfs { device, fs }
            | Call::NewFsUuid { device, fs }
            | Call::GrowUnmountedFs { device, fs } => {
                write!(f, "{op} {} {}", device.display(), fs.as_str())
            }
            Call::Mount {
                device,
                target,
                fs,
                opts,
            } => write!(
                f,
                "{op} {} {} {fs}{}",
                device.display(),
                target.display(),
                ro(opts.read_only)
            ),
            Call::BindMount {
                source,
                target,
                read_only,
            } => write!(
                f,
                "{op} {} {}{}",
                source.display(),
                target.display(),
                ro(*read_only)
            ),
            Call::Unmount { target } => write!(f, "{op} {}", target.display()),
            Call::GrowFs {
                device,
                mount_point,
                fs,
            } => write!(
                f,
                "{op} {} {} {}",
                device.display(),
                mount_point.display(),
                fs.as_str()
            ),
        }
    }
}

/// The recording fake. See the module documentation.
pub struct FakeHost {
    state: Mutex<State>,
}

/// What lives in an image file, so it outlasts loop devices and reboots. Keyed by a file
/// identity, not by path: an image deleted and created again at the same path is a new file.
#[derive(Debug, Clone)]
struct Contents {
    probe: Probe,
    probe_fails: bool,
    size: u64,
    stats: Option<FsStats>,
}

impl Default for Contents {
    fn default() -> Contents {
        Contents {
            probe: Probe::Blank,
            probe_fails: false,
            size: DEFAULT_SIZE,
            stats: None,
        }
    }
}

#[derive(Debug)]
struct Loop {
    image: PathBuf,
    file: u64,
    read_only: bool,
    /// Detach was asked while in use: the device goes away with its last mount, as the
    /// kernel's autoclear does.
    autoclear: bool,
}

#[derive(Debug, Clone)]
struct Mount {
    id: u32,
    parent: u32,
    dev: DevId,
    root: PathBuf,
    target: PathBuf,
    fs_type: String,
    source: String,
    read_only: bool,
    /// For a bind of a device node: the device it refers to (`st_rdev` of the target).
    node: Option<DevId>,
}

#[derive(Debug)]
struct State {
    /// Path -> file identity of the image files that exist.
    files: HashMap<PathBuf, u64>,
    contents: HashMap<u64, Contents>,
    next_file: u64,
    loops: BTreeMap<u32, Loop>,
    mounts: Vec<Mount>,
    next_mount_id: u32,
    failures: HashMap<&'static str, usize>,
    calls: Vec<Call>,
    not_ready: Option<String>,
    formatted: u64,
}

impl Default for FakeHost {
    fn default() -> FakeHost {
        FakeHost::new()
    }
}

impl FakeHost {
    pub fn new() -> FakeHost {
        FakeHost {
            state: Mutex::new(State {
                files: HashMap::new(),
                contents: HashMap::new(),
                next_file: 1,
                loops: BTreeMap::new(),
                mounts: Vec::new(),
                next_mount_id: FIRST_MOUNT_ID,
                failures: HashMap::new(),
                calls: Vec::new(),
                not_ready: None,
                formatted: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; keep the state usable
        // so other threads report their own results rather than a poison error.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets what probing finds. `dev` is an attached `/dev/loopN` or an image path; either
    /// way the signature belongs to the image file, and clears a `fail_probe`.
    pub fn set_probe(&self, dev: &Path, probe: Probe) {
        let mut st = self.lock();
        let c = st.contents_of(dev);
        c.probe = probe;
        c.probe_fails = false;
    }

    /// Makes every probe of the image behind `dev` fail, as an unreadable device does.
    pub fn fail_probe(&self, dev: &Path) {
        self.lock().contents_of(dev).probe_fails = true;
    }

    /// Sets the size of the image behind `dev` (device or image path).
    pub fn set_size(&self, dev: &Path, bytes: u64) {
        self.lock().contents_of(dev).size = bytes;
    }

    /// Sets what statfs reports for a filesystem on the image behind `dev`; by default the
    /// whole size is free.
    pub fn set_fs_stats(&self, dev: &Path, stats: FsStats) {
        self.lock().contents_of(dev).stats = Some(stats);
    }

    /// Unlinks an image: attached devices keep the old file and list it as deleted, and a new
    /// file at the same path starts blank.
    pub fn delete_image(&self, image: &Path) {
        self.lock().files.remove(image);
    }

    /// Makes the next call of `op` (a name from [`OPS`]) fail; calling it n times fails the
    /// next n calls.
    pub fn fail_next(&self, op: &str) {
        let op = OPS
            .iter()
            .find(|o| **o == op)
            .unwrap_or_else(|| panic!("fail_next: no host operation named {op:?}"));
        *self.lock().failures.entry(op).or_default() += 1;
    }

    /// Makes `check_ready` fail with `message`, or succeed again with `None`.
    pub fn set_not_ready(&self, message: Option<&str>) {
        self.lock().not_ready = message.map(str::to_string);
    }

    /// Every recorded call, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The recorded calls as lines, oldest first.
    pub fn call_log(&self) -> Vec<String> {
        self.lock().calls.iter().map(Call::to_string).collect()
    }

    /// How many recorded calls went to `op`.
    pub fn count(&self, op: &str) -> usize {
        self.lock().calls.iter().filter(|c| c.op() == op).count()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// A machine restart: every loop device and mount is gone; image files and what is in them
    /// stay. Recorded calls and pending failures stay too.
    pub fn reboot(&self) {
        let mut st = self.lock();
        st.loops.clear();
        st.mounts.clear();
    }
}

fn errno(context: String, code: i32) -> Error {
    Error::io(context, io::Error::from_raw_os_error(code))
}

/// `/dev/loopN` -> N.
fn loop_index(path: &Path) -> Option<u32> {
    let name = path
        .strip_prefix("/dev")
        .ok()?
        .to_str()?
        .strip_prefix("loop")?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

fn loop_dev(n: u32) -> DevId {
    DevId {
        major: LOOP_MAJOR,
        minor: n,
    }
}

impl State {
    fn record(&mut self, call: Call) -> Result<()> {
        let op = call.op();
        self.calls.push(call);
        self.take_failure(op)
    }

    fn take_failure(&mut self, op: &'static str) -> Result<()> {
        match self.failures.get_mut(op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(Error::io(
                    format!("injected failure of {op}"),
                    io::Error::other("injected by FakeHost::fail_next"),
                ))
            }
            _ => Ok(()),
        }
    }

    fn file_of(&mut self, image: &Path) -> u64 {
        if let Some(id) = self.files.get(image) {
            return *id;
        }
        let id = self.next_file;
        self.next_file += 1;
        self.files.insert(image.to_path_buf(), id);
        id
    }

    /// The contents behind an attached loop device path, or else behind an image path.
    fn contents_of(&mut self, dev: &Path) -> &mut Contents {
        let file = match loop_index(dev).and_then(|n| self.loops.get(&n)) {
            Some(l) => l.file,
            None => self.file_of(dev),
        };
        self.contents.entry(file).or_default()
    }

    /// The attached loop device at `device`, with its number.
    fn attached(&self, device: &Path) -> Result<(u32, &Loop)> {
        loop_index(device)
            .and_then(|n| self.loops.get(&n).map(|l| (n, l)))
            .ok_or_else(|| {
                errno(
                    format!("{} is not an attached loop device", device.display()),
                    libc::ENXIO,
                )
            })
    }

    fn attached_contents(&mut self, device: &Path) -> Result<(u32, &mut Contents)> {
        let (n, file) = {
            let (n, l) = self.attached(device)?;
            (n, l.file)
        };
        Ok((n, self.contents.entry(file).or_default()))
    }

    fn top_mount(&self, path: &Path) -> Option<&Mount> {
        self.mounts.iter().rev().find(|m| m.target == path)
    }

    /// The mount a path lives in: the topmost one at the longest mount point above it.
    fn covering(&self, path: &Path) -> Option<&Mount> {
        self.mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| path.starts_with(&m.target))
            .max_by_key(|(i, m)| (m.target.components().count(), *i))
            .map(|(_, m)| m)
    }

    fn device_number(&self, path: &Path) -> Option<DevId> {
        if let Some(n) = loop_index(path).filter(|n| self.loops.contains_key(n)) {
            return Some(loop_dev(n));
        }
        self.top_mount(path).and_then(|m| m.node)
    }

    fn in_use(&self, dev: DevId) -> bool {
        self.mounts.iter().any(|m| m.dev == dev)
    }

    fn push_mount(&mut self, mut mount: Mount) {
        mount.id = self.next_mount_id;
        self.next_mount_id += 1;
        mount.parent = self.covering(&mount.target).map_or(ROOT_MOUNT_ID, |m| m.id);
        self.mounts.push(mount);
    }
}

impl Host for FakeHost {
    fn loop_devices(&self) -> Result<Vec<LoopDevice>> {
        let mut st = self.lock();
        st.take_failure("loop_devices")?;
        Ok(st
            .loops
            .iter()
            .map(|(n, l)| LoopDevice {
                path: PathBuf::from(format!("/dev/loop{n}")),
                dev: loop_dev(*n),
                backing_file: l.image.clone(),
                backing_id: None,
                backing_deleted: st.files.get(&l.image) != Some(&l.file),
            })
            .collect())
    }

    fn attach_loop(&self, image: &Path, opts: AttachOptions) -> Result<LoopDevice> {
        let mut st = self.lock();
        st.record(Call::AttachLoop {
            image: image.to_path_buf(),
            opts,
        })?;
        let n = (0..)
            .find(|n| !st.loops.contains_key(n))
            .expect("a free loop number");
        let file = st.file_of(image);
        st.contents.entry(file).or_default();
        st.loops.insert(
            n,
            Loop {
                image: image.to_path_buf(),
                file,
                read_only: opts.read_only,
                autoclear: false,
            },
        );
        Ok(LoopDevice {
            path: PathBuf::from(format!("/dev/loop{n}")),
            dev: loop_dev(n),
            backing_file: image.to_path_buf(),
            backing_id: None,
            backing_deleted: false,
        })
    }

    fn detach_loop(&self, dev: &LoopDevice) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::DetachLoop {
            device: dev.path.clone(),
        })?;
        let Some(n) = loop_index(&dev.path) else {
            return Err(errno(
                format!("{} is not a loop device", dev.path.display()),
                libc::EINVAL,
            ));
        };
        // Gone, or reused for another image since `dev` was listed: ours is detached.
        if st.loops.get(&n).is_none_or(|l| l.image != dev.backing_file) {
            return Ok(());
        }
        if st.in_use(loop_dev(n)) {
            st.loops.get_mut(&n).expect("checked above").autoclear = true;
            return Err(Error::Busy(format!(
                "{} is still in use (mounted or open); it detaches when released",
                dev.path.display()
            )));
        }
        st.loops.remove(&n);
        Ok(())
    }

    fn refresh_loop_capacity(&self, dev: &LoopDevice) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::RefreshLoopCapacity {
            device: dev.path.clone(),
        })?;
        st.attached(&dev.path).map(drop)
    }

    fn probe(&self, device: &Path) -> Result<Probe> {
        let mut st = self.lock();
        st.record(Call::Probe {
            device: device.to_path_buf(),
        })?;
        let (_, c) = st.attached_contents(device)?;
        if c.probe_fails {
            return Err(errno(format!("read {}", device.display()), libc::EIO));
        }
        Ok(c.probe.clone())
    }

    fn mkfs(&self, device: &Path, fs: FsType) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::Mkfs {
            device: device.to_path_buf(),
            fs,
        })?;
        if st.attached(device)?.1.read_only {
            return Err(errno(format!("mkfs {}", device.display()), libc::EROFS));
        }
        let (_, c) = st.attached_contents(device)?;
        // Like LinuxHost, which probes again before formatting.
        if c.probe_fails {
            return Err(errno(format!("read {}", device.display()), libc::EIO));
        }
        if c.probe != Probe::Blank {
            return Err(errno(
                format!(
                    "refusing to format {}, which is not blank",
                    device.display()
                ),
                libc::EEXIST,
            ));
        }
        st.formatted += 1;
        let uuid = format!("00000000-0000-4000-8000-{:012x}", st.formatted);
        st.attached_contents(device)?.1.probe = Probe::Filesystem {
            fs_type: fs.as_str().to_string(),
            uuid: Some(uuid),
        };
        Ok(())
    }

    fn redo_mkfs(&self, device: &Path, fs: FsType) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::Mkfs {
            device: device.to_path_buf(),
            fs,
        })?;
        if st.attached(device)?.1.read_only {
            return Err(errno(format!("mkfs {}", device.display()), libc::EROFS));
        }
        st.formatted += 1;
        let uuid = format!("00000000-0000-4000-8000-{:012x}", st.formatted);
        st.attached_contents(device)?.1.probe = Probe::Filesystem {
            fs_type: fs.as_str().to_string(),
            uuid: Some(uuid),
        };
        Ok(())
    }

    fn mount(&self, device: &Path, target: &Path, fs: &str, opts: &MountOptions) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::Mount {
            device: device.to_path_buf(),
            target: target.to_path_buf(),
            fs: fs.to_string(),
            opts: opts.clone(),
        })?;
        let context = || format!("mount {} on {}", device.display(), target.display());
        let (n, l) = st.attached(device)?;
        if l.read_only && !opts.read_only {
            return Err(errno(context(), libc::EACCES));
        }
        let (_, c) = st.attached_contents(device)?;
        if !matches!(&c.probe, Probe::Filesystem { fs_type, .. } if fs_type == fs) {
            return Err(errno(context(), libc::EINVAL));
        }
        st.push_mount(Mount {
            id: 0,
            parent: 0,
            dev: loop_dev(n),
            root: PathBuf::from("/"),
            target: target.to_path_buf(),
            fs_type: fs.to_string(),
            source: device.display().to_string(),
            read_only: opts.read_only,
            node: None,
        });
        Ok(())
    }

    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::BindMount {
            source: source.to_path_buf(),
            target: target.to_path_buf(),
            read_only,
        })?;
        let mount = if let Some(node) = st.device_number(source) {
            // The node may itself be a bind target; mountinfo then shows the original node.
            let root = match st.top_mount(source).filter(|m| m.node.is_some()) {
                Some(m) => m.root.clone(),
                None => Path::new("/").join(source.file_name().unwrap_or_default()),
            };
            Mount {
                id: 0,
                parent: 0,
                dev: DEVTMPFS_DEV,
                root,
                target: target.to_path_buf(),
                fs_type: "devtmpfs".into(),
                source: "devtmpfs".into(),
                read_only,
                node: Some(node),
            }
        } else if loop_index(source).is_some() {
            return Err(errno(format!("bind {}", source.display()), libc::ENOENT));
        } else if let Some(m) = st.covering(source) {
            let rel = source
                .strip_prefix(&m.target)
                .expect("covering mount is above source");
            Mount {
                id: 0,
                parent: 0,
                dev: m.dev,
                root: if rel.as_os_str().is_empty() {
                    m.root.clone()
                } else {
                    m.root.join(rel)
                },
                target: target.to_path_buf(),
                fs_type: m.fs_type.clone(),
                source: m.source.clone(),
                read_only,
                node: None,
            }
        } else {
            Mount {
                id: 0,
                parent: 0,
                dev: ROOT_DEV,
                root: source.to_path_buf(),
                target: target.to_path_buf(),
                fs_type: "ext4".into(),
                source: "/dev/root".into(),
                read_only,
                node: None,
            }
        };
        st.push_mount(mount);
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::Unmount {
            target: target.to_path_buf(),
        })?;
        let Some(i) = st.mounts.iter().rposition(|m| m.target == target) else {
            return Err(errno(format!("unmount {}", target.display()), libc::EINVAL));
        };
        let id = st.mounts[i].id;
        if st.mounts.iter().any(|m| m.parent == id) {
            return Err(Error::Busy(format!("{} is busy", target.display())));
        }
        let gone = st.mounts.remove(i);
        if gone.dev.major == LOOP_MAJOR && !st.in_use(gone.dev) {
            let n = gone.dev.minor;
            if st.loops.get(&n).is_some_and(|l| l.autoclear) {
                st.loops.remove(&n);
            }
        }
        Ok(())
    }

    fn mounts(&self) -> Result<Vec<MountEntry>> {
        let mut st = self.lock();
        st.take_failure("mounts")?;
        Ok(st
            .mounts
            .iter()
            .map(|m| {
                let mode = if m.read_only { "ro" } else { "rw" };
                MountEntry {
                    mount_id: m.id,
                    parent_id: m.parent,
                    dev: m.dev,
                    root: m.root.clone(),
                    mount_point: m.target.clone(),
                    options: format!("{mode},relatime"),
                    fs_type: m.fs_type.clone(),
                    source: m.source.clone(),
                    super_options: if m.node.is_some() {
                        "rw,size=4096k,mode=755".into()
                    } else {
                        mode.into()
                    },
                }
            })
            .collect())
    }

    fn device_number(&self, path: &Path) -> Result<Option<DevId>> {
        let mut st = self.lock();
        st.take_failure("device_number")?;
        Ok(st.device_number(path))
    }

    fn device_size(&self, device: &Path) -> Result<u64> {
        let mut st = self.lock();
        st.take_failure("device_size")?;
        Ok(st.attached_contents(device)?.1.size)
    }

    fn fs_stats(&self, path: &Path) -> Result<FsStats> {
        let mut st = self.lock();
        st.take_failure("fs_stats")?;
        let no_stats = || {
            errno(
                format!("statvfs {}: no fake filesystem there", path.display()),
                libc::ENOENT,
            )
        };
        let dev = st.covering(path).map(|m| m.dev).ok_or_else(no_stats)?;
        let file = match st.loops.get(&dev.minor) {
            Some(l) if dev.major == LOOP_MAJOR => l.file,
            _ => return Err(no_stats()),
        };
        let c = st.contents.entry(file).or_default();
        Ok(c.stats.unwrap_or(FsStats {
            total_bytes: c.size,
            available_bytes: c.size,
            used_bytes: 0,
            total_inodes: 65536,
            free_inodes: 65536,
            used_inodes: 0,
        }))
    }

    fn grow_fs(&self, device: &Path, mount_point: &Path, fs: FsType) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::GrowFs {
            device: device.to_path_buf(),
            mount_point: mount_point.to_path_buf(),
            fs,
        })?;
        let (n, _) = st.attached(device)?;
        if st.top_mount(mount_point).map(|m| m.dev) != Some(loop_dev(n)) {
            return Err(errno(
                format!(
                    "grow {}: {} is not mounted there",
                    mount_point.display(),
                    device.display()
                ),
                libc::EINVAL,
            ));
        }
        Ok(())
    }

    fn grow_unmounted_fs(&self, device: &Path, fs: FsType) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::GrowUnmountedFs {
            device: device.to_path_buf(),
            fs,
        })?;
        st.attached(device)?;
        if fs == FsType::Xfs {
            return Err(errno(
                format!("grow {}", device.display()),
                libc::EOPNOTSUPP,
            ));
        }
        Ok(())
    }

    fn new_fs_uuid(&self, device: &Path, fs: FsType, _scratch: &Path) -> Result<()> {
        let mut st = self.lock();
        st.record(Call::NewFsUuid {
            device: device.to_path_buf(),
            fs,
        })?;
        let (_, c) = st.attached_contents(device)?;
        match &c.probe {
            Probe::Filesystem { fs_type, .. } if fs_type == fs.as_str() => {}
            other => {
                return Err(errno(
                    format!("new uuid for {}: holds {other:?}", device.display()),
                    libc::EINVAL,
                ))
            }
        }
        st.formatted += 1;
        let uuid = format!("00000000-0000-4000-9000-{:012x}", st.formatted);
        st.attached_contents(device)?.1.probe = Probe::Filesystem {
            fs_type: fs.as_str().to_string(),
            uuid: Some(uuid),
        };
        Ok(())
    }

    fn check_ready(&self) -> std::result::Result<(), String> {
        match &self.lock().not_ready {
            Some(msg) => Err(msg.clone()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: AttachOptions = AttachOptions {
        read_only: false,
        direct_io: true,
    };

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    fn ext4() -> MountOptions {
        MountOptions::default()
    }

    fn staged(host: &FakeHost, image: &str, stage: &str) -> LoopDevice {
        let dev = host.attach_loop(p(image), RW).unwrap();
        host.mkfs(&dev.path, FsType::Ext4).unwrap();
        host.mount(&dev.path, p(stage), "ext4", &ext4()).unwrap();
        dev
    }

    #[test]
    fn signatures_follow_the_image_across_reboot() {
        let host = FakeHost::new();
        host.attach_loop(p("/pool/other.img"), RW).unwrap();
        let dev = staged(&host, "/pool/a.img", "/stage/a");
        assert_eq!(dev.path, p("/dev/loop1"));

        host.reboot();
        assert!(host.loop_devices().unwrap().is_empty());
        assert!(host.mounts().unwrap().is_empty());

        let again = host.attach_loop(p("/pool/a.img"), RW).unwrap();
        assert_eq!(again.path, p("/dev/loop0"), "numbers are handed out afresh");
        assert!(matches!(
            host.probe(&again.path).unwrap(),
            Probe::Filesystem { fs_type, .. } if fs_type == "ext4"
        ));
        let blank = host.attach_loop(p("/pool/other.img"), RW).unwrap();
        assert_eq!(host.probe(&blank.path).unwrap(), Probe::Blank);
    }

    #[test]
    fn binds_show_like_mountinfo() {
        let host = FakeHost::new();
        let dev = staged(&host, "/pool/a.img", "/stage/a");
        host.bind_mount(p("/stage/a"), p("/pods/1"), true).unwrap();
        host.bind_mount(p("/stage/a/sub"), p("/pods/2"), false)
            .unwrap();
        host.bind_mount(&dev.path, p("/pods/3"), false).unwrap();
        host.bind_mount(p("/pods/3"), p("/pods/4"), true).unwrap();

        let m = host.mounts().unwrap();
        let rows: Vec<(&str, DevId, &str, &str, bool)> = m
            .iter()
            .map(|e| {
                (
                    e.mount_point.to_str().unwrap(),
                    e.dev,
                    e.root.to_str().unwrap(),
                    e.fs_type.as_str(),
                    e.read_only(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("/stage/a", loop_dev(0), "/", "ext4", false),
                ("/pods/1", loop_dev(0), "/", "ext4", true),
                ("/pods/2", loop_dev(0), "/sub", "ext4", false),
                ("/pods/3", DEVTMPFS_DEV, "/loop0", "devtmpfs", false),
                ("/pods/4", DEVTMPFS_DEV, "/loop0", "devtmpfs", true),
            ]
        );
        for target in ["/pods/3", "/pods/4", "/dev/loop0"] {
            assert_eq!(
                host.device_number(p(target)).unwrap(),
                Some(dev.dev),
                "{target}"
            );
        }
        for path in ["/pods/1", "/stage/a", "/dev/loop9"] {
            assert_eq!(host.device_number(p(path)).unwrap(), None, "{path}");
        }
        assert!(host
            .bind_mount(p("/dev/loop9"), p("/pods/5"), false)
            .is_err());
    }

    #[test]
    fn unmount_follows_the_kernel() {
        let host = FakeHost::new();
        staged(&host, "/pool/a.img", "/stage/a");
        host.bind_mount(p("/stage/a"), p("/t"), false).unwrap();
        host.bind_mount(p("/stage/a"), p("/t"), true).unwrap();
        host.bind_mount(p("/stage/a"), p("/t/inner"), false)
            .unwrap();

        assert!(
            matches!(host.unmount(p("/t")), Err(Error::Busy(_))),
            "a mount below the top one"
        );
        host.unmount(p("/t/inner")).unwrap();
        host.unmount(p("/t")).unwrap();
        let left: Vec<bool> = host
            .mounts()
            .unwrap()
            .iter()
            .filter(|m| m.mount_point == p("/t"))
            .map(|m| m.read_only())
            .collect();
        assert_eq!(left, vec![false], "the top (read-only) one went first");
        host.unmount(p("/t")).unwrap();
        match host.unmount(p("/t")) {
            Err(Error::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("want EINVAL, got {other:?}"),
        }
    }

    #[test]
    fn detach_of_a_mounted_device_is_deferred() {
        let host = FakeHost::new();
        let dev = staged(&host, "/pool/a.img", "/stage/a");
        assert!(matches!(host.detach_loop(&dev), Err(Error::Busy(_))));
        assert_eq!(host.loop_devices().unwrap().len(), 1);
        host.unmount(p("/stage/a")).unwrap();
        assert!(host.loop_devices().unwrap().is_empty());
        host.detach_loop(&dev).unwrap();
    }

    #[test]
    fn deleted_images_and_reused_devices() {
        let host = FakeHost::new();
        let old = staged(&host, "/pool/a.img", "/stage/a");
        host.delete_image(p("/pool/a.img"));
        assert!(host.loop_devices().unwrap()[0].backing_deleted);
        let new = host.attach_loop(p("/pool/a.img"), RW).unwrap();
        assert_eq!(
            host.probe(&new.path).unwrap(),
            Probe::Blank,
            "a new file at the same path"
        );
        assert!(matches!(
            host.probe(&old.path).unwrap(),
            Probe::Filesystem { .. }
        ));

        // A stale handle to a device now holding another image must not detach it.
        host.unmount(p("/stage/a")).unwrap();
        host.detach_loop(&old).unwrap();
        let other = host.attach_loop(p("/pool/b.img"), RW).unwrap();
        assert_eq!(other.path, old.path);
        host.detach_loop(&old).unwrap();
        let now = host.loop_devices().unwrap();
        assert_eq!(
            (now[0].path.as_path(), now[0].backing_file.as_path()),
            (old.path.as_path(), p("/pool/b.img"))
        );
    }

    #[test]
    fn format_guards() {
        let host = FakeHost::new();
        let dev = host.attach_loop(p("/pool/a.img"), RW).unwrap();
        host.set_probe(
            &dev.path,
            Probe::Other {
                description: "a partition table (gpt)".into(),
            },
        );
        assert!(host.mkfs(&dev.path, FsType::Ext4).is_err());
        host.fail_probe(p("/pool/a.img"));
        assert!(host.probe(&dev.path).is_err());
        host.set_probe(p("/pool/a.img"), Probe::Blank);
        host.mkfs(&dev.path, FsType::Xfs).unwrap();
        assert!(
            host.mount(&dev.path, p("/s"), "ext4", &ext4()).is_err(),
            "wrong type"
        );
        host.mount(&dev.path, p("/s"), "xfs", &ext4()).unwrap();

        let ro = host
            .attach_loop(
                p("/pool/r.img"),
                AttachOptions {
                    read_only: true,
                    direct_io: false,
                },
            )
            .unwrap();
        assert!(host.mkfs(&ro.path, FsType::Ext4).is_err());
    }

    #[test]
    fn failure_injection_and_log() {
        let host = FakeHost::new();
        host.fail_next("attach_loop");
        host.fail_next("mounts");
        assert!(host.attach_loop(p("/pool/a.img"), RW).is_err());
        assert!(host.mounts().is_err());
        assert!(host.mounts().is_ok());
        let dev = staged(&host, "/pool/a.img", "/stage/a");
        host.bind_mount(p("/stage/a"), p("/pub"), true).unwrap();
        host.unmount(p("/pub")).unwrap();
        assert_eq!(
            host.call_log(),
            vec![
                "attach_loop /pool/a.img",
                "attach_loop /pool/a.img",
                "mkfs /dev/loop0 ext4",
                "mount /dev/loop0 /stage/a ext4",
                "bind_mount /stage/a /pub ro",
                "unmount /pub",
            ]
        );
        assert_eq!(host.count("attach_loop"), 2);
        assert_eq!(
            host.calls()[2],
            Call::Mkfs {
                device: dev.path,
                fs: FsType::Ext4
            }
        );
    }

    #[test]
    #[should_panic(expected = "no host operation")]
    fn fail_next_rejects_unknown_names() {
        FakeHost::new().fail_next("mkfs_ext4");
    }
}
