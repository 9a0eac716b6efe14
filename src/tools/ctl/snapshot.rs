//! `ctl snapshot`: one function per subcommand.

use serde_json::{json, Value};

use super::output::{done, table, Output};
use super::{rpc, Clients, CtlError, SnapshotCommand};
use crate::pb;
use crate::tools::human_bytes;

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": s.creation_time.as_ref().map(|t| t.seconds),
        "ready_to_use": s.ready_to_use,
    })
}

fn snapshot_row(s: &pb::Snapshot) -> Vec<String> {
    vec![
        s.snapshot_id.clone(),
        s.source_volume_id.to_string(),
        human_bytes(s.size_bytes),
        s.ready_to_use.to_string(),
    ]
}

const SNAPSHOT_HEADER: [&str; 4] = ["SNAPSHOT", "SOURCE VOLUME", "SIZE", "READY"];

pub(super) async fn run(c: &mut Clients, cmd: &SnapshotCommand) -> Result<Output, CtlError> {
    match cmd {
        SnapshotCommand::Create { name, volume } => create(c, name, volume).await,
        SnapshotCommand::List { volume } => list(c, volume).await,
        SnapshotCommand::Delete { snapshot_id } => delete(c, snapshot_id).await,
    }
}

/// CreateSnapshot.
async fn create(c: &mut Clients, name: &str, volume: &str) -> Result<Output, CtlError> {
    let s = c
        .controller
        .create_snapshot(pb::CreateSnapshotRequest {
            source_volume_id: volume.to_string(),
            name: name.to_string(),
            ..Default::default()
        })
        .await
        .map_err(rpc("CreateSnapshot"))?
        .into_inner()
        .snapshot
        .unwrap_or_default();
    Ok(Output::new(
        snapshot_json(&s),
        table(&SNAPSHOT_HEADER, &[snapshot_row(&s)]),
    ))
}

/// ListSnapshots, every page.
async fn list(c: &mut Clients, volume: &Option<String>) -> Result<Output, CtlError> {
    let mut snaps = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .controller
            .list_snapshots(pb::ListSnapshotsRequest {
                starting_token: token.clone(),
                source_volume_id: volume.clone().unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map_err(rpc("ListSnapshots"))?
            .into_inner();
        snaps.extend(r.entries.into_iter().filter_map(|e| e.snapshot));
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    Ok(Output::new(
        Value::Array(snaps.iter().map(snapshot_json).collect()),
        table(
            &SNAPSHOT_HEADER,
            &snaps.iter().map(snapshot_row).collect::<Vec<_>>(),
        ),
    ))
}

/// DeleteSnapshot.
async fn delete(c: &mut Clients, snapshot_id: &str) -> Result<Output, CtlError> {
    c.controller
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: snapshot_id.to_string(),
            ..Default::default()
        })
        .await
        .map_err(rpc("DeleteSnapshot"))?;
    done(
        json!({"snapshot_id": snapshot_id, "deleted": true}),
        format!("deleted {snapshot_id}"),
    )
}
