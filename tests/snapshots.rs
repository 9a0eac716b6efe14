//! Real-kernel tests of snapshots, restores, clones and expansion, on pools that live on an XFS
//! filesystem with reflink and on a plain ext4 one (each made on a loop device). Run as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blockcsi::pb;
use common::*;
use sha2::{Digest, Sha256};
use tonic::Code;

/// A filesystem made for the pool and mounted at the sandbox's pool path.
struct PoolFs {
    _image_dir: tempfile::TempDir,
    device: String,
    mount: PathBuf,
}

impl PoolFs {
    fn new(sb: &Sandbox, kind: &str) -> PoolFs {
        let image_dir = tempfile::Builder::new()
            .prefix("blockcsi-poolfs-")
            .tempdir()
            .unwrap();
        let image = image_dir.path().join("pool.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(8 << 30)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success());
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let mkfs = match kind {
            "xfs-reflink" => Command::new("mkfs.xfs")
                .args(["-q", "-K", "-m", "reflink=1", &device])
                .status(),
            "ext4" => Command::new("mkfs.ext4")
                .args(["-q", "-E", "nodiscard", &device])
                .status(),
            other => panic!("no pool kind {other}"),
        };
        assert!(mkfs.unwrap().success());
        let mount = sb.pool();
        std::fs::create_dir_all(&mount).unwrap();
        assert!(Command::new("mount")
            .arg(&device)
            .arg(&mount)
            .status()
            .unwrap()
            .success());
        PoolFs {
            _image_dir: image_dir,
            device,
            mount,
        }
    }
}

impl Drop for PoolFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so each file has distinct contents.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn digest(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

async fn snapshot(c: &mut Client, name: &str, volume: &str) -> pb::Snapshot {
    c.controller
        .create_snapshot(pb::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: volume.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
}

async fn create_from(
    c: &mut Client,
    name: &str,
    bytes: i64,
    cap: &pb::VolumeCapability,
    source: pb::volume_content_source::Type,
) -> Result<String, tonic::Status> {
    c.controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            volume_content_source: Some(pb::VolumeContentSource {
                r#type: Some(source),
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

fn from_snapshot(id: &str) -> pb::volume_content_source::Type {
    pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

fn from_volume(id: &str) -> pb::volume_content_source::Type {
    pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
        volume_id: id.into(),
    })
}

/// Publishes, stages and mounts a volume at `<sandbox>/pods/<label>`; returns the target.
async fn bring_up(
    c: &mut Client,
    sb: &Sandbox,
    id: &str,
    label: &str,
    cap: &pb::VolumeCapability,
) -> String {
    let staging = sb.dir(&format!("staging-{label}"));
    let target = format!("{}/{label}", sb.dir("pods"));
    c.controller_publish(id, cap).await;
    c.stage(id, &staging, cap).await.unwrap();
    c.publish(id, &staging, &target, cap).await.unwrap();
    target
}

async fn take_down(c: &mut Client, sb: &Sandbox, id: &str, label: &str) {
    let staging = sb.path(&format!("staging-{label}")).display().to_string();
    let target = format!("{}/{label}", sb.path("pods").display());
    c.unpublish(id, &target).await;
    c.unstage(id, &staging).await;
}

fn fs_uuid_at(mount: &str) -> String {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dev = text
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mount))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|rest| rest.split(' ').nth(1))
        .unwrap()
        .to_string();
    fs_uuid(Path::new(&dev)).unwrap()
}

/// Write, snapshot, write more, restore: the restore holds exactly the snapshot-time data. A
/// restore and a clone are mounted beside their source on the same node.
async fn restore_and_clone(pool_kind: &str, fs: &str) {
    let sb = Sandbox::new();
    let _pool = PoolFs::new(&sb, pool_kind);
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let cap = mount_cap(fs);

    let src = c.create("source", 512 * MIB, &cap).await;
    let src_target = bring_up(&mut c, &sb, &src, "src", &cap).await;
    let a = Path::new(&src_target).join("a.bin");
    write_synced(&a, &pattern(1, 8 << 20));
    let a_digest = digest(&a);
    let snap = snapshot(&mut c, "snap-1", &src).await;
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 512 * MIB);
    // Changes after the snapshot must not reach the restore.
    write_synced(&a, &pattern(2, 8 << 20));
    write_synced(&Path::new(&src_target).join("b.bin"), &pattern(3, 1 << 20));

    let restored = create_from(
        &mut c,
        "restored",
        768 * MIB,
        &cap,
        from_snapshot(&snap.snapshot_id),
    )
    .await
    .unwrap();
    let r_target = bring_up(&mut c, &sb, &restored, "restored", &cap).await;
    assert_eq!(digest(&Path::new(&r_target).join("a.bin")), a_digest);
    assert!(!Path::new(&r_target).join("b.bin").exists());

    let clone = create_from(&mut c, "clone", 512 * MIB, &cap, from_volume(&src))
        .await
        .unwrap();
    let c_target = bring_up(&mut c, &sb, &clone, "clone", &cap).await;
    assert_eq!(
        digest(&Path::new(&c_target).join("b.bin")),
        digest(&Path::new(&src_target).join("b.bin"))
    );
    // Three copies of one filesystem, mounted together, each with its own UUID.
    let uuids = [
        fs_uuid_at(&src_target),
        fs_uuid_at(&r_target),
        fs_uuid_at(&c_target),
    ];
    assert!(
        uuids[0] != uuids[1] && uuids[0] != uuids[2] && uuids[1] != uuids[2],
        "{uuids:?}"
    );

    // Unknown sources are NOT_FOUND and leave nothing; a name reused with another source is
    // ALREADY_EXISTS.
    let missing = create_from(
        &mut c,
        "nope",
        512 * MIB,
        &cap,
        from_snapshot("snap-00000000000000000000000000000000"),
    )
    .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    let reused = create_from(
        &mut c,
        "clone",
        512 * MIB,
        &cap,
        from_snapshot(&snap.snapshot_id),
    )
    .await;
    assert_eq!(reused.unwrap_err().code(), Code::AlreadyExists);
    let smaller = create_from(
        &mut c,
        "small",
        256 * MIB,
        &cap,
        from_snapshot(&snap.snapshot_id),
    )
    .await;
    assert_eq!(smaller.unwrap_err().code(), Code::OutOfRange);

    for (id, label) in [(&src, "src"), (&restored, "restored"), (&clone, "clone")] {
        take_down(&mut c, &sb, id, label).await;
        c.remove(id).await;
    }
    // The snapshot outlives its source.
    let listed = c
        .controller
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: src.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    let again = create_from(
        &mut c,
        "after-source-gone",
        512 * MIB,
        &cap,
        from_snapshot(&snap.snapshot_id),
    )
    .await
    .unwrap();
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: again,
            ..Default::default()
        })
        .await
        .unwrap();
    c.controller
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(driver.stop().success());
    sb.assert_no_leaks();
    let left: Vec<_> = std::fs::read_dir(sb.pool().join("snapshots"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_and_clone_ext4_on_reflink_xfs_pool() {
    restore_and_clone("xfs-reflink", "ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_and_clone_xfs_on_plain_ext4_pool() {
    restore_and_clone("ext4", "xfs").await;
}

fn statfs_total(path: &str) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks() * st.fragment_size()
}

async fn controller_expand(
    c: &mut Client,
    id: &str,
    bytes: i64,
) -> pb::ControllerExpandVolumeResponse {
    c.controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn node_expand(c: &mut Client, id: &str, path: &str) -> Result<i64, tonic::Status> {
    c.node
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().capacity_bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn expansion_online_offline_and_block() {
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;

    // Online: an XFS volume grows while a pod has it mounted.
    let cap = mount_cap("xfs");
    let id = c.create("online", 512 * MIB, &cap).await;
    let target = bring_up(&mut c, &sb, &id, "online", &cap).await;
    write_synced(&Path::new(&target).join("keep"), b"data");
    let before = statfs_total(&target);
    let reply = controller_expand(&mut c, &id, 1024 * MIB).await;
    assert_eq!(
        reply.capacity_bytes,
        1024 * MIB,
        "the reply equals the request"
    );
    assert!(reply.node_expansion_required);
    assert_eq!(node_expand(&mut c, &id, &target).await.unwrap(), 1024 * MIB);
    let after = statfs_total(&target);
    assert!(after > before + 400 * (MIB as u64), "{before} -> {after}");
    // Never shrinks: a smaller request leaves the size as it is.
    assert_eq!(
        controller_expand(&mut c, &id, 600 * MIB)
            .await
            .capacity_bytes,
        1024 * MIB
    );
    take_down(&mut c, &sb, &id, "online").await;
    c.remove(&id).await;

    // Offline: an ext4 volume grown while unstaged comes back larger, data intact.
    let cap = mount_cap("ext4");
    let id = c.create("offline", 128 * MIB, &cap).await;
    let target = bring_up(&mut c, &sb, &id, "offline", &cap).await;
    write_synced(&Path::new(&target).join("keep"), b"offline data");
    let before = statfs_total(&target);
    take_down(&mut c, &sb, &id, "offline").await;
    controller_expand(&mut c, &id, 256 * MIB).await;
    let staging = sb.path("staging-offline").display().to_string();
    c.stage(&id, &staging, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    assert_eq!(node_expand(&mut c, &id, &target).await.unwrap(), 256 * MIB);
    let after = statfs_total(&target);
    assert!(after > before + 100 * (MIB as u64), "{before} -> {after}");
    assert_eq!(
        std::fs::read(Path::new(&target).join("keep")).unwrap(),
        b"offline data"
    );
    take_down(&mut c, &sb, &id, "offline").await;
    c.remove(&id).await;

    // Block: the published device grows.
    let cap = block_cap();
    let id = c.create("block", 64 * MIB, &cap).await;
    let staging = sb.dir("staging-block");
    let target = format!("{}/blockdev", sb.dir("pods"));
    c.controller_publish(&id, &cap).await;
    c.stage(&id, &staging, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    controller_expand(&mut c, &id, 96 * MIB).await;
    assert_eq!(node_expand(&mut c, &id, &target).await.unwrap(), 96 * MIB);
    let dev_size = std::fs::File::open(&target)
        .map(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).unwrap())
        .unwrap();
    assert_eq!(dev_size, 96 << 20);
    c.unpublish(&id, &target).await;
    c.unstage(&id, &staging).await;
    c.remove(&id).await;

    assert!(driver.stop().success());
    sb.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_during_snapshot_leaves_none_or_a_whole_one() {
    use std::os::unix::fs::FileExt;
    let sb = Sandbox::new();
    // A plain ext4 pool: snapshots are data copies there, slow enough to be interrupted.
    let _pool = PoolFs::new(&sb, "ext4");
    let cap = block_cap();
    let mut driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let vol = c.create("big", 768 * MIB, &cap).await;
    {
        // Fill the image directly: the volume is not attached anywhere.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(image_of(&sb, &vol))
            .unwrap();
        let chunk = pattern(7, 4 << 20);
        for i in 0..160u64 {
            f.write_all_at(&chunk, i * (4 << 20)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let source_digest = digest(&image_of(&sb, &vol));

    let mut outcomes = Vec::new();
    for (round, delay_ms) in [20u64, 80, 200, 400, 15_000].into_iter().enumerate() {
        let name = format!("interrupted-{round}");
        let socket = sb.socket();
        let vol2 = vol.clone();
        let name2 = name.clone();
        let call = tokio::spawn(async move {
            let mut c = Client::connect(&socket).await;
            c.controller
                .create_snapshot(pb::CreateSnapshotRequest {
                    name: name2,
                    source_volume_id: vol2,
                    ..Default::default()
                })
                .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        driver.kill();
        let finished = call.await.unwrap().is_ok();
        driver = Driver::all(&sb);
        c = driver.client().await;
        let listed = c
            .controller
            .list_snapshots(pb::ListSnapshotsRequest {
                source_volume_id: vol.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        // Either no snapshot, or one that is whole.
        for e in &listed {
            let s = e.snapshot.as_ref().unwrap();
            let image = sb
                .pool()
                .join("snapshots")
                .join(format!("{}.img", s.snapshot_id));
            assert_eq!(
                digest(&image),
                source_digest,
                "a listed snapshot must be whole"
            );
        }
        let temp: Vec<_> = std::fs::read_dir(sb.pool().join("snapshots"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(temp.is_empty(), "a restart removes half copies: {temp:?}");
        // The retry of the same call completes it.
        let snap = snapshot(&mut c, &name, &vol).await;
        let image = sb
            .pool()
            .join("snapshots")
            .join(format!("{}.img", snap.snapshot_id));
        assert_eq!(digest(&image), source_digest);
        outcomes.push((delay_ms, finished, listed.len()));
        c.controller
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    println!("kill during snapshot (delay ms, call finished, snapshots listed after restart): {outcomes:?}");
    assert!(
        outcomes.iter().any(|o| !o.1),
        "no kill interrupted a copy: {outcomes:?}"
    );
    assert!(
        outcomes.iter().any(|o| o.1 && o.2 == 1),
        "no copy finished before its kill: {outcomes:?}"
    );
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(driver.stop().success());
    sb.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread")]
async fn group_snapshot_is_all_or_nothing() {
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let cap = block_cap();
    let a = c.create("ga", 16 * MIB, &cap).await;
    let b = c.create("gb", 16 * MIB, &cap).await;
    let mut group = c.group.clone();
    let made = group
        .create_volume_group_snapshot(pb::CreateVolumeGroupSnapshotRequest {
            name: "g1".into(),
            source_volume_ids: vec![a.clone(), b.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(made.snapshots.len(), 2);
    assert!(made
        .snapshots
        .iter()
        .all(|s| s.group_snapshot_id == made.group_snapshot_id));
    // A member cannot be deleted alone.
    let err = c
        .controller
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: made.snapshots[0].snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // One unknown member: nothing is made.
    let err = group
        .create_volume_group_snapshot(pb::CreateVolumeGroupSnapshotRequest {
            name: "g2".into(),
            source_volume_ids: vec![a.clone(), "vol-00000000000000000000000000000000".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let all = c
        .controller
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 2, "only the first group's members exist");
    group
        .delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: made.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = group
        .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: made.group_snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for v in [a, b] {
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: v,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(driver.stop().success());
    sb.assert_no_leaks();
    assert_eq!(
        std::fs::read_dir(sb.pool().join("snapshots"))
            .unwrap()
            .count(),
        0
    );
}
