//! `blockcsi bench`: measures the driver as its users meet it, through the CSI socket of real
//! `blockcsi serve` processes, and writes the figures into BENCHMARKS.md. It compares the mount
//! lifecycle with a shell script doing the same kernel work with the standard tools, in the same
//! run; it also measures create/delete throughput, Probe latency, resident memory before and
//! after many lifecycles, start-up time and binary size. Needs root (loop devices, mounts).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tonic::transport::Channel;

use crate::client::connect;
use crate::daemon::metrics::resident_bytes_of;
use crate::pb;
use crate::pb::controller_client::ControllerClient;
use crate::pb::identity_client::IdentityClient;
use crate::pb::node_client::NodeClient;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const NODE: &str = "bench-node";
const GIB: i64 = 1 << 30;
const BEGIN: &str =
    "<!-- bench:begin (written by `blockcsi bench`; edit outside these markers) -->";
const END: &str = "<!-- bench:end -->";

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Scratch directory for pools, sockets and mount points [default: a new directory in /var/tmp]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Mount and block lifecycles timed for the comparison with the shell tools
    #[arg(long, default_value_t = 20)]
    pub iterations: usize,
    /// Lifecycles run against the node and controller processes before their RSS is read again
    #[arg(long, default_value_t = 1000)]
    pub soak: usize,
    /// CreateVolume+DeleteVolume pairs per concurrency level
    #[arg(long, default_value_t = 2000)]
    pub pairs: usize,
    /// Probe calls timed
    #[arg(long, default_value_t = 5000)]
    pub probes: usize,
    /// Start-ups timed
    #[arg(long, default_value_t = 10)]
    pub startups: usize,
    /// A short run (a few of everything) that checks the benchmark works; figures are rough
    #[arg(long)]
    pub quick: bool,
    /// Where to write the figures; "-" writes nothing
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: String,
    /// The blockcsi binary to measure [default: this one]
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

impl BenchArgs {
    fn effective(&self) -> BenchArgs {
        let mut a = self.clone();
        if a.quick {
            a.iterations = a.iterations.min(3);
            a.soak = a.soak.min(20);
            a.pairs = a.pairs.min(64);
            a.probes = a.probes.min(200);
            a.startups = a.startups.min(3);
        }
        a
    }
}

pub fn main(args: BenchArgs) -> i32 {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("error: bench needs root: it attaches loop devices, runs mkfs and mounts");
        return 1;
    }
    // Worker threads besides the one blocked in `run`: tonic's channels close their
    // connections from background tasks, and a driver's graceful stop waits for that.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(args.effective())) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Scratch space; whatever a failed run left mounted or attached in it goes away on drop.
struct Scratch {
    dir: PathBuf,
    remove: bool,
}

impl Scratch {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read("/proc/self/mountinfo") {
            if let Ok(entries) = crate::host::mountinfo::parse_bytes(&text) {
                let mut mine: Vec<_> = entries
                    .into_iter()
                    .filter(|m| m.mount_point.starts_with(&self.dir))
                    .collect();
                mine.reverse();
                for m in mine {
                    let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        if let Ok(devs) = crate::host::loopdev::list() {
            for d in devs
                .iter()
                .filter(|d| d.backing_file.starts_with(&self.dir))
            {
                let _ = crate::host::loopdev::detach(d);
            }
        }
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A `blockcsi serve` child process.
struct Driver {
    child: Child,
    socket: PathBuf,
}

impl Driver {
    fn spawn(
        binary: &Path,
        mode: &str,
        socket: &Path,
        pool: &Path,
        log: &Path,
    ) -> BenchResult<Driver> {
        let child = Command::new(binary)
            .args([
                "serve",
                "--mode",
                mode,
                "--node-id",
                NODE,
                "--log-level",
                "warn",
            ])
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pool")
            .arg(pool)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        Ok(Driver {
            child,
            socket: socket.to_path_buf(),
        })
    }

    /// Polls until the socket accepts a connection; returns how long that took from `since`.
    fn wait_ready(&mut self, since: Instant) -> BenchResult<Duration> {
        let deadline = since + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(since.elapsed());
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("driver exited with {status} before serving").into());
            }
            if Instant::now() > deadline {
                return Err("driver never served its socket".into());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn rss(&self) -> u64 {
        resident_bytes_of(&self.pid()).unwrap_or(0)
    }

    fn threads(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Threads:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
struct Client {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Client {
    async fn connect(socket: &Path) -> BenchResult<Client> {
        let ch = connect(socket).await?;
        Ok(Client {
            identity: IdentityClient::new(ch.clone()),
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
        })
    }
}

fn cap(block: bool) -> pb::VolumeCapability {
    use pb::volume_capability::access_mode::Mode;
    use pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    pb::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })
        }),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// The eight calls of a volume's life, on a controller and a node (which may be one process).
async fn lifecycle(
    ctrl: &mut Client,
    node: &mut Client,
    name: &str,
    staging: &Path,
    target: &Path,
    block: bool,
    steps: &mut Steps,
) -> BenchResult<()> {
    let cap = cap(block);
    let mut t = Instant::now();
    let id = ctrl
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: GIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .ok_or("CreateVolume returned no volume")?
        .volume_id;
    steps.lap(0, &mut t);
    ctrl.controller
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: NODE.into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await?;
    steps.lap(1, &mut t);
    let staging = staging.to_str().ok_or("path")?.to_string();
    let target = target.to_str().ok_or("path")?.to_string();
    node.node
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await?;
    steps.lap(2, &mut t);
    node.node
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await?;
    steps.lap(3, &mut t);
    node.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target,
        })
        .await?;
    steps.lap(4, &mut t);
    node.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging,
        })
        .await?;
    steps.lap(5, &mut t);
    ctrl.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: NODE.into(),
            ..Default::default()
        })
        .await?;
    steps.lap(6, &mut t);
    ctrl.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await?;
    steps.lap(7, &mut t);
    Ok(())
}

const STEP_NAMES: [&str; 8] = [
    "CreateVolume",
    "ControllerPublishVolume",
    "NodeStageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeUnstageVolume",
    "ControllerUnpublishVolume",
    "DeleteVolume",
];

/// Per-call durations of lifecycles, to show where the time goes.
#[derive(Default)]
struct Steps([Vec<Duration>; 8]);

impl Steps {
    fn lap(&mut self, i: usize, t: &mut Instant) {
        let now = Instant::now();
        self.0[i].push(now - *t);
        *t = now;
    }

    fn medians(&mut self) -> String {
        STEP_NAMES
            .iter()
            .zip(self.0.iter_mut())
            .map(|(n, v)| format!("{n} {:.1}", median(v).as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The same kernel work as the driver's lifecycle, done by the standard tools. mkfs gets the
/// driver's options and losetup direct I/O, as the driver asks for.
const SHELL_MOUNT: &str = r#"set -eu
img=$1 staging=$2 target=$3
truncate -s 1G "$img"
dev=$(losetup --direct-io=on -f --show "$img")
mkfs.ext4 -q -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$dev"
mkdir -p "$staging" "$target"
mount "$dev" "$staging"
mount --bind "$staging" "$target"
umount "$target"
rmdir "$target"
umount "$staging"
losetup -d "$dev"
rm -f "$img"
"#;

const SHELL_BLOCK: &str = r#"set -eu
img=$1 staging=$2 target=$3
truncate -s 1G "$img"
dev=$(losetup --direct-io=on -f --show "$img")
touch "$target"
mount --bind "$dev" "$target"
umount "$target"
rm -f "$target"
losetup -d "$dev"
rm -f "$img"
"#;

fn run_shell(script: &Path, img: &Path, staging: &Path, target: &Path) -> BenchResult<Duration> {
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(script)
        .args([img, staging, target])
        .stdin(Stdio::null())
        .output()?;
    let took = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "shell lifecycle failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(took)
}

/// Times `n` Probe and then `n` GetPluginInfo calls (after 100 untimed ones), sorted. The
/// client is what kubelet and livenessprobe are to the driver: one connection, one call at a
/// time. It runs on a thread of its own with a single-threaded runtime, so the round trip
/// measured is the driver's and the socket's, not a hand-over between the bench's threads.
///
/// With `pin_with`, the calling thread and every thread of that driver process first move to
/// one CPU. On an idle virtual machine most of a round trip is waking the other side's idle
/// CPU (a halted vCPU waits for the hypervisor); on one CPU that cost disappears and what is
/// left is the driver's and the transport's own time.
fn time_identity_calls(
    socket: &Path,
    n: usize,
    pin_with: Option<u32>,
) -> BenchResult<(Vec<Duration>, Vec<Duration>)> {
    if let Some(pid) = pin_with {
        pin_to_one_cpu(pid)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = Client::connect(socket).await?;
        for _ in 0..100 {
            c.identity.probe(pb::ProbeRequest {}).await?;
        }
        let mut probes = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            c.identity.probe(pb::ProbeRequest {}).await?;
            probes.push(started.elapsed());
        }
        let mut infos = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            c.identity
                .get_plugin_info(pb::GetPluginInfoRequest {})
                .await?;
            infos.push(started.elapsed());
        }
        probes.sort();
        infos.sort();
        Ok((probes, infos))
    })
}

/// Moves the calling thread and all threads of process `pid` to the first CPU this thread may
/// use.
fn pin_to_one_cpu(pid: u32) -> BenchResult<()> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0))?;
    let cpu = (0..CpuSet::count())
        .find(|&c| allowed.is_set(c).unwrap_or(false))
        .ok_or("no CPU in this thread's affinity mask")?;
    let mut one = CpuSet::new();
    one.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &one)?;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = task?.file_name().to_string_lossy().parse()?;
        sched_setaffinity(Pid::from_raw(tid), &one)?;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    percentile(v, 0.5)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// One row of the results: what, the figure, the target (if any) and whether it is met.
struct Row {
    what: String,
    figure: String,
    target: String,
    met: Option<bool>,
}

fn row(what: impl Into<String>, figure: impl Into<String>) -> Row {
    Row {
        what: what.into(),
        figure: figure.into(),
        target: String::new(),
        met: None,
    }
}

fn target(what: impl Into<String>, figure: impl Into<String>, target: &str, met: bool) -> Row {
    Row {
        what: what.into(),
        figure: figure.into(),
        target: target.into(),
        met: Some(met),
    }
}

fn print_row(r: &Row) {
    let verdict = match r.met {
        Some(true) => "  [target met]",
        Some(false) => "  [TARGET MISSED]",
        None => "",
    };
    let t = if r.target.is_empty() {
        String::new()
    } else {
        format!("  (target {})", r.target)
    };
    println!("  {:<58} {:>14}{t}{verdict}", r.what, r.figure);
}

async fn run(args: BenchArgs) -> BenchResult<()> {
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    let (dir, remove) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (std::fs::canonicalize(d)?, false)
        }
        None => {
            let d = tempfile::Builder::new()
                .prefix("blockcsi-bench-")
                .tempdir_in("/var/tmp")?
                .keep();
            (std::fs::canonicalize(d)?, true)
        }
    };
    let scratch = Scratch { dir, remove };
    let mut rows = Vec::new();
    let machine = machine(&scratch.dir);
    println!(
        "blockcsi bench in {}{}",
        scratch.dir.display(),
        if args.quick { " (quick)" } else { "" }
    );
    for (k, v) in &machine {
        println!("  {k}: {v}");
    }

    // 1. Lifecycles through one all-mode driver against the shell tools, interleaved so both
    // see the same machine state.
    let pool = scratch.path("pool");
    let mut all = Driver::spawn(
        &binary,
        "all",
        &scratch.path("all.sock"),
        &pool,
        &scratch.path("all.log"),
    )?;
    all.wait_ready(Instant::now())?;
    let mut c = Client::connect(&all.socket).await?;
    let shell_mount = scratch.path("mount.sh");
    let shell_block = scratch.path("block.sh");
    std::fs::write(&shell_mount, SHELL_MOUNT)?;
    std::fs::write(&shell_block, SHELL_BLOCK)?;
    std::fs::create_dir_all(scratch.path("pods"))?;
    std::fs::create_dir_all(scratch.path("shell"))?;
    for block in [false, true] {
        let kind = if block { "block" } else { "mount" };
        let script = if block { &shell_block } else { &shell_mount };
        let (mut drv, mut sh) = (Vec::new(), Vec::new());
        let mut steps = Steps::default();
        let mut warm = Steps::default();
        // One untimed round of each warms the page cache and the tools' binaries.
        for i in 0..=args.iterations {
            let staging = scratch.path(&format!("staging-{kind}-{i}"));
            let target = scratch.path(&format!("pods/{kind}-{i}"));
            let mut node = c.clone();
            let started = Instant::now();
            let st = if i > 0 { &mut steps } else { &mut warm };
            lifecycle(
                &mut c,
                &mut node,
                &format!("bench-{kind}-{i}"),
                &staging,
                &target,
                block,
                st,
            )
            .await?;
            let d = started.elapsed();
            let s = run_shell(
                script,
                &scratch.path(&format!("shell/{kind}-{i}.img")),
                &scratch.path(&format!("shell/staging-{i}")),
                &scratch.path(&format!("shell/target-{i}")),
            )?;
            if i > 0 {
                drv.push(d);
                sh.push(s);
            }
            let _ = std::fs::remove_dir(&staging);
            let _ = std::fs::remove_dir(scratch.path(&format!("shell/staging-{i}")));
        }
        let (d, s) = (median(&mut drv), median(&mut sh));
        let ratio = d.as_secs_f64() / s.as_secs_f64();
        let r = [
            row(
                format!("{kind} lifecycle, driver (8 RPCs), median of {}", drv.len()),
                ms(d),
            ),
            row(
                format!("{kind} lifecycle, median ms per call"),
                steps.medians(),
            ),
            row(
                format!("{kind} lifecycle, shell tools, median of {}", sh.len()),
                ms(s),
            ),
            if block {
                row("block lifecycle ratio driver/shell", format!("{ratio:.2}x"))
            } else {
                target(
                    "mount lifecycle ratio driver/shell",
                    format!("{ratio:.2}x"),
                    "<= 0.80x",
                    ratio <= 0.8,
                )
            },
        ];
        for x in r {
            print_row(&x);
            rows.push(x);
        }
    }

    // 2. Create+Delete throughput.
    for clients in [1usize, 8, 64] {
        let done = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..clients {
            let mut cl = Client::connect(&all.socket).await?;
            let done = done.clone();
            let total = args.pairs;
            tasks.push(tokio::spawn(async move {
                loop {
                    let k = done.fetch_add(1, Ordering::Relaxed);
                    if k >= total {
                        return Ok::<(), tonic::Status>(());
                    }
                    let id = cl
                        .controller
                        .create_volume(pb::CreateVolumeRequest {
                            name: format!("tp-{clients}-{t}-{k}"),
                            capacity_range: Some(pb::CapacityRange {
                                required_bytes: 64 << 20,
                                limit_bytes: 0,
                            }),
                            volume_capabilities: vec![cap(false)],
                            ..Default::default()
                        })
                        .await?
                        .into_inner()
                        .volume
                        .unwrap_or_default()
                        .volume_id;
                    cl.controller
                        .delete_volume(pb::DeleteVolumeRequest {
                            volume_id: id,
                            ..Default::default()
                        })
                        .await?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let rate = args.pairs as f64 / started.elapsed().as_secs_f64();
        let r = if clients == 64 {
            target(
                format!("CreateVolume+DeleteVolume pairs/s, {clients} clients"),
                format!("{rate:.0}/s"),
                ">= 1000/s",
                rate >= 1000.0,
            )
        } else {
            row(
                format!("CreateVolume+DeleteVolume pairs/s, {clients} clients"),
                format!("{rate:.0}/s"),
            )
        };
        print_row(&r);
        rows.push(r);
    }

    let r = row(
        "RSS, all-mode process after the throughput runs",
        mib(all.rss()),
    );
    print_row(&r);
    rows.push(r);

    // 3. Probe latency, on the all-mode driver (it checks the pool and the node tools).
    let socket = all.socket.clone();
    let (probe_times, info_times) = tokio::task::spawn_blocking({
        let n = args.probes;
        move || time_identity_calls(&socket, n, None)
    })
    .await??;
    let (p50, p99) = (
        percentile(&probe_times, 0.5),
        percentile(&probe_times, 0.99),
    );
    // The same calls from the bench's own multi-threaded runtime, the method of earlier runs:
    // each reply is handed from the worker thread that reads it to the waiting caller.
    let mut mt = Vec::with_capacity(args.probes);
    for _ in 0..args.probes {
        let started = Instant::now();
        c.identity.probe(pb::ProbeRequest {}).await?;
        mt.push(started.elapsed());
    }
    mt.sort();
    // Last, as it moves the driver's threads: the same calls with client and driver on one CPU.
    let socket = all.socket.clone();
    let (pinned, _) = tokio::task::spawn_blocking({
        let (n, pid) = (args.probes, all.child.id());
        move || time_identity_calls(&socket, n, Some(pid))
    })
    .await??;
    for r in [
        target(
            format!("Probe p50 over the socket ({} calls)", probe_times.len()),
            us(p50),
            "<= 100 us",
            p50 <= Duration::from_micros(100),
        ),
        row("Probe p99 over the socket", us(p99)),
        row(
            "GetPluginInfo p50 / p99 (transport alone)",
            format!(
                "{} / {}",
                us(percentile(&info_times, 0.5)),
                us(percentile(&info_times, 0.99))
            ),
        ),
        row(
            "Probe p50 / p99, client and driver on one CPU (no cross-CPU wake-up)",
            format!(
                "{} / {}",
                us(percentile(&pinned, 0.5)),
                us(percentile(&pinned, 0.99))
            ),
        ),
        row(
            "Probe p50 / p99 from a multi-threaded client runtime",
            format!(
                "{} / {}",
                us(percentile(&mt, 0.5)),
                us(percentile(&mt, 0.99))
            ),
        ),
    ] {
        print_row(&r);
        rows.push(r);
    }
    drop(c);
    all.stop();

    // 4. RSS of separate node and controller processes, idle and after many lifecycles.
    let pool2 = scratch.path("pool-split");
    let mut ctrl = Driver::spawn(
        &binary,
        "controller",
        &scratch.path("ctrl.sock"),
        &pool2,
        &scratch.path("ctrl.log"),
    )?;
    let mut node = Driver::spawn(
        &binary,
        "node",
        &scratch.path("node.sock"),
        &pool2,
        &scratch.path("node.log"),
    )?;
    ctrl.wait_ready(Instant::now())?;
    node.wait_ready(Instant::now())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (node_idle, ctrl_idle) = (node.rss(), ctrl.rss());
    let (node_threads_idle, ctrl_threads_idle) = (node.threads(), ctrl.threads());
    let mut cc = Client::connect(&ctrl.socket).await?;
    let mut nc = Client::connect(&node.socket).await?;
    let early = (args.soak / 10).max(1);
    let (mut node_early, mut ctrl_early) = (0, 0);
    let soak_started = Instant::now();
    let mut soak_steps = Steps::default();
    for i in 0..args.soak {
        let staging = scratch.path("soak-staging");
        let target = scratch.path("pods/soak");
        lifecycle(
            &mut cc,
            &mut nc,
            &format!("soak-{i}"),
            &staging,
            &target,
            false,
            &mut soak_steps,
        )
        .await?;
        if i + 1 == early {
            node_early = node.rss();
            ctrl_early = ctrl.rss();
        }
    }
    let soak_took = soak_started.elapsed();
    let (node_end, ctrl_end) = (node.rss(), ctrl.rss());
    let growth = node_end as i64 - node_early as i64;
    let cgrowth = ctrl_end as i64 - ctrl_early as i64;
    for r in [
        target(
            "RSS, idle node-mode process",
            mib(node_idle),
            "<= 8 MiB",
            node_idle <= 8 << 20,
        ),
        row("RSS, idle controller-mode process", mib(ctrl_idle)),
        row(
            "threads, idle node / controller",
            format!("{node_threads_idle} / {ctrl_threads_idle}"),
        ),
        row(
            format!("RSS, node after {early} / {} mount lifecycles", args.soak),
            format!("{} / {}", mib(node_early), mib(node_end)),
        ),
        row(
            format!("RSS, controller after {early} / {} lifecycles", args.soak),
            format!("{} / {}", mib(ctrl_early), mib(ctrl_end)),
        ),
        target(
            format!("RSS growth, node, lifecycle {early} to {}", args.soak),
            format!("{:+.2} MiB", growth as f64 / 1048576.0),
            "<= 1 MiB",
            growth <= 1 << 20,
        ),
        target(
            format!("RSS growth, controller, lifecycle {early} to {}", args.soak),
            format!("{:+.2} MiB", cgrowth as f64 / 1048576.0),
            "<= 1 MiB",
            cgrowth <= 1 << 20,
        ),
        row(
            format!("split-process mount lifecycle, mean of {}", args.soak),
            ms(soak_took / args.soak.max(1) as u32),
        ),
    ] {
        print_row(&r);
        rows.push(r);
    }
    drop((cc, nc));
    node.stop();
    ctrl.stop();

    // 5. Start-up to a served socket, node mode (the process every node runs).
    let mut starts = Vec::new();
    for i in 0..args.startups {
        let sock = scratch.path(&format!("start-{i}.sock"));
        let started = Instant::now();
        let mut d = Driver::spawn(&binary, "node", &sock, &pool2, &scratch.path("start.log"))?;
        starts.push(d.wait_ready(started)?);
        d.stop();
    }
    let start = median(&mut starts);
    let r = target(
        format!(
            "start-up to a served socket, node mode, median of {}",
            starts.len()
        ),
        ms(start),
        "<= 50 ms",
        start <= Duration::from_millis(50),
    );
    print_row(&r);
    rows.push(r);

    // 6. Binary size.
    let size = std::fs::metadata(&binary)?.len();
    let stripped = !has_symtab(&std::fs::read(&binary)?);
    let r = target(
        format!(
            "release binary size ({})",
            if stripped { "stripped" } else { "NOT stripped" }
        ),
        format!("{:.2} MB", size as f64 / 1e6),
        "<= 15 MB",
        size <= 15_000_000,
    );
    print_row(&r);
    rows.push(r);

    if args.out != "-" {
        write_report(Path::new(&args.out), &machine, &rows, &args)?;
        println!("wrote {}", args.out);
    }
    Ok(())
}

/// Whether an ELF64 little-endian file has a symbol table section (SHT_SYMTAB): what `strip`
/// removes.
fn has_symtab(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(shoff), Some(shentsize), Some(shnum)) = (u64_at(0x28), u16_at(0x3A), u16_at(0x3C))
    else {
        return false;
    };
    (0..shnum).any(|i| u32_at(shoff + i * shentsize + 4) == Some(2))
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn machine(dir: &Path) -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1048576.0))
        .unwrap_or_default();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    // The magic's integer type differs between C libraries.
    #[allow(clippy::unnecessary_cast)]
    let fs = nix::sys::statfs::statfs(dir)
        .map(|s| crate::tools::doctor::fs_name(s.filesystem_type().0 as i64).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    vec![
        ("cpu".into(), format!("{cpu}, {cores} cores")),
        ("memory".into(), mem),
        ("kernel".into(), kernel),
        ("pool filesystem".into(), fs),
        ("mkfs.ext4".into(), first_line("mkfs.ext4", &["-V"])),
        ("losetup".into(), first_line("losetup", &["--version"])),
        ("blockcsi".into(), env!("CARGO_PKG_VERSION").to_string()),
    ]
}

fn write_report(
    path: &Path,
    machine: &[(String, String)],
    rows: &[Row],
    args: &BenchArgs,
) -> BenchResult<()> {
    let mut s = String::new();
    writeln!(s, "{BEGIN}")?;
    writeln!(s)?;
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    writeln!(
        s,
        "Run of {date}{}: {} timed lifecycles per kind, {} soak lifecycles, {} pairs per \
         concurrency level, {} probes, {} start-ups.",
        if args.quick {
            " (quick mode: rough figures)"
        } else {
            ""
        },
        args.iterations,
        args.soak,
        args.pairs,
        args.probes,
        args.startups
    )?;
    writeln!(s)?;
    writeln!(s, "| machine | |")?;
    writeln!(s, "|---|---|")?;
    for (k, v) in machine {
        writeln!(s, "| {k} | {v} |")?;
    }
    writeln!(s)?;
    writeln!(s, "| figure | measured | target | |")?;
    writeln!(s, "|---|---:|---|---|")?;
    for r in rows {
        let verdict = match r.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "",
        };
        writeln!(
            s,
            "| {} | {} | {} | {verdict} |",
            r.what, r.figure, r.target
        )?;
    }
    writeln!(s)?;
    write!(s, "{END}")?;

    let text = match std::fs::read_to_string(path) {
        Ok(old) => match (old.find(BEGIN), old.find(END)) {
            (Some(b), Some(e)) if b < e => format!("{}{s}{}", &old[..b], &old[e + END.len()..]),
            _ => format!("{old}\n{s}\n"),
        },
        Err(_) => format!("# Benchmarks\n\n{s}\n"),
    };
    std::fs::write(path, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
