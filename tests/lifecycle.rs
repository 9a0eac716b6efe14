//! Real-kernel lifecycle tests: the `blockcsi` binary with real loop devices, mkfs and mounts.
//! Run as root.

mod common;

use common::*;
use tonic::Code;

async fn mount_lifecycle(fs: &str) {
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let cap = mount_cap(fs);
    let staging = sb.dir("staging");
    let target_parent = sb.dir("pods");
    let target = format!("{target_parent}/target");

    let id = c.create(&format!("lifecycle-{fs}"), 512 * MIB, &cap).await;
    c.controller_publish(&id, &cap).await;
    c.stage(&id, &staging, &cap).await.unwrap();
    c.stage(&id, &staging, &cap).await.unwrap(); // idempotent
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap(); // idempotent
    let mounts = sb.mounts();
    assert!(
        mounts.contains(&staging) && mounts.contains(&target),
        "{mounts:?}"
    );
    let fs_type = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(staging.as_str()))
        .map(|l| {
            l.split(" - ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        });
    assert_eq!(fs_type.as_deref(), Some(fs));

    write_synced(
        &std::path::Path::new(&target).join("data.txt"),
        b"kept across restage",
    );
    let stats = c
        .node
        .node_get_volume_stats(blockcsi::pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = &stats.usage[0];
    assert!(
        bytes.total > 400 * MIB && bytes.total <= 512 * MIB,
        "{stats:?}"
    );
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Full teardown, then bring it back: the data must still be there and the filesystem must be
    // the same one (same UUID: no second mkfs).
    let uuid_before = fs_uuid(&image_of(&sb, &id)).expect("filesystem present");
    c.unpublish(&id, &target).await;
    c.unpublish(&id, &target).await; // idempotent
    assert!(
        !std::path::Path::new(&target).exists(),
        "target must be removed"
    );
    c.unstage(&id, &staging).await;
    c.unstage(&id, &staging).await; // idempotent
    assert!(sb.loops().is_empty() && sb.mounts().is_empty());

    c.stage(&id, &staging, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    let text = std::fs::read_to_string(std::path::Path::new(&target).join("data.txt")).unwrap();
    assert_eq!(text, "kept across restage");
    assert_eq!(fs_uuid(&image_of(&sb, &id)), Some(uuid_before));

    c.unpublish(&id, &target).await;
    c.unstage(&id, &staging).await;
    c.remove(&id).await;
    assert!(driver.stop().success());
    sb.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_lifecycle_ext4() {
    mount_lifecycle("ext4").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_lifecycle_xfs() {
    mount_lifecycle("xfs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn block_lifecycle_keeps_raw_data_and_never_formats() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let cap = block_cap();
    let staging = sb.dir("staging");
    let target = format!("{}/dev", sb.dir("pods"));

    let id = c.create("block", 16 * MIB, &cap).await;
    c.controller_publish(&id, &cap).await;
    c.stage(&id, &staging, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    {
        let mut dev = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap();
        dev.seek(SeekFrom::Start(4 * MIB as u64)).unwrap();
        dev.write_all(b"raw block payload").unwrap();
        dev.sync_all().unwrap();
    }
    let stats = c
        .node
        .node_get_volume_stats(blockcsi::pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 16 * MIB);

    c.unpublish(&id, &target).await;
    assert!(
        !std::path::Path::new(&target).exists(),
        "block target file must be removed"
    );
    c.unstage(&id, &staging).await;
    assert!(sb.loops().is_empty());

    c.stage(&id, &staging, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    let mut buf = vec![0u8; 17];
    let mut dev = std::fs::File::open(&target).unwrap();
    dev.seek(SeekFrom::Start(4 * MIB as u64)).unwrap();
    dev.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"raw block payload");
    drop(dev);

    c.unpublish(&id, &target).await;
    c.unstage(&id, &staging).await;
    c.remove(&id).await;
    assert!(driver.stop().success());
    sb.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_between_stage_and_publish_and_after_reboot_like_loss() {
    let sb = Sandbox::new();
    let cap = mount_cap("");
    let staging = sb.dir("staging");
    let target = format!("{}/target", sb.dir("pods"));

    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let id = c.create("restart", 64 * MIB, &cap).await;
    c.controller_publish(&id, &cap).await;
    c.stage(&id, &staging, &cap).await.unwrap();
    // A crash: no chance to clean up anything.
    driver.kill();

    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    c.stage(&id, &staging, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    write_synced(&std::path::Path::new(&target).join("f"), b"before reboot");
    let uuid_before = fs_uuid(&image_of(&sb, &id)).unwrap();
    driver.kill();

    // A reboot: every mount and loop device is gone, the pool stays.
    for m in [&target, &staging] {
        nix::mount::umount(m.as_str()).unwrap();
    }
    for l in sb.loops() {
        let dev = format!("/dev/{}", l.split(' ').next().unwrap());
        assert!(std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status()
            .unwrap()
            .success());
    }
    assert!(sb.loops().is_empty() && sb.mounts().is_empty());

    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    c.stage(&id, &staging, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    let text = std::fs::read_to_string(std::path::Path::new(&target).join("f")).unwrap();
    assert_eq!(text, "before reboot");
    assert_eq!(
        fs_uuid(&image_of(&sb, &id)),
        Some(uuid_before),
        "must not be re-formatted"
    );

    c.unpublish(&id, &target).await;
    c.unstage(&id, &staging).await;
    c.remove(&id).await;
    assert!(driver.stop().success());
    sb.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_whose_filesystem_vanished_is_refused_not_formatted() {
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let cap = mount_cap("ext4");
    let staging = sb.dir("staging");
    let target = format!("{}/target", sb.dir("pods"));

    let id = c.create("wiped", 64 * MIB, &cap).await;
    c.controller_publish(&id, &cap).await;
    c.stage(&id, &staging, &cap).await.unwrap();
    c.publish(&id, &staging, &target, &cap).await.unwrap();
    write_synced(
        &std::path::Path::new(&target).join("precious"),
        &vec![7u8; 1 << 20],
    );
    c.unpublish(&id, &target).await;
    c.unstage(&id, &staging).await;

    // Destroy the ext4 signature (superblock magic at 1024 + 0x38) under the data.
    let image = image_of(&sb, &id);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&[0, 0], 1024 + 0x38).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(
        fs_uuid(&image),
        None,
        "signature must be gone for this test to mean anything"
    );
    let before = std::fs::read(&image).unwrap();

    let err = c.stage(&id, &staging, &cap).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("data may be at risk"),
        "{}",
        err.message()
    );
    assert_eq!(
        std::fs::read(&image).unwrap(),
        before,
        "the image must be untouched"
    );
    assert!(
        sb.loops().is_empty(),
        "a refused stage must detach: {:?}",
        sb.loops()
    );
    assert!(sb.mounts().is_empty());

    c.remove(&id).await;
    assert!(driver.stop().success());
    sb.assert_no_leaks();
}

/// A fresh volume skips blkid only when both ends read as zero. Signatures at the farthest
/// places blkid looks from the start and from the end must still be found and refused; bytes
/// there that are no signature leave the verdict to blkid, which lets the volume be formatted.
#[tokio::test(flavor = "multi_thread")]
async fn signatures_at_either_end_are_refused_and_other_bytes_left_to_blkid() {
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let cap = mount_cap("ext4");
    let staging = sb.dir("staging");
    let size = 64 * MIB as u64;
    // (name, offset, bytes, whether blkid reports a signature)
    let cases: [(&str, u64, Vec<u8>, bool); 4] = [
        (
            "luks2-secondary-header",
            4 * MIB as u64,
            b"SKUL\xba\xbe".to_vec(),
            true,
        ),
        (
            "promise-raid",
            size - 3087 * 512,
            b"Promise Technology, Inc.".to_vec(),
            true,
        ),
        (
            "md-0.90",
            (size & !0xffff) - 0x10000,
            vec![0xfc, 0x4e, 0x2b, 0xa9],
            true,
        ),
        ("no-signature", size - 4096, vec![0x5a; 4096], false),
    ];
    for (name, at, bytes, signature) in cases {
        let id = c.create(name, size as i64, &cap).await;
        let image = image_of(&sb, &id);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap();
            f.write_all_at(&bytes, at).unwrap();
            f.sync_all().unwrap();
        }
        let blkid = std::process::Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(
            blkid.status.success(),
            signature,
            "{name}: blkid must agree for this test to mean anything: {}",
            String::from_utf8_lossy(&blkid.stdout)
        );
        let before = std::fs::read(&image).unwrap();
        c.controller_publish(&id, &cap).await;
        let res = c.stage(&id, &staging, &cap).await;
        if signature {
            let err = res.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{name}: {err:?}");
            assert_eq!(
                std::fs::read(&image).unwrap(),
                before,
                "{name}: the image must be untouched"
            );
            assert!(sb.loops().is_empty(), "{name}: {:?}", sb.loops());
        } else {
            res.unwrap();
            assert!(fs_uuid(&image).is_some(), "{name}: must be formatted");
            c.unstage(&id, &staging).await;
        }
        c.remove(&id).await;
    }
    assert!(driver.stop().success());
    sb.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread")]
async fn error_paths_leave_nothing_behind() {
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let cap = mount_cap("ext4");
    let staging = sb.dir("staging");

    // Not published to this node: refused before anything is attached.
    let id = c.create("errors", 64 * MIB, &cap).await;
    let err = c.stage(&id, &staging, &cap).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(sb.loops().is_empty());

    c.controller_publish(&id, &cap).await;
    // A mount option outside the allowlist.
    let mut bad = cap.clone();
    if let Some(blockcsi::pb::volume_capability::AccessType::Mount(m)) = &mut bad.access_type {
        m.mount_flags = vec!["x-evil=1".into()];
    }
    let err = c.stage(&id, &staging, &bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Staging path whose parent does not exist: the attach is undone.
    let err = c
        .stage(
            &id,
            &sb.path("missing/parent/staging").display().to_string(),
            &cap,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(sb.loops().is_empty() && sb.mounts().is_empty());

    // Stage as ext4, then ask for xfs: refused, nothing new attached or mounted.
    c.stage(&id, &staging, &cap).await.unwrap();
    let err = c.stage(&id, &staging, &mount_cap("xfs")).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::AlreadyExists | Code::InvalidArgument),
        "{err:?}"
    );
    // Publish under a parent that does not exist: no target is created.
    let missing = sb.path("nope/target").display().to_string();
    let err = c.publish(&id, &staging, &missing, &cap).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(!sb.path("nope").exists());
    // Delete while published is refused and keeps the volume.
    let err = c
        .controller
        .delete_volume(blockcsi::pb::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(sb.images().len(), 1);

    c.unstage(&id, &staging).await;
    c.remove(&id).await;
    // Unknown and malformed ids.
    for bad_id in ["vol-00000000000000000000000000000000", "../../etc"] {
        c.controller
            .delete_volume(blockcsi::pb::DeleteVolumeRequest {
                volume_id: bad_id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(driver.stop().success());
    sb.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_lifecycle_and_split_processes() {
    let sb = Sandbox::new();
    // A path that is not a socket is never removed.
    let not_socket = sb.path("file.sock");
    std::fs::write(&not_socket, b"keep me").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blockcsi"))
        .args(["serve", "--node-id", NODE, "--endpoint"])
        .arg(format!("unix://{}", not_socket.display()))
        .arg("--pool")
        .arg(sb.pool())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&not_socket).unwrap(), b"keep me");

    // Controller and node as separate processes sharing the pool; stale sockets are replaced.
    let ctrl_sock = sb.path("sock/ctrl.sock");
    let node_sock = sb.path("sock/node.sock");
    let ctrl = Driver::start(&sb, "controller", &ctrl_sock, 0);
    let node = Driver::start(&sb, "node", &node_sock, 3);
    let mode = std::fs::metadata(&ctrl_sock).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o660
    );
    let mut cc = ctrl.client().await;
    let mut nc = node.client().await;
    let caps = nc
        .identity
        .get_plugin_capabilities(blockcsi::pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        caps.capabilities.len(),
        5,
        "the plugin's capabilities, whatever the mode"
    );
    let no_controller = nc
        .controller
        .controller_get_capabilities(blockcsi::pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        no_controller.code(),
        Code::Unimplemented,
        "node mode serves no Controller RPCs"
    );
    let info = nc
        .node
        .node_get_info(blockcsi::pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_volumes_per_node, 3);
    let cap = mount_cap("");
    let staging = sb.dir("staging");
    let id = cc.create("split", 32 * MIB, &cap).await;
    cc.controller_publish(&id, &cap).await;
    nc.stage(&id, &staging, &cap).await.unwrap();
    nc.unstage(&id, &staging).await;
    cc.remove(&id).await;

    ctrl.kill();
    // The stale socket of a killed process does not block a restart.
    assert!(ctrl_sock.exists());
    let ctrl = Driver::start(&sb, "controller", &ctrl_sock, 0);
    assert!(ctrl.stop().success());
    assert!(!ctrl_sock.exists(), "socket removed at exit");
    assert!(node.stop().success());
    sb.assert_no_leaks();
}
