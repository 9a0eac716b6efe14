//! Concurrency torture against the real binary: many parallel identical and conflicting calls.
//! Every answer must be OK, ABORTED or the code the spec names for the situation; the state
//! after the storm must be consistent (one volume per name, at most one loop device per image,
//! ListVolumes equal to the pool's records, nothing left after teardown); and nothing may hang:
//! every call and every test has a time bound. Each test prints how many calls the torture
//! tests have made so far.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use blockcsi::pb;
use common::*;
use tonic::Code;

const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const TEST_TIMEOUT: Duration = Duration::from_secs(300);

static CALLS: AtomicUsize = AtomicUsize::new(0);

/// One call with a deadline; a call that does not answer is a deadlock.
async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    CALLS.fetch_add(1, Ordering::Relaxed);
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"))
        .map(tonic::Response::into_inner)
}

fn allowed(what: &str, res: &Result<impl std::fmt::Debug, tonic::Status>, codes: &[Code]) {
    if let Err(s) = res {
        assert!(
            codes.contains(&s.code()),
            "{what}: {:?} ({}), allowed: OK {codes:?}",
            s.code(),
            s.message()
        );
    }
}

fn create_req(name: &str, bytes: i64, cap: &pb::VolumeCapability) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap.clone()],
        ..Default::default()
    }
}

async fn listed(c: &mut Client) -> BTreeSet<String> {
    c.controller
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect()
}

fn records(sb: &Sandbox) -> BTreeSet<String> {
    std::fs::read_dir(sb.pool().join("meta/volumes"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .collect()
}

/// Retries on ABORTED (another call on the same object in flight), as the sidecars do.
macro_rules! until_not_aborted {
    ($what:expr, $call:expr) => {{
        let mut tries = 0;
        loop {
            let res = bounded($what, $call).await;
            match &res {
                Err(s) if s.code() == Code::Aborted && tries < 1000 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                _ => break res,
            }
        }
    }};
}

/// The tests run in parallel and share the counter, so the line says "so far": the largest
/// number printed is the binary's total.
fn report(test: &str, _before: usize) {
    println!(
        "torture: {test}: passed; {} calls by all torture tests so far",
        CALLS.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_name_from_many_callers_makes_one_volume() {
    let before = CALLS.load(Ordering::Relaxed);
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let c = driver.client().await;
    let cap = mount_cap("ext4");
    tokio::time::timeout(TEST_TIMEOUT, async {
        for round in 0..5 {
            let name = format!("same-{round}");
            // Half ask for 8 MiB, half for 16 MiB: exactly one size can win.
            let tasks: Vec<_> = (0..16)
                .map(|i| {
                    let mut c = c.clone();
                    let req = create_req(&name, if i % 2 == 0 { 8 * MIB } else { 16 * MIB }, &cap);
                    tokio::spawn(async move {
                        let res =
                            until_not_aborted!("create", c.controller.create_volume(req.clone()));
                        allowed("create", &res, &[Code::AlreadyExists]);
                        res.ok().map(|r| {
                            let v = r.volume.unwrap();
                            (v.volume_id, v.capacity_bytes)
                        })
                    })
                })
                .collect();
            let mut won = BTreeSet::new();
            for t in tasks {
                if let Some(v) = t.await.unwrap() {
                    won.insert(v);
                }
            }
            assert_eq!(won.len(), 1, "one volume, one size: {won:?}");
        }
        let mut c = c.clone();
        let ids = listed(&mut c).await;
        assert_eq!(ids.len(), 5);
        assert_eq!(ids, records(&sb));
        assert_eq!(sb.images().len(), 5, "{:?}", sb.images());
        // Parallel deletes of the same volumes: all OK in the end, nothing left.
        let tasks: Vec<_> = ids
            .iter()
            .flat_map(|id| std::iter::repeat_n(id.clone(), 4))
            .map(|id| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    let res = until_not_aborted!(
                        "delete",
                        c.controller.delete_volume(pb::DeleteVolumeRequest {
                            volume_id: id.clone(),
                            ..Default::default()
                        })
                    );
                    allowed("delete", &res, &[]);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(listed(&mut c).await.is_empty());
    })
    .await
    .expect("deadlock: the test did not finish in time");
    assert!(driver.stop().success());
    sb.assert_no_leaks();
    report("one-name", before);
}

#[derive(Clone, Copy, Debug)]
enum NodeOp {
    Stage,
    Publish(usize),
    Unpublish(usize),
    Unstage,
    ControllerPublish,
    ControllerUnpublish,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stage_publish_unpublish_unstage_race_on_one_volume() {
    let before = CALLS.load(Ordering::Relaxed);
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    for (kind, cap) in [("fs", mount_cap("ext4")), ("block", block_cap())] {
        let id = c.create(&format!("race-{kind}"), 32 * MIB, &cap).await;
        c.controller_publish(&id, &cap).await;
        let staging = sb.dir(&format!("staging-{kind}"));
        let pods = sb.dir(&format!("pods-{kind}"));
        let targets: Vec<String> = (0..4).map(|i| format!("{pods}/t{i}")).collect();
        let ops: &[NodeOp] = &[
            NodeOp::Stage,
            NodeOp::Publish(0),
            NodeOp::Publish(1),
            NodeOp::Publish(2),
            NodeOp::Publish(3),
            NodeOp::Unpublish(0),
            NodeOp::Unpublish(1),
            NodeOp::Unpublish(2),
            NodeOp::Unpublish(3),
            NodeOp::Unstage,
            NodeOp::ControllerPublish,
            NodeOp::ControllerUnpublish,
        ];
        tokio::time::timeout(TEST_TIMEOUT, async {
            let tasks: Vec<_> = (0..8u64)
                .map(|t| {
                    let (mut c, cap, id, staging, targets) = (
                        c.clone(),
                        cap.clone(),
                        id.clone(),
                        staging.clone(),
                        targets.clone(),
                    );
                    tokio::spawn(async move {
                        let mut x = t * 7919 + 13;
                        for _ in 0..60 {
                            x = x
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let op = ops[((x >> 33) % ops.len() as u64) as usize];
                            let what = format!("{op:?}");
                            let target = |i: usize| targets[i].clone();
                            match op {
                                NodeOp::Stage => {
                                    let res = bounded(
                                        &what,
                                        c.node.node_stage_volume(pb::NodeStageVolumeRequest {
                                            volume_id: id.clone(),
                                            staging_target_path: staging.clone(),
                                            volume_capability: Some(cap.clone()),
                                            ..Default::default()
                                        }),
                                    )
                                    .await;
                                    // Not published to the node while a ControllerUnpublish won.
                                    allowed(
                                        &what,
                                        &res,
                                        &[Code::Aborted, Code::FailedPrecondition],
                                    );
                                }
                                NodeOp::Publish(i) => {
                                    let res = bounded(
                                        &what,
                                        c.node.node_publish_volume(pb::NodePublishVolumeRequest {
                                            volume_id: id.clone(),
                                            staging_target_path: staging.clone(),
                                            target_path: target(i),
                                            volume_capability: Some(cap.clone()),
                                            ..Default::default()
                                        }),
                                    )
                                    .await;
                                    allowed(
                                        &what,
                                        &res,
                                        &[Code::Aborted, Code::FailedPrecondition],
                                    );
                                }
                                NodeOp::Unpublish(i) => {
                                    let res = bounded(
                                        &what,
                                        c.node.node_unpublish_volume(
                                            pb::NodeUnpublishVolumeRequest {
                                                volume_id: id.clone(),
                                                target_path: target(i),
                                            },
                                        ),
                                    )
                                    .await;
                                    allowed(&what, &res, &[Code::Aborted]);
                                }
                                NodeOp::Unstage => {
                                    let res = bounded(
                                        &what,
                                        c.node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
                                            volume_id: id.clone(),
                                            staging_target_path: staging.clone(),
                                        }),
                                    )
                                    .await;
                                    // Still published somewhere: refused, nothing changed.
                                    allowed(
                                        &what,
                                        &res,
                                        &[Code::Aborted, Code::FailedPrecondition],
                                    );
                                }
                                NodeOp::ControllerPublish => {
                                    let res = bounded(
                                        &what,
                                        c.controller.controller_publish_volume(
                                            pb::ControllerPublishVolumeRequest {
                                                volume_id: id.clone(),
                                                node_id: NODE.into(),
                                                volume_capability: Some(cap.clone()),
                                                ..Default::default()
                                            },
                                        ),
                                    )
                                    .await;
                                    allowed(&what, &res, &[Code::Aborted]);
                                }
                                NodeOp::ControllerUnpublish => {
                                    let res = bounded(
                                        &what,
                                        c.controller.controller_unpublish_volume(
                                            pb::ControllerUnpublishVolumeRequest {
                                                volume_id: id.clone(),
                                                node_id: NODE.into(),
                                                ..Default::default()
                                            },
                                        ),
                                    )
                                    .await;
                                    allowed(&what, &res, &[Code::Aborted]);
                                }
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        })
        .await
        .expect("deadlock: the race did not finish in time");

        // Consistent after the storm: at most one device for the image, no stacked mounts.
        let image = image_of(&sb, &id).display().to_string();
        let devices: Vec<_> = sb
            .loops()
            .into_iter()
            .filter(|l| l.contains(&image))
            .collect();
        assert!(
            devices.len() <= 1,
            "{kind}: several devices for one image: {devices:?}"
        );
        let mounts = sb.mounts();
        for path in targets.iter().chain([&staging]) {
            let n = mounts.iter().filter(|m| *m == path).count();
            assert!(n <= 1, "{kind}: {n} mounts stacked at {path}");
        }
        // Teardown converges: unpublish everything, unstage, unpublish from the controller.
        for t in &targets {
            let res = until_not_aborted!(
                "unpublish",
                c.node
                    .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                        volume_id: id.clone(),
                        target_path: t.clone(),
                    })
            );
            allowed("teardown unpublish", &res, &[]);
            assert!(!std::path::Path::new(t).exists(), "{t} left behind");
        }
        c.unstage(&id, &staging).await;
        c.remove(&id).await;
        assert!(
            sb.loops().is_empty() && sb.mounts().is_empty(),
            "{kind}: leaked"
        );
    }
    assert!(listed(&mut c).await.is_empty() && records(&sb).is_empty());
    assert!(driver.stop().success());
    sb.assert_no_leaks();
    report("node-race", before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_during_stage_leaves_nothing() {
    let before = CALLS.load(Ordering::Relaxed);
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    let cap = mount_cap("ext4");
    let staging = sb.dir("staging");
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    tokio::time::timeout(TEST_TIMEOUT, async {
        for round in 0..12u64 {
            let id = c.create(&format!("dds-{round}"), 32 * MIB, &cap).await;
            c.controller_publish(&id, &cap).await;
            let stage = {
                let (mut c, id, staging, cap) =
                    (c.clone(), id.clone(), staging.clone(), cap.clone());
                tokio::spawn(async move {
                    bounded(
                        "stage",
                        c.node.node_stage_volume(pb::NodeStageVolumeRequest {
                            volume_id: id,
                            staging_target_path: staging,
                            volume_capability: Some(cap),
                            ..Default::default()
                        }),
                    )
                    .await
                })
            };
            let delete = {
                let (mut c, id) = (c.clone(), id.clone());
                tokio::spawn(async move {
                    // Stagger the delete across the phases of the stage.
                    tokio::time::sleep(Duration::from_millis(round * 8)).await;
                    let res = until_not_aborted!(
                        "controller unpublish",
                        c.controller.controller_unpublish_volume(
                            pb::ControllerUnpublishVolumeRequest {
                                volume_id: id.clone(),
                                node_id: NODE.into(),
                                ..Default::default()
                            }
                        )
                    );
                    allowed("controller unpublish", &res, &[]);
                    until_not_aborted!(
                        "delete",
                        c.controller.delete_volume(pb::DeleteVolumeRequest {
                            volume_id: id.clone(),
                            ..Default::default()
                        })
                    )
                })
            };
            let s = stage.await.unwrap();
            allowed(
                "stage racing a delete",
                &s,
                &[Code::Aborted, Code::FailedPrecondition, Code::NotFound],
            );
            let d = delete.await.unwrap();
            allowed("delete racing a stage", &d, &[]);
            let key = format!(
                "stage {}",
                s.as_ref()
                    .map(|_| "OK".to_string())
                    .unwrap_or_else(|e| format!("{:?}", e.code()))
            );
            *outcomes.entry(key).or_default() += 1;
            // Whatever the stage did, unstage cleans it up, even for a deleted volume.
            c.unstage(&id, &staging).await;
            assert!(sb.loops().is_empty(), "round {round}: {:?}", sb.loops());
            assert!(sb.mounts().is_empty(), "round {round}: {:?}", sb.mounts());
            assert_eq!(listed(&mut c).await, records(&sb));
            assert!(sb.images().is_empty(), "round {round}: {:?}", sb.images());
        }
    })
    .await
    .expect("deadlock: delete during stage did not finish in time");
    println!("torture: delete-during-stage outcomes: {outcomes:?}");
    assert!(driver.stop().success());
    sb.assert_no_leaks();
    report("delete-during-stage", before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_publishes_respect_the_attach_limit_and_format_slots() {
    let before = CALLS.load(Ordering::Relaxed);
    let sb = Sandbox::new();
    let driver = Driver::start_with(
        &sb,
        "all",
        &sb.socket(),
        3,
        &[("BLOCKCSI_MAX_CONCURRENT_FORMATS", "1")],
    );
    let mut c = driver.client().await;
    let cap = mount_cap("xfs");
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(c.create(&format!("limit-{i}"), 300 * MIB, &cap).await);
    }
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tasks: Vec<_> = ids
            .iter()
            .map(|id| {
                let (mut c, id, cap) = (c.clone(), id.clone(), cap.clone());
                tokio::spawn(async move {
                    let res = until_not_aborted!(
                        "publish",
                        c.controller.controller_publish_volume(
                            pb::ControllerPublishVolumeRequest {
                                volume_id: id.clone(),
                                node_id: NODE.into(),
                                volume_capability: Some(cap.clone()),
                                ..Default::default()
                            }
                        )
                    );
                    allowed("publish at the limit", &res, &[Code::ResourceExhausted]);
                    res.is_ok().then_some(id)
                })
            })
            .collect();
        let mut published = Vec::new();
        for t in tasks {
            published.extend(t.await.unwrap());
        }
        assert_eq!(
            published.len(),
            3,
            "exactly the node's limit: {published:?}"
        );
        // The published ones are staged at once: mkfs.xfs runs one at a time, all succeed.
        let tasks: Vec<_> = published
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let (mut c, id, cap, staging) = (
                    c.clone(),
                    id.clone(),
                    cap.clone(),
                    sb.dir(&format!("staging{i}")),
                );
                tokio::spawn(async move {
                    let res = bounded(
                        "stage",
                        c.node.node_stage_volume(pb::NodeStageVolumeRequest {
                            volume_id: id.clone(),
                            staging_target_path: staging.clone(),
                            volume_capability: Some(cap),
                            ..Default::default()
                        }),
                    )
                    .await;
                    allowed("stage under the format limit", &res, &[]);
                    (id, staging)
                })
            })
            .collect();
        for t in tasks {
            let (id, staging) = t.await.unwrap();
            c.unstage(&id, &staging).await;
        }
    })
    .await
    .expect("deadlock: publishes at the limit did not finish in time");
    let log = driver.log_text();
    assert!(
        log.contains("max_concurrent_formats=1"),
        "the limit was not applied"
    );
    for id in &ids {
        c.remove(id).await;
    }
    assert!(driver.stop().success());
    sb.assert_no_leaks();
    report("attach-limit-and-format-slots", before);
}
