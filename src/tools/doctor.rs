//! `blockcsi doctor`: a preflight of a node. Each check prints one line, OK, WARN or FAIL with a
//! hint on what to do; the exit status is non-zero when any check failed. It changes nothing on
//! the machine except a loop device attached and detached again and a few temporary files.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use crate::daemon::config::{socket_path, DEFAULT_ENDPOINT, DEFAULT_POOL};
use crate::host::{loopdev, AttachOptions};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The pool directory the node will use
    #[arg(long, env = "BLOCKCSI_POOL", default_value = DEFAULT_POOL)]
    pub pool: PathBuf,
    /// The CSI socket the driver will serve
    #[arg(long, env = "CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// The kubelet's root directory, whose mounts must propagate into pods
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// Print JSON instead of lines
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn ok(name: &str, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status: Status::Ok,
        detail: detail.into(),
        hint: None,
    }
}

fn warn(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status: Status::Warn,
        detail: detail.into(),
        hint: Some(hint.into()),
    }
}

fn fail(name: &str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status: Status::Fail,
        detail: detail.into(),
        hint: Some(hint.into()),
    }
}

/// Runs every check and prints them; returns the exit status (1 when any check failed).
pub fn main(args: DoctorArgs) -> i32 {
    let checks = run(&args);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&checks).unwrap_or_default()
        );
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            print!("{:<4}  {:<width$}  {}", c.status.as_str(), c.name, c.detail);
            if let Some(h) = &c.hint {
                print!(" (hint: {h})");
            }
            println!();
        }
    }
    i32::from(checks.iter().any(|c| c.status == Status::Fail))
}

pub fn run(args: &DoctorArgs) -> Vec<Check> {
    let mut checks = vec![privileges()];
    checks.extend(loop_support(&args.pool));
    checks.push(free_loops());
    checks.extend(tools());
    checks.extend(pool(&args.pool));
    checks.push(propagation(&args.kubelet_dir));
    checks.push(socket_dir(&args.endpoint));
    checks
}

fn privileges() -> Check {
    if nix::unistd::geteuid().is_root() {
        ok("privileges", "running as root")
    } else {
        fail(
            "privileges",
            "not root: loop devices and mount(2) need CAP_SYS_ADMIN",
            "run the node plugin privileged (securityContext.privileged: true), and doctor as root",
        )
    }
}

/// `(major, minor)` of the running kernel.
fn kernel_version() -> Option<(u32, u32)> {
    let uts = nix::sys::utsname::uname().ok()?;
    let release = uts.release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn loop_support(pool: &Path) -> Vec<Check> {
    let name = "loop devices";
    if let Err(e) = OpenOptions::new()
        .read(true)
        .write(true)
        .open(loopdev::LOOP_CONTROL)
    {
        return vec![fail(
            name,
            format!("cannot open {}: {e}", loopdev::LOOP_CONTROL),
            "load the loop module (modprobe loop) and give the plugin /dev (hostPath)",
        )];
    }
    let mut out = Vec::new();
    // LOOP_CONFIGURE (5.8) attaches in one ioctl; without it attaching goes through
    // LOOP_SET_FD + LOOP_SET_STATUS64, which waits for the page cache and costs milliseconds.
    out.push(match kernel_version() {
        Some((maj, min)) if (maj, min) >= (5, 8) => ok(
            "LOOP_CONFIGURE",
            format!("kernel {maj}.{min} has it: attaching is a single ioctl"),
        ),
        Some((maj, min)) => warn(
            "LOOP_CONFIGURE",
            format!("kernel {maj}.{min} predates it (5.8); the slower LOOP_SET_FD path is used"),
            "a kernel >= 5.8 attaches volumes faster",
        ),
        None => warn(
            "LOOP_CONFIGURE",
            "cannot read the kernel version",
            "check uname -r",
        ),
    });
    out.push(attach_test(pool));
    out
}

/// Attaches a small temporary image (in the pool when it exists, so the pool's filesystem is
/// proven to back loop devices) and detaches it again.
fn attach_test(pool: &Path) -> Check {
    let name = "loop attach";
    let dir = if pool.is_dir() {
        pool.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let file = match tempfile::Builder::new()
        .prefix(".doctor-loop-")
        .suffix(".img")
        .tempfile_in(&dir)
    {
        Ok(f) => f,
        Err(e) => {
            return fail(
                name,
                format!("cannot create a test image in {}: {e}", dir.display()),
                "make the directory writable",
            )
        }
    };
    if let Err(e) = file.as_file().set_len(1 << 20) {
        return fail(
            name,
            format!("cannot size the test image: {e}"),
            "check free space",
        );
    }
    // The kernel reports backing files with symlinks resolved; so must we, for detach to match.
    let image = std::fs::canonicalize(file.path()).unwrap_or_else(|_| file.path().to_path_buf());
    let started = Instant::now();
    let dev = match loopdev::attach(
        &image,
        AttachOptions {
            read_only: false,
            direct_io: true,
        },
    ) {
        Ok(d) => d,
        Err(e) => {
            return fail(
                name,
                format!("cannot attach a test image in {}: {e}", dir.display()),
                "check that loop devices can be created (max_loop, container device cgroup)",
            )
        }
    };
    let took = started.elapsed();
    match loopdev::detach(&dev) {
        Ok(()) => ok(
            name,
            format!(
                "attached and detached a test image in {} via {} in {:.2} ms",
                dir.display(),
                dev.path.display(),
                took.as_secs_f64() * 1e3
            ),
        ),
        Err(e) => fail(
            name,
            format!("attached {} but cannot detach it: {e}", dev.path.display()),
            "something holds loop devices open (udev?); detach it with losetup -d",
        ),
    }
}

fn free_loops() -> Check {
    let name = "free loop devices";
    let mut total = 0;
    let mut free = 0;
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if !n.starts_with("loop") || !n[4..].bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            total += 1;
            if !e.path().join("loop/backing_file").exists() {
                free += 1;
            }
        }
    }
    let max_loop: u64 = std::fs::read_to_string("/sys/module/loop/parameters/max_loop")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    // With max_loop 0 the kernel creates devices on demand through /dev/loop-control.
    let on_demand = max_loop == 0 || total < max_loop;
    let detail = format!(
        "{free} of {total} free{}",
        if max_loop == 0 {
            ", more created on demand".to_string()
        } else {
            format!(", max_loop={max_loop}")
        }
    );
    if free > 0 || on_demand {
        ok(name, detail)
    } else {
        fail(
            name,
            detail,
            "detach unused devices (losetup -D) or raise max_loop",
        )
    }
}

fn tools() -> Vec<Check> {
    // The host layer's list, so doctor's FAIL is exactly what makes Probe fail; a tool only one
    // filesystem needs is a WARN: volumes of the other filesystem still work.
    crate::host::TOOLS
        .iter()
        .map(|tool| {
            let name = format!("tool {}", tool.name);
            let purpose = tool.purpose;
            match crate::host::find_tool(tool.name) {
                Some(p) => ok(&name, format!("{} ({purpose})", p.display())),
                None if tool.fs.is_none() => fail(
                    &name,
                    format!("not on PATH: needed for {purpose}"),
                    format!("install {}", tool.package),
                ),
                None => warn(
                    &name,
                    format!("not on PATH: needed for {purpose}; only those volumes fail"),
                    format!("install {}", tool.package),
                ),
            }
        })
        .collect()
}

/// Names of `statfs` magic numbers of filesystems a pool may sit on.
pub(crate) fn fs_name(magic: i64) -> &'static str {
    match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlayfs",
        0x6969 => "nfs",
        0x2FC1_2FC1 => "zfs",
        0xF2F5_2010 => "f2fs",
        0xFF53_4D42 => "cifs",
        0x6573_5546 => "fuse",
        _ => "unknown",
    }
}

fn pool(pool: &Path) -> Vec<Check> {
    let name = "pool";
    match std::fs::metadata(pool) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return vec![fail(
                name,
                format!("{} is not a directory", pool.display()),
                "point --pool at a directory",
            )]
        }
        Err(e) => {
            return vec![fail(
                name,
                format!(
                    "{}: {e} (filesystem, reflink and free-space checks skipped)",
                    pool.display()
                ),
                "mount the pool's filesystem there, or create the directory, or pass --pool",
            )]
        }
    }
    let mut out = Vec::new();
    let st = match nix::sys::statfs::statfs(pool) {
        Ok(st) => st,
        Err(e) => {
            return vec![fail(
                name,
                format!("statfs {}: {e}", pool.display()),
                "check the pool's mount",
            )]
        }
    };
    // The magic's integer type differs between C libraries.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.filesystem_type().0 as i64;
    let fs = fs_name(magic);
    let writable = tempfile::tempfile_in(pool).map(drop);
    out.push(match (&writable, fs) {
        (Err(e), _) => fail(
            name,
            format!("{} is not writable: {e}", pool.display()),
            "the node writes volume records and images there; fix permissions or the mount",
        ),
        (Ok(()), "ext4" | "xfs" | "btrfs") => ok(name, format!("{} on {fs}", pool.display())),
        (Ok(()), "tmpfs") => warn(
            name,
            format!("{} on tmpfs", pool.display()),
            "volumes live in memory and vanish at reboot: use a disk-backed filesystem",
        ),
        (Ok(()), "overlayfs") => warn(
            name,
            format!("{} on overlayfs", pool.display()),
            "mount a host directory there (hostPath) instead of the container's own filesystem",
        ),
        (Ok(()), other) => warn(
            name,
            format!("{} on {other} (statfs magic {magic:#x})", pool.display()),
            "tested on ext4, xfs and btrfs",
        ),
    });
    if writable.is_ok() {
        out.push(reflink(pool, fs));
    }
    out.push(free_space(pool, &st));
    out
}

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// Whether the pool's filesystem shares extents between files (FICLONE): snapshots and clones
/// are then instant and take no space until written.
fn reflink(pool: &Path, fs: &str) -> Check {
    let name = "reflink";
    let attempt = || -> std::io::Result<()> {
        let mut src = tempfile::tempfile_in(pool)?;
        std::io::Write::write_all(&mut src, &[0x5a; 4096])?;
        src.sync_all()?;
        let dst = tempfile::tempfile_in(pool)?;
        // SAFETY: FICLONE takes the source fd as its argument; both files are open for the call.
        unsafe { ficlone(dst.as_raw_fd(), src.as_raw_fd() as libc::c_ulong) }
            .map(drop)
            .map_err(std::io::Error::from)
    };
    match attempt() {
        Ok(()) => ok(
            name,
            format!("{fs} clones files by reference: snapshots and clones are instant"),
        ),
        Err(e) => warn(
            name,
            format!("{fs} cannot clone files by reference ({e})"),
            "snapshots and clones copy every byte; put the pool on xfs (reflink=1) or btrfs",
        ),
    }
}

fn free_space(pool: &Path, st: &nix::sys::statfs::Statfs) -> Check {
    let name = "free space";
    let bsize = st.block_size() as u64;
    let total = st.blocks() * bsize;
    let avail = st.blocks_available() * bsize;
    let pct = (avail * 100).checked_div(total).unwrap_or(0);
    let detail = format!(
        "{} free of {} ({pct}%) in {}",
        crate::tools::human_bytes(avail as i64),
        crate::tools::human_bytes(total as i64),
        pool.display()
    );
    const MIN: u64 = 64 << 20;
    if avail < MIN {
        fail(
            name,
            detail,
            "volumes cannot be created or written: free space in the pool",
        )
    } else if pct < 10 || avail < 1 << 30 {
        warn(
            name,
            detail,
            "sparse volumes fail with ENOSPC when the pool fills: free space or grow it",
        )
    } else {
        ok(name, detail)
    }
}

/// The mount holding `path` and whether it propagates mounts to its peers (`shared:N` among
/// the optional fields of mountinfo).
fn propagation(kubelet_dir: &Path) -> Check {
    let name = "mount propagation";
    let dir =
        match std::fs::canonicalize(kubelet_dir) {
            Ok(d) => d,
            Err(e) => return warn(
                name,
                format!("{}: {e}", kubelet_dir.display()),
                "not a Kubernetes node? pass --kubelet-dir when the kubelet's root is elsewhere",
            ),
        };
    let raw = match std::fs::read("/proc/self/mountinfo") {
        Ok(r) => r,
        Err(e) => return fail(name, format!("read mountinfo: {e}"), "is /proc mounted?"),
    };
    let entries = match crate::host::mountinfo::parse_bytes(&raw) {
        Ok(e) => e,
        Err(e) => {
            return fail(
                name,
                format!("parse mountinfo: {e}"),
                "report this as a bug",
            )
        }
    };
    // The last mount at the longest prefix is the one that covers the directory.
    let Some(m) = entries
        .iter()
        .filter(|m| dir.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
    else {
        return fail(
            name,
            format!("no mount covers {}", dir.display()),
            "is /proc mounted?",
        );
    };
    let fields = optional_fields(&raw, m.mount_id);
    let shared = fields.iter().any(|f| f.starts_with("shared:"));
    let detail = format!(
        "{} is on mount {} ({})",
        dir.display(),
        m.mount_point.display(),
        if fields.is_empty() {
            "private".to_string()
        } else {
            fields.join(" ")
        }
    );
    if shared {
        ok(name, detail)
    } else {
        warn(
            name,
            detail,
            "mounts made by the plugin will not reach pods: make it shared \
             (mount --make-rshared /, or mountPropagation: Bidirectional on the plugin's kubelet volume)",
        )
    }
}

/// The optional fields (`shared:N`, `master:N`, ...) of the mountinfo line with `mount_id`.
fn optional_fields(raw: &[u8], mount_id: u32) -> Vec<String> {
    let text = String::from_utf8_lossy(raw);
    for line in text.lines() {
        let mut it = line.split(' ');
        if it.next().and_then(|id| id.parse::<u32>().ok()) != Some(mount_id) {
            continue;
        }
        // id parent major:minor root mount-point options [optional...] - fstype source super
        return line
            .split(' ')
            .skip(6)
            .take_while(|f| *f != "-")
            .map(str::to_string)
            .collect();
    }
    Vec::new()
}

fn socket_dir(endpoint: &str) -> Check {
    let name = "socket directory";
    let socket = match socket_path(endpoint) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                name,
                e.to_string(),
                "use --endpoint unix:///absolute/path.sock",
            )
        }
    };
    let Some(dir) = socket.parent() else {
        return fail(
            name,
            "the socket has no directory",
            "use a path inside a directory",
        );
    };
    // The driver creates the directory when missing: then its nearest existing ancestor must be
    // writable.
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    match tempfile::tempfile_in(existing) {
        Ok(_) if existing == dir => ok(name, format!("{} is writable", dir.display())),
        Ok(_) => ok(
            name,
            format!(
                "{} will be created in {}",
                dir.display(),
                existing.display()
            ),
        ),
        Err(e) => fail(
            name,
            format!("cannot write in {}: {e}", existing.display()),
            "mount a writable directory there (the kubelet's plugins directory, hostPath)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:5 / /var/lib/kubelet rw,relatime master:3 - tmpfs tmpfs rw
24 22 0:6 / /private rw - tmpfs tmpfs rw
";

    #[test]
    fn optional_fields_of_mountinfo() {
        assert_eq!(optional_fields(MOUNTINFO.as_bytes(), 22), ["shared:1"]);
        assert_eq!(optional_fields(MOUNTINFO.as_bytes(), 23), ["master:3"]);
        assert!(optional_fields(MOUNTINFO.as_bytes(), 24).is_empty());
        assert!(optional_fields(MOUNTINFO.as_bytes(), 99).is_empty());
    }

    #[test]
    fn filesystem_magics() {
        assert_eq!(fs_name(0xEF53), "ext4");
        assert_eq!(fs_name(0x5846_5342), "xfs");
        assert_eq!(fs_name(1), "unknown");
    }

    #[test]
    fn missing_pool_fails() {
        let checks = pool(Path::new("/nonexistent/blockcsi-pool"));
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].status, Status::Fail);
    }
}
