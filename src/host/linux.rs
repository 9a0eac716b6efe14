//! The real [`Host`]: loop ioctls (via [`super::loopdev`]), mount(2), statvfs(2), and the few
//! external tools (blkid, mkfs, grow) run with explicit arguments under a timeout.
//! Probing fails closed: a device is blank only when every place a signature can live reads as
//! zero or blkid cleanly finds nothing; anything else is a signature or an error, never blank.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::statvfs::FsFlags;
use tracing::debug;

use super::{
    loopdev::{self, LOOP_CONTROL},
    mountinfo, AttachOptions, DevId, Error, FsStats, FsType, Host, LoopDevice, MountEntry,
    MountOptions, Probe, Result,
};
use crate::host::signature;

const MOUNTINFO: &str = "/proc/self/mountinfo";

const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
// Lazy init makes mkfs take milliseconds; minutes means a hung device, not a big one.
const MKFS_TIMEOUT: Duration = Duration::from_secs(300);
const GROW_TIMEOUT: Duration = Duration::from_secs(300);
const FSCK_TIMEOUT: Duration = Duration::from_secs(600);

/// blkid's exit status when it found no signature at all.
const BLKID_NOTHING_FOUND: i32 = 2;

// BLKGETSIZE64 is _IOR(0x12, 114, size_t) but always writes a u64.
nix::ioctl_read_bad!(
    blk_get_size64,
    nix::request_code_read!(0x12, 114, std::mem::size_of::<usize>()),
    u64
);

/// How many mkfs/fsck/resize processes run at once unless configured otherwise. Each can take
/// hundreds of MiB on a large device; a burst of NodeStage calls must not OOM-kill the plugin.
pub const DEFAULT_MAX_CONCURRENT_FORMATS: usize = 4;

/// The host of a real Linux machine. Its only state is the bound on concurrent heavy tools:
/// every answer comes from the kernel.
#[derive(Debug, Clone)]
pub struct LinuxHost {
    heavy: Arc<Slots>,
}

impl Default for LinuxHost {
    fn default() -> LinuxHost {
        LinuxHost::with_max_concurrent_formats(DEFAULT_MAX_CONCURRENT_FORMATS)
    }
}

impl LinuxHost {
    pub fn new() -> LinuxHost {
        LinuxHost::default()
    }

    /// At most `max` mkfs/fsck/resize processes at once; 0 means no bound.
    pub fn with_max_concurrent_formats(max: usize) -> LinuxHost {
        LinuxHost {
            heavy: Arc::new(Slots::new(max)),
        }
    }
}

/// A counting semaphore for blocking threads (the node's work runs on tokio's blocking pool).
#[derive(Debug)]
pub struct Slots {
    max: usize,
    state: Mutex<SlotState>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    busy: usize,
    /// Highest `busy` seen, for tests and logs.
    peak: usize,
}

/// One claimed slot; dropping it frees the slot.
pub struct Slot<'a> {
    slots: &'a Slots,
}

impl Slots {
    /// `max` = 0: unbounded.
    pub fn new(max: usize) -> Slots {
        Slots {
            max,
            state: Mutex::new(SlotState::default()),
            freed: Condvar::new(),
        }
    }

    /// Waits until a slot is free, at most `timeout`; the wait counts against the tool's own
    /// time budget, so a queue of formats cannot hold a NodeStage forever.
    pub fn acquire(&self, what: &str, timeout: Duration) -> Result<Slot<'_>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut logged = false;
        while self.max != 0 && st.busy >= self.max {
            if !logged {
                debug!(
                    what,
                    busy = st.busy,
                    max = self.max,
                    "waiting for a format slot"
                );
                logged = true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    command: format!("waiting for a slot to run {what}"),
                    timeout,
                });
            }
            st = self
                .freed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.busy += 1;
        st.peak = st.peak.max(st.busy);
        Ok(Slot { slots: self })
    }

    /// The most slots ever held at once.
    pub fn peak(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).peak
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut st = self.slots.state.lock().unwrap_or_else(|e| e.into_inner());
        st.busy -= 1;
        self.slots.freed.notify_one();
    }
}

impl Host for LinuxHost {
    fn loop_devices(&self) -> Result<Vec<LoopDevice>> {
        loopdev::list()
    }

    fn attach_loop(&self, image: &Path, opts: AttachOptions) -> Result<LoopDevice> {
        loopdev::attach(image, opts)
    }

    fn detach_loop(&self, dev: &LoopDevice) -> Result<()> {
        loopdev::detach(dev)
    }

    fn refresh_loop_capacity(&self, dev: &LoopDevice) -> Result<()> {
        loopdev::set_capacity(dev)
    }

    fn probe(&self, device: &Path) -> Result<Probe> {
        // Nearly every probe is of a new volume, which reads as zero everywhere: then blkid,
        // one fork and exec and a few dozen reads costing milliseconds, has nothing to find.
        if signature_areas_are_zero(device)? {
            debug!(device = %device.display(), "every place a signature can live reads as zero: blank");
            return Ok(Probe::Blank);
        }
        let args: [&dyn AsRef<OsStr>; 4] = [&"-p", &"-o", &"export", &device];
        let out = execute("blkid", &args, PROBE_TIMEOUT)?;
        match out.status.code() {
            Some(0) => Ok(parse_blkid(&String::from_utf8_lossy(&out.stdout))),
            // blkid also says "nothing found" when it could not open the device, so anything on
            // stderr makes the answer unknown.
            Some(BLKID_NOTHING_FOUND) if out.stderr.iter().all(u8::is_ascii_whitespace) => {
                Ok(Probe::Blank)
            }
            _ => Err(command_error("blkid", &args, &out)),
        }
    }

    fn mkfs(&self, device: &Path, fs: FsType) -> Result<()> {
        // Before the slot and the probe: a node without this filesystem's tools answers at once.
        require_mkfs(fs)?;
        // The slot first, so the probe below is the last look before the tool runs.
        let _slot = self
            .heavy
            .acquire(&format!("mkfs.{}", fs.as_str()), MKFS_TIMEOUT)?;
        // mkfs.ext4 overwrites an existing filesystem without asking when stdin is not a
        // terminal, so the caller's probe is not enough of a guard: look again right here, with
        // the same probe (zero signature areas, or else blkid's verdict).
        match self.probe(device)? {
            Probe::Blank => {}
            found => {
                return Err(Error::io(
                    format!(
                        "refusing to format {}, which holds {}",
                        device.display(),
                        describe(&found)
                    ),
                    io::Error::from(io::ErrorKind::AlreadyExists),
                ))
            }
        }
        match fs {
            FsType::Ext4 => run(
                "mkfs.ext4",
                &[
                    &"-q",
                    &"-E",
                    &"lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                    &device,
                ],
                MKFS_TIMEOUT,
            ),
            FsType::Xfs => run("mkfs.xfs", &[&"-q", &"-K", &device], MKFS_TIMEOUT),
        }
        .map(drop)
    }

    fn redo_mkfs(&self, device: &Path, fs: FsType) -> Result<()> {
        require_mkfs(fs)?;
        let _slot = self
            .heavy
            .acquire(&format!("mkfs.{}", fs.as_str()), MKFS_TIMEOUT)?;
        signature_areas_are_zero(device)?;
        match fs {
            FsType::Ext4 => run(
                "mkfs.ext4",
                &[
                    &"-q",
                    &"-F",
                    &"-E",
                    &"lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                    &device,
                ],
                MKFS_TIMEOUT,
            ),
            FsType::Xfs => run("mkfs.xfs", &[&"-q", &"-f", &"-K", &device], MKFS_TIMEOUT),
        }
        .map(drop)
    }

    fn mount(&self, device: &Path, target: &Path, fs: &str, opts: &MountOptions) -> Result<()> {
        let mut flags = MsFlags::from_bits_retain(opts.flags as libc::c_ulong);
        flags.set(MsFlags::MS_RDONLY, opts.read_only);
        let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
        let context = || format!("mount {} on {} as {fs}", device.display(), target.display());
        let point = MountPoint::open(target).map_err(|e| resolve_error(context(), e))?;
        debug!(device = %device.display(), target = %target.display(), fs, flags = flags.bits(), data = ?data, "mount(2)");
        nix::mount::mount(Some(device), &point.proc_path(), Some(fs), flags, data)
            .map_err(|e| Error::io(context(), e.into()))
    }

    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        let context = || format!("bind {} on {}", source.display(), target.display());
        let from = open_no_symlinks(AT_FDCWD, source).map_err(|e| resolve_error(context(), e))?;
        let point = MountPoint::open(target).map_err(|e| resolve_error(context(), e))?;
        debug!(source = %source.display(), target = %target.display(), "mount(2) MS_BIND");
        nix::mount::mount(
            Some(&proc_fd_path(&from)),
            &point.proc_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| Error::io(context(), e.into()))?;
        if !read_only {
            return Ok(());
        }
        // The fd names the directory under the new mount; looking the name up again from the
        // pinned parent lands on the mount's root (a mount point cannot be renamed away).
        let root = match point.reopen() {
            Ok(root) => root,
            Err(e) => return Err(Error::io(format!("{}: find the new mount", context()), e)),
        };
        if let Err(e) = remount_read_only(&root) {
            // No half-done state: a read-write bind where read-only was asked is worse than none.
            if let Err(undo) = umount_fd(&root) {
                tracing::warn!(target = %target.display(), error = %undo, "could not undo a bind after its read-only remount failed");
            }
            return Err(Error::io(format!("{}: read-only remount", context()), e));
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        umount(target).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                Error::Busy(format!("{} is busy", target.display()))
            } else {
                Error::io(format!("unmount {}", target.display()), e)
            }
        })
    }

    fn mounts(&self) -> Result<Vec<MountEntry>> {
        let data =
            std::fs::read(MOUNTINFO).map_err(|e| Error::io(format!("read {MOUNTINFO}"), e))?;
        mountinfo::parse_bytes(&data).map_err(|e| {
            Error::io(
                format!("parse {MOUNTINFO}"),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })
    }

    fn device_number(&self, path: &Path) -> Result<Option<DevId>> {
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        Ok(meta
            .file_type()
            .is_block_device()
            .then(|| loopdev::dev_id(meta.rdev())))
    }

    fn device_size(&self, device: &Path) -> Result<u64> {
        let file =
            File::open(device).map_err(|e| Error::io(format!("open {}", device.display()), e))?;
        block_device_size(&file).map_err(|e| Error::io(format!("size of {}", device.display()), e))
    }

    fn fs_stats(&self, path: &Path) -> Result<FsStats> {
        debug!(path = %path.display(), "statvfs(2)");
        let st = nix::sys::statvfs::statvfs(path)
            .map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
        // The field types differ between targets; all are unsigned and at most 64 bits.
        let frsize = st.fragment_size() as u64;
        let (blocks, bfree, bavail) = (
            st.blocks() as u64,
            st.blocks_free() as u64,
            st.blocks_available() as u64,
        );
        let (files, ffree) = (st.files() as u64, st.files_free() as u64);
        Ok(FsStats {
            total_bytes: blocks.saturating_mul(frsize),
            available_bytes: bavail.saturating_mul(frsize),
            used_bytes: blocks.saturating_sub(bfree).saturating_mul(frsize),
            total_inodes: files,
            free_inodes: ffree,
            used_inodes: files.saturating_sub(ffree),
        })
    }

    fn grow_fs(&self, device: &Path, mount_point: &Path, fs: FsType) -> Result<()> {
        super::require_tools([match fs {
            FsType::Ext4 => "resize2fs",
            FsType::Xfs => "xfs_growfs",
        }])?;
        let _slot = self.heavy.acquire("a filesystem resize", GROW_TIMEOUT)?;
        match fs {
            FsType::Ext4 => run("resize2fs", &[&device], GROW_TIMEOUT),
            FsType::Xfs => run("xfs_growfs", &[&mount_point], GROW_TIMEOUT),
        }
        .map(drop)
    }

    fn grow_unmounted_fs(&self, device: &Path, fs: FsType) -> Result<()> {
        match fs {
            // resize2fs insists on a check newer than the last mount, as tune2fs -U does.
            FsType::Ext4 => {
                super::require_tools(["e2fsck", "resize2fs"])?;
                check_ext4(device)?;
                run("resize2fs", &[&device], GROW_TIMEOUT).map(drop)
            }
            FsType::Xfs => Err(Error::Busy(format!(
                "xfs on {} can only grow while mounted",
                device.display()
            ))),
        }
    }

    fn new_fs_uuid(&self, device: &Path, fs: FsType, scratch: &Path) -> Result<()> {
        // Before the replay mount, so a missing tool leaves the device as it was.
        super::require_tools(
            match fs {
                FsType::Ext4 => &["e2fsck", "tune2fs"][..],
                FsType::Xfs => &["xfs_admin"][..],
            }
            .iter()
            .copied(),
        )?;
        // XFS refuses to mount a second filesystem with a UUID already mounted: the replay mount
        // says nouuid. The copy's UUID changes below, so later mounts need no such option.
        let replay = MountOptions {
            data: if fs == FsType::Xfs {
                "nouuid".into()
            } else {
                String::new()
            },
            ..Default::default()
        };
        self.mount(device, scratch, fs.as_str(), &replay)?;
        self.unmount(scratch)?;
        match fs {
            FsType::Ext4 => {
                check_ext4(device)?;
                run("tune2fs", &[&"-U", &"random", &device], GROW_TIMEOUT)?;
            }
            FsType::Xfs => {
                run("xfs_admin", &[&"-U", &"generate", &device], GROW_TIMEOUT)?;
            }
        }
        Ok(())
    }

    fn check_ready(&self) -> std::result::Result<(), String> {
        // Probe runs every few seconds (livenessprobe); once every tool was found, the PATH is
        // not searched again. A missing tool is looked for on every call, so installing it heals.
        static TOOLS_FOUND: std::sync::atomic::AtomicBool =
            std::sync::atomic::AtomicBool::new(false);
        let tools_known = TOOLS_FOUND.load(std::sync::atomic::Ordering::Relaxed);
        // The loop driver cannot be unloaded while its control device is open, so the first
        // descriptor that opens is kept; later calls only see that the node attach opens is
        // still there, a stat instead of an open and a close (whose cost an idle machine turns
        // into tens of microseconds of Probe latency by letting the client's CPU fall asleep).
        static LOOP_DRIVER: std::sync::OnceLock<File> = std::sync::OnceLock::new();
        let mut missing = Vec::new();
        let loop_ready = match LOOP_DRIVER.get() {
            Some(_) => std::fs::metadata(LOOP_CONTROL).and_then(|m| {
                if m.file_type().is_char_device() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a character device",
                    ))
                }
            }),
            None => OpenOptions::new()
                .read(true)
                .write(true)
                .open(LOOP_CONTROL)
                .map(|f| drop(LOOP_DRIVER.set(f))),
        };
        if let Err(e) = loop_ready {
            missing.push(format!("{LOOP_CONTROL} ({e})"));
        }
        if !tools_known {
            let before = missing.len();
            for tool in super::required_tools() {
                if super::find_tool(tool.name).is_none() {
                    missing.push(format!("{} (package {})", tool.name, tool.package));
                }
            }
            if missing.len() == before {
                TOOLS_FOUND.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing: {}", missing.join(", ")))
        }
    }
}

fn require_mkfs(fs: FsType) -> Result<()> {
    super::require_tools([match fs {
        FsType::Ext4 => "mkfs.ext4",
        FsType::Xfs => "mkfs.xfs",
    }])
}

fn umount(target: &Path) -> io::Result<()> {
    debug!(target = %target.display(), "umount2(2)");
    // NOFOLLOW: a symlink planted at a target must not redirect the unmount elsewhere.
    nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW).map_err(io::Error::from)
}

/// Makes the bind whose root `root` is read-only. A bind remount replaces every per-mount flag, so
/// the flags the bind inherited from its source (nosuid, nodev, noexec...) are passed again, or
/// a read-only publish would quietly drop them.
fn remount_read_only(root: &OwnedFd) -> io::Result<()> {
    let inherited = nix::sys::statvfs::fstatvfs(root)?.flags();
    let carried = [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st, _)| inherited.contains(*st))
    .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms);
    let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | carried;
    let path = proc_fd_path(root);
    debug!(target = %path.display(), flags = flags.bits(), "mount(2) MS_REMOUNT|MS_BIND|MS_RDONLY");
    nix::mount::mount(None::<&str>, &path, None::<&str>, flags, None::<&str>)?;
    Ok(())
}

/// Unmounts the mount whose root `root` is. The magic link must be followed here: it is our
/// own descriptor, so following it cannot lead anywhere else.
fn umount_fd(root: &OwnedFd) -> io::Result<()> {
    let path = proc_fd_path(root);
    debug!(target = %path.display(), "umount2(2)");
    nix::mount::umount2(&path, MntFlags::empty()).map_err(io::Error::from)
}

/// The path through which mount(2) reaches what `fd` was opened on, whatever has been renamed
/// or swapped for a link since.
fn proc_fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A mount target resolved once, without following symbolic links: mount(2) is given its
/// /proc/self/fd path, so a component swapped for a link after the node checked the path
/// cannot redirect the mount (ARCHITECTURE.md invariant 10). The parent stays open so the new
/// mount's root can be found again by name.
struct MountPoint {
    parent: OwnedFd,
    name: PathBuf,
    target: OwnedFd,
}

impl MountPoint {
    fn open(path: &Path) -> io::Result<MountPoint> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a mount target needs a parent and a name",
            ));
        };
        let parent = open_no_symlinks(AT_FDCWD, parent)?;
        let target = open_no_symlinks(&parent, Path::new(name))?;
        Ok(MountPoint {
            parent,
            name: PathBuf::from(name),
            target,
        })
    }

    fn proc_path(&self) -> PathBuf {
        proc_fd_path(&self.target)
    }

    fn reopen(&self) -> io::Result<OwnedFd> {
        open_no_symlinks(&self.parent, &self.name)
    }
}

/// Opens `path` (relative to `dir`) as an O_PATH descriptor, refusing a symbolic link in any
/// component with ELOOP. openat2 does it in one call; on kernels before 5.6 the components are
/// walked one by one with O_NOFOLLOW, which is as safe, only slower.
fn open_no_symlinks<Fd: AsFd>(dir: Fd, path: &Path) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    match nix::fcntl::openat2(dir.as_fd(), path, how) {
        Err(nix::errno::Errno::ENOSYS) => walk_no_symlinks(dir.as_fd(), path),
        other => other.map_err(io::Error::from),
    }
}

fn walk_no_symlinks(dir: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    use std::path::Component;
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut at: OwnedFd = nix::fcntl::openat(dir, ".", flags, nix::sys::stat::Mode::empty())?;
    for component in path.components() {
        let name: &OsStr = match component {
            Component::RootDir => OsStr::new("/"),
            Component::CurDir => continue,
            Component::ParentDir => OsStr::new(".."),
            Component::Normal(name) => name,
            Component::Prefix(_) => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        };
        let next = nix::fcntl::openat(&at, name, flags, nix::sys::stat::Mode::empty())?;
        if nix::sys::stat::fstat(&next)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        at = next;
    }
    Ok(at)
}

/// A symbolic link in a path the caller named is its error (INVALID_ARGUMENT); anything else
/// is ours.
fn resolve_error(context: String, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        Error::Symlink(format!("{context}: the path goes through a symbolic link"))
    } else {
        Error::io(context, e)
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    debug!("ioctl BLKGETSIZE64");
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    unsafe { blk_get_size64(file.as_raw_fd(), &mut size) }?;
    Ok(size)
}

/// Whether every place blkid reads on `device` holds zeros ([`signature::reads_all_zero`]);
/// `false` leaves the verdict to blkid. Reading those places also proves the device can be read
/// before blkid's answer is believed: blkid exits with "nothing found" on a device it cannot
/// open, and a detached loop device has no size, which no prober can tell from blank.
fn signature_areas_are_zero(device: &Path) -> Result<bool> {
    let context = |what: &str| format!("{what} {}", device.display());
    // Direct reads: what the device holds without filling the page cache with megabytes of
    // zeros per stage. They are coherent with buffered writes (the kernel writes dirty pages
    // of the range back before reading), so they see what blkid would see.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .map_err(|e| Error::io(context("open"), e))?;
    let meta = file.metadata().map_err(|e| Error::io(context("stat"), e))?;
    if !meta.file_type().is_block_device() {
        return Err(Error::io(
            context("probe"),
            io::Error::new(io::ErrorKind::InvalidInput, "not a block device"),
        ));
    }
    let size = block_device_size(&file).map_err(|e| Error::io(context("size of"), e))?;
    if size == 0 {
        return Err(Error::io(
            context("probe"),
            io::Error::new(
                io::ErrorKind::InvalidData,
                "device has no size (not attached?)",
            ),
        ));
    }
    debug!(device = %device.display(), size, "read signature areas");
    let zero = match signature::reads_all_zero(&file, size) {
        // A device whose blocks are larger than the alignment of the direct reads.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let buffered = File::open(device).map_err(|e| Error::io(context("open"), e))?;
            signature::reads_all_zero(&buffered, size)
        }
        other => other,
    };
    zero.map_err(|e| Error::io(context("read"), e))
}

/// Reads `blkid -p -o export` output (exit 0: some signature was found).
fn parse_blkid(out: &str) -> Probe {
    let tags: HashMap<&str, String> = out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), unescape_export(v)))
        .collect();
    let get = |k: &str| tags.get(k).map(String::as_str).filter(|v| !v.is_empty());
    match (get("PTTYPE"), get("TYPE"), get("USAGE")) {
        (None, Some(fs_type), Some("filesystem")) => Probe::Filesystem {
            fs_type: fs_type.to_string(),
            uuid: get("UUID").map(str::to_string),
        },
        // A partition table, even beside a filesystem signature, means the device is laid out
        // in a way this driver never creates: hands off.
        (Some(pt), ty, _) => Probe::Other {
            description: match ty {
                Some(ty) => format!("a partition table ({pt}) and a signature of type {ty}"),
                None => format!("a partition table ({pt})"),
            },
        },
        (None, Some(ty), usage) => Probe::Other {
            description: format!(
                "a signature of type {ty} (usage {})",
                usage.unwrap_or("unknown")
            ),
        },
        (None, None, _) => Probe::Other {
            description: "an unidentified signature".to_string(),
        },
    }
}

/// blkid's export format backslash-escapes shell-special characters in values.
fn unescape_export(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn describe(p: &Probe) -> String {
    match p {
        Probe::Blank => "nothing".to_string(),
        Probe::Filesystem { fs_type, .. } => format!("a filesystem ({fs_type})"),
        Probe::Other { description } => description.clone(),
    }
}

/// `e2fsck -f -p` of an unmounted ext4: the fresh check tune2fs -U and an offline resize2fs
/// require. Exit 1 means "errors corrected"; anything above fails and leaves the volume alone.
fn check_ext4(device: &Path) -> Result<()> {
    let out = execute("e2fsck", &[&"-f", &"-p", &device], FSCK_TIMEOUT)?;
    if !matches!(out.status.code(), Some(0) | Some(1)) {
        return Err(command_error("e2fsck", &[&"-f", &"-p", &device], &out));
    }
    Ok(())
}

/// Runs a tool to completion within `timeout` and fails unless it exits 0; the error carries
/// the tool's own message.
pub fn run(program: &str, args: &[&dyn AsRef<OsStr>], timeout: Duration) -> Result<Output> {
    let out = execute(program, args, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(command_error(program, args, &out))
    }
}

/// Runs a tool within `timeout`, whatever its exit status. No shell, no stdin, C locale.
fn execute(program: &str, args: &[&dyn AsRef<OsStr>], timeout: Duration) -> Result<Output> {
    let line = command_line(program, args);
    debug!(command = %line, "run");
    let parent = std::process::id();
    let mut cmd = Command::new(program);
    cmd.args(args.iter().map(|a| a.as_ref()))
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A tool must not outlive a killed driver: an orphaned mkfs still writing while the restarted
    // driver probes the same device could be taken for blank and formatted a second time. The
    // signal follows the spawning thread, which waits for the child below, so it fires only when
    // the driver itself dies.
    // SAFETY: prctl, getppid and raise are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            if libc::getppid() as u32 != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::MissingTool(program.to_string())
        } else {
            Error::io(format!("start {line}"), e)
        }
    })?;
    // Drained on their own threads, so a chatty tool cannot fill a pipe and stall until the timeout.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut exited = ExitWatch::new(&child);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => exited.wait(deadline),
            Ok(None) => {
                let _ = child.kill();
                // A tool blocked on a hung device sleeps through SIGKILL until its I/O returns:
                // reap it in the background instead of holding the caller.
                std::thread::spawn(move || child.wait());
                return Err(Error::Timeout {
                    command: line,
                    timeout,
                });
            }
            Err(e) => {
                let _ = child.kill();
                std::thread::spawn(move || child.wait());
                return Err(Error::io(format!("wait for {line}"), e));
            }
        }
    };
    debug!(command = %line, %status, "finished");
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Sleeps until a child may have exited. Tools take a few milliseconds and sit on the path of
/// every first stage: waking when the process ends (its pidfd turns readable) instead of at the
/// next tick of a doubling backoff (1, 3, 7, 15 ms...) stops a 5 ms mkfs from costing 8.
struct ExitWatch {
    /// `None` on kernels without `pidfd_open` (before 5.3): then a short sleep.
    pidfd: Option<OwnedFd>,
    pause: Duration,
}

impl ExitWatch {
    fn new(child: &std::process::Child) -> ExitWatch {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1. The child
        // is not reaped before `child.try_wait` sees it exit, so the pid is still its own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        let pidfd = i32::try_from(fd)
            .ok()
            .filter(|&fd| fd >= 0)
            // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        ExitWatch {
            pidfd,
            pause: Duration::from_millis(1),
        }
    }

    /// Returns when the child exited, at `deadline`, or earlier (callers check again).
    fn wait(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        match &self.pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
                // SAFETY: one valid pollfd, for the duration of the call.
                if unsafe { libc::poll(&mut pfd, 1, ms) } < 0
                    && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted
                {
                    // Never spin on a descriptor poll refuses: back to sleeping.
                    self.pidfd = None;
                }
            }
            None => {
                std::thread::sleep(self.pause.min(left));
                self.pause = (self.pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut p| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            buf
        })
    })
}

fn collect(handle: Option<JoinHandle<Vec<u8>>>) -> Vec<u8> {
    handle.and_then(|h| h.join().ok()).unwrap_or_default()
}

fn command_line(program: &str, args: &[&dyn AsRef<OsStr>]) -> String {
    std::iter::once(program.to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

fn command_error(program: &str, args: &[&dyn AsRef<OsStr>], out: &Output) -> Error {
    // Some tools report failures on stdout only.
    let text = if out.stderr.iter().all(u8::is_ascii_whitespace) {
        &out.stdout
    } else {
        &out.stderr
    };
    let mut stderr = String::from_utf8_lossy(text).trim().to_string();
    if stderr.len() > 2048 {
        let cut = (0..=2048)
            .rev()
            .find(|&i| stderr.is_char_boundary(i))
            .unwrap_or(0);
        stderr.truncate(cut);
        stderr.push_str("...");
    }
    Error::Command {
        command: command_line(program, args),
        status: out.status.to_string(),
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_output() {
        let fs = |t: &str, u: Option<&str>| Probe::Filesystem {
            fs_type: t.into(),
            uuid: u.map(Into::into),
        };
        let other = |d: &str| Probe::Other {
            description: d.into(),
        };
        let cases: &[(&str, &str, Probe)] = &[
            (
                "ext4",
                "DEVNAME=/dev/loop0\nUUID=aace8e98\nVERSION=1.0\nBLOCK_SIZE=1024\nTYPE=ext4\nUSAGE=filesystem\n",
                fs("ext4", Some("aace8e98")),
            ),
            ("xfs without uuid", "TYPE=xfs\nUSAGE=filesystem\n", fs("xfs", None)),
            (
                "escaped value",
                "LABEL=my\\ data\nTYPE=ext4\nUSAGE=filesystem\nUUID=x\\$y\n",
                fs("ext4", Some("x$y")),
            ),
            ("swap", "UUID=fa18\nVERSION=1\nTYPE=swap\nUSAGE=other\n", other("a signature of type swap (usage other)")),
            (
                "raid member",
                "TYPE=linux_raid_member\nUSAGE=raid\n",
                other("a signature of type linux_raid_member (usage raid)"),
            ),
            ("luks", "TYPE=crypto_LUKS\nUSAGE=crypto\n", other("a signature of type crypto_LUKS (usage crypto)")),
            ("type without usage", "TYPE=ext4\n", other("a signature of type ext4 (usage unknown)")),
            ("partition table", "PTUUID=1234\nPTTYPE=gpt\n", other("a partition table (gpt)")),
            (
                "partition table beside a filesystem",
                "PTTYPE=dos\nTYPE=vfat\nUSAGE=filesystem\n",
                other("a partition table (dos) and a signature of type vfat"),
            ),
            ("nothing recognisable", "DEVNAME=/dev/loop0\n", other("an unidentified signature")),
            ("empty output", "", other("an unidentified signature")),
        ];
        for (name, input, want) in cases {
            assert_eq!(&parse_blkid(input), want, "{name}");
        }
    }

    #[test]
    fn runs_tools_and_reports_failures() {
        let out = run("sh", &[&"-c", &"printf hello"], Duration::from_secs(10)).unwrap();
        assert_eq!(out.stdout, b"hello");

        match run(
            "sh",
            &[&"-c", &"echo boom >&2; exit 3"],
            Duration::from_secs(10),
        ) {
            Err(Error::Command {
                command,
                status,
                stderr,
            }) => {
                assert_eq!(command, "sh -c echo boom >&2; exit 3");
                assert!(status.contains('3'), "{status}");
                assert_eq!(stderr, "boom");
            }
            other => panic!("want a command error, got {other:?}"),
        }

        let started = Instant::now();
        match run("sleep", &[&"30"], Duration::from_millis(200)) {
            Err(Error::Timeout { command, .. }) => assert_eq!(command, "sleep 30"),
            other => panic!("want a timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));

        match run("blockcsi-no-such-tool", &[], Duration::from_secs(1)) {
            Err(Error::MissingTool(t)) => assert_eq!(t, "blockcsi-no-such-tool"),
            other => panic!("want a missing tool, got {other:?}"),
        }
    }

    #[test]
    fn large_output_does_not_stall() {
        let out = run(
            "sh",
            &[&"-c", &"head -c 1000000 /dev/zero"],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout.len(), 1_000_000);
    }

    #[test]
    fn probe_refuses_what_is_not_a_readable_block_device() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        for path in [file, dir.path().join("missing")] {
            assert!(LinuxHost::new().probe(&path).is_err(), "{}", path.display());
        }
    }

    #[test]
    fn heavy_tools_never_exceed_their_slots() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for (max, threads, want_peak) in [(1, 4, 1), (2, 6, 2), (0, 3, 3)] {
            let slots = Arc::new(Slots::new(max));
            let running = Arc::new(AtomicUsize::new(0));
            let seen = Arc::new(AtomicUsize::new(0));
            let start = Arc::new(std::sync::Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (slots, running, seen, start) =
                        (slots.clone(), running.clone(), seen.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        let _slot = slots.acquire("sleep", Duration::from_secs(30)).unwrap();
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        seen.fetch_max(now, Ordering::SeqCst);
                        run("sleep", &[&"0.2"], Duration::from_secs(10)).unwrap();
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            assert_eq!(seen.load(Ordering::SeqCst), want_peak, "max {max}");
            assert_eq!(slots.peak(), want_peak, "max {max}");
        }
        // A full set of slots turns into a timeout, not an endless wait.
        let slots = Slots::new(1);
        let _held = slots.acquire("first", Duration::from_secs(1)).unwrap();
        let started = Instant::now();
        assert!(matches!(
            slots.acquire("second", Duration::from_millis(100)),
            Err(Error::Timeout { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn tools_die_with_the_driver() {
        // A child that forks a grandchild which spawns `sleep` through `run`, then the grandchild
        // (the "driver") is killed: the sleep must be gone too.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // SAFETY: the forked child only calls run() and exits; it is a test process.
        match unsafe { libc::fork() } {
            0 => {
                let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
                let _ = run("sh", &[&"-c", &script], Duration::from_secs(60));
                unsafe { libc::_exit(0) };
            }
            pid if pid > 0 => {
                let deadline = Instant::now() + Duration::from_secs(10);
                let tool: i32 = loop {
                    if let Some(p) = std::fs::read_to_string(&pidfile)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                    {
                        break p;
                    }
                    assert!(Instant::now() < deadline, "tool never started");
                    std::thread::sleep(Duration::from_millis(10));
                };
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let mut status = 0;
                unsafe { libc::waitpid(pid, &mut status, 0) };
                let deadline = Instant::now() + Duration::from_secs(10);
                // Gone, or a zombie waiting for init to reap it.
                while std::fs::read_to_string(format!("/proc/{tool}/stat"))
                    .is_ok_and(|s| !s.contains(") Z"))
                {
                    assert!(Instant::now() < deadline, "tool {tool} outlived its driver");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            _ => panic!("fork failed"),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blkgetsize64_number() {
        assert_eq!(
            nix::request_code_read!(0x12, 114, std::mem::size_of::<usize>()),
            0x8008_1272
        );
    }
}
