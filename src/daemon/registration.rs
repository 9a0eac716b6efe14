//! Registration with kubelet: the `pluginregistration.Registration` service that kubelet's
//! plugin watcher calls on our socket in its plugin registry directory. It tells kubelet that a
//! CSI driver of this name lives at the host path of our CSI socket, and logs kubelet's
//! verdict. The socket itself is made and removed by `server.rs`, like the CSI socket.

use std::path::PathBuf;

use tonic::{Request, Response, Status};
use tracing::{error, info};

/// The generated messages and service of kubelet's plugin-registration API v1.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("pluginregistration");
}

/// The plugin kind kubelet hands CSI drivers to.
pub const CSI_PLUGIN: &str = "CSIPlugin";

/// The CSI versions we claim. Kubelet only checks that one of them is a 1.x it speaks; the
/// minor version of the spec is negotiated by capabilities, not here.
pub const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

pub struct RegistrationService {
    pub driver_name: String,
    /// The CSI socket as kubelet sees it on the host.
    pub kubelet_endpoint: PathBuf,
}

#[tonic::async_trait]
impl pb::registration_server::Registration for RegistrationService {
    async fn get_info(
        &self,
        _req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        // Kubelet asks again after every restart of either side; one line each is little.
        info!(
            method = "GetInfo",
            endpoint = %self.kubelet_endpoint.display(),
            "kubelet asked who we are"
        );
        Ok(Response::new(pb::PluginInfo {
            r#type: CSI_PLUGIN.to_string(),
            name: self.driver_name.clone(),
            // Config checked it is UTF-8.
            endpoint: self.kubelet_endpoint.to_string_lossy().into_owned(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        req: Request<pb::RegistrationStatus>,
    ) -> Result<Response<pb::RegistrationStatusResponse>, Status> {
        let status = req.into_inner();
        if status.plugin_registered {
            info!(
                method = "NotifyRegistrationStatus",
                driver = self.driver_name,
                "kubelet registered the driver"
            );
        } else {
            // Kubelet's text is shown as is: it names the check that failed (name clash,
            // unsupported version, NodeGetInfo error). Bounded, since it comes over a socket.
            let reason: String = status.error.chars().take(1024).collect();
            error!(
                method = "NotifyRegistrationStatus",
                driver = self.driver_name,
                error = reason,
                "kubelet refused to register the driver"
            );
        }
        Ok(Response::new(pb::RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::pb::registration_server::Registration;
    use super::*;

    #[tokio::test]
    async fn get_info_names_the_driver_and_the_host_endpoint() {
        let svc = RegistrationService {
            driver_name: "blockcsi.dev".into(),
            kubelet_endpoint: "/var/lib/kubelet/plugins/blockcsi.dev/csi.sock".into(),
        };
        let info = svc
            .get_info(Request::new(pb::InfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            info,
            pb::PluginInfo {
                r#type: "CSIPlugin".into(),
                name: "blockcsi.dev".into(),
                endpoint: "/var/lib/kubelet/plugins/blockcsi.dev/csi.sock".into(),
                supported_versions: vec!["1.0.0".into()],
            }
        );
        for registered in [true, false] {
            svc.notify_registration_status(Request::new(pb::RegistrationStatus {
                plugin_registered: registered,
                error: if registered { "" } else { "no" }.into(),
            }))
            .await
            .unwrap();
        }
    }
}
