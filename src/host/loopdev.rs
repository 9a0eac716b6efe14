//! Loop devices through the kernel's ioctls (no losetup): attaching an image to a free device,
//! detaching, capacity refresh, and the list of attached devices read from sysfs.
//! The ioctl numbers and structures mirror `linux/loop.h`.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tracing::debug;

use super::{AttachOptions, DevId, Error, FileId, LoopDevice, Result};

pub(crate) const LOOP_CONTROL: &str = "/dev/loop-control";
const SYS_BLOCK: &str = "/sys/block";
const DEV_DIR: &str = "/dev";

const LOOP_SET_FD: u32 = 0x4C00;
const LOOP_CLR_FD: u32 = 0x4C01;
const LOOP_SET_STATUS64: u32 = 0x4C04;
const LOOP_GET_STATUS64: u32 = 0x4C05;
const LOOP_SET_CAPACITY: u32 = 0x4C07;
const LOOP_SET_DIRECT_IO: u32 = 0x4C08;
const LOOP_CONFIGURE: u32 = 0x4C0A;
const LOOP_CTL_GET_FREE: u32 = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `LOOP_CTL_GET_FREE` is not a reservation: two attachers can be handed the same device, and the
/// loser gets EBUSY. Beyond this many lost races something else is wrong.
const MAX_TRIES: usize = 16;

/// How long detach waits for the device to let go of its image. The kernel tears a device down
/// when its last opener closes, and a short-lived opener (udev's blkid) can outlast our close.
const DETACH_SETTLE: Duration = Duration::from_secs(2);

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The kernel reads these by size; a layout slip would hand it garbage flags.
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

nix::ioctl_write_int_bad!(loop_set_fd, LOOP_SET_FD);
nix::ioctl_none_bad!(loop_clr_fd, LOOP_CLR_FD);
nix::ioctl_write_ptr_bad!(loop_set_status64, LOOP_SET_STATUS64, LoopInfo64);
nix::ioctl_read_bad!(loop_get_status64, LOOP_GET_STATUS64, LoopInfo64);
nix::ioctl_none_bad!(loop_set_capacity, LOOP_SET_CAPACITY);
nix::ioctl_write_int_bad!(loop_set_direct_io, LOOP_SET_DIRECT_IO);
nix::ioctl_write_ptr_bad!(loop_configure, LOOP_CONFIGURE, LoopConfig);
nix::ioctl_none_bad!(loop_ctl_get_free, LOOP_CTL_GET_FREE);

impl LoopInfo64 {
    fn new(image: &Path, flags: u32) -> LoopInfo64 {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: file_name_field(image),
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// The path as the kernel's fixed, NUL-terminated name field holds it. Informational only
/// (sysfs `backing_file` shows the full path), so cutting it short is harmless.
fn file_name_field(image: &Path) -> [u8; LO_NAME_SIZE] {
    let bytes = image.as_os_str().as_encoded_bytes();
    let len = bytes.len().min(LO_NAME_SIZE - 1);
    let mut field = [0; LO_NAME_SIZE];
    field[..len].copy_from_slice(&bytes[..len]);
    field
}

/// What the attach loop learned so far; kept across EBUSY retries so a refusal is not re-tried.
struct Attempt {
    direct_io: bool,
    use_configure: bool,
}

/// Attaches `image` to a free loop device.
pub fn attach(image: &Path, opts: AttachOptions) -> Result<LoopDevice> {
    let backing = OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .open(image)
        .map_err(|e| Error::io(format!("open image {}", image.display()), e))?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)
        .map_err(|e| Error::io(format!("open {LOOP_CONTROL}"), e))?;
    let mut attempt = Attempt {
        direct_io: opts.direct_io,
        use_configure: true,
    };
    for _ in 0..MAX_TRIES {
        debug!("ioctl LOOP_CTL_GET_FREE");
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; `control` is an open fd for the call's duration.
        let n = unsafe { loop_ctl_get_free(control.as_raw_fd()) }
            .map_err(|e| Error::io("find a free loop device", e.into()))?;
        let path = PathBuf::from(format!("{DEV_DIR}/loop{n}"));
        let device = open_loop(&path)?;
        match bind(
            &device,
            &path,
            &backing,
            image,
            opts.read_only,
            &mut attempt,
        ) {
            Ok(()) => {
                let dev = describe(&device, &path, image).inspect_err(|_| {
                    // A device the caller never hears of would leak: let it go.
                    // SAFETY: LOOP_CLR_FD takes no argument; `device` is open for the call.
                    let _ = unsafe { loop_clr_fd(device.as_raw_fd()) };
                })?;
                debug!(device = %path.display(), image = %image.display(), direct_io = attempt.direct_io, "attached");
                return Ok(dev);
            }
            Err(Errno::EBUSY) => {
                debug!(device = %path.display(), "loop device taken by another attacher, trying the next");
            }
            Err(e) => {
                return Err(Error::io(
                    format!("attach {} to {}", image.display(), path.display()),
                    e.into(),
                ))
            }
        }
    }
    Err(Error::Busy(format!(
        "no free loop device for {} after {MAX_TRIES} tries",
        image.display()
    )))
}

fn bind(
    device: &File,
    path: &Path,
    backing: &File,
    image: &Path,
    read_only: bool,
    attempt: &mut Attempt,
) -> nix::Result<()> {
    let ro = if read_only { LO_FLAGS_READ_ONLY } else { 0 };
    if attempt.use_configure {
        let flags = ro
            | if attempt.direct_io {
                LO_FLAGS_DIRECT_IO
            } else {
                0
            };
        match configure(device, path, backing, image, flags) {
            Ok(()) => return Ok(()),
            Err(Errno::EINVAL) if attempt.direct_io => {
                // EINVAL means either "no direct I/O on this pool filesystem" or "no
                // LOOP_CONFIGURE on this kernel"; a try without direct I/O tells which.
                match configure(device, path, backing, image, ro) {
                    Ok(()) => {
                        debug!(device = %path.display(), "direct I/O refused, attached without it");
                        attempt.direct_io = false;
                        return Ok(());
                    }
                    Err(Errno::EINVAL | Errno::ENOTTY) => attempt.use_configure = false,
                    Err(e) => return Err(e),
                }
            }
            Err(Errno::EINVAL | Errno::ENOTTY) => attempt.use_configure = false,
            Err(e) => return Err(e),
        }
        debug!("LOOP_CONFIGURE unsupported, falling back to LOOP_SET_FD");
    }
    set_fd_and_status(device, path, backing, image, ro, attempt.direct_io)
}

fn configure(
    device: &File,
    path: &Path,
    backing: &File,
    image: &Path,
    flags: u32,
) -> nix::Result<()> {
    let config = LoopConfig {
        // A raw fd of an open file is never negative.
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: LoopInfo64::new(image, flags),
        reserved: [0; 8],
    };
    debug!(device = %path.display(), image = %image.display(), flags, "ioctl LOOP_CONFIGURE");
    // SAFETY: `config` is a live, fully initialised `struct loop_config`; the kernel only reads it.
    unsafe { loop_configure(device.as_raw_fd(), &config) }.map(drop)
}

/// The pre-5.8 path. Read-only follows from how `backing` was opened, since LOOP_SET_STATUS64
/// ignores the flag; direct I/O has its own ioctl.
fn set_fd_and_status(
    device: &File,
    path: &Path,
    backing: &File,
    image: &Path,
    flags: u32,
    direct_io: bool,
) -> nix::Result<()> {
    debug!(device = %path.display(), image = %image.display(), "ioctl LOOP_SET_FD");
    // SAFETY: LOOP_SET_FD takes an fd by value; `backing` stays open for the call.
    unsafe { loop_set_fd(device.as_raw_fd(), backing.as_raw_fd()) }?;
    let info = LoopInfo64::new(image, flags);
    debug!(device = %path.display(), "ioctl LOOP_SET_STATUS64");
    // SAFETY: `info` is a live, fully initialised `struct loop_info64`; the kernel only reads it.
    if let Err(e) = unsafe { loop_set_status64(device.as_raw_fd(), &info) } {
        // Never leave a half-configured device bound to the image.
        // SAFETY: LOOP_CLR_FD takes no argument.
        let _ = unsafe { loop_clr_fd(device.as_raw_fd()) };
        return Err(e);
    }
    if direct_io {
        debug!(device = %path.display(), "ioctl LOOP_SET_DIRECT_IO");
        // SAFETY: LOOP_SET_DIRECT_IO takes an integer by value.
        if let Err(e) = unsafe { loop_set_direct_io(device.as_raw_fd(), 1) } {
            debug!(device = %path.display(), error = %e, "direct I/O refused, attached without it");
        }
    }
    Ok(())
}

/// The device just attached, as `loop_devices` will list it.
fn describe(device: &File, path: &Path, image: &Path) -> Result<LoopDevice> {
    let meta = device
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    let dev = dev_id(std::os::unix::fs::MetadataExt::rdev(&meta));
    let sys = sys_dir(path)?;
    // Report the path sysfs shows (symlinks resolved), so it matches a later listing.
    let (backing_file, backing_deleted) =
        read_backing(&sys)?.unwrap_or_else(|| (image.to_path_buf(), false));
    Ok(LoopDevice {
        path: path.to_path_buf(),
        dev,
        backing_file,
        backing_deleted,
        backing_id: backing_id(device),
    })
}

/// The identity of the file behind an attached loop device (`LOOP_GET_STATUS64`); `None` when
/// the device is not attached (any more) or refuses.
fn backing_id(device: &File) -> Option<FileId> {
    // SAFETY: loop_info64 is plain integers and byte arrays, for which all-zero is valid.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 fills a loop_info64 we own; `device` is open for the call.
    unsafe { loop_get_status64(device.as_raw_fd(), &mut info) }.ok()?;
    Some(FileId {
        dev: decode_kernel_dev(info.lo_device),
        ino: info.lo_inode,
    })
}

/// The kernel reports device numbers in its `new_encode_dev` layout: minor bits 0-7, major
/// bits 8-19, the rest of the minor above.
fn decode_kernel_dev(x: u64) -> DevId {
    DevId {
        major: ((x >> 8) & 0xfff) as u32,
        minor: ((x & 0xff) | ((x >> 12) & 0xfff00)) as u32,
    }
}

/// Detaches `dev`. Already detached, a vanished device node, or a device that meanwhile holds
/// another image all mean "ours is gone" and succeed; a device still in use gets
/// [`Error::Busy`] (the kernel then detaches it by itself when released).
pub fn detach(dev: &LoopDevice) -> Result<()> {
    let device = match open_loop(&dev.path) {
        Ok(f) => f,
        Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            debug!(device = %dev.path.display(), "device node gone, nothing to detach");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let sys = sys_dir(&dev.path)?;
    if !holds(&sys, &dev.backing_file)? {
        debug!(device = %dev.path.display(), "not attached to the image any more");
        return Ok(());
    }
    debug!(device = %dev.path.display(), "ioctl LOOP_CLR_FD");
    // SAFETY: LOOP_CLR_FD takes no argument; `device` is open for the call.
    match unsafe { loop_clr_fd(device.as_raw_fd()) } {
        Ok(_) | Err(Errno::ENXIO) => {}
        Err(e) => {
            return Err(Error::io(
                format!("detach {}", dev.path.display()),
                e.into(),
            ))
        }
    }
    drop(device);
    let deadline = Instant::now() + DETACH_SETTLE;
    while holds(&sys, &dev.backing_file)? {
        if Instant::now() >= deadline {
            return Err(Error::Busy(format!(
                "{} is still in use (mounted or open); it detaches when released",
                dev.path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Makes the device pick up the current size of its image.
pub fn set_capacity(dev: &LoopDevice) -> Result<()> {
    let device = open_loop(&dev.path)?;
    debug!(device = %dev.path.display(), "ioctl LOOP_SET_CAPACITY");
    // SAFETY: LOOP_SET_CAPACITY takes no argument; `device` is open for the call.
    unsafe { loop_set_capacity(device.as_raw_fd()) }
        .map(drop)
        .map_err(|e| {
            Error::io(
                format!("refresh capacity of {}", dev.path.display()),
                e.into(),
            )
        })
}

/// Every attached loop device.
pub fn list() -> Result<Vec<LoopDevice>> {
    list_in(Path::new(SYS_BLOCK), Path::new(DEV_DIR))
}

/// The listing over a given sysfs `block` directory, so tests can hand it a fake tree.
/// Devices are detached and removed while we read: a file that vanished means "skip".
pub(crate) fn list_in(sys_block: &Path, dev_dir: &Path) -> Result<Vec<LoopDevice>> {
    let context = || format!("list {}", sys_block.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir(sys_block).map_err(|e| Error::io(context(), e))? {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(context(), e)),
        };
        let name = entry.file_name();
        let Some(number) = loop_number(&name) else {
            continue;
        };
        let dir = sys_block.join(&name);
        let dev = match std::fs::read_to_string(dir.join("dev")) {
            Ok(s) => parse_dev(&s).ok_or_else(|| {
                Error::io(
                    format!("read {}/dev", dir.display()),
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad device number {s:?}"),
                    ),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("read {}/dev", dir.display()), e)),
        };
        let Some((backing_file, backing_deleted)) = read_backing(&dir)? else {
            continue;
        };
        let path = dev_dir.join(&name);
        let backing_id = File::open(&path).ok().and_then(|f| backing_id(&f));
        found.push((
            number,
            LoopDevice {
                path,
                dev,
                backing_file,
                backing_deleted,
                backing_id,
            },
        ));
    }
    found.sort_by_key(|(n, _)| *n);
    Ok(found.into_iter().map(|(_, d)| d).collect())
}

/// `loopN` -> N; anything else (`loop-control`, `loop0p1`, `vda`) -> None.
fn loop_number(name: &std::ffi::OsStr) -> Option<u32> {
    let digits = name.to_str()?.strip_prefix("loop")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn parse_dev(s: &str) -> Option<DevId> {
    let (major, minor) = s.trim_end().split_once(':')?;
    Some(DevId {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

/// The backing file of the device whose sysfs directory is `dir`, and whether it was unlinked;
/// `None` when the device is not attached (the `loop` directory exists only while it is).
fn read_backing(dir: &Path) -> Result<Option<(PathBuf, bool)>> {
    let file = dir.join("loop/backing_file");
    let mut bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // ENXIO or ENODEV: the device was being torn down while we read (which of the two
        // depends on how far the detach got; the crash storm sees both).
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) => return Ok(None),
        Err(e) => return Err(Error::io(format!("read {}", file.display()), e)),
    };
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Ok(None);
    }
    Ok(Some(split_deleted(bytes)))
}

/// The kernel marks an unlinked file by appending " (deleted)" to its path.
fn split_deleted(mut bytes: Vec<u8>) -> (PathBuf, bool) {
    const SUFFIX: &[u8] = b" (deleted)";
    let deleted = bytes.ends_with(SUFFIX);
    if deleted {
        bytes.truncate(bytes.len() - SUFFIX.len());
    }
    (PathBuf::from(OsString::from_vec(bytes)), deleted)
}

/// Whether the device of sysfs directory `sys` is attached to `image` right now.
fn holds(sys: &Path, image: &Path) -> Result<bool> {
    Ok(read_backing(sys)?.is_some_and(|(path, _)| path == image))
}

fn sys_dir(device: &Path) -> Result<PathBuf> {
    let name = device
        .file_name()
        .filter(|n| loop_number(n).is_some())
        .ok_or_else(|| {
            Error::io(
                format!("{} is not a loop device path", device.display()),
                io::Error::from(io::ErrorKind::InvalidInput),
            )
        })?;
    Ok(Path::new(SYS_BLOCK).join(name))
}

/// Opens a loop device for ioctls. A device attached read-only refuses write opens (EROFS), and
/// every ioctl used here works on a read-only fd for root.
fn open_loop(path: &Path) -> Result<File> {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => File::open(path),
        other => other,
    }
    .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let is_block = file
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    if !is_block {
        return Err(Error::io(
            format!("{} is not a block device", path.display()),
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    }
    Ok(file)
}

pub(crate) fn dev_id(rdev: u64) -> DevId {
    // Major numbers have 12 bits and minors 20 in today's encoding: both fit in u32.
    DevId {
        major: nix::sys::stat::major(rdev) as u32,
        minor: nix::sys::stat::minor(rdev) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn name_field_is_truncated_and_terminated() {
        // (path, how many of its bytes the field keeps)
        let cases = [
            ("/pool/a.img".to_string(), 11),
            (String::new(), 0),
            ("x".repeat(63), 63),
            ("y".repeat(64), 63),
            ("z".repeat(200), 63),
        ];
        for (input, kept) in cases {
            let field = file_name_field(Path::new(&input));
            assert_eq!(&field[..kept], &input.as_bytes()[..kept], "{input:?}");
            assert!(field[kept..].iter().all(|&b| b == 0), "{input:?}");
        }
    }

    #[test]
    fn loop_names() {
        let cases: &[(&str, Option<u32>)] = &[
            ("loop0", Some(0)),
            ("loop17", Some(17)),
            ("loop-control", None),
            ("loop0p1", None),
            ("loop", None),
            ("vda", None),
            ("loop+1", None),
        ];
        for (name, want) in cases {
            assert_eq!(loop_number(std::ffi::OsStr::new(name)), *want, "{name}");
        }
    }

    #[test]
    fn deleted_suffix() {
        let cases: &[(&[u8], &[u8], bool)] = &[
            (b"/pool/a.img", b"/pool/a.img", false),
            (b"/pool/a.img (deleted)", b"/pool/a.img", true),
            (b"/pool/(deleted)", b"/pool/(deleted)", false),
            (b"/pool/\xff.img (deleted)", b"/pool/\xff.img", true),
        ];
        for (input, path, deleted) in cases {
            let (p, d) = split_deleted(input.to_vec());
            assert_eq!(p.as_os_str().as_bytes(), *path);
            assert_eq!(d, *deleted);
        }
    }

    /// One device of a fake sysfs: name, `dev` contents, `loop/backing_file` contents.
    type FakeDev = (&'static str, Option<&'static str>, Option<&'static [u8]>);

    fn fake_sysfs(devices: &[FakeDev]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (name, dev, backing) in devices {
            let dir = root.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(dev) = dev {
                std::fs::write(dir.join("dev"), dev).unwrap();
            }
            if let Some(backing) = backing {
                std::fs::create_dir_all(dir.join("loop")).unwrap();
                std::fs::write(dir.join("loop/backing_file"), backing).unwrap();
            }
        }
        root
    }

    #[test]
    fn lists_attached_devices_from_sysfs() {
        let sys = fake_sysfs(&[
            ("loop10", Some("7:10\n"), Some(b"/pool/b.img\n")),
            ("loop2", Some("7:2\n"), Some(b"/pool/a.img (deleted)\n")),
            // Not attached: no loop/ directory.
            ("loop3", Some("7:3\n"), None),
            // Vanished between readdir and reading `dev`.
            ("loop4", None, Some(b"/pool/c.img\n")),
            ("vda", Some("254:0\n"), None),
            ("loop0p1", Some("259:0\n"), Some(b"/pool/x.img\n")),
        ]);
        // A device directory without device nodes: no identity can be read.
        let dev = tempfile::tempdir().unwrap();
        let got = list_in(sys.path(), dev.path()).unwrap();
        let want = vec![
            LoopDevice {
                path: dev.path().join("loop2"),
                dev: DevId { major: 7, minor: 2 },
                backing_file: "/pool/a.img".into(),
                backing_deleted: true,
                backing_id: None,
            },
            LoopDevice {
                path: dev.path().join("loop10"),
                dev: DevId {
                    major: 7,
                    minor: 10,
                },
                backing_file: "/pool/b.img".into(),
                backing_deleted: false,
                backing_id: None,
            },
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn kernel_device_numbers_decode() {
        // new_encode_dev(MKDEV(259, 0x12345)) and MKDEV(8, 1).
        let x = 0x45 | (259 << 8) | (0x12300 << 12);
        assert_eq!(
            decode_kernel_dev(x),
            DevId {
                major: 259,
                minor: 0x12345
            }
        );
        assert_eq!(decode_kernel_dev(0x801), DevId { major: 8, minor: 1 });
    }

    #[test]
    fn malformed_dev_is_an_error() {
        let sys = fake_sysfs(&[("loop1", Some("garbage\n"), Some(b"/pool/a.img\n"))]);
        assert!(list_in(sys.path(), Path::new("/dev")).is_err());
    }

    #[test]
    fn empty_sysfs_lists_nothing() {
        let sys = fake_sysfs(&[]);
        assert_eq!(list_in(sys.path(), Path::new("/dev")).unwrap(), vec![]);
    }
}
