//! The Node service adapter: request validation and reply shaping around `node`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{run, to_i64};
use crate::csi::validate;
use crate::node::{NodeService, PublishRequest, StageRequest, Usage};
use crate::pb;
use crate::pb::node_service_capability::rpc::Type as Rpc;
use crate::storage::contract::{ContextError, PublishContext};

const CAPABILITIES: &[Rpc] = &[
    Rpc::StageUnstageVolume,
    Rpc::GetVolumeStats,
    Rpc::VolumeCondition,
    Rpc::SingleNodeMultiWriter,
    Rpc::ExpandVolume,
];

pub struct NodeAdapter {
    pub node: Arc<NodeService>,
}

fn usage(unit: pb::volume_usage::Unit, total: u64, available: u64, used: u64) -> pb::VolumeUsage {
    pb::VolumeUsage {
        available: to_i64(available),
        total: to_i64(total),
        used: to_i64(used),
        unit: unit as i32,
    }
}

/// The publish context of a node request: a layout this node does not know is a precondition
/// (upgrade the node), a malformed key a bad argument.
fn publish_context(
    m: &std::collections::HashMap<String, String>,
) -> crate::error::Result<Option<PublishContext>> {
    PublishContext::parse(m).map_err(|e| match e {
        ContextError::Version(_) => crate::error::Error::FailedPrecondition(e.to_string()),
        ContextError::Invalid { .. } => crate::error::Error::InvalidArgument(e.to_string()),
    })
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeAdapter {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let n = self.node.clone();
        let id = r.volume_id.clone();
        run("NodeStageVolume", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            let staging_path = validate::path(&r.staging_target_path, "staging_target_path")?;
            let capability = validate::capability(r.volume_capability.as_ref())?;
            let context = publish_context(&r.publish_context)?;
            n.stage(&StageRequest {
                volume_id: r.volume_id,
                staging_path,
                capability,
                context,
            })?;
            Ok(pb::NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let n = self.node.clone();
        let id = r.volume_id.clone();
        run("NodeUnstageVolume", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            let staging_path = validate::path(&r.staging_target_path, "staging_target_path")?;
            n.unstage(&r.volume_id, &staging_path)?;
            Ok(pb::NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let n = self.node.clone();
        let id = r.volume_id.clone();
        run("NodePublishVolume", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            let target = validate::path(&r.target_path, "target_path")?;
            let capability = validate::capability(r.volume_capability.as_ref())?;
            let staging_path = validate::path(&r.staging_target_path, "staging_target_path")?;
            let context = publish_context(&r.publish_context)?;
            n.publish(&PublishRequest {
                volume_id: r.volume_id,
                staging_path,
                target,
                capability,
                read_only: r.readonly,
                context,
            })?;
            Ok(pb::NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let n = self.node.clone();
        let id = r.volume_id.clone();
        run("NodeUnpublishVolume", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            let target = validate::path(&r.target_path, "target_path")?;
            n.unpublish(&r.volume_id, &target)?;
            Ok(pb::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let n = self.node.clone();
        let id = r.volume_id.clone();
        run("NodeGetVolumeStats", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            validate::required(&r.volume_path, "volume_path")?;
            let (u, health) = n.stats(&r.volume_id, &r.volume_path)?;
            use pb::volume_usage::Unit;
            let usage = match u {
                Usage::Filesystem(s) => vec![
                    usage(Unit::Bytes, s.total_bytes, s.available_bytes, s.used_bytes),
                    usage(Unit::Inodes, s.total_inodes, s.free_inodes, s.used_inodes),
                ],
                Usage::Block { total_bytes } => vec![pb::VolumeUsage {
                    total: to_i64(total_bytes),
                    unit: Unit::Bytes as i32,
                    ..Default::default()
                }],
            };
            Ok(pb::NodeGetVolumeStatsResponse {
                usage,
                volume_condition: Some(pb::VolumeCondition {
                    abnormal: health.abnormal,
                    message: health.message,
                }),
            })
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let n = self.node.clone();
        let id = r.volume_id.clone();
        run("NodeExpandVolume", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            validate::required(&r.volume_path, "volume_path")?;
            if let Some(cap) = r.volume_capability.as_ref() {
                validate::capability(Some(cap))?;
            }
            let size = n.expand(&r.volume_id, &r.volume_path)?;
            Ok(pb::NodeExpandVolumeResponse {
                capacity_bytes: to_i64(size),
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| pb::NodeServiceCapability {
                r#type: Some(pb::node_service_capability::Type::Rpc(
                    pb::node_service_capability::Rpc { r#type: *t as i32 },
                )),
            })
            .collect();
        super::quick(
            "NodeGetCapabilities",
            Ok(pb::NodeGetCapabilitiesResponse { capabilities }),
        )
    }

    async fn node_get_info(
        &self,
        _req: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let info = self.node.info();
        super::quick(
            "NodeGetInfo",
            Ok(pb::NodeGetInfoResponse {
                node_id: info.id.clone(),
                max_volumes_per_node: to_i64(info.max_volumes),
                accessible_topology: Some(pb::Topology {
                    segments: info.segments.clone().into_iter().collect(),
                }),
            }),
        )
    }
}
