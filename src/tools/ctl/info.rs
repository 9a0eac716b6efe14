//! `ctl info`: what the driver behind the socket is: plugin, readiness, and which of the
//! Controller and Node services this process serves, with their capabilities.

use serde_json::json;
use tonic::Code;

use super::output::{segments, table, Output};
use super::{rpc, Clients, CtlError};
use crate::error::code_name;
use crate::pb;

/// Everything `ctl info` shows, gathered before it is printed.
struct Info {
    plugin: pb::GetPluginInfoResponse,
    plugin_caps: Vec<String>,
    ready: bool,
    /// Why Probe failed, when it did.
    probe_error: Option<String>,
    /// `None` when this process serves no Controller service.
    controller_caps: Option<Vec<String>>,
    /// `None` when this process serves no Node service.
    node: Option<(pb::NodeGetInfoResponse, Vec<String>)>,
}

pub(super) async fn info(c: &mut Clients) -> Result<Output, CtlError> {
    let plugin = c
        .identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .map_err(rpc("GetPluginInfo"))?
        .into_inner();
    let plugin_caps = plugin_capabilities(c).await?;
    let (ready, probe_error) = probe(c).await;
    let controller_caps = controller_capabilities(c).await?;
    let node = node(c).await?;
    let info = Info {
        plugin,
        plugin_caps,
        ready,
        probe_error,
        controller_caps,
        node,
    };
    Ok(Output::new(info_json(&info), table(&[], &info_rows(&info))))
}

async fn plugin_capabilities(c: &mut Clients) -> Result<Vec<String>, CtlError> {
    let caps = c
        .identity
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .map_err(rpc("GetPluginCapabilities"))?
        .into_inner();
    Ok(caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::plugin_capability::Type::Service(s)) => {
                pb::plugin_capability::service::Type::try_from(s.r#type)
                    .ok()
                    .map(|t| t.as_str_name().to_string())
            }
            Some(pb::plugin_capability::Type::VolumeExpansion(e)) => {
                pb::plugin_capability::volume_expansion::Type::try_from(e.r#type)
                    .ok()
                    .map(|t| format!("VOLUME_EXPANSION_{}", t.as_str_name()))
            }
            None => None,
        })
        .collect())
}

/// Readiness, and why Probe failed when it did.
async fn probe(c: &mut Clients) -> (bool, Option<String>) {
    // Probe's failure is an answer worth showing, not a reason to stop.
    match c.identity.probe(pb::ProbeRequest {}).await {
        Ok(r) => (r.into_inner().ready.unwrap_or(true), None),
        Err(s) => (
            false,
            Some(format!("{}: {}", code_name(s.code()), s.message())),
        ),
    }
}

async fn controller_capabilities(c: &mut Clients) -> Result<Option<Vec<String>>, CtlError> {
    // A node-mode driver serves no Controller service and a controller-mode one no Node
    // service: UNIMPLEMENTED there just means "not in this process".
    match c
        .controller
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
    {
        Ok(r) => Ok(Some(
            r.into_inner()
                .capabilities
                .iter()
                .filter_map(|c| match &c.r#type {
                    Some(pb::controller_service_capability::Type::Rpc(r)) => {
                        pb::controller_service_capability::rpc::Type::try_from(r.r#type)
                            .ok()
                            .map(|t| t.as_str_name().to_string())
                    }
                    None => None,
                })
                .collect::<Vec<_>>(),
        )),
        Err(s) if s.code() == Code::Unimplemented => Ok(None),
        Err(s) => Err(rpc("ControllerGetCapabilities")(s)),
    }
}

/// NodeGetInfo and the node capabilities; `None` when this process serves no Node service.
async fn node(c: &mut Clients) -> Result<Option<(pb::NodeGetInfoResponse, Vec<String>)>, CtlError> {
    let node_info = match c.node.node_get_info(pb::NodeGetInfoRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::Unimplemented => return Ok(None),
        Err(s) => return Err(rpc("NodeGetInfo")(s)),
    };
    let node_caps = c
        .node
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .map_err(rpc("NodeGetCapabilities"))?
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::node_service_capability::Type::Rpc(r)) => {
                pb::node_service_capability::rpc::Type::try_from(r.r#type)
                    .ok()
                    .map(|t| t.as_str_name().to_string())
            }
            None => None,
        })
        .collect::<Vec<_>>();
    Ok(Some((node_info, node_caps)))
}

fn info_json(i: &Info) -> serde_json::Value {
    let node_json = i.node.as_ref().map(|(n, _)| {
        json!({
            "node_id": n.node_id,
            "max_volumes_per_node": n.max_volumes_per_node,
            "topology": n.accessible_topology.as_ref().map(|t| &t.segments),
        })
    });
    json!({
        "name": i.plugin.name,
        "vendor_version": i.plugin.vendor_version,
        "manifest": i.plugin.manifest,
        "plugin_capabilities": i.plugin_caps,
        "ready": i.ready,
        "probe_error": i.probe_error,
        "controller_capabilities": i.controller_caps,
        "node": node_json,
        "node_capabilities": i.node.as_ref().map(|(_, caps)| caps),
    })
}

/// Key/value rows of the text form.
fn info_rows(i: &Info) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec!["name".to_string(), i.plugin.name.clone()],
        vec!["version".into(), i.plugin.vendor_version.clone()],
        vec!["plugin capabilities".into(), i.plugin_caps.join(", ")],
        vec![
            "ready".into(),
            match &i.probe_error {
                Some(e) => format!("no ({e})"),
                None => i.ready.to_string(),
            },
        ],
        vec![
            "controller capabilities".into(),
            i.controller_caps
                .as_ref()
                .map(|c| c.join(", "))
                .unwrap_or_else(|| "(no controller service here)".into()),
        ],
    ];
    match &i.node {
        Some((n, node_caps)) => {
            rows.push(vec!["node id".into(), n.node_id.clone()]);
            rows.push(vec![
                "max volumes per node".into(),
                match n.max_volumes_per_node {
                    0 => "no limit".to_string(),
                    m => m.to_string(),
                },
            ]);
            rows.push(vec![
                "node topology".into(),
                n.accessible_topology
                    .as_ref()
                    .map(|t| segments(&t.segments))
                    .unwrap_or_default(),
            ]);
            rows.push(vec!["node capabilities".into(), node_caps.join(", ")]);
        }
        None => rows.push(vec!["node".into(), "(no node service here)".into()]),
    }
    rows
}
