//! The liveness check behind `GET /healthz`: dial our own CSI socket and call Probe, as a CO
//! would, so a driver whose socket vanished, whose server wedged or whose node lost its tools
//! is restarted. With kubelet registration on, the registration socket must exist too: kubelet
//! forgets a plugin whose socket is gone, and only a restart makes a new one.

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::pb;
use crate::pb::identity_client::IdentityClient;

/// How long connecting and Probe may take together. Kubelet's probe gives up after its own
/// timeout (3 s in the chart); answering a little sooner lets it see our reason.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(2500);

#[derive(Debug, Clone)]
pub struct Health {
    pub csi_socket: PathBuf,
    pub registration_socket: Option<PathBuf>,
    pub timeout: Duration,
}

impl Health {
    pub fn new(csi_socket: PathBuf, registration_socket: Option<PathBuf>) -> Health {
        Health {
            csi_socket,
            registration_socket,
            timeout: PROBE_TIMEOUT,
        }
    }

    /// `Ok` when healthy, else a one-line reason for the 503 body and the log.
    pub async fn check(&self) -> Result<(), String> {
        if let Some(reg) = &self.registration_socket {
            match std::fs::symlink_metadata(reg) {
                Ok(m) if m.file_type().is_socket() => {}
                Ok(_) => return Err(format!("{} is not a socket", reg.display())),
                Err(e) => return Err(format!("registration socket {}: {e}", reg.display())),
            }
        }
        match tokio::time::timeout(self.timeout, self.probe()).await {
            Ok(res) => res,
            Err(_) => Err(format!(
                "Probe did not answer within {} ms",
                self.timeout.as_millis()
            )),
        }
    }

    async fn probe(&self) -> Result<(), String> {
        let channel = crate::client::connect(&self.csi_socket)
            .await
            .map_err(|e| {
                format!(
                    "cannot reach {}: {}",
                    self.csi_socket.display(),
                    source_chain(&e)
                )
            })?;
        let reply = IdentityClient::new(channel)
            .probe(pb::ProbeRequest {})
            .await
            .map_err(|s| {
                format!(
                    "Probe failed: {}: {}",
                    crate::error::code_name(s.code()),
                    s.message()
                )
            })?
            .into_inner();
        // The spec: no `ready` field means ready.
        match reply.ready {
            Some(false) => Err("Probe: not ready".to_string()),
            _ => Ok(()),
        }
    }
}

/// A transport error's own text is only "transport error"; the cause (ENOENT, ECONNREFUSED)
/// is what tells an operator what is wrong.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::UnixListener;
    use tokio_stream::wrappers::UnixListenerStream;
    use tonic::{Request, Response, Status};

    /// What the fake's Probe answers: `ready`, or an error status with this code.
    type ProbeAnswer = Result<Option<bool>, tonic::Code>;

    /// An Identity server whose Probe answers what the test says.
    struct FakeIdentity {
        probe: ProbeAnswer,
    }

    #[tonic::async_trait]
    impl pb::identity_server::Identity for FakeIdentity {
        async fn get_plugin_info(
            &self,
            _req: Request<pb::GetPluginInfoRequest>,
        ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn get_plugin_capabilities(
            &self,
            _req: Request<pb::GetPluginCapabilitiesRequest>,
        ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
            Err(Status::unimplemented(""))
        }
        async fn probe(
            &self,
            _req: Request<pb::ProbeRequest>,
        ) -> Result<Response<pb::ProbeResponse>, Status> {
            match self.probe {
                Ok(ready) => Ok(Response::new(pb::ProbeResponse { ready })),
                Err(code) => Err(Status::new(code, "loop control missing")),
            }
        }
    }

    fn serve_fake(socket: &std::path::Path, probe: ProbeAnswer) {
        let listener = UnixListener::bind(socket).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::identity_server::IdentityServer::new(FakeIdentity {
                    probe,
                }))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
    }

    #[tokio::test]
    async fn probe_outcomes_become_health() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, ProbeAnswer, Option<&str>)] = &[
            ("ready", Ok(Some(true)), None),
            ("silent", Ok(None), None),
            ("unready", Ok(Some(false)), Some("not ready")),
            (
                "failing",
                Err(tonic::Code::FailedPrecondition),
                Some("FAILED_PRECONDITION: loop control missing"),
            ),
        ];
        for (name, probe, want) in cases {
            let socket = dir.path().join(format!("{name}.sock"));
            serve_fake(&socket, *probe);
            let got = Health::new(socket, None).check().await;
            match (got, want) {
                (Ok(()), None) => {}
                (Err(reason), Some(want)) if reason.contains(want) => {}
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_missing_or_silent_socket_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Health::new(dir.path().join("none.sock"), None)
            .check()
            .await
            .unwrap_err();
        assert!(missing.contains("cannot reach"), "{missing}");
        assert!(missing.contains("No such file"), "{missing}");

        // A socket that accepts and then never speaks: a wedged server.
        let socket = dir.path().join("silent.sock");
        let listener = Arc::new(UnixListener::bind(&socket).unwrap());
        let held = listener.clone();
        let accepted = tokio::spawn(async move {
            let mut streams = Vec::new();
            while let Ok((s, _)) = held.accept().await {
                streams.push(s);
            }
        });
        let health = Health {
            timeout: Duration::from_millis(300),
            ..Health::new(socket, None)
        };
        let started = std::time::Instant::now();
        let reason = health.check().await.unwrap_err();
        assert!(reason.contains("within 300 ms"), "{reason}");
        assert!(started.elapsed() < Duration::from_secs(2));
        accepted.abort();
    }

    #[tokio::test]
    async fn a_vanished_registration_socket_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let csi = dir.path().join("csi.sock");
        serve_fake(&csi, Ok(Some(true)));
        let reg = dir.path().join("reg.sock");
        let health = Health::new(csi, Some(reg.clone()));
        let reason = health.check().await.unwrap_err();
        assert!(reason.contains("registration socket"), "{reason}");
        let _listener = std::os::unix::net::UnixListener::bind(&reg).unwrap();
        assert_eq!(health.check().await, Ok(()));
        std::fs::remove_file(&reg).unwrap();
        std::fs::write(&reg, b"").unwrap();
        let reason = health.check().await.unwrap_err();
        assert!(reason.contains("is not a socket"), "{reason}");
    }
}
