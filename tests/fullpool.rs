//! A full pool: ENOSPC where each controller call writes. The pool is a small ext4 filesystem
//! (no reflink: snapshots and clones copy data) on a loop device, filled with a ballast file to
//! leave exactly as much room as a case needs. Every call that runs out gets RESOURCE_EXHAUSTED
//! naming the pool, leaves nothing half-made (image, record, index, temp file, grown image), and
//! succeeds once the ballast is gone. Run as root.

mod common;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blockcsi::pb;
use common::*;
use tonic::Code;

/// Small enough to fill in a moment, big enough for every case below.
const POOL_BYTES: u64 = 128 << 20;

/// An ext4 filesystem on a loop device, mounted at the sandbox's pool path.
struct SmallPool {
    device: String,
    mount: PathBuf,
}

impl SmallPool {
    fn new(sb: &Sandbox) -> SmallPool {
        let image = sb.path("pool-fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(POOL_BYTES)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let pool = SmallPool {
            device,
            mount: sb.pool(),
        };
        // -m 0: no blocks reserved for root, so statvfs's free count is what the driver
        // (running as root) can really use.
        assert!(Command::new("mkfs.ext4")
            .args(["-q", "-m", "0", "-E", "nodiscard", &pool.device])
            .status()
            .unwrap()
            .success());
        std::fs::create_dir_all(&pool.mount).unwrap();
        assert!(Command::new("mount")
            .arg(&pool.device)
            .arg(&pool.mount)
            .status()
            .unwrap()
            .success());
        pool
    }

    fn ballast(&self) -> PathBuf {
        self.mount.join("ballast")
    }

    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.mount).unwrap();
        st.blocks_available() * st.fragment_size()
    }

    /// Grows or shrinks the ballast until exactly `want` bytes are free.
    fn leave_free(&self, want: u64) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.ballast())
            .unwrap();
        for _ in 0..8 {
            nix::unistd::syncfs(&f).unwrap();
            let free = self.free();
            let len = f.metadata().unwrap().len();
            if free == want {
                return;
            }
            if free > want {
                // SAFETY: fallocate on an open fd; no memory is passed.
                let rc = unsafe {
                    libc::fallocate(
                        f.as_raw_fd(),
                        0,
                        len as libc::off_t,
                        (free - want) as libc::off_t,
                    )
                };
                // The extent tree may need a block more than was free: shrink and retry.
                if rc != 0 {
                    f.set_len(len.saturating_sub(1 << 20)).unwrap();
                }
            } else {
                f.set_len(len.saturating_sub(want - free)).unwrap();
            }
        }
        panic!(
            "could not leave {want} bytes free (free: {}, ballast: {})",
            self.free(),
            f.metadata().unwrap().len()
        );
    }

    fn drop_ballast(&self) {
        std::fs::remove_file(self.ballast()).unwrap();
        nix::unistd::sync();
    }
}

impl Drop for SmallPool {
    fn drop(&mut self) {
        // A plain unmount first, so the loop device is free to go at once; lazily if busy.
        if nix::mount::umount(&self.mount).is_err() {
            let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// Every file of the pool that describes or holds an object (lock files aside: they are
/// collected at the next start and hold nothing), with its size.
fn pool_state(pool: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for dir in [
        "volumes",
        "snapshots",
        "meta/volumes",
        "meta/names",
        "meta/snapshots",
    ] {
        if let Ok(rd) = std::fs::read_dir(pool.join(dir)) {
            for e in rd.flatten() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.insert(format!("{dir}/{}", e.file_name().to_string_lossy()), len);
            }
        }
    }
    out
}

fn params(provisioning: &str) -> std::collections::HashMap<String, String> {
    [("provisioning".to_string(), provisioning.to_string())].into()
}

async fn create(
    c: &mut Client,
    name: &str,
    bytes: u64,
    provisioning: &str,
    source: Option<&str>,
) -> Result<String, tonic::Status> {
    let source = source.map(|v| pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Volume(
            pb::volume_content_source::VolumeSource {
                volume_id: v.into(),
            },
        )),
    });
    c.controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block_cap()],
            parameters: params(provisioning),
            volume_content_source: source,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

async fn snapshot(c: &mut Client, name: &str, volume: &str) -> Result<String, tonic::Status> {
    c.controller
        .create_snapshot(pb::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: volume.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().snapshot.unwrap().snapshot_id)
}

async fn expand(c: &mut Client, id: &str, bytes: u64) -> Result<i64, tonic::Status> {
    c.controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().capacity_bytes)
}

async fn capacity_of(c: &mut Client, id: &str) -> i64 {
    c.controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .capacity_bytes
}

/// The call ran out of room: RESOURCE_EXHAUSTED, a message that says the pool is what ran out,
/// and the pool exactly as it was before the call.
#[track_caller]
fn assert_exhausted<T: std::fmt::Debug>(
    what: &str,
    res: Result<T, tonic::Status>,
    pool: &Path,
    before: &BTreeMap<String, u64>,
) {
    let err = res.expect_err(&format!("{what} succeeded on a full pool"));
    assert_eq!(err.code(), Code::ResourceExhausted, "{what}: {err:?}");
    let msg = err.message();
    assert!(
        msg.contains("pool is full") || msg.contains("free in the pool"),
        "{what}: the message does not say the pool ran out: {msg}"
    );
    assert_eq!(
        &pool_state(pool),
        before,
        "{what}: the failed call left something behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_refuses_cleanly_and_recovers() {
    let sb = Sandbox::new();
    let fs = SmallPool::new(&sb);
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let pool = sb.pool();

    // A thin source with 8 MiB of data (a data copy on ext4), and a thick volume to grow.
    let src = create(&mut c, "source", 16 * MIB as u64, "thin", None)
        .await
        .unwrap();
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8 | 1).collect();
    {
        let img = std::fs::OpenOptions::new()
            .write(true)
            .open(image_of(&sb, &src))
            .unwrap();
        img.write_all_at(&data, 0).unwrap();
        img.sync_all().unwrap();
    }
    let grow = create(&mut c, "grow", 8 * MIB as u64, "thick", None)
        .await
        .unwrap();

    // Thin create: with less room than its size it is refused before anything is written.
    fs.leave_free(4 * MIB as u64);
    let before = pool_state(&pool);
    let res = create(&mut c, "thin", 32 * MIB as u64, "thin", None).await;
    assert_exhausted("thin create", res, &pool, &before);

    // Thick create with exactly its size free: the capacity check passes, the name index takes
    // a block, and the reservation hits ENOSPC.
    fs.leave_free(32 * MIB as u64);
    let before = pool_state(&pool);
    let res = create(&mut c, "thick", 32 * MIB as u64, "thick", None).await;
    assert_exhausted("thick create", res, &pool, &before);

    // Thick clone with exactly its size free: the data copy fits, the reservation does not.
    fs.leave_free(16 * MIB as u64);
    let before = pool_state(&pool);
    let res = create(&mut c, "clone", 16 * MIB as u64, "thick", Some(&src)).await;
    assert_exhausted("thick clone", res, &pool, &before);

    // Snapshot: ext4 cannot reflink, so 8 MiB of data are copied into 4 MiB of room.
    fs.leave_free(4 * MIB as u64);
    let before = pool_state(&pool);
    let res = snapshot(&mut c, "snap", &src).await;
    assert_exhausted("snapshot copy", res, &pool, &before);

    // Thick expansion 8 -> 40 MiB with 16 MiB free: the image neither grows nor keeps the
    // blocks the failed reservation got.
    fs.leave_free(16 * MIB as u64);
    let before = pool_state(&pool);
    let free_before = fs.free();
    let res = expand(&mut c, &grow, 40 * MIB as u64).await;
    assert_exhausted("thick expansion", res, &pool, &before);
    assert_eq!(capacity_of(&mut c, &grow).await, 8 * MIB);
    nix::unistd::sync();
    assert!(
        fs.free() + MIB as u64 >= free_before,
        "the failed expansion kept blocks: {} bytes free before, {} after",
        free_before,
        fs.free()
    );

    // A thin volume is made while there is room, then the room goes: the write path (the
    // volume's own writes, here straight into its image) is what fails.
    fs.leave_free(24 * MIB as u64);
    let thin = create(&mut c, "thin-late", 16 * MIB as u64, "thin", None)
        .await
        .unwrap();
    fs.leave_free(2 * MIB as u64);
    {
        let img = std::fs::OpenOptions::new()
            .write(true)
            .open(image_of(&sb, &thin))
            .unwrap();
        let err = img
            .write_all_at(&data, 0)
            .and_then(|()| img.sync_all())
            .expect_err("8 MiB written into 2 MiB of room");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    }

    // The ballast goes: every refused call now succeeds.
    fs.drop_ballast();
    let thin_id = create(&mut c, "thin", 32 * MIB as u64, "thin", None)
        .await
        .unwrap();
    let thick = create(&mut c, "thick", 32 * MIB as u64, "thick", None)
        .await
        .unwrap();
    let clone = create(&mut c, "clone", 16 * MIB as u64, "thick", Some(&src))
        .await
        .unwrap();
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(image_of(&sb, &clone))
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert_eq!(
        head,
        data[..1 << 20],
        "the clone does not hold its source's data"
    );
    let snap = snapshot(&mut c, "snap", &src).await.unwrap();
    assert_eq!(
        expand(&mut c, &grow, 40 * MIB as u64).await.unwrap(),
        40 * MIB
    );
    assert_eq!(
        std::fs::metadata(image_of(&sb, &grow)).unwrap().len(),
        40 * MIB as u64
    );

    // Teardown leaves nothing.
    c.controller
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snap,
            ..Default::default()
        })
        .await
        .unwrap();
    for id in [&src, &grow, &thin, &thin_id, &thick, &clone] {
        c.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let left: Vec<_> = pool_state(&pool).into_keys().collect();
    assert!(left.is_empty(), "left after teardown: {left:?}");
    driver.stop();
    // The pool's own loop device is backed by a sandbox file: it goes with the pool.
    drop(fs);
    sb.assert_no_leaks();
}
