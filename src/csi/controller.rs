//! The Controller service adapter: request validation and reply shaping around `controller`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{run, to_i64, to_u64};
use crate::backend::{Health, NewVolume, Volume};
use crate::controller::{check_fits, Controller, CreateRequest, Segments};
use crate::error::Error;
use crate::pb;
use crate::pb::controller_service_capability::rpc::Type as Rpc;
use crate::validate;

/// The controller RPCs this driver implements; csi-sanity runs the tests each one gates.
const CAPABILITIES: &[Rpc] = &[
    Rpc::CreateDeleteVolume,
    Rpc::PublishUnpublishVolume,
    Rpc::ListVolumes,
    Rpc::ListVolumesPublishedNodes,
    Rpc::GetCapacity,
    Rpc::GetVolume,
    Rpc::VolumeCondition,
    Rpc::SingleNodeMultiWriter,
    Rpc::PublishReadonly,
];

pub struct ControllerService {
    pub controller: Arc<Controller>,
}

fn topology(t: &pb::Topology) -> Segments {
    t.segments
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn wire_volume(c: &Controller, v: &Volume) -> pb::Volume {
    pb::Volume {
        capacity_bytes: to_i64(v.capacity_bytes),
        volume_id: v.id.clone(),
        volume_context: Default::default(),
        content_source: None,
        accessible_topology: vec![pb::Topology {
            segments: c.topology().into_iter().collect(),
        }],
    }
}

fn condition(h: &Health) -> pb::VolumeCondition {
    pb::VolumeCondition {
        abnormal: h.abnormal,
        message: h.message.clone(),
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not supported by this driver"))
}

#[tonic::async_trait]
impl pb::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        run("CreateVolume", "", move || {
            let name = validate::name(&r.name)?.to_string();
            let capabilities = validate::capabilities(&r.volume_capabilities)?;
            if r.volume_content_source.is_some() {
                return Err(Error::InvalidArgument(
                    "volume_content_source is not supported yet".into(),
                ));
            }
            let range = r.capacity_range.unwrap_or_default();
            let parameters = validate::create_parameters(&r.parameters)?;
            if !r.mutable_parameters.is_empty() {
                return Err(Error::InvalidArgument(
                    "this driver has no mutable parameters".into(),
                ));
            }
            let reqs = r.accessibility_requirements.unwrap_or_default();
            let volume = c.create_volume(CreateRequest {
                volume: NewVolume {
                    name,
                    required_bytes: to_u64(range.required_bytes, "required_bytes")?,
                    limit_bytes: to_u64(range.limit_bytes, "limit_bytes")?,
                    min_bytes: 0,
                    capabilities,
                    parameters,
                },
                requisite: reqs.requisite.iter().map(topology).collect(),
                preferred: reqs.preferred.iter().map(topology).collect(),
            })?;
            Ok(pb::CreateVolumeResponse {
                volume: Some(wire_volume(&c, &volume)),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        let id = r.volume_id.clone();
        run("DeleteVolume", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            c.delete_volume(&r.volume_id)?;
            Ok(pb::DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        let id = r.volume_id.clone();
        run("ControllerPublishVolume", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            validate::required(&r.node_id, "node_id")?;
            let cap = validate::capability(r.volume_capability.as_ref())?;
            c.publish(&r.volume_id, &r.node_id, cap, r.readonly)?;
            Ok(pb::ControllerPublishVolumeResponse {
                publish_context: Default::default(),
            })
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        let id = r.volume_id.clone();
        run("ControllerUnpublishVolume", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            c.unpublish(&r.volume_id, &r.node_id)?;
            Ok(pb::ControllerUnpublishVolumeResponse {})
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        let id = r.volume_id.clone();
        run("ValidateVolumeCapabilities", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            if r.volume_capabilities.is_empty() {
                return Err(Error::InvalidArgument(
                    "volume_capabilities is required".into(),
                ));
            }
            let (volume, _) = c.volume(&r.volume_id)?;
            // A capability we cannot parse or serve is simply not confirmed.
            let ok = validate::capabilities(&r.volume_capabilities)
                .is_ok_and(|caps| caps.iter().all(|cap| check_fits(&volume, cap).is_ok()));
            let params_ok = validate::create_parameters(&r.parameters)
                .is_ok_and(|p| p == volume.parameters)
                && r.mutable_parameters.is_empty();
            if !(ok && params_ok) {
                return Ok(pb::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: "the volume cannot serve these capabilities or parameters".into(),
                });
            }
            Ok(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            })
        })
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        run("ListVolumes", "", move || {
            let max = usize::try_from(r.max_entries)
                .map_err(|_| Error::InvalidArgument("max_entries must not be negative".into()))?;
            let page = c.list_volumes(max, &r.starting_token)?;
            let entries = page
                .entries
                .iter()
                .map(|(v, h)| pb::list_volumes_response::Entry {
                    volume: Some(wire_volume(&c, v)),
                    status: Some(pb::list_volumes_response::VolumeStatus {
                        published_node_ids: v.attachments.keys().cloned().collect(),
                        volume_condition: Some(condition(h)),
                    }),
                })
                .collect();
            Ok(pb::ListVolumesResponse {
                entries,
                next_token: page.next_token,
            })
        })
        .await
    }

    async fn get_capacity(
        &self,
        req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        run("GetCapacity", "", move || {
            validate::capabilities(&r.volume_capabilities).or_else(|e| {
                // Capabilities are optional here; only present ones are checked.
                if r.volume_capabilities.is_empty() {
                    Ok(vec![])
                } else {
                    Err(e)
                }
            })?;
            validate::create_parameters(&r.parameters)?;
            let topo = r.accessible_topology.as_ref().map(topology);
            let cap = c.capacity(topo.as_ref())?;
            Ok(pb::GetCapacityResponse {
                available_capacity: to_i64(cap.available_bytes),
                maximum_volume_size: Some(to_i64(cap.max_volume_bytes)),
                minimum_volume_size: Some(to_i64(cap.min_volume_bytes)),
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| pb::ControllerServiceCapability {
                r#type: Some(pb::controller_service_capability::Type::Rpc(
                    pb::controller_service_capability::Rpc { r#type: *t as i32 },
                )),
            })
            .collect();
        super::quick(
            "ControllerGetCapabilities",
            Ok(pb::ControllerGetCapabilitiesResponse { capabilities }),
        )
    }

    async fn controller_get_volume(
        &self,
        req: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        let id = r.volume_id.clone();
        run("ControllerGetVolume", &id, move || {
            validate::required(&r.volume_id, "volume_id")?;
            let (v, h) = c.volume(&r.volume_id)?;
            Ok(pb::ControllerGetVolumeResponse {
                volume: Some(wire_volume(&c, &v)),
                status: Some(pb::controller_get_volume_response::VolumeStatus {
                    published_node_ids: v.attachments.keys().cloned().collect(),
                    volume_condition: Some(condition(&h)),
                }),
            })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        _req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        Err(unimplemented("CreateSnapshot"))
    }

    async fn delete_snapshot(
        &self,
        _req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        Err(unimplemented("DeleteSnapshot"))
    }

    async fn list_snapshots(
        &self,
        _req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Err(unimplemented("ListSnapshots"))
    }

    async fn get_snapshot(
        &self,
        _req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        Err(unimplemented("GetSnapshot"))
    }

    async fn controller_expand_volume(
        &self,
        _req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        Err(unimplemented("ControllerExpandVolume"))
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        Err(unimplemented("ControllerModifyVolume"))
    }
}
