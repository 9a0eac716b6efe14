//! The GroupController service adapter: crash-consistent snapshots of several volumes at once.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::controller::{timestamp, wire_snapshot};
use super::run_async;
use crate::controller::Controller;
use crate::csi::validate;
use crate::error::Error;
use crate::pb;

pub struct GroupService {
    pub controller: Arc<Controller>,
}

fn wire_group(
    group: &crate::storage::GroupSnapshot,
    members: &[crate::storage::Snapshot],
) -> pb::VolumeGroupSnapshot {
    pb::VolumeGroupSnapshot {
        group_snapshot_id: group.id.clone(),
        snapshots: members.iter().map(wire_snapshot).collect(),
        creation_time: Some(timestamp(group.created)),
        ready_to_use: true,
    }
}

#[tonic::async_trait]
impl pb::group_controller_server::GroupController for GroupService {
    async fn group_controller_get_capabilities(
        &self,
        _req: Request<pb::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::GroupControllerGetCapabilitiesResponse>, Status> {
        use pb::group_controller_service_capability::{rpc::Type, Rpc, Type as CapType};
        super::quick(
            "GroupControllerGetCapabilities",
            Ok(pb::GroupControllerGetCapabilitiesResponse {
                capabilities: vec![pb::GroupControllerServiceCapability {
                    r#type: Some(CapType::Rpc(Rpc {
                        r#type: Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                    })),
                }],
            }),
        )
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<pb::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        run_async("CreateVolumeGroupSnapshot", "", async move {
            let name = validate::name(&r.name)?;
            if r.source_volume_ids.is_empty() {
                return Err(Error::InvalidArgument(
                    "source_volume_ids is required".into(),
                ));
            }
            for v in &r.source_volume_ids {
                validate::required(v, "source_volume_ids[]")?;
            }
            let group = c.create_group_snapshot(name, &r.source_volume_ids).await?;
            let (group, members) = c.group_snapshot(&group.id).await?;
            Ok(pb::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(wire_group(&group, &members)),
            })
        })
        .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<pb::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        run_async("DeleteVolumeGroupSnapshot", "", async move {
            validate::required(&r.group_snapshot_id, "group_snapshot_id")?;
            c.delete_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids)
                .await?;
            Ok(pb::DeleteVolumeGroupSnapshotResponse {})
        })
        .await
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<pb::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::GetVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        let c = self.controller.clone();
        run_async("GetVolumeGroupSnapshot", "", async move {
            validate::required(&r.group_snapshot_id, "group_snapshot_id")?;
            let (group, members) = c.group_snapshot(&r.group_snapshot_id).await?;
            Ok(pb::GetVolumeGroupSnapshotResponse {
                group_snapshot: Some(wire_group(&group, &members)),
            })
        })
        .await
    }
}
