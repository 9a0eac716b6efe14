//! Hostile requests against the real binary over gRPC, as root: ids and names with `..`, `/`,
//! NUL, control characters and megabyte lengths; sizes at the int64 limits; fs types and mount
//! flags that try to inject options; staging and target paths that are relative, climb with
//! `..`, or are symbolic links to somewhere else; secrets that must never be echoed. Each case
//! must get the spec's code, the driver must keep answering Probe and never log a panic, and
//! nothing outside the sandbox may change. Each group prints `hostile: <group>: N cases`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blockcsi::pb;
use common::*;
use tonic::{Code, Response, Status};

const MARKER: &str = "S3CRET-MARKER-d41d8c";
const MIB_TEXT: usize = 1 << 20;

/// Ids that must never become a path.
fn bad_ids() -> Vec<String> {
    vec![
        "..".into(),
        "../../../../etc/passwd".into(),
        "vol-../../../../etc/passwd0000000000".into(),
        "vol-0123456789abcdef0123456789abcde/".into(),
        "vol-0123456789ABCDEF0123456789ABCDEF".into(),
        "vol-0123456789abcdef0123456789abcdef/../x".into(),
        "vol-0123456789abcdef\u{0}123456789abcdef".into(),
        "/etc/passwd".into(),
        "a\nb\tc\u{7}\u{1b}[2J".into(),
        "x".repeat(MIB_TEXT),
        format!("vol-{}", "0".repeat(MIB_TEXT)),
    ]
}

/// Request paths that must be refused before they are used.
fn bad_paths(sb: &Sandbox) -> Vec<String> {
    let base = sb.path("pods").display().to_string();
    vec![
        "relative/target".into(),
        "./target".into(),
        "..".into(),
        format!("{base}/../../../../etc"),
        format!("{base}/a/../../b"),
        "/".into(),
        format!("{base}/nul\u{0}byte"),
        format!("/{}", "p".repeat(MIB_TEXT)),
    ]
}

/// A symbolic link in the sandbox, as a request path.
fn link(sb: &Sandbox, name: &str, to: &Path) -> String {
    let p = sb.path(name);
    std::os::unix::fs::symlink(to, &p).unwrap();
    p.display().to_string()
}

fn secrets() -> HashMap<String, String> {
    HashMap::from([
        ("password".to_string(), MARKER.to_string()),
        (MARKER.to_string(), format!("token={MARKER}")),
    ])
}

fn cap_with(fs: &str, flags: &[&str]) -> pb::VolumeCapability {
    let mut cap = mount_cap(fs);
    if let Some(pb::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = flags.iter().map(|s| s.to_string()).collect();
    }
    cap
}

/// Everything under a directory: relative path, kind, size, contents of small files.
fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if meta.is_dir() {
                out.push(format!("{rel}/"));
                stack.push(p);
            } else if meta.file_type().is_symlink() {
                out.push(format!(
                    "{rel} -> {}",
                    std::fs::read_link(&p).unwrap().display()
                ));
            } else {
                out.push(format!("{rel} {:?}", std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// One hostile session: a driver, a client, a directory outside the sandbox that symlinks point
/// at, and the tally.
struct Run {
    group: &'static str,
    sb: Sandbox,
    driver: Driver,
    c: Client,
    outside: Outside,
    outside_before: Vec<String>,
    mounts_before: usize,
    cases: usize,
    messages: Vec<String>,
}

/// The directory symlinks point at. Should a case ever mount over it, it is unmounted before
/// the directory is removed, so a failing run does not leave the machine dirty.
struct Outside(tempfile::TempDir);

impl Outside {
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let me = self.0.path().display().to_string();
        let mut mine: Vec<String> = all_mounts()
            .into_iter()
            .filter(|m| m.starts_with(&me))
            .collect();
        mine.reverse();
        for m in mine {
            let _ = nix::mount::umount2(Path::new(&m), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Mounts that belong to no test sandbox: other tests of this run mount and unmount inside
/// their own `blockcsi-*` temporary directories in parallel, so only the rest of the host's
/// mount table must stay as it was.
fn host_mounts() -> usize {
    let tmp = std::env::temp_dir().join("blockcsi-");
    let prefix = tmp.to_string_lossy().into_owned();
    all_mounts()
        .iter()
        .filter(|m| !m.starts_with(&prefix))
        .count()
}

fn all_mounts() -> Vec<String> {
    let text = std::fs::read("/proc/self/mountinfo").unwrap();
    blockcsi::host::mountinfo::parse_bytes(&text)
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point.display().to_string())
        .collect()
}

impl Run {
    async fn new(group: &'static str) -> Run {
        let sb = Sandbox::new();
        let driver = Driver::all(&sb);
        let c = driver.client().await;
        let outside = Outside(
            tempfile::Builder::new()
                .prefix("blockcsi-outside-")
                .tempdir()
                .unwrap(),
        );
        std::fs::create_dir(outside.path().join("dir")).unwrap();
        std::fs::create_dir(outside.path().join("empty")).unwrap();
        std::fs::write(outside.path().join("dir/file"), b"outside data").unwrap();
        std::fs::write(outside.path().join("file"), b"a file").unwrap();
        let outside_before = snapshot(outside.path());
        Run {
            group,
            sb,
            driver,
            c,
            outside,
            outside_before,
            mounts_before: host_mounts(),
            cases: 0,
            messages: Vec::new(),
        }
    }

    fn out(&self, rel: &str) -> PathBuf {
        self.outside.path().join(rel)
    }

    /// Checks one answer against the codes the spec allows, then that the driver still serves.
    async fn case<T>(
        &mut self,
        what: &str,
        res: Result<Response<T>, Status>,
        want: &[Code],
    ) -> Option<T> {
        self.cases += 1;
        let what = blockcsi::error::clip(what, 120);
        let got = match res {
            Ok(r) => {
                assert!(
                    want.contains(&Code::Ok),
                    "{}: {what}: got OK, want {want:?}",
                    self.group
                );
                Some(r.into_inner())
            }
            Err(s) => {
                assert!(
                    want.contains(&s.code()),
                    "{}: {what}: got {:?} ({}), want {want:?}",
                    self.group,
                    s.code(),
                    blockcsi::error::clip(s.message(), 300)
                );
                assert!(
                    s.message().len() <= 4096,
                    "{what}: a {} byte message",
                    s.message().len()
                );
                self.messages.push(s.message().to_string());
                None
            }
        };
        self.alive(&what).await;
        got
    }

    async fn alive(&mut self, after: &str) {
        assert!(
            self.driver.child.try_wait().unwrap().is_none(),
            "{}: driver died after {after}: {}",
            self.group,
            self.driver.log_text()
        );
        self.c
            .identity
            .probe(pb::ProbeRequest {})
            .await
            .unwrap_or_else(|e| panic!("{}: probe after {after}: {e:?}", self.group));
    }

    /// A volume created and published to the test node.
    async fn volume(&mut self, name: &str, cap: &pb::VolumeCapability) -> String {
        let id = self.c.create(name, 16 * MIB, cap).await;
        self.c.controller_publish(&id, cap).await;
        id
    }

    async fn finish(mut self) -> usize {
        // Everything the cases created is torn down the normal way; then nothing may remain.
        let vols = self
            .c
            .controller
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        for e in vols.entries {
            let id = e.volume.unwrap().volume_id;
            self.c.remove(&id).await;
        }
        self.alive("teardown").await;
        let log = self.driver.log_text();
        assert!(
            !log.contains("panicked"),
            "{}: the driver panicked: {log}",
            self.group
        );
        assert!(
            !log.contains(MARKER),
            "{}: a secret reached the log",
            self.group
        );
        for m in &self.messages {
            assert!(
                !m.contains(MARKER),
                "{}: a secret reached an error: {m}",
                self.group
            );
        }
        // The longest log line stays bounded even with megabyte fields.
        let longest = log.lines().map(str::len).max().unwrap_or(0);
        assert!(
            longest < 16 * 1024,
            "{}: a {longest} byte log line",
            self.group
        );
        assert!(self.driver.stop().success());
        assert_eq!(
            snapshot(self.outside.path()),
            self.outside_before,
            "{}: outside changed",
            self.group
        );
        let outside = self.outside.path().display().to_string();
        assert!(
            !all_mounts().iter().any(|m| m.starts_with(&outside)),
            "{}: something is mounted outside the sandbox",
            self.group
        );
        self.sb.assert_no_leaks();
        assert_eq!(
            host_mounts(),
            self.mounts_before,
            "{}: mount table changed",
            self.group
        );
        println!("hostile: {}: {} cases", self.group, self.cases);
        self.cases
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn names_sizes_and_capabilities() {
    let mut r = Run::new("names-sizes-capabilities").await;
    let mut ctl = r.c.controller.clone();
    let create = |name: &str, required: i64, limit: i64, cap: pb::VolumeCapability| {
        pb::CreateVolumeRequest {
            name: name.to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }),
            volume_capabilities: vec![cap],
            secrets: secrets(),
            ..Default::default()
        }
    };
    let cap = mount_cap("ext4");

    // Names are hashed before they name a file: odd but printable names are fine.
    let good_names = [
        "..".to_string(),
        "../../../../etc/passwd".to_string(),
        "a/b/c".to_string(),
        "/".to_string(),
        "vol-0123456789abcdef0123456789abcdef".to_string(),
        "\u{202e}reversed".to_string(),
        "n".repeat(blockcsi::csi::validate::MAX_NAME_BYTES),
    ];
    for name in &good_names {
        let res = ctl.create_volume(create(name, MIB, 0, cap.clone())).await;
        let v = r
            .case(&format!("create name {name:?}"), res, &[Code::Ok])
            .await;
        let id = v.unwrap().volume.unwrap().volume_id;
        assert!(blockcsi::storage::filepool::is_volume_id(&id), "{id}");
        // Idempotent under the same odd name.
        let res = ctl.create_volume(create(name, MIB, 0, cap.clone())).await;
        let again = r
            .case(&format!("repeat name {name:?}"), res, &[Code::Ok])
            .await;
        assert_eq!(again.unwrap().volume.unwrap().volume_id, id);
    }
    let bad_names = [
        String::new(),
        "nul\u{0}byte".to_string(),
        "bell\u{7}".to_string(),
        "new\nline".to_string(),
        "esc\u{1b}[31m".to_string(),
        "\u{9f}c1-control".to_string(),
        "n".repeat(blockcsi::csi::validate::MAX_NAME_BYTES + 1),
        "n".repeat(MIB_TEXT),
    ];
    for name in &bad_names {
        let res = ctl.create_volume(create(name, MIB, 0, cap.clone())).await;
        r.case(
            &format!("create name {name:?}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
    }

    // Sizes at the int64 limits.
    let sizes: &[(i64, i64, Code)] = &[
        (-1, 0, Code::InvalidArgument),
        (0, -1, Code::InvalidArgument),
        (i64::MIN, 0, Code::InvalidArgument),
        (0, i64::MIN, Code::InvalidArgument),
        (i64::MAX, 0, Code::OutOfRange),
        (i64::MAX, i64::MAX, Code::OutOfRange),
        (i64::MAX - 1, i64::MAX, Code::OutOfRange),
        (2 * MIB, MIB, Code::OutOfRange),
        (1, 1, Code::OutOfRange),
        (0, 1, Code::OutOfRange),
        (MIB + 1, MIB + 2, Code::OutOfRange),
        ((16 << 40) + 1, 0, Code::OutOfRange),
    ];
    for (i, &(required, limit, want)) in sizes.iter().enumerate() {
        let res = ctl
            .create_volume(create(&format!("size-{i}"), required, limit, cap.clone()))
            .await;
        r.case(
            &format!("size required={required} limit={limit}"),
            res,
            &[want],
        )
        .await;
    }
    // A huge limit with a small request is fine and exact.
    let res = ctl
        .create_volume(create("size-ok", MIB, i64::MAX, cap.clone()))
        .await;
    let v = r
        .case("size required=1MiB limit=i64::MAX", res, &[Code::Ok])
        .await;
    assert_eq!(v.unwrap().volume.unwrap().capacity_bytes, MIB);

    // fs types and mount flags that try to smuggle options or commands.
    let fs_types = [
        "ext4 -o".to_string(),
        "ext4;rm -rf /".to_string(),
        "ext4,remount".to_string(),
        "ext4\u{0}".to_string(),
        "EXT4".to_string(),
        "../ext4".to_string(),
        "$(reboot)".to_string(),
        "btrfs".to_string(),
        "e".repeat(MIB_TEXT),
    ];
    for fs in &fs_types {
        let res = ctl
            .create_volume(create("fs", MIB, 0, cap_with(fs, &[])))
            .await;
        r.case(&format!("fs_type {fs:?}"), res, &[Code::InvalidArgument])
            .await;
    }
    let long_flag = "o".repeat(MIB_TEXT);
    let flags: Vec<Vec<&str>> = vec![
        vec![",remount"],
        vec!["remount"],
        vec!["bind"],
        vec!["rbind"],
        vec!["noatime,remount,rw"],
        vec!["context=\"system_u:object_r:etc_t:s0\""],
        vec!["fscontext=system_u:object_r:etc_t:s0"],
        vec!["x-mount.mkdir"],
        vec!["x-mount.mkdir=0755"],
        vec!["errors=panic"],
        vec!["commit=1;reboot"],
        vec!["commit=$(id)"],
        vec!["data=journal\u{0},remount"],
        vec!["uid=0"],
        vec!["upperdir=/etc"],
        vec!["nodev", "suid", "loop=/dev/sda"],
        vec!["-o remount"],
        vec![long_flag.as_str()],
    ];
    for f in &flags {
        let res = ctl
            .create_volume(create("flags", MIB, 0, cap_with("ext4", f)))
            .await;
        let what = format!(
            "mount flags {:?}",
            f.iter()
                .map(|s| blockcsi::error::clip(s, 40))
                .collect::<Vec<_>>()
        );
        r.case(&what, res, &[Code::InvalidArgument]).await;
    }
    // Access modes outside the enum.
    for mode in [-1, 0, 8, i32::MAX, i32::MIN] {
        let mut c = mount_cap("ext4");
        c.access_mode = Some(pb::volume_capability::AccessMode { mode });
        let res = ctl.create_volume(create("mode", MIB, 0, c)).await;
        r.case(
            &format!("access mode {mode}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
    }
    // Parameters are not secrets, but a value never needs echoing either.
    let mut params = HashMap::new();
    params.insert("iops".to_string(), MARKER.to_string());
    for i in 0..10_000 {
        params.insert(format!("k{i}"), "v".into());
    }
    let res = ctl
        .create_volume(pb::CreateVolumeRequest {
            parameters: params,
            ..create("params", MIB, 0, cap.clone())
        })
        .await;
    r.case("10k unknown parameters", res, &[Code::InvalidArgument])
        .await;
    // Paging tokens.
    for token in [
        "../../etc",
        "after:../../etc/passwd",
        "after:vol-XYZ",
        &"t".repeat(MIB_TEXT),
    ] {
        let res = ctl
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 1,
                starting_token: token.to_string(),
            })
            .await;
        r.case(&format!("token {token:?}"), res, &[Code::Aborted])
            .await;
    }
    let res = ctl
        .list_volumes(pb::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await;
    r.case("max_entries -1", res, &[Code::InvalidArgument])
        .await;
    // Every image in the pool is named by an id, whatever the names were.
    for img in r.sb.images() {
        let id = img.strip_suffix(".img").unwrap_or(&img);
        assert!(blockcsi::storage::filepool::is_volume_id(id), "{img}");
    }
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_and_node_ids_on_every_rpc() {
    let mut r = Run::new("ids").await;
    let cap = mount_cap("ext4");
    let staging = r.sb.dir("staging");
    let target = format!("{}/t", r.sb.dir("pods"));
    let real = r.volume("real", &cap).await;
    let mut ctl = r.c.controller.clone();
    let mut node = r.c.node.clone();

    let mut ids = bad_ids();
    ids.push(String::new());
    for id in &ids {
        let empty = id.is_empty();
        let inv = |other: Code| if empty { Code::InvalidArgument } else { other };
        let show = blockcsi::error::clip(id, 48).into_owned();
        let res = ctl
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: secrets(),
            })
            .await;
        r.case(&format!("delete {show:?}"), res, &[inv(Code::Ok)])
            .await;
        let res = ctl
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                volume_capability: Some(cap.clone()),
                secrets: secrets(),
                ..Default::default()
            })
            .await;
        r.case(
            &format!("controller publish {show:?}"),
            res,
            &[inv(Code::NotFound)],
        )
        .await;
        let res = ctl
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                secrets: secrets(),
            })
            .await;
        r.case(
            &format!("controller unpublish {show:?}"),
            res,
            &[inv(Code::Ok)],
        )
        .await;
        let res = ctl
            .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![cap.clone()],
                secrets: secrets(),
                ..Default::default()
            })
            .await;
        r.case(&format!("validate {show:?}"), res, &[inv(Code::NotFound)])
            .await;
        let res = ctl
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await;
        r.case(&format!("get volume {show:?}"), res, &[inv(Code::NotFound)])
            .await;
        let res = node
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.clone()),
                secrets: secrets(),
                ..Default::default()
            })
            .await;
        r.case(&format!("stage {show:?}"), res, &[inv(Code::NotFound)])
            .await;
        let res = node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
            })
            .await;
        r.case(&format!("unstage {show:?}"), res, &[inv(Code::NotFound)])
            .await;
        let res = node
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                target_path: target.clone(),
                volume_capability: Some(cap.clone()),
                secrets: secrets(),
                ..Default::default()
            })
            .await;
        r.case(&format!("publish {show:?}"), res, &[inv(Code::NotFound)])
            .await;
        let res = node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.clone(),
            })
            .await;
        r.case(&format!("unpublish {show:?}"), res, &[inv(Code::NotFound)])
            .await;
        let res = node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: staging.clone(),
                ..Default::default()
            })
            .await;
        r.case(&format!("stats {show:?}"), res, &[inv(Code::NotFound)])
            .await;
    }
    // Node ids never name a file either.
    let mut nodes = vec![
        "..".to_string(),
        "../meta/volumes/x".to_string(),
        "a/b".to_string(),
        "nul\u{0}".to_string(),
        ".hidden".to_string(),
        "n".repeat(129),
        "n".repeat(MIB_TEXT),
    ];
    nodes.push(String::new());
    for n in &nodes {
        let want = if n.is_empty() {
            Code::InvalidArgument
        } else {
            Code::NotFound
        };
        let res = ctl
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: real.clone(),
                node_id: n.clone(),
                volume_capability: Some(cap.clone()),
                secrets: secrets(),
                ..Default::default()
            })
            .await;
        r.case(
            &format!("node id {:?}", blockcsi::error::clip(n, 48)),
            res,
            &[want],
        )
        .await;
        let res = ctl
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: real.clone(),
                node_id: n.clone(),
                secrets: secrets(),
            })
            .await;
        // An empty node id means "from every node"; the others are simply not attached.
        r.case(
            &format!("unpublish node id {:?}", blockcsi::error::clip(n, 48)),
            res,
            &[Code::Ok],
        )
        .await;
    }
    // The volume was unpublished from every node by the empty node id above: still intact.
    let res = ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: real.clone(),
        })
        .await;
    let v = r
        .case("real volume intact", res, &[Code::Ok])
        .await
        .unwrap();
    assert!(!v.status.unwrap().volume_condition.unwrap().abnormal);
    assert_eq!(r.sb.images().len(), 1);
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_and_symlinks_never_lead_outside() {
    let mut r = Run::new("paths-symlinks").await;
    let cap = mount_cap("ext4");
    let bcap = block_cap();
    let id = r.volume("fsvol", &cap).await;
    let bid = r.volume("blockvol", &bcap).await;
    let staging = r.sb.dir("staging");
    let bstaging = r.sb.dir("bstaging");
    let pods = r.sb.dir("pods");
    let mut node = r.c.node.clone();
    let stage_req = |vid: &str, path: &str, c: &pb::VolumeCapability| pb::NodeStageVolumeRequest {
        volume_id: vid.to_string(),
        staging_target_path: path.to_string(),
        volume_capability: Some(c.clone()),
        secrets: secrets(),
        ..Default::default()
    };
    let publish_req = |vid: &str, st: &str, target: &str, c: &pb::VolumeCapability| {
        pb::NodePublishVolumeRequest {
            volume_id: vid.to_string(),
            staging_target_path: st.to_string(),
            target_path: target.to_string(),
            volume_capability: Some(c.clone()),
            secrets: secrets(),
            ..Default::default()
        }
    };

    // Malformed paths on every node RPC that takes one.
    for p in bad_paths(&r.sb) {
        let show = blockcsi::error::clip(&p, 48).into_owned();
        let res = node.node_stage_volume(stage_req(&id, &p, &cap)).await;
        r.case(&format!("stage at {show:?}"), res, &[Code::InvalidArgument])
            .await;
        let res = node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: p.clone(),
            })
            .await;
        r.case(
            &format!("unstage at {show:?}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
        let res = node
            .node_publish_volume(publish_req(&id, &staging, &p, &cap))
            .await;
        r.case(
            &format!("publish to {show:?}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
        let res = node
            .node_publish_volume(publish_req(&id, &p, &format!("{pods}/t"), &cap))
            .await;
        r.case(
            &format!("publish from {show:?}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
        let res = node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: p.clone(),
            })
            .await;
        r.case(
            &format!("unpublish {show:?}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
        let res = node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: p.clone(),
                ..Default::default()
            })
            .await;
        r.case(&format!("stats {show:?}"), res, &[Code::NotFound])
            .await;
    }
    let res = node.node_stage_volume(stage_req(&id, "", &cap)).await;
    r.case("stage without a path", res, &[Code::InvalidArgument])
        .await;

    // Symbolic links: at the path itself, above it, dangling, to a directory or a file outside.
    let to_dir = link(&r.sb, "link-dir", &r.out("dir"));
    let to_empty = link(&r.sb, "link-empty", &r.out("empty"));
    let to_file = link(&r.sb, "link-file", &r.out("file"));
    let dangling = link(&r.sb, "link-dangling", &r.out("missing"));
    let above = link(&r.sb, "link-parent", r.outside.path());
    let under_link = format!("{above}/empty");
    let new_under_link = format!("{above}/new");
    for p in [&to_dir, &to_empty, &dangling, &under_link, &new_under_link] {
        let res = node.node_stage_volume(stage_req(&id, p, &cap)).await;
        r.case(
            &format!("stage at symlink {p}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
        let res = node.node_stage_volume(stage_req(&bid, p, &bcap)).await;
        r.case(
            &format!("block stage at symlink {p}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
        let res = node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: p.clone(),
            })
            .await;
        r.case(
            &format!("unstage at symlink {p}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
    }
    assert!(
        r.sb.loops().is_empty(),
        "a refused stage left a device: {:?}",
        r.sb.loops()
    );

    // Now really staged, then publish to links.
    r.c.stage(&id, &staging, &cap).await.unwrap();
    r.c.stage(&bid, &bstaging, &bcap).await.unwrap();
    for p in [
        &to_dir,
        &to_empty,
        &to_file,
        &dangling,
        &under_link,
        &new_under_link,
    ] {
        let res = node
            .node_publish_volume(publish_req(&id, &staging, p, &cap))
            .await;
        r.case(
            &format!("publish to symlink {p}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
        let res = node
            .node_publish_volume(publish_req(&bid, &bstaging, p, &bcap))
            .await;
        r.case(
            &format!("block publish to symlink {p}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
        let res = node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: p.clone(),
            })
            .await;
        r.case(
            &format!("unpublish symlink {p}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
    }
    // A staging path given through a link is refused even though it leads to the real one.
    let staging_link = link(&r.sb, "link-staging", Path::new(&staging));
    let res = node
        .node_publish_volume(publish_req(
            &id,
            &staging_link,
            &format!("{pods}/via-link"),
            &cap,
        ))
        .await;
    r.case(
        "publish from a symlinked staging path",
        res,
        &[Code::InvalidArgument],
    )
    .await;
    // Mount flags on stage are checked too.
    for f in [
        ["remount"],
        ["x-mount.mkdir"],
        ["context=system_u:object_r:etc_t:s0"],
    ] {
        let res = node
            .node_stage_volume(stage_req(&id, &staging, &cap_with("ext4", &f)))
            .await;
        r.case(
            &format!("stage with flags {f:?}"),
            res,
            &[Code::InvalidArgument],
        )
        .await;
    }
    // Unstaging with the wrong volume id leaves the real mount alone.
    let res = node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: bid.clone(),
            staging_target_path: staging.clone(),
        })
        .await;
    r.case(
        "unstage another volume's staging path",
        res,
        &[Code::FailedPrecondition],
    )
    .await;
    assert!(r.sb.mounts().contains(&staging));

    r.c.unstage(&id, &staging).await;
    r.c.unstage(&bid, &bstaging).await;
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wiped_filesystem_is_reported_abnormal() {
    let mut r = Run::new("volume-condition").await;
    let cap = mount_cap("ext4");
    let staging = r.sb.dir("staging");
    let target = format!("{}/t", r.sb.dir("pods"));
    let id = r.volume("wiped", &cap).await;
    r.c.stage(&id, &staging, &cap).await.unwrap();
    r.c.publish(&id, &staging, &target, &cap).await.unwrap();
    write_synced(&Path::new(&target).join("precious"), &[9u8; 4096]);
    let mut node = r.c.node.clone();
    let mut ctl = r.c.controller.clone();
    let stats = |vid: &str, path: &str| pb::NodeGetVolumeStatsRequest {
        volume_id: vid.to_string(),
        volume_path: path.to_string(),
        ..Default::default()
    };
    let res = node.node_get_volume_stats(stats(&id, &target)).await;
    let s = r.case("healthy stats", res, &[Code::Ok]).await.unwrap();
    assert!(!s.volume_condition.unwrap().abnormal);
    r.c.unpublish(&id, &target).await;
    r.c.unstage(&id, &staging).await;

    // Destroy the superblock magic under the data.
    let image = image_of(&r.sb, &id);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&[0, 0], 1024 + 0x38).unwrap();
        f.sync_all().unwrap();
    }
    let res = ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await;
    let v = r
        .case("get volume after wipe", res, &[Code::Ok])
        .await
        .unwrap();
    let cond = v.status.unwrap().volume_condition.unwrap();
    assert!(
        cond.abnormal && cond.message.contains("data may be at risk"),
        "{cond:?}"
    );
    let res = ctl.list_volumes(pb::ListVolumesRequest::default()).await;
    let l = r.case("list after wipe", res, &[Code::Ok]).await.unwrap();
    let cond = l.entries[0]
        .status
        .clone()
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(cond.abnormal, "{cond:?}");
    let res = node
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            secrets: secrets(),
            ..Default::default()
        })
        .await;
    r.case("stage after wipe", res, &[Code::FailedPrecondition])
        .await;
    assert!(r.sb.loops().is_empty() && r.sb.mounts().is_empty());
    r.finish().await;
}
