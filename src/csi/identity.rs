//! The Identity service: who we are, what we offer, whether we are healthy.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::pb;
use crate::pb::plugin_capability::service::Type as ServiceType;

pub struct IdentityService {
    pub driver_name: String,
    pub controller: Option<Arc<crate::controller::Controller>>,
    /// What the backend serves: the plugin's capabilities in every mode (a node-mode process
    /// belongs to a plugin whose controller runs elsewhere).
    pub features: crate::storage::provider::Features,
    pub node: Option<Arc<crate::node::NodeService>>,
}

fn service(t: ServiceType) -> pb::PluginCapability {
    pb::PluginCapability {
        r#type: Some(pb::plugin_capability::Type::Service(
            pb::plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

impl IdentityService {
    async fn check(&self) -> crate::error::Result<()> {
        if let Some(c) = &self.controller {
            c.ready()
                .await
                .map_err(|e| Error::FailedPrecondition(format!("storage is not usable: {e}")))?;
        }
        if let Some(n) = &self.node {
            n.host()
                .check_ready()
                .map_err(|e| Error::FailedPrecondition(format!("node is not ready: {e}")))?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        super::quick(
            "GetPluginInfo",
            Ok(pb::GetPluginInfoResponse {
                name: self.driver_name.clone(),
                vendor_version: env!("CARGO_PKG_VERSION").to_string(),
                manifest: Default::default(),
            }),
        )
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        // Capabilities describe the plugin, not this process: a node-mode process belongs to a
        // plugin whose controller runs elsewhere, and csi-sanity in split mode reads the node
        // socket's answer to decide whether volumes must be ControllerPublished first.
        use pb::plugin_capability::volume_expansion::Type as Expansion;
        let expansion = |t: Expansion| pb::PluginCapability {
            r#type: Some(pb::plugin_capability::Type::VolumeExpansion(
                pb::plugin_capability::VolumeExpansion { r#type: t as i32 },
            )),
        };
        let f = self.features;
        let mut capabilities = vec![service(ServiceType::ControllerService)];
        if f.topology {
            capabilities.push(service(ServiceType::VolumeAccessibilityConstraints));
        }
        if f.group_snapshots {
            capabilities.push(service(ServiceType::GroupControllerService));
        }
        if f.expand {
            capabilities.push(expansion(Expansion::Online));
            capabilities.push(expansion(Expansion::Offline));
        }
        super::quick(
            "GetPluginCapabilities",
            Ok(pb::GetPluginCapabilitiesResponse { capabilities }),
        )
    }

    async fn probe(
        &self,
        _req: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        super::quick(
            "Probe",
            self.check()
                .await
                .map(|()| pb::ProbeResponse { ready: Some(true) }),
        )
    }
}
