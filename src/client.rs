//! A tonic channel to a CSI Unix socket: used by the health check, the operator tools and the
//! tests, so each of them dials the driver the same way.

use std::path::Path;

use tonic::transport::Channel;

/// Connects to a CSI Unix socket. The URI is a placeholder: the connector ignores it.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}
