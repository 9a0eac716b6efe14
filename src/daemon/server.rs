//! The process: builds the services a mode asks for, owns the Unix sockets (CSI and kubelet
//! registration: stale-socket removal, permissions, removal at exit), starts the HTTP endpoints,
//! and shuts down gracefully on SIGTERM or SIGINT, letting in-flight RPCs finish.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info};

use crate::controller::Controller;
use crate::csi::{
    controller::ControllerService, group::GroupService, identity::IdentityService,
    node::NodeAdapter,
};
use crate::daemon::config::Config;
use crate::daemon::registration::pb::registration_server::RegistrationServer;
use crate::daemon::registration::RegistrationService;
use crate::host::linux::LinuxHost;
use crate::node::NodeService;
use crate::pb;
use crate::storage::filepool::devices::PoolDevices;
use crate::storage::filepool::ledger::PoolLedger;
use crate::storage::filepool::provider::FilePoolProvider;
use crate::storage::filepool::FilePool;
use crate::storage::BlockStorage;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("socket {path}: {message}")]
    Socket { path: String, message: String },
    #[error("pool {path}: {source}")]
    Pool {
        path: String,
        source: crate::storage::Error,
    },
    #[error("node start-up: {0}")]
    Node(crate::error::Error),
    #[error("http address {address}: {source}")]
    Http {
        address: String,
        source: std::io::Error,
    },
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("grpc server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A socket file this process made; dropping it removes the file, so every way out of `serve`
/// (an error after binding included) leaves no socket behind for kubelet or a CO to dial.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A background task that must not outlive `serve`.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once `stop` says so; the shutdown future of every gRPC server.
async fn stopped(mut stop: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|s| *s).await;
}

/// Prepares the socket path: creates the parent, removes a stale socket, refuses anything else
/// (a file, a directory, or a socket some process still serves).
async fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |message: String| ServeError::Socket {
        path: path.display().to_string(),
        message,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err(format!("create parent: {e}")))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(err("another process is serving this socket".into()));
            }
            std::fs::remove_file(path).map_err(|e| err(format!("remove stale socket: {e}")))?;
            info!(path = %path.display(), "removed stale socket");
        }
        Ok(_) => {
            return Err(err(
                "exists and is not a socket; refusing to remove it".into()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| err(format!("bind: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(format!("chmod: {e}")))?;
    Ok(listener)
}

/// SIGTERM and SIGINT, caught from the moment this is called: it must run before the socket is
/// bound, or a signal sent as soon as the socket answers would kill the process unclean.
fn shutdown_signals() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    shutdown_signal(term, int)
}

async fn shutdown_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) {
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutting down: finishing in-flight calls");
}

/// The runtime of `serve`: one async thread. Every RPC's real work (files, fsync, ioctls,
/// mkfs) runs on the blocking pool (`csi::run`), so the async side only parses and routes calls;
/// a single thread does that with lower latency than a work-stealing pool (no cross-thread
/// wake-ups) and with fewer threads and arenas, which is most of an idle node's memory.
/// Measurements in BENCHMARKS.md.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tune_malloc();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Blocking threads exit after this long idle, returning their stacks.
        .thread_keep_alive(std::time::Duration::from_secs(10))
        .build()
}

/// glibc gives each thread that allocates its own malloc arena (up to 8 per core), and freed
/// arena memory is rarely returned: after a burst of calls on many blocking threads the
/// process keeps the high-water mark. Two arenas are plenty for a driver whose threads mostly
/// wait on the kernel.
///
/// glibc also raises its mmap threshold to the size of the largest block freed, so the
/// 256 KiB buffer of each stage's blank check would move into the arenas after the first
/// stage and stay resident there (0.6-0.9 MiB more after one lifecycle, measured). A fixed
/// threshold keeps blocks of 128 KiB and more in their own mappings, returned when freed.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

pub async fn serve(cfg: Config) -> Result<(), ServeError> {
    let signals = shutdown_signals();
    let pool = FilePool::open(&cfg.pool).map_err(|source| ServeError::Pool {
        path: cfg.pool.display().to_string(),
        source,
    })?;
    // Before serving, while this process has nothing in flight: what a killed predecessor left.
    pool.collect_garbage().map_err(|source| ServeError::Pool {
        path: cfg.pool.display().to_string(),
        source,
    })?;
    if cfg.mode.controller() {
        let removed = pool
            .collect_orphan_snapshots()
            .map_err(|source| ServeError::Pool {
                path: cfg.pool.display().to_string(),
                source,
            })?;
        if removed > 0 {
            info!(removed, "removed snapshot images that never got a record");
        }
    }
    let pool_id = pool.pool_id().to_string();
    let pool = Arc::new(pool);
    let backend: Arc<dyn BlockStorage> = pool.clone();

    let controller = cfg.mode.controller().then(|| {
        Arc::new(Controller::new(Arc::new(FilePoolProvider::new(
            pool.clone(),
        ))))
    });
    let node = if cfg.mode.node() {
        let host: Arc<dyn crate::host::Host> = Arc::new(LinuxHost::with_max_concurrent_formats(
            cfg.max_concurrent_formats,
        ));
        let devices = Arc::new(PoolDevices::new(
            pool.clone(),
            host.clone(),
            cfg.node_id.clone(),
            cfg.max_volumes_per_node,
        ));
        let svc = Arc::new(NodeService::new(
            devices,
            Arc::new(PoolLedger::new(pool.clone())),
            host,
            cfg.default_fs_type,
        ));
        let starting = svc.clone();
        tokio::task::spawn_blocking(move || starting.start())
            .await
            .map_err(|e| ServeError::Node(crate::error::Error::Internal(e.to_string())))?
            .map_err(ServeError::Node)?;
        Some(svc)
    } else {
        None
    };

    let identity = IdentityService {
        driver_name: cfg.driver_name.clone(),
        controller: controller.clone(),
        features: crate::storage::filepool::provider::FEATURES,
        node: node.clone(),
    };
    if cfg.metrics_address.is_some() {
        crate::daemon::metrics::enable(Some(backend.clone()));
    }
    let registration_socket = cfg.registration.as_ref().map(|r| r.socket.clone());
    let health = cfg.health_address.as_deref().map(|address| {
        (
            address,
            crate::daemon::health::Health::new(cfg.socket.clone(), registration_socket),
        )
    });
    let mut http_servers = Vec::new();
    for (address, routes) in crate::daemon::http::plan(cfg.metrics_address.as_deref(), health) {
        let listener = crate::daemon::http::bind(&address, &routes)
            .await
            .map_err(|source| ServeError::Http {
                address: address.clone(),
                source,
            })?;
        http_servers.push(AbortOnDrop(tokio::spawn(crate::daemon::http::serve(
            listener, routes,
        ))));
    }

    let listener = bind(&cfg.socket).await?;
    let csi_socket = SocketFile(cfg.socket.clone());
    info!(
        mode = ?cfg.mode,
        socket = %cfg.socket.display(),
        pool = %cfg.pool.display(),
        pool_id,
        node_id = cfg.node_id,
        max_concurrent_formats = cfg.max_concurrent_formats,
        driver = cfg.driver_name,
        version = env!("CARGO_PKG_VERSION"),
        "serving"
    );
    let (stop, stopping) = watch::channel(false);
    let mut csi = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tower::util::option_layer(
                crate::daemon::metrics::enabled().then_some(crate::daemon::metrics::RpcLayer),
            ))
            .add_service(pb::identity_server::IdentityServer::new(identity))
            .add_optional_service(controller.clone().map(|c| {
                pb::controller_server::ControllerServer::new(ControllerService { controller: c })
            }))
            .add_optional_service(controller.map(|c| {
                pb::group_controller_server::GroupControllerServer::new(GroupService {
                    controller: c,
                })
            }))
            .add_optional_service(
                node.map(|n| pb::node_server::NodeServer::new(NodeAdapter { node: n })),
            )
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped(stopping)),
    );

    // Kubelet dials the CSI endpoint right after GetInfo, so the registration socket appears
    // only once the CSI socket is bound and its server running. On this single-threaded
    // runtime the spawned server first runs when this task yields: yield once before binding.
    tokio::task::yield_now().await;
    let registration = match &cfg.registration {
        Some(reg) => {
            let listener = bind(&reg.socket).await?;
            let file = SocketFile(reg.socket.clone());
            let service = RegistrationService {
                driver_name: cfg.driver_name.clone(),
                kubelet_endpoint: reg.kubelet_endpoint.clone(),
            };
            let server = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(service))
                // Kubelet's plugin watcher sends the socket path as :authority, which the
                // HTTP/2 layer refuses; the connections go through the repair first.
                .serve_with_incoming_shutdown(
                    crate::daemon::authority::incoming(listener),
                    stopped(stop.subscribe()),
                );
            let task = tokio::spawn(async move {
                if let Err(e) = server.await {
                    error!(error = %e, "registration server");
                }
            });
            info!(
                socket = %reg.socket.display(),
                endpoint = %reg.kubelet_endpoint.display(),
                "serving kubelet plugin registration"
            );
            Some((file, task))
        }
        None => None,
    };

    let ended_early = tokio::select! {
        () = signals => None,
        res = &mut csi => Some(res),
    };
    // Kubelet deregisters a plugin whose registration socket is gone: remove it before the
    // servers stop, so kubelet stops sending work while the calls in flight finish.
    let registration = registration.map(|(file, task)| {
        drop(file);
        task
    });
    let _ = stop.send(true);
    if let Some(task) = registration {
        let _ = task.await;
    }
    let result = match ended_early {
        Some(res) => res,
        None => csi.await,
    };
    drop(csi_socket);
    drop(http_servers);
    info!("stopped");
    Ok(result??)
}
