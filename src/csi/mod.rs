//! Thin tonic adapters: each RPC validates its request (see `validate`), calls the domain logic on
//! the blocking pool, and turns the domain result into a reply. Errors become gRPC codes in one
//! place (`error.rs`); every RPC is logged once at info with its duration and code.

pub mod controller;
pub mod group;
pub mod identity;
pub mod node;
pub mod validate;

use std::time::Instant;

use tonic::{Code, Response, Status};
use tracing::{info, warn};

use crate::error::{code_name, Error, Result};

/// Runs blocking domain work for one RPC on the blocking pool and logs the outcome.
pub(crate) async fn run<T, F>(
    method: &'static str,
    volume_id: &str,
    work: F,
) -> std::result::Result<Response<T>, Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    run_async(method, volume_id, async move {
        match tokio::task::spawn_blocking(work).await {
            Ok(r) => r,
            Err(e) => Err(Error::Internal(format!("{method} worker failed: {e}"))),
        }
    })
    .await
}

/// Runs async domain work for one RPC and logs the outcome. If the caller goes away the
/// future is dropped with it: async work stops at its next await.
pub(crate) async fn run_async<T, F>(
    method: &'static str,
    volume_id: &str,
    work: F,
) -> std::result::Result<Response<T>, Status>
where
    F: std::future::Future<Output = Result<T>>,
{
    run_create(method, volume_id, None, |_: &T| None, work).await
}

/// [`run_async`] for an RPC that creates an object under a CO-chosen name (CreateVolume,
/// CreateSnapshot): its log line carries the `name` (`pvc-...`, `snapshot-...`) and the `new_id`
/// the reply gives it, so one line ties what Kubernetes calls it to what the pool calls it.
pub(crate) async fn run_create<T, F>(
    method: &'static str,
    volume_id: &str,
    name: Option<&str>,
    new_id: fn(&T) -> Option<String>,
    work: F,
) -> std::result::Result<Response<T>, Status>
where
    F: std::future::Future<Output = Result<T>>,
{
    let started = Instant::now();
    // A hostile id or name must not flood the log.
    let volume_id = &*crate::error::clip(volume_id, 128);
    let name = name.map(|n| crate::error::clip(n, 128).into_owned());
    let res = work.await;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    match res {
        Ok(reply) => {
            match &name {
                Some(name) => {
                    let new_id = new_id(&reply).unwrap_or_default();
                    info!(
                        method,
                        volume_id,
                        name,
                        new_id,
                        elapsed_ms,
                        code = "OK",
                        "rpc"
                    )
                }
                None => info!(method, volume_id, elapsed_ms, code = "OK", "rpc"),
            }
            Ok(Response::new(reply))
        }
        Err(err) => {
            let status = Status::from(err);
            let code = code_name(status.code());
            let name = name.as_deref().unwrap_or_default();
            if matches!(status.code(), Code::Internal | Code::Unavailable) {
                warn!(
                    method,
                    volume_id,
                    name,
                    elapsed_ms,
                    code,
                    message = status.message(),
                    "rpc"
                );
            } else {
                info!(
                    method,
                    volume_id,
                    name,
                    elapsed_ms,
                    code,
                    message = status.message(),
                    "rpc"
                );
            }
            Err(status)
        }
    }
}

/// Runs a cheap RPC that needs no blocking pool.
pub(crate) fn quick<T>(
    method: &'static str,
    res: Result<T>,
) -> std::result::Result<Response<T>, Status> {
    match res {
        Ok(reply) => {
            tracing::debug!(method, code = "OK", "rpc");
            Ok(Response::new(reply))
        }
        Err(err) => {
            let status = Status::from(err);
            info!(
                method,
                code = code_name(status.code()),
                message = status.message(),
                "rpc"
            );
            Err(status)
        }
    }
}

pub(crate) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Negative sizes are invalid; zero means "not given".
pub(crate) fn to_u64(n: i64, field: &str) -> Result<u64> {
    u64::try_from(n).map_err(|_| Error::InvalidArgument(format!("{field} must not be negative")))
}
