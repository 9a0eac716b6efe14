//! The small HTTP/1.1 server behind `--metrics-address` and `--health-address`. One listener
//! serves the routes it was given (`/metrics`, `/healthz`), so equal addresses share a port;
//! anything else is 404. One request per connection: scrapers and kubelet's probes come
//! rarely, so keep-alive would only hold sockets and memory.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::daemon::health::Health;

/// What one listener answers.
#[derive(Debug, Default)]
pub struct Routes {
    /// `GET /metrics`; the registry must be enabled (`metrics::enable`).
    pub metrics: bool,
    /// `GET /healthz`.
    pub health: Option<Health>,
}

impl Routes {
    fn paths(&self) -> Vec<&'static str> {
        let mut paths = Vec::new();
        if self.metrics {
            paths.push("/metrics");
        }
        if self.health.is_some() {
            paths.push("/healthz");
        }
        paths
    }
}

/// The listeners the settings ask for: one per distinct address, so metrics and health on the
/// same `HOST:PORT` share a listener instead of failing with EADDRINUSE.
pub fn plan(metrics: Option<&str>, health: Option<(&str, Health)>) -> Vec<(String, Routes)> {
    let mut out: Vec<(String, Routes)> = Vec::new();
    if let Some(address) = metrics {
        out.push((
            address.to_string(),
            Routes {
                metrics: true,
                health: None,
            },
        ));
    }
    if let Some((address, check)) = health {
        match out.iter_mut().find(|(a, _)| a == address) {
            Some((_, routes)) => routes.health = Some(check),
            None => out.push((
                address.to_string(),
                Routes {
                    metrics: false,
                    health: Some(check),
                },
            )),
        }
    }
    out
}

/// Binds a listener; done before the CSI socket is served so a bad address fails the start-up
/// instead of leaving a driver without the endpoints it was asked for.
pub async fn bind(address: &str, routes: &Routes) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(address).await?;
    info!(address = %listener.local_addr()?, paths = ?routes.paths(), "serving HTTP");
    Ok(listener)
}

/// Serves `routes` until the task is aborted.
pub async fn serve(listener: TcpListener, routes: Routes) {
    let routes = Arc::new(routes);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let routes = routes.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &routes).await {
                        debug!(%peer, error = %e, "http connection");
                    }
                });
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!(error = %e, "http accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Longest request head accepted; a scrape's or a probe's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

async fn handle(mut stream: TcpStream, routes: &Routes) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if !complete {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"bad request\n",
            true,
        )
        .await;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let send_body = method != "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") if routes.metrics => {
            let body = tokio::task::spawn_blocking(crate::daemon::metrics::render)
                .await
                .unwrap_or_default();
            respond(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body.as_bytes(),
                send_body,
            )
            .await
        }
        ("GET" | "HEAD", "/healthz") if routes.health.is_some() => {
            let health = routes.health.as_ref().expect("matched on is_some");
            match health.check().await {
                Ok(()) => respond(&mut stream, "200 OK", "text/plain", b"ok\n", send_body).await,
                Err(reason) => {
                    // Kubelet restarts the container after a few of these; the log says why.
                    warn!(reason, "health check failed");
                    let body = format!("{reason}\n");
                    respond(
                        &mut stream,
                        "503 Service Unavailable",
                        "text/plain; charset=utf-8",
                        body.as_bytes(),
                        send_body,
                    )
                    .await
                }
            }
        }
        _ => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"not found\n",
                send_body,
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    send_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if send_body {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new("/nonexistent/blockcsi-test/csi.sock".into(), None)
    }

    #[test]
    fn equal_addresses_share_one_listener() {
        let plans = [
            (plan(None, None), vec![]),
            (
                plan(Some("0.0.0.0:9090"), None),
                vec![("0.0.0.0:9090", true, false)],
            ),
            (
                plan(None, Some(("0.0.0.0:9808", health()))),
                vec![("0.0.0.0:9808", false, true)],
            ),
            (
                plan(Some("0.0.0.0:9090"), Some(("0.0.0.0:9808", health()))),
                vec![("0.0.0.0:9090", true, false), ("0.0.0.0:9808", false, true)],
            ),
            (
                plan(Some("0.0.0.0:9808"), Some(("0.0.0.0:9808", health()))),
                vec![("0.0.0.0:9808", true, true)],
            ),
        ];
        for (got, want) in plans {
            let got: Vec<(&str, bool, bool)> = got
                .iter()
                .map(|(a, r)| (a.as_str(), r.metrics, r.health.is_some()))
                .collect();
            assert_eq!(got, want);
        }
    }

    /// One request over a real connection; the status line and the body.
    async fn get(port: u16, method: &str, path: &str) -> (String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }

    #[tokio::test]
    async fn routes_answer_only_what_they_were_given() {
        let routes = Routes {
            metrics: false,
            health: Some(health()),
        };
        let listener = bind("127.0.0.1:0", &routes).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(serve(listener, routes));
        let (status, body) = get(port, "GET", "/healthz").await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert!(
            body.starts_with("cannot reach /nonexistent/blockcsi-test/csi.sock"),
            "{body}"
        );
        let (status, body) = get(port, "HEAD", "/healthz?verbose").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 503 Service Unavailable", "")
        );
        // Metrics were not asked for on this listener.
        assert_eq!(
            get(port, "GET", "/metrics").await.0,
            "HTTP/1.1 404 Not Found"
        );
        assert_eq!(
            get(port, "GET", "/healthzz").await.0,
            "HTTP/1.1 404 Not Found"
        );
        assert_eq!(
            get(port, "POST", "/healthz").await.0,
            "HTTP/1.1 404 Not Found"
        );
        server.abort();
    }
}
