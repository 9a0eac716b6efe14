//! Power cuts at block level. The pool's filesystem (ext4, then XFS) lives on a loop device with
//! direct I/O whose backing file sits on an XFS filesystem with reflink: what the pool's
//! filesystem has flushed (fsync: REQ_FLUSH/FUA) is in the backing file, what it has not is only
//! in its page cache. A power cut is a FICLONE of the backing file, atomic with respect to the
//! writes in flight, taken at a random moment while the driver creates, publishes, stages (and
//! writes an fsynced marker file), snapshots, clones, expands and deletes. Each captured image is
//! then "rebooted": attached, mounted (journal replay), served by a new driver (start-up
//! reconciliation) and checked: every operation acknowledged before the cut is there, nothing
//! half-made is visible, and a volume whose filesystem was recorded mounts with its marker or is
//! refused, never formatted again.
//!
//! `BLOCKCSI_POWERCUT_CUTS` sets the cuts per pool filesystem (default 20),
//! `BLOCKCSI_POWERCUT_SEED` the seed. The summary line is `powercut: N cuts survived, ...`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockcsi::pb;
use common::*;

/// `_IOW(0x94, 9, int)`: clone every extent of the source fd into the destination.
const FICLONE: libc::c_ulong = 0x4004_9409;
const VOLUME_BYTES: u64 = 64 << 20;
const EXPANDED_BYTES: u64 = 96 << 20;
/// Bounds the live phase of one pool filesystem.
const LIVE_TIMEOUT: Duration = Duration::from_secs(60);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A filesystem on a loop device, mounted; unmounted and detached when dropped, so a failing
/// assertion leaves no mount or device behind.
struct Mounted {
    device: String,
    mount: PathBuf,
}

impl Mounted {
    fn attach(image: &Path, direct_io: bool) -> String {
        let mut cmd = Command::new("losetup");
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        let out = cmd.args(["-f", "--show"]).arg(image).output().unwrap();
        assert!(out.status.success(), "losetup {}: {out:?}", image.display());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Attaches `image`, optionally makes a filesystem of `mkfs` on it, and mounts it.
    fn new(image: &Path, direct_io: bool, mkfs: Option<&str>, mount: &Path) -> Mounted {
        let device = Mounted::attach(image, direct_io);
        let m = Mounted {
            device,
            mount: mount.to_path_buf(),
        };
        if let Some(kind) = mkfs {
            let st = match kind {
                "xfs-reflink" => Command::new("mkfs.xfs")
                    .args(["-q", "-f", "-K", "-m", "reflink=1", &m.device])
                    .status(),
                "xfs" => Command::new("mkfs.xfs")
                    .args(["-q", "-f", "-K", &m.device])
                    .status(),
                "ext4" => Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-E", "nodiscard", &m.device])
                    .status(),
                other => panic!("no filesystem {other}"),
            };
            assert!(st.unwrap().success(), "mkfs {kind} on {}", m.device);
        }
        std::fs::create_dir_all(mount).unwrap();
        let out = Command::new("mount")
            .arg(&m.device)
            .arg(mount)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount {} (journal replay) failed: {}",
            m.device,
            String::from_utf8_lossy(&out.stderr)
        );
        m
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if nix::mount::umount(&self.mount).is_err() {
            let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// A file removed when dropped (captured disk images).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An operation the driver acknowledged.
#[derive(Debug, Clone)]
enum Acked {
    Created {
        id: String,
        bytes: u64,
    },
    /// Staged with a filesystem whose UUID this is, and a marker file fsynced in it.
    Staged {
        id: String,
        uuid: String,
    },
    Snapshot {
        id: String,
    },
    Expanded {
        id: String,
        bytes: u64,
    },
    Deleted {
        id: String,
    },
    SnapshotDeleted {
        id: String,
    },
    /// A delete was sent: from here on the object may be gone at a cut, or still there.
    Deleting {
        id: String,
    },
    SnapshotDeleting {
        id: String,
    },
}

/// What a prefix of the acknowledged operations promises.
#[derive(Default)]
struct Model {
    live: BTreeMap<String, u64>,
    gone: BTreeSet<String>,
    staged: BTreeMap<String, String>,
    snapshots: BTreeSet<String>,
    gone_snapshots: BTreeSet<String>,
}

impl Model {
    fn of(ops: &[Acked]) -> Model {
        let mut m = Model::default();
        for op in ops {
            match op {
                Acked::Created { id, bytes } | Acked::Expanded { id, bytes } => {
                    m.live.insert(id.clone(), *bytes);
                }
                Acked::Staged { id, uuid } => {
                    m.staged.insert(id.clone(), uuid.clone());
                }
                Acked::Snapshot { id } => {
                    m.snapshots.insert(id.clone());
                }
                Acked::Deleted { id } => {
                    m.live.remove(id);
                    m.staged.remove(id);
                    m.gone.insert(id.clone());
                }
                Acked::SnapshotDeleted { id } => {
                    m.snapshots.remove(id);
                    m.gone_snapshots.insert(id.clone());
                }
                Acked::Deleting { id } => {
                    m.live.remove(id);
                    m.staged.remove(id);
                }
                Acked::SnapshotDeleting { id } => {
                    m.snapshots.remove(id);
                }
            }
        }
        m
    }
}

fn marker_for(id: &str) -> Vec<u8> {
    format!("marker of {id}\n").into_bytes()
}

fn dir_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Stems of the files in `dir` ending in `ext`; temp files are pushed to `temps`.
fn stems(pool: &Path, dir: &str, ext: &str, temps: &mut Vec<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for n in dir_names(&pool.join(dir)) {
        if n.contains(".tmp-") {
            temps.push(format!("{dir}/{n}"));
        } else if let Some(stem) = n.strip_suffix(ext) {
            out.insert(stem.to_string());
        }
    }
    out
}

fn ficlone(src: &Path, dst: &Path) {
    let s = std::fs::File::open(src).unwrap();
    let d = std::fs::File::create(dst).unwrap();
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open and owned.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) };
    assert_eq!(
        rc,
        0,
        "FICLONE {}: {}",
        src.display(),
        std::io::Error::last_os_error()
    );
}

/// Starts `blockcsi serve` on a pool other than the sandbox's.
fn start_driver(sb: &Sandbox, pool: &Path, socket: &Path) -> Driver {
    let log = sb.path(&format!(
        "driver-powercut-{}.log",
        uuid::Uuid::new_v4().simple()
    ));
    let child = Command::new(env!("CARGO_BIN_EXE_blockcsi"))
        .args(["serve", "--mode", "all", "--node-id", NODE])
        .args(["--log-level", "debug"])
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--pool")
        .arg(pool)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut d = Driver {
        child,
        socket: socket.to_path_buf(),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            panic!("driver exited with {status}: {}", d.log_text());
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return d;
        }
        assert!(Instant::now() < deadline, "no socket: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cap() -> pb::VolumeCapability {
    mount_cap("ext4")
}

async fn create(c: &mut Client, name: &str, bytes: u64, from: Option<&str>) -> String {
    c.controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap()],
            volume_content_source: from.map(|v| pb::VolumeContentSource {
                r#type: Some(pb::volume_content_source::Type::Volume(
                    pb::volume_content_source::VolumeSource {
                        volume_id: v.into(),
                    },
                )),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

/// The live phase: lifecycles through the real driver, each acknowledged call logged.
async fn workload(
    sb: &Sandbox,
    c: &mut Client,
    round: &str,
    acked: &Mutex<Vec<Acked>>,
    stop: &AtomicBool,
) {
    let ack = |op: Acked| acked.lock().unwrap().push(op);
    let mut previous: Option<(String, String, String)> = None;
    let mut cycle = 0;
    while !stop.load(Ordering::SeqCst) {
        cycle += 1;
        let a = create(c, &format!("{round}-a-{cycle}"), VOLUME_BYTES, None).await;
        ack(Acked::Created {
            id: a.clone(),
            bytes: VOLUME_BYTES,
        });
        c.controller_publish(&a, &cap()).await;
        let staging = sb.dir(&format!("live-stage/{round}-{cycle}"));
        c.stage(&a, &staging, &cap()).await.unwrap();
        write_synced(&Path::new(&staging).join("marker"), &marker_for(&a));
        let uuid = fs_uuid(&image_of_in(&live_pool(sb), &a)).unwrap();
        ack(Acked::Staged {
            id: a.clone(),
            uuid,
        });
        let snap = c
            .controller
            .create_snapshot(pb::CreateSnapshotRequest {
                name: format!("{round}-snap-{cycle}"),
                source_volume_id: a.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id;
        ack(Acked::Snapshot { id: snap.clone() });
        c.controller
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: a.clone(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: EXPANDED_BYTES as i64,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap()),
                ..Default::default()
            })
            .await
            .unwrap();
        ack(Acked::Expanded {
            id: a.clone(),
            bytes: EXPANDED_BYTES,
        });
        let b = create(c, &format!("{round}-b-{cycle}"), EXPANDED_BYTES, Some(&a)).await;
        ack(Acked::Created {
            id: b.clone(),
            bytes: EXPANDED_BYTES,
        });
        c.unstage(&a, &staging).await;
        c.controller
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: a.clone(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        if let Some((pa, pb_, ps)) = previous.replace((a, b, snap)) {
            for id in [pb_, pa] {
                ack(Acked::Deleting { id: id.clone() });
                c.controller
                    .delete_volume(pb::DeleteVolumeRequest {
                        volume_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                ack(Acked::Deleted { id });
            }
            ack(Acked::SnapshotDeleting { id: ps.clone() });
            c.controller
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: ps.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            ack(Acked::SnapshotDeleted { id: ps });
        }
    }
}

fn live_pool(sb: &Sandbox) -> PathBuf {
    sb.pool()
}

fn image_of_in(pool: &Path, id: &str) -> PathBuf {
    pool.join("volumes").join(format!("{id}.img"))
}

/// Boots a captured disk image and checks it against what was acknowledged before the cut.
/// Returns how many acknowledged operations were checked.
async fn reboot_and_check(sb: &Sandbox, pool_fs: &str, cut: &Path, ops: &[Acked]) -> usize {
    let what = format!("{pool_fs} cut {}", cut.display());
    let mount = sb.path("reboot/pool");
    let fs = Mounted::new(cut, false, None, &mount);
    let socket = sb.path(&format!(
        "sock/reboot-{}.sock",
        uuid::Uuid::new_v4().simple()
    ));
    let driver = start_driver(sb, &mount, &socket);
    let mut c = driver.client().await;

    // Nothing half-made after the start-up reconciliation.
    let listed: BTreeMap<String, i64> = c
        .controller
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap())
        .map(|v| (v.volume_id, v.capacity_bytes))
        .collect();
    let snapshots: BTreeSet<String> = c
        .controller
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect();
    let mut temps = Vec::new();
    let records = stems(&mount, "meta/volumes", ".json", &mut temps);
    let images = stems(&mount, "volumes", ".img", &mut temps);
    let snap_records = stems(&mount, "meta/snapshots", ".json", &mut temps);
    let snap_images = stems(&mount, "snapshots", ".img", &mut temps);
    let _ = stems(&mount, "meta/names", ".json", &mut temps);
    let indexed: BTreeSet<String> = dir_names(&mount.join("meta/names"))
        .iter()
        .filter_map(|n| std::fs::read(mount.join("meta/names").join(n)).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter_map(|v| v["volume_id"].as_str().map(str::to_string))
        .collect();
    let listed_ids: BTreeSet<String> = listed.keys().cloned().collect();
    assert_eq!(
        listed_ids, records,
        "{what}: ListVolumes disagrees with the records"
    );
    assert_eq!(images, records, "{what}: images and records differ");
    assert!(temps.is_empty(), "{what}: temp files: {temps:?}");
    assert!(
        indexed.is_subset(&records),
        "{what}: index without record: {:?}",
        indexed.difference(&records).collect::<Vec<_>>()
    );
    let listed_snaps: BTreeSet<String> = snap_records
        .iter()
        .filter(|s| {
            std::fs::metadata(mount.join(format!("meta/snapshots/{s}.json")))
                .is_ok_and(|m| m.len() > 0)
        })
        .cloned()
        .collect();
    assert_eq!(snapshots, listed_snaps, "{what}: ListSnapshots disagrees");
    assert!(
        snapshots.is_subset(&snap_images),
        "{what}: snapshot records without image: {:?}",
        snapshots.difference(&snap_images).collect::<Vec<_>>()
    );

    // Every acknowledged operation survived.
    let model = Model::of(ops);
    for (id, bytes) in &model.live {
        let got = listed
            .get(id)
            .unwrap_or_else(|| panic!("{what}: acknowledged volume {id} lost"));
        assert!(
            *got as u64 >= *bytes,
            "{what}: volume {id} has {got} bytes, {bytes} were acknowledged"
        );
        let len = std::fs::metadata(image_of_in(&mount, id)).unwrap().len();
        assert!(len >= *bytes, "{what}: image of {id} has {len} bytes");
    }
    for id in &model.gone {
        assert!(!records.contains(id), "{what}: deleted volume {id} is back");
        assert!(!images.contains(id), "{what}: deleted image {id} is back");
    }
    for id in &model.snapshots {
        assert!(
            snapshots.contains(id),
            "{what}: acknowledged snapshot {id} lost"
        );
    }
    for id in &model.gone_snapshots {
        assert!(
            !snapshots.contains(id),
            "{what}: deleted snapshot {id} is back"
        );
    }

    // A recorded filesystem is mounted with its marker, or refused; never made again.
    for (id, uuid) in &model.staged {
        let staging = sb.dir(&format!("reboot-stage/{}", uuid::Uuid::new_v4().simple()));
        c.controller_publish(id, &cap()).await;
        match c.stage(id, &staging, &cap()).await {
            Ok(()) => {
                let marker = std::fs::read(Path::new(&staging).join("marker"));
                assert_eq!(
                    marker.ok(),
                    Some(marker_for(id)),
                    "{what}: the fsynced marker of {id} is gone"
                );
                assert_eq!(
                    fs_uuid(&image_of_in(&mount, id)).as_deref(),
                    Some(uuid.as_str()),
                    "{what}: {id} was formatted again"
                );
                c.unstage(id, &staging).await;
            }
            Err(status) => {
                assert_eq!(
                    fs_uuid(&image_of_in(&mount, id)).as_deref(),
                    Some(uuid.as_str()),
                    "{what}: {id} refused ({status:?}) and its filesystem changed"
                );
            }
        }
    }
    let status = driver.stop();
    assert!(status.success(), "{what}: driver exit {status}");
    drop(fs);
    ops.len()
}

/// One pool filesystem: live phase with `cuts` power cuts, then a reboot of every cut.
async fn round(sb: &Sandbox, outer: &Path, pool_fs: &str, cuts: usize, rng: &mut Rng) -> usize {
    let disk = outer.join(format!("disk-{pool_fs}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(768 << 20)
        .unwrap();
    let _disk_file = TempFile(disk.clone());
    let captured: Vec<(TempFile, usize)>;
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    {
        let pool = Mounted::new(&disk, true, Some(pool_fs), &sb.pool());
        let dio = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/dio",
            pool.device.trim_start_matches("/dev/")
        ))
        .unwrap();
        assert_eq!(dio.trim(), "1", "the pool's loop device has no direct I/O");
        let driver = start_driver(
            sb,
            &sb.pool(),
            &sb.path(&format!("sock/live-{pool_fs}.sock")),
        );
        let mut c = driver.client().await;
        let stop = Arc::new(AtomicBool::new(false));
        let pauses: Vec<u64> = (0..cuts).map(|_| 100 + rng.next() % 700).collect();
        let cutter = {
            let (acked, stop, disk) = (acked.clone(), stop.clone(), disk.clone());
            let outer = outer.to_path_buf();
            let pool_fs = pool_fs.to_string();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for (k, pause) in pauses.into_iter().enumerate() {
                    std::thread::sleep(Duration::from_millis(pause));
                    // Only what was acknowledged before the cut is taken is promised.
                    let promised = acked.lock().unwrap().len();
                    let image = outer.join(format!("cut-{pool_fs}-{k}.img"));
                    let file = TempFile(image.clone());
                    ficlone(&disk, &image);
                    out.push((file, promised));
                }
                stop.store(true, Ordering::SeqCst);
                out
            })
        };
        tokio::time::timeout(LIVE_TIMEOUT, workload(sb, &mut c, pool_fs, &acked, &stop))
            .await
            .expect("the live phase overran");
        captured = tokio::task::block_in_place(|| cutter.join().unwrap());
        let status = driver.stop();
        assert!(status.success(), "live driver exit {status}");
        drop(pool);
    }
    let ops = acked.lock().unwrap().clone();
    let mut verified = 0;
    for (file, promised) in &captured {
        verified += reboot_and_check(sb, pool_fs, &file.0, &ops[..*promised]).await;
    }
    verified
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_operation() {
    let sb = Sandbox::new();
    let cuts: usize = std::env::var("BLOCKCSI_POWERCUT_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("BLOCKCSI_POWERCUT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("powercut: seed {seed} (BLOCKCSI_POWERCUT_SEED), {cuts} cuts per pool filesystem");
    let mut rng = Rng(seed | 1);
    std::fs::create_dir_all(sb.path("sock")).unwrap();

    let outer_image = sb.path("outer.img");
    std::fs::File::create(&outer_image)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let outer = Mounted::new(&outer_image, false, Some("xfs-reflink"), &sb.path("outer"));
    let started = Instant::now();
    let mut verified = 0;
    for pool_fs in ["ext4", "xfs"] {
        verified += round(&sb, &outer.mount, pool_fs, cuts, &mut rng).await;
    }
    drop(outer);
    println!(
        "powercut: {} cuts survived, {verified} operations verified ({:.0?})",
        2 * cuts,
        started.elapsed()
    );
    assert!(verified > 0, "no acknowledged operation was ever cut");
    sb.assert_no_leaks();
}
