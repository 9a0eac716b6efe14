//! `ctl volume`: one function per subcommand, each one or two CSI calls.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::output::{done, segments, table, Output};
use super::{rpc, CapArgs, Clients, CtlError, VolumeCommand};
use crate::error::code_name;
use crate::pb;
use crate::tools::human_bytes;

fn volume_json(
    v: &pb::Volume,
    published: Option<&[String]>,
    cond: Option<&pb::VolumeCondition>,
) -> Value {
    let mut j = json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": v.volume_context,
        "accessible_topology": v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>(),
    });
    if let Some(src) = &v.content_source {
        j["content_source"] = match &src.r#type {
            Some(pb::volume_content_source::Type::Snapshot(s)) => {
                json!({"snapshot_id": s.snapshot_id})
            }
            Some(pb::volume_content_source::Type::Volume(s)) => json!({"volume_id": s.volume_id}),
            None => Value::Null,
        };
    }
    if let Some(p) = published {
        j["published_node_ids"] = json!(p);
    }
    if let Some(c) = cond {
        j["condition"] = json!({"abnormal": c.abnormal, "message": c.message});
    }
    j
}

fn volume_row(
    v: &pb::Volume,
    published: Option<&[String]>,
    cond: Option<&pb::VolumeCondition>,
) -> Vec<String> {
    vec![
        v.volume_id.to_string(),
        human_bytes(v.capacity_bytes),
        v.accessible_topology
            .iter()
            .map(|t| segments(&t.segments))
            .collect::<Vec<_>>()
            .join(" "),
        published.map(|p| p.join(",")).unwrap_or_default(),
        match cond {
            Some(c) if c.abnormal => format!("ABNORMAL: {}", c.message),
            Some(_) => "ok".into(),
            None => String::new(),
        },
    ]
}

const VOLUME_HEADER: [&str; 5] = ["VOLUME", "SIZE", "TOPOLOGY", "PUBLISHED ON", "CONDITION"];

/// The node to publish to: the one given, or the node of the driver we are talking to.
async fn node_id(c: &mut Clients, given: &Option<String>) -> Result<String, CtlError> {
    if let Some(n) = given {
        return Ok(n.clone());
    }
    match c.node.node_get_info(pb::NodeGetInfoRequest {}).await {
        Ok(r) => Ok(r.into_inner().node_id),
        Err(s) => Err(CtlError::Other(format!(
            "no --node given and the driver here serves no node ({}: {}); pass --node",
            code_name(s.code()),
            s.message()
        ))),
    }
}

fn path_str(p: &Path) -> Result<String, CtlError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| CtlError::Other(format!("{} is not UTF-8", p.display())))
}

/// An absolute form of a path given on the command line: the driver resolves paths in its own
/// working directory, not ours.
fn abs_path(p: &Path) -> Result<String, CtlError> {
    if p.is_absolute() {
        return path_str(p);
    }
    let cwd =
        std::env::current_dir().map_err(|e| CtlError::Other(format!("current directory: {e}")))?;
    path_str(&cwd.join(p))
}

pub(super) async fn run(c: &mut Clients, cmd: &VolumeCommand) -> Result<Output, CtlError> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            cap,
            params,
            from_snapshot,
            from_volume,
        } => create(c, name, *size, cap, params, from_snapshot, from_volume).await,
        VolumeCommand::List => list(c).await,
        VolumeCommand::Get { volume_id } => get(c, volume_id).await,
        VolumeCommand::Delete { volume_id } => delete(c, volume_id).await,
        VolumeCommand::Publish {
            volume_id,
            node,
            readonly,
            cap,
        } => publish(c, volume_id, node, *readonly, cap).await,
        VolumeCommand::Unpublish { volume_id, node } => unpublish(c, volume_id, node).await,
        VolumeCommand::Stage {
            volume_id,
            staging_path,
            cap,
        } => stage(c, volume_id, staging_path, cap).await,
        VolumeCommand::Unstage {
            volume_id,
            staging_path,
        } => unstage(c, volume_id, staging_path).await,
        VolumeCommand::Mount {
            volume_id,
            staging_path,
            target,
            readonly,
            cap,
        } => mount(c, volume_id, staging_path, target, *readonly, cap).await,
        VolumeCommand::Unmount { volume_id, target } => unmount(c, volume_id, target).await,
        VolumeCommand::Stats { volume_id, path } => stats(c, volume_id, path).await,
        VolumeCommand::Expand {
            volume_id,
            size,
            path,
            staging_path,
        } => expand(c, volume_id, *size, path, staging_path).await,
    }
}

/// CreateVolume.
async fn create(
    c: &mut Clients,
    name: &str,
    size: u64,
    cap: &CapArgs,
    params: &[(String, String)],
    from_snapshot: &Option<String>,
    from_volume: &Option<String>,
) -> Result<Output, CtlError> {
    use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let source = match (from_snapshot, from_volume) {
        (Some(s), _) => Some(Type::Snapshot(SnapshotSource {
            snapshot_id: s.clone(),
        })),
        (None, Some(v)) => Some(Type::Volume(VolumeSource {
            volume_id: v.clone(),
        })),
        (None, None) => None,
    };
    let v = c
        .controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.capability()],
            parameters: params.iter().cloned().collect(),
            volume_content_source: source.map(|t| pb::VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        })
        .await
        .map_err(rpc("CreateVolume"))?
        .into_inner()
        .volume
        .unwrap_or_default();
    Ok(Output::new(
        volume_json(&v, None, None),
        table(
            &VOLUME_HEADER[..3],
            &[volume_row(&v, None, None)[..3].to_vec()],
        ),
    ))
}

/// ListVolumes, every page.
async fn list(c: &mut Clients) -> Result<Output, CtlError> {
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .controller
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 0,
                starting_token: token.clone(),
            })
            .await
            .map_err(rpc("ListVolumes"))?
            .into_inner();
        entries.extend(r.entries);
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    let mut js = Vec::new();
    let mut rows = Vec::new();
    for e in &entries {
        let v = e.volume.clone().unwrap_or_default();
        let published = e.status.as_ref().map(|s| s.published_node_ids.as_slice());
        let cond = e.status.as_ref().and_then(|s| s.volume_condition.as_ref());
        js.push(volume_json(&v, published, cond));
        rows.push(volume_row(&v, published, cond));
    }
    Ok(Output::new(Value::Array(js), table(&VOLUME_HEADER, &rows)))
}

/// ControllerGetVolume.
async fn get(c: &mut Clients, volume_id: &str) -> Result<Output, CtlError> {
    let r = c
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: volume_id.to_string(),
        })
        .await
        .map_err(rpc("ControllerGetVolume"))?
        .into_inner();
    let v = r.volume.unwrap_or_default();
    let published = r.status.as_ref().map(|s| s.published_node_ids.as_slice());
    let cond = r.status.as_ref().and_then(|s| s.volume_condition.as_ref());
    Ok(Output::new(
        volume_json(&v, published, cond),
        table(&VOLUME_HEADER, &[volume_row(&v, published, cond)]),
    ))
}

/// DeleteVolume.
async fn delete(c: &mut Clients, volume_id: &str) -> Result<Output, CtlError> {
    c.controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: volume_id.to_string(),
            ..Default::default()
        })
        .await
        .map_err(rpc("DeleteVolume"))?;
    done(
        json!({"volume_id": volume_id, "deleted": true}),
        format!("deleted {volume_id}"),
    )
}

/// ControllerPublishVolume.
async fn publish(
    c: &mut Clients,
    volume_id: &str,
    node: &Option<String>,
    readonly: bool,
    cap: &CapArgs,
) -> Result<Output, CtlError> {
    let node = node_id(c, node).await?;
    let r = c
        .controller
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: volume_id.to_string(),
            node_id: node.clone(),
            volume_capability: Some(cap.capability()),
            readonly,
            ..Default::default()
        })
        .await
        .map_err(rpc("ControllerPublishVolume"))?
        .into_inner();
    done(
        json!({"volume_id": volume_id, "node_id": node, "publish_context": r.publish_context}),
        format!("published {volume_id} to node {node}"),
    )
}

/// ControllerUnpublishVolume.
async fn unpublish(
    c: &mut Clients,
    volume_id: &str,
    node: &Option<String>,
) -> Result<Output, CtlError> {
    let node = node_id(c, node).await?;
    c.controller
        .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.to_string(),
            node_id: node.clone(),
            ..Default::default()
        })
        .await
        .map_err(rpc("ControllerUnpublishVolume"))?;
    done(
        json!({"volume_id": volume_id, "node_id": node, "unpublished": true}),
        format!("unpublished {volume_id} from node {node}"),
    )
}

/// NodeStageVolume.
async fn stage(
    c: &mut Clients,
    volume_id: &str,
    staging_path: &Path,
    cap: &CapArgs,
) -> Result<Output, CtlError> {
    let staging = abs_path(staging_path)?;
    c.node
        .node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: volume_id.to_string(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.capability()),
            ..Default::default()
        })
        .await
        .map_err(rpc("NodeStageVolume"))?;
    done(
        json!({"volume_id": volume_id, "staging_path": staging, "staged": true}),
        format!("staged {volume_id} at {staging}"),
    )
}

/// NodeUnstageVolume.
async fn unstage(
    c: &mut Clients,
    volume_id: &str,
    staging_path: &Path,
) -> Result<Output, CtlError> {
    let staging = abs_path(staging_path)?;
    c.node
        .node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: volume_id.to_string(),
            staging_target_path: staging.clone(),
        })
        .await
        .map_err(rpc("NodeUnstageVolume"))?;
    done(
        json!({"volume_id": volume_id, "staging_path": staging, "unstaged": true}),
        format!("unstaged {volume_id} from {staging}"),
    )
}

/// NodePublishVolume.
async fn mount(
    c: &mut Clients,
    volume_id: &str,
    staging_path: &Path,
    target: &Path,
    readonly: bool,
    cap: &CapArgs,
) -> Result<Output, CtlError> {
    let staging = abs_path(staging_path)?;
    let target = abs_path(target)?;
    c.node
        .node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: volume_id.to_string(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap.capability()),
            readonly,
            ..Default::default()
        })
        .await
        .map_err(rpc("NodePublishVolume"))?;
    done(
        json!({"volume_id": volume_id, "staging_path": staging, "target": target, "mounted": true}),
        format!("mounted {volume_id} at {target}"),
    )
}

/// NodeUnpublishVolume.
async fn unmount(c: &mut Clients, volume_id: &str, target: &Path) -> Result<Output, CtlError> {
    let target = abs_path(target)?;
    c.node
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.to_string(),
            target_path: target.clone(),
        })
        .await
        .map_err(rpc("NodeUnpublishVolume"))?;
    done(
        json!({"volume_id": volume_id, "target": target, "unmounted": true}),
        format!("unmounted {volume_id} from {target}"),
    )
}

/// NodeGetVolumeStats.
async fn stats(c: &mut Clients, volume_id: &str, path: &Path) -> Result<Output, CtlError> {
    let path = abs_path(path)?;
    let r = c
        .node
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: volume_id.to_string(),
            volume_path: path.clone(),
            ..Default::default()
        })
        .await
        .map_err(rpc("NodeGetVolumeStats"))?
        .into_inner();
    let unit = |u: i32| match pb::volume_usage::Unit::try_from(u) {
        Ok(pb::volume_usage::Unit::Bytes) => "bytes",
        Ok(pb::volume_usage::Unit::Inodes) => "inodes",
        _ => "unknown",
    };
    let usage: Vec<Value> = r
        .usage
        .iter()
        .map(|u| json!({"unit": unit(u.unit), "total": u.total, "used": u.used, "available": u.available}))
        .collect();
    let rows: Vec<Vec<String>> = r
        .usage
        .iter()
        .map(|u| {
            let f = |n: i64| {
                if u.unit == pb::volume_usage::Unit::Bytes as i32 {
                    human_bytes(n)
                } else {
                    n.to_string()
                }
            };
            vec![
                unit(u.unit).to_string(),
                f(u.total),
                f(u.used),
                f(u.available),
            ]
        })
        .collect();
    let cond = r.volume_condition.as_ref();
    let mut text = table(&["UNIT", "TOTAL", "USED", "AVAILABLE"], &rows);
    if let Some(c) = cond {
        text.push_str(&format!(
            "condition: {}\n",
            if c.abnormal {
                format!("ABNORMAL: {}", c.message)
            } else {
                "ok".into()
            }
        ));
    }
    Ok(Output::new(
        json!({
            "volume_id": volume_id,
            "path": path,
            "usage": usage,
            "condition": cond.map(|c| json!({"abnormal": c.abnormal, "message": c.message})),
        }),
        text,
    ))
}

/// ControllerExpandVolume, then NodeExpandVolume when the node must act and `path` is given.
async fn expand(
    c: &mut Clients,
    volume_id: &str,
    size: u64,
    path: &Option<PathBuf>,
    staging_path: &Option<PathBuf>,
) -> Result<Output, CtlError> {
    let r = c
        .controller
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: volume_id.to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map_err(rpc("ControllerExpandVolume"))?
        .into_inner();
    let mut capacity = r.capacity_bytes;
    let mut node_expanded = false;
    if let (true, Some(p)) = (r.node_expansion_required, path) {
        let n = c
            .node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: volume_id.to_string(),
                volume_path: abs_path(p)?,
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: size as i64,
                    limit_bytes: 0,
                }),
                staging_target_path: staging_path
                    .as_deref()
                    .map(abs_path)
                    .transpose()?
                    .unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map_err(rpc("NodeExpandVolume"))?
            .into_inner();
        if n.capacity_bytes > 0 {
            capacity = n.capacity_bytes;
        }
        node_expanded = true;
    }
    let pending = r.node_expansion_required && !node_expanded;
    done(
        json!({
            "volume_id": volume_id,
            "capacity_bytes": capacity,
            "node_expansion_required": r.node_expansion_required,
            "node_expanded": node_expanded,
        }),
        format!(
            "expanded {volume_id} to {}{}",
            human_bytes(capacity),
            if pending {
                " (the node must still grow the filesystem: repeat with --path)"
            } else {
                ""
            }
        ),
    )
}
