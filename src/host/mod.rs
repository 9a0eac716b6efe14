//! The node's view of the kernel: loop devices, mounts, filesystem probing and creation, statfs.
//! Everything the node service does to the machine goes through the [`Host`] trait, so the node
//! logic can be tested against [`fake::FakeHost`] without root; [`linux::LinuxHost`] is the real one.

// A recording fake for tests; never in the release binary.
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod linux;
pub mod loopdev;
pub mod mountinfo;
pub mod signature;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use mountinfo::MountEntry;

/// A device number split the way the kernel prints it in mountinfo and sysfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// An attached loop device and the image behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    pub dev: DevId,
    /// The backing file as sysfs reports it, with a trailing " (deleted)" removed.
    pub backing_file: PathBuf,
    /// True when sysfs says the backing file was unlinked while attached.
    pub backing_deleted: bool,
    /// The backing file's identity, when the kernel tells it. sysfs shows the path as seen
    /// from the mount namespace that attached the device; once that namespace is gone (a node
    /// plugin container restarted) the path is cut to the mount's root, and only this still
    /// names the image.
    pub backing_id: Option<FileId>,
}

/// A file's identity: the device of its filesystem and its inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: DevId,
    pub ino: u64,
}

impl FileId {
    /// The identity of the file at `path`; `None` when it cannot be read (gone, say).
    pub fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        let dev = meta.dev();
        Some(FileId {
            dev: DevId {
                major: libc::major(dev),
                minor: libc::minor(dev),
            },
            ino: meta.ino(),
        })
    }
}

/// How to attach an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachOptions {
    pub read_only: bool,
    /// Ask for direct I/O (bypassing the page cache of the pool filesystem); silently
    /// dropped when the pool filesystem refuses it.
    pub direct_io: bool,
}

/// What a low-level probe of a device found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature of any kind: the only state in which formatting is considered.
    Blank,
    /// A filesystem signature (`TYPE=` of blkid) with its UUID when known.
    Filesystem {
        fs_type: String,
        uuid: Option<String>,
    },
    /// Some other signature (partition table, RAID member, swap...): never formatted, never mounted.
    Other { description: String },
}

/// Filesystems the node creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }
}

/// A mount request after the option allowlist: kernel flags plus the filesystem-specific data string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub read_only: bool,
    /// `MS_*` bits other than `MS_RDONLY`.
    pub flags: u64,
    /// Comma-separated filesystem options (`data` of mount(2)).
    pub data: String,
}

/// Space and inode figures of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{command} did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    /// A tool a filesystem needs is not on PATH; the message names the package that ships it.
    #[error("{0} is not installed (Debian package {pkg})", pkg = tool_package(.0))]
    MissingTool(String),
    #[error("{0}")]
    Busy(String),
    /// A path the caller gave goes through a symbolic link, found while resolving it to mount.
    #[error("{0}")]
    Symlink(String),
}

impl Error {
    /// True when the error only says a tool is not installed: the operation needs that tool,
    /// nothing else about the volume or the node is wrong.
    pub fn is_missing_tool(&self) -> bool {
        matches!(self, Error::MissingTool(_))
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An external tool the node runs, and the Debian package that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
    /// What it is needed for, for doctor's report.
    pub purpose: &'static str,
    /// `None`: every volume needs it; `Some(fs)`: only volumes of that filesystem do.
    pub fs: Option<FsType>,
}

const fn tool(
    name: &'static str,
    package: &'static str,
    purpose: &'static str,
    fs: Option<FsType>,
) -> Tool {
    Tool {
        name,
        package,
        purpose,
        fs,
    }
}

/// Every tool the node runs. The ones with `fs: None` decide readiness (Probe, `/healthz`,
/// doctor's FAIL); a node without the tools of one filesystem still serves the others, and only
/// the NodeStage or NodeExpandVolume that needs a missing tool fails, naming it and its package.
/// One list, so Probe and doctor cannot disagree on what "ready" means.
pub const TOOLS: [Tool; 8] = [
    tool("blkid", "util-linux", "probing before any format", None),
    tool(
        "mkfs.ext4",
        "e2fsprogs",
        "formatting ext4 volumes",
        Some(FsType::Ext4),
    ),
    tool(
        "resize2fs",
        "e2fsprogs",
        "growing ext4 volumes",
        Some(FsType::Ext4),
    ),
    tool(
        "e2fsck",
        "e2fsprogs",
        "checking copied or grown ext4 volumes",
        Some(FsType::Ext4),
    ),
    tool(
        "tune2fs",
        "e2fsprogs",
        "new UUIDs of copied ext4 volumes",
        Some(FsType::Ext4),
    ),
    tool(
        "mkfs.xfs",
        "xfsprogs",
        "formatting xfs volumes",
        Some(FsType::Xfs),
    ),
    tool(
        "xfs_growfs",
        "xfsprogs",
        "growing xfs volumes",
        Some(FsType::Xfs),
    ),
    tool(
        "xfs_admin",
        "xfsprogs",
        "new UUIDs of copied xfs volumes",
        Some(FsType::Xfs),
    ),
];

/// The tools every volume needs: what readiness checks besides the loop driver.
pub fn required_tools() -> impl Iterator<Item = &'static Tool> {
    TOOLS.iter().filter(|t| t.fs.is_none())
}

/// The tools only volumes of `fs` need.
pub fn filesystem_tools(fs: FsType) -> impl Iterator<Item = &'static Tool> {
    TOOLS.iter().filter(move |t| t.fs == Some(fs))
}

/// The Debian package that ships `tool`, for messages; "?" for a tool not in [`TOOLS`].
pub fn tool_package(tool: &str) -> &'static str {
    TOOLS
        .iter()
        .find(|t| t.name == tool)
        .map_or("?", |t| t.package)
}

/// Where `tool` is on PATH, as `Command` will find it: a regular file with an execute bit.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The first of `tools` that is not on PATH, as the error an operation needing it returns.
pub fn require_tools<'a>(tools: impl IntoIterator<Item = &'a str>) -> Result<()> {
    match tools.into_iter().find(|t| find_tool(t).is_none()) {
        Some(t) => Err(Error::MissingTool(t.to_string())),
        None => Ok(()),
    }
}

/// The kernel work of the node service. Implementations must be safe to call from many threads:
/// the node service serialises work per volume, not globally.
pub trait Host: Send + Sync {
    /// Every attached loop device, from sysfs.
    fn loop_devices(&self) -> Result<Vec<LoopDevice>>;
    /// Attaches `image` to a free loop device.
    fn attach_loop(&self, image: &Path, opts: AttachOptions) -> Result<LoopDevice>;
    /// Detaches a loop device. Detaching one that is already gone is not an error.
    fn detach_loop(&self, dev: &LoopDevice) -> Result<()>;
    /// Makes the loop device pick up a new size of its backing file.
    fn refresh_loop_capacity(&self, dev: &LoopDevice) -> Result<()>;
    /// Low-level probe of a block device for any signature. An `Err` means "unknown", never blank.
    fn probe(&self, device: &Path) -> Result<Probe>;
    /// Creates a filesystem. Only called after `probe` returned `Blank`.
    fn mkfs(&self, device: &Path, fs: FsType) -> Result<()>;
    /// Creates a filesystem over what an interrupted mkfs of this driver left (forcing the
    /// tool past the half-written signature). Only called when the pool recorded that the
    /// format started and the volume was never mounted since.
    fn redo_mkfs(&self, device: &Path, fs: FsType) -> Result<()>;
    /// Mounts a block device holding a filesystem.
    fn mount(&self, device: &Path, target: &Path, fs: &str, opts: &MountOptions) -> Result<()>;
    /// Bind-mounts `source` (a directory or a device node) onto `target`, read-only if asked.
    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> Result<()>;
    /// Unmounts the top mount at `target`.
    fn unmount(&self, target: &Path) -> Result<()>;
    /// The mount table of this process (`/proc/self/mountinfo`).
    fn mounts(&self) -> Result<Vec<MountEntry>>;
    /// The device number a device node refers to (`st_rdev`), `None` when `path` is not a device node.
    fn device_number(&self, path: &Path) -> Result<Option<DevId>>;
    /// Size in bytes of a block device.
    fn device_size(&self, device: &Path) -> Result<u64>;
    /// statfs of a mounted filesystem.
    fn fs_stats(&self, path: &Path) -> Result<FsStats>;
    /// Grows a mounted filesystem to the size of its device.
    fn grow_fs(&self, device: &Path, mount_point: &Path, fs: FsType) -> Result<()>;
    /// Grows an unmounted filesystem to the size of its device (ext4 only: XFS grows mounted).
    fn grow_unmounted_fs(&self, device: &Path, fs: FsType) -> Result<()>;
    /// Gives the (unmounted) filesystem on `device` a new random UUID. It is mounted at
    /// `scratch` and unmounted first, so a journal or log left by a crash-consistent copy is
    /// replayed as a normal mount would; ext4 is then checked, as tune2fs requires.
    fn new_fs_uuid(&self, device: &Path, fs: FsType, scratch: &Path) -> Result<()>;
    /// Whether the loop driver and the tools every volume needs ([`required_tools`]) are present;
    /// the message names what is missing. Tools of one filesystem are not part of it: the
    /// operation that needs one fails on its own ([`Error::MissingTool`]).
    fn check_ready(&self) -> std::result::Result<(), String>;
}
