//! The Controller service adapter: request validation and reply shaping around `controller`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{run_async, to_i64, to_u64};
use crate::controller::{check_fits, Controller, CreateRequest, Segments};
use crate::csi::validate;
use crate::error::Error;
use crate::pb;
use crate::pb::controller_service_capability::rpc::Type as Rpc;
use crate::storage::provider::Features;
use crate::storage::{Health, NewVolume, Provisioning, Snapshot, Timestamp, Volume, VolumeSource};

/// The controller RPCs the backend serves; csi-sanity runs the tests each one gates.
pub(crate) fn capabilities(f: Features) -> Vec<Rpc> {
    let mut caps = vec![Rpc::CreateDeleteVolume, Rpc::SingleNodeMultiWriter];
    let optional = [
        (f.publish, Rpc::PublishUnpublishVolume),
        (f.publish, Rpc::PublishReadonly),
        (f.list_volumes, Rpc::ListVolumes),
        (f.list_volumes && f.publish, Rpc::ListVolumesPublishedNodes),
        (f.capacity, Rpc::GetCapacity),
        (f.get_volume, Rpc::GetVolume),
        (f.get_volume, Rpc::VolumeCondition),
        (f.snapshots, Rpc::CreateDeleteSnapshot),
        (f.list_snapshots, Rpc::ListSnapshots),
        (f.snapshots, Rpc::GetSnapshot),
        (f.clone, Rpc::CloneVolume),
        (f.expand, Rpc::ExpandVolume),
        (f.modify, Rpc::ModifyVolume),
    ];
    caps.extend(
        optional
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, rpc)| rpc),
    );
    caps
}

/// An optional RPC the backend does not serve.
fn unsupported(what: &str) -> Error {
    Error::Unimplemented(format!("{what} is not supported by this backend"))
}

pub struct ControllerService {
    pub controller: Arc<Controller>,
}

fn topology(t: &pb::Topology) -> Segments {
    t.segments
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn content_source(src: &VolumeSource) -> pb::VolumeContentSource {
    use pb::volume_content_source::{SnapshotSource, Type, VolumeSource as PbVolume};
    pb::VolumeContentSource {
        r#type: Some(match src {
            VolumeSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            VolumeSource::Volume(id) => Type::Volume(PbVolume {
                volume_id: id.clone(),
            }),
        }),
    }
}

fn source_of(src: Option<&pb::VolumeContentSource>) -> Result<Option<VolumeSource>, Error> {
    use pb::volume_content_source::Type;
    match src.and_then(|s| s.r#type.as_ref()) {
        None => Ok(None),
        Some(Type::Snapshot(s)) => Ok(Some(VolumeSource::Snapshot(
            validate::required(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?
                .to_string(),
        ))),
        Some(Type::Volume(v)) => Ok(Some(VolumeSource::Volume(
            validate::required(&v.volume_id, "volume_content_source.volume.volume_id")?.to_string(),
        ))),
    }
}

pub(crate) fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.seconds,
        nanos: t.nanos,
    }
}

pub(crate) fn wire_snapshot(s: &Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: to_i64(s.size_bytes),
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(timestamp(s.created)),
        // Copies are complete before the record exists: a listed snapshot is always usable.
        ready_to_use: true,
        group_snapshot_id: s.group_id.clone().unwrap_or_default(),
    }
}

fn wire_volume(c: &Controller, v: &Volume) -> pb::Volume {
    pb::Volume {
        capacity_bytes: to_i64(v.capacity_bytes),
        volume_id: v.id.clone(),
        volume_context: Default::default(),
        content_source: v.source.as_ref().map(content_source),
        accessible_topology: c
            .topology_of(v)
            .into_iter()
            .map(|segments| pb::Topology {
                segments: segments.into_iter().collect(),
            })
            .collect(),
    }
}

fn condition(h: &Health) -> pb::VolumeCondition {
    pb::VolumeCondition {
        abnormal: h.abnormal,
        message: h.message.clone(),
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        let name = r.name.clone();
        let new_id = |v: &pb::CreateVolumeResponse| v.volume.as_ref().map(|v| v.volume_id.clone());
        super::run_create("CreateVolume", "", Some(&name), new_id, async move {
            let name = validate::name(&r.name)?.to_string();
            let capabilities = validate::capabilities(&r.volume_capabilities)?;
            let source = source_of(r.volume_content_source.as_ref())?;
            let range = r.capacity_range.unwrap_or_default();
            let parameters = validate::create_parameters(&r.parameters)?;
            // A mutable parameter wins over the StorageClass parameter of the same name.
            let provisioning = validate::mutable_parameters(&r.mutable_parameters)?
                .or_else(|| {
                    parameters
                        .get(validate::PROVISIONING_KEY)
                        .and_then(|p| Provisioning::parse(p))
                })
                .unwrap_or_default();
            let reqs = r.accessibility_requirements.unwrap_or_default();
            let volume = c
                .create_volume(CreateRequest {
                    volume: NewVolume {
                        name,
                        required_bytes: to_u64(range.required_bytes, "required_bytes")?,
                        limit_bytes: to_u64(range.limit_bytes, "limit_bytes")?,
                        min_bytes: 0,
                        capabilities,
                        parameters,
                        source,
                        provisioning,
                    },
                    requisite: reqs.requisite.iter().map(topology).collect(),
                    preferred: reqs.preferred.iter().map(topology).collect(),
                })
                .await?;
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
        run_async("DeleteVolume", &id, async move {
            validate::required(&r.volume_id, "volume_id")?;
            c.delete_volume(&r.volume_id).await?;
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
        run_async("ControllerPublishVolume", &id, async move {
            validate::required(&r.volume_id, "volume_id")?;
            validate::required(&r.node_id, "node_id")?;
            let cap = validate::capability(r.volume_capability.as_ref())?;
            if !c.features().publish {
                return Err(unsupported("ControllerPublishVolume"));
            }
            let context = c.publish(&r.volume_id, &r.node_id, cap, r.readonly).await?;
            Ok(pb::ControllerPublishVolumeResponse {
                publish_context: context.to_map(),
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
        run_async("ControllerUnpublishVolume", &id, async move {
            validate::required(&r.volume_id, "volume_id")?;
            c.unpublish(&r.volume_id, &r.node_id).await?;
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
        run_async("ValidateVolumeCapabilities", &id, async move {
            validate::required(&r.volume_id, "volume_id")?;
            if r.volume_capabilities.is_empty() {
                return Err(Error::InvalidArgument(
                    "volume_capabilities is required".into(),
                ));
            }
            let (volume, _) = c.volume(&r.volume_id).await?;
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
        run_async("ListVolumes", "", async move {
            let max = usize::try_from(r.max_entries)
                .map_err(|_| Error::InvalidArgument("max_entries must not be negative".into()))?;
            if !c.features().list_volumes {
                return Err(unsupported("ListVolumes"));
            }
            let page = c.list_volumes(max, &r.starting_token).await?;
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
        run_async("GetCapacity", "", async move {
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
            if !c.features().capacity {
                return Err(unsupported("GetCapacity"));
            }
            let cap = c.capacity(topo.as_ref()).await?;
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
        let capabilities = capabilities(self.controller.features())
            .into_iter()
            .map(|t| pb::ControllerServiceCapability {
                r#type: Some(pb::controller_service_capability::Type::Rpc(
                    pb::controller_service_capability::Rpc { r#type: t as i32 },
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
        run_async("ControllerGetVolume", &id, async move {
            validate::required(&r.volume_id, "volume_id")?;
            let (v, h) = c.volume(&r.volume_id).await?;
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
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        let id = r.source_volume_id.clone();
        let name = r.name.clone();
        let new_id =
            |s: &pb::CreateSnapshotResponse| s.snapshot.as_ref().map(|s| s.snapshot_id.clone());
        super::run_create("CreateSnapshot", &id, Some(&name), new_id, async move {
            let name = validate::name(&r.name)?;
            validate::required(&r.source_volume_id, "source_volume_id")?;
            let mut unknown: Vec<&String> = r
                .parameters
                .keys()
                .filter(|k| !k.starts_with(validate::SIDECAR_PARAMETER_PREFIX))
                .collect();
            if !unknown.is_empty() {
                unknown.sort();
                return Err(Error::InvalidArgument(format!(
                    "unknown snapshot parameters: {unknown:?}"
                )));
            }
            let snap = c.create_snapshot(name, &r.source_volume_id).await?;
            Ok(pb::CreateSnapshotResponse {
                snapshot: Some(wire_snapshot(&snap)),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        run_async("DeleteSnapshot", "", async move {
            validate::required(&r.snapshot_id, "snapshot_id")?;
            c.delete_snapshot(&r.snapshot_id).await?;
            Ok(pb::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        run_async("ListSnapshots", "", async move {
            let max = usize::try_from(r.max_entries)
                .map_err(|_| Error::InvalidArgument("max_entries must not be negative".into()))?;
            if !c.features().list_snapshots {
                return Err(unsupported("ListSnapshots"));
            }
            let page = c
                .list_snapshots(max, &r.starting_token, &r.snapshot_id, &r.source_volume_id)
                .await?;
            Ok(pb::ListSnapshotsResponse {
                entries: page
                    .entries
                    .iter()
                    .map(|s| pb::list_snapshots_response::Entry {
                        snapshot: Some(wire_snapshot(s)),
                    })
                    .collect(),
                next_token: page.next_token,
            })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        req: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        run_async("GetSnapshot", "", async move {
            validate::required(&r.snapshot_id, "snapshot_id")?;
            let snap = c.snapshot(&r.snapshot_id).await?;
            Ok(pb::GetSnapshotResponse {
                snapshot: Some(wire_snapshot(&snap)),
            })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        let id = r.volume_id.clone();
        run_async("ControllerExpandVolume", &id, async move {
            validate::required(&r.volume_id, "volume_id")?;
            let range = r
                .capacity_range
                .ok_or_else(|| Error::InvalidArgument("capacity_range is required".into()))?;
            if let Some(cap) = r.volume_capability.as_ref() {
                validate::capability(Some(cap))?;
            }
            let (v, node_expansion_required) = c
                .expand(
                    &r.volume_id,
                    to_u64(range.required_bytes, "required_bytes")?,
                    to_u64(range.limit_bytes, "limit_bytes")?,
                )
                .await?;
            Ok(pb::ControllerExpandVolumeResponse {
                capacity_bytes: to_i64(v.capacity_bytes),
                node_expansion_required,
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        req: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        let id = r.volume_id.clone();
        run_async("ControllerModifyVolume", &id, async move {
            validate::required(&r.volume_id, "volume_id")?;
            let provisioning = validate::mutable_parameters(&r.mutable_parameters)?;
            c.modify(&r.volume_id, provisioning).await?;
            Ok(pb::ControllerModifyVolumeResponse {})
        })
        .await
    }
}
