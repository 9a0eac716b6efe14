//! Prometheus metrics: per-RPC counts, latencies and in-flight gauges (a tower layer around the
//! gRPC server), NodeStage phase histograms, pool and volume gauges computed at scrape time from
//! the backend, and their text rendering, which `http.rs` serves on `GET /metrics`.
//!
//! Everything hangs off one process-global registry that exists only once [`enable`] ran: with
//! metrics off (the default) [`observe_phase`] is a single atomic load, and the RPC layer is not
//! installed at all.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tonic::codegen::http;
use tonic::Code;
use tracing::warn;

use crate::error::code_name;
use crate::storage::BlockStorage;

/// The steps of NodeStageVolume (and of node-side expansion) that are timed separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Attaching the image to a loop device.
    Attach,
    /// `blkid -p` of the device.
    Probe,
    /// mkfs of a blank volume.
    Format,
    /// mount(2) of the staging path.
    Mount,
    /// Growing the loop device and the filesystem.
    Resize,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Attach,
        Phase::Probe,
        Phase::Format,
        Phase::Mount,
        Phase::Resize,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Attach => "attach",
            Phase::Probe => "probe",
            Phase::Format => "format",
            Phase::Mount => "mount",
            Phase::Resize => "resize",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: Cow<'static, str>,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: Cow<'static, str>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Metrics {
    requests: Family<RpcLabels, Counter>,
    durations: HistogramFamily<RpcLabels>,
    in_flight: Family<MethodLabel, Gauge>,
    phases: HistogramFamily<PhaseLabel>,
    registry: Registry,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

// 100 us .. ~53 s: a Probe answers in tens of microseconds, a stage with mkfs of a big XFS
// volume in seconds.
fn rpc_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 3.0, 13))
}

// 20 us .. ~10 s: a bind mount takes microseconds, mkfs milliseconds to seconds.
fn phase_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00002, 3.0, 13))
}

/// Turns metrics on for this process; `backend` feeds the pool gauges. Later calls are no-ops
/// (the first backend wins), so tests may call it freely.
pub fn enable(backend: Option<Arc<dyn BlockStorage>>) {
    METRICS.get_or_init(|| {
        let requests = Family::<RpcLabels, Counter>::default();
        let durations = HistogramFamily::<RpcLabels>::new_with_constructor(rpc_histogram as _);
        let in_flight = Family::<MethodLabel, Gauge>::default();
        let phases = HistogramFamily::<PhaseLabel>::new_with_constructor(phase_histogram as _);
        // Create every phase up front so dashboards see zeros rather than absent series.
        for p in Phase::ALL {
            let _ = phases.get_or_create(&PhaseLabel { phase: p.as_str() });
        }
        let mut registry = Registry::with_prefix("blockcsi");
        registry.register(
            "rpc_requests",
            "CSI calls served, by method and gRPC code",
            requests.clone(),
        );
        registry.register_with_unit(
            "rpc_duration",
            "Time to answer a CSI call, by method and gRPC code",
            Unit::Seconds,
            durations.clone(),
        );
        registry.register(
            "rpc_in_flight",
            "CSI calls being served now, by method",
            in_flight.clone(),
        );
        registry.register_with_unit(
            "node_stage_phase_duration",
            "Time spent in each phase of NodeStageVolume and node expansion",
            Unit::Seconds,
            phases.clone(),
        );
        registry.register_collector(Box::new(StateCollector { backend }));
        Metrics {
            requests,
            durations,
            in_flight,
            phases,
            registry,
        }
    });
}

pub fn enabled() -> bool {
    METRICS.get().is_some()
}

/// Records how long a phase of a node operation took. Free when metrics are off.
pub fn observe_phase(phase: Phase, elapsed: Duration) {
    if let Some(m) = METRICS.get() {
        m.phases
            .get_or_create(&PhaseLabel {
                phase: phase.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// Runs `f` and records its duration under `phase`, whatever it returns.
pub fn time_phase<T>(phase: Phase, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let started = Instant::now();
    let out = f();
    observe_phase(phase, started.elapsed());
    out
}

/// The method label of a gRPC path. Anything that is not a plausible CSI method name collapses
/// into "other", so a client sending random paths cannot grow the label set without bound.
fn method_label(path: &str) -> Cow<'static, str> {
    let Some(rest) = path.strip_prefix("/csi.v1.") else {
        return Cow::Borrowed("other");
    };
    match rest.split_once('/') {
        Some((service, method))
            if matches!(
                service,
                "Identity" | "Controller" | "Node" | "GroupController"
            ) && !method.is_empty()
                && method.len() <= 64
                && method.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            Cow::Owned(method.to_string())
        }
        _ => Cow::Borrowed("other"),
    }
}

/// The gRPC code of a response. tonic sends a failed unary call as "trailers only", with
/// `grpc-status` among the headers; a successful one carries its status in the trailers.
fn response_code<B>(res: &http::Response<B>) -> Code {
    res.headers()
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
        .unwrap_or(Code::Ok)
}

/// Tower layer counting and timing every gRPC call by method and code. Installed only when
/// metrics are on (see `server.rs`), so the default build pays nothing per call.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
}

/// Decrements the in-flight gauge when the call ends, also when the client went away and the
/// future was dropped unfinished.
struct InFlight {
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = method_label(req.uri().path());
        let fut = self.inner.call(req);
        let Some(m) = METRICS.get() else {
            return Box::pin(fut);
        };
        let gauge = m.in_flight.get_or_create_owned(&MethodLabel {
            method: method.clone(),
        });
        gauge.inc();
        let guard = InFlight { gauge };
        let started = Instant::now();
        Box::pin(async move {
            let res = fut.await;
            drop(guard);
            let code = match &res {
                Ok(r) => response_code(r),
                Err(_) => Code::Internal,
            };
            let labels = RpcLabels {
                method,
                code: code_name(code),
            };
            m.requests.get_or_create(&labels).inc();
            m.durations
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
            res
        })
    }
}

/// Gauges read at scrape time, so they are never stale and no other module has to keep them up
/// to date: pool capacity, volumes, attachments, and this process's resident memory.
struct StateCollector {
    backend: Option<Arc<dyn BlockStorage>>,
}

impl fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
    value: i64,
) -> fmt::Result {
    let g = ConstGauge::new(value);
    let mut metric = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    if labels.is_empty() {
        g.encode(metric)
    } else {
        g.encode(metric.encode_family(&labels)?)
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        if let Some(rss) = resident_bytes() {
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident set size of this process (VmRSS)",
                &[],
                clamp(rss),
            )?;
        }
        let Some(backend) = &self.backend else {
            return Ok(());
        };
        let pool = [("pool", backend.pool_id())];
        // A pool that cannot be read is reported through the log and by the absence of these
        // series; failing the whole scrape would hide the RPC metrics as well.
        match backend.capacity() {
            Ok(c) => {
                gauge(
                    &mut encoder,
                    "pool_capacity_bytes",
                    "Size of the filesystem holding the pool",
                    &pool,
                    clamp(c.total_bytes),
                )?;
                gauge(
                    &mut encoder,
                    "pool_available_bytes",
                    "Space left for new volume data in the pool",
                    &pool,
                    clamp(c.available_bytes),
                )?;
                gauge(
                    &mut encoder,
                    "pool_used_bytes",
                    "Space in use on the filesystem holding the pool",
                    &pool,
                    clamp(c.total_bytes.saturating_sub(c.available_bytes)),
                )?;
            }
            Err(e) => warn!(error = %e, "metrics: pool capacity unavailable"),
        }
        match backend.volumes() {
            Ok(volumes) => {
                let provisioned: u64 = volumes.iter().map(|v| v.capacity_bytes).sum();
                let attachments: usize = volumes.iter().map(|v| v.attachments.len()).sum();
                gauge(
                    &mut encoder,
                    "volumes",
                    "Volumes in the pool",
                    &pool,
                    clamp(volumes.len() as u64),
                )?;
                gauge(
                    &mut encoder,
                    "volumes_provisioned_bytes",
                    "Sum of the sizes of the volumes in the pool",
                    &pool,
                    clamp(provisioned),
                )?;
                gauge(
                    &mut encoder,
                    "attachments",
                    "Volume publications to nodes recorded in the pool",
                    &pool,
                    clamp(attachments as u64),
                )?;
            }
            Err(e) => warn!(error = %e, "metrics: volume list unavailable"),
        }
        match backend.snapshots() {
            Ok(snapshots) => gauge(
                &mut encoder,
                "snapshots",
                "Snapshots in the pool",
                &pool,
                clamp(snapshots.len() as u64),
            )?,
            Err(e) => warn!(error = %e, "metrics: snapshot list unavailable"),
        }
        Ok(())
    }
}

/// VmRSS of this process, in bytes.
pub fn resident_bytes() -> Option<u64> {
    resident_bytes_of("self")
}

/// VmRSS of a process (`pid` is a number or "self"), in bytes.
pub fn resident_bytes_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The metrics in Prometheus text format. Reads the pool, so call it off the async threads.
pub fn render() -> String {
    let mut out = String::new();
    if let Some(m) = METRICS.get() {
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &m.registry) {
            warn!(error = %e, "metrics: encoding failed");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        for (path, want) in [
            ("/csi.v1.Node/NodeStageVolume", "NodeStageVolume"),
            ("/csi.v1.Identity/Probe", "Probe"),
            ("/csi.v1.Controller/CreateSnapshot", "CreateSnapshot"),
            ("/csi.v1.Other/Probe", "other"),
            ("/grpc.health.v1.Health/Check", "other"),
            ("/csi.v1.Node/Bad-Name", "other"),
            ("/csi.v1.Node/", "other"),
            ("/", "other"),
        ] {
            assert_eq!(method_label(path), want, "{path}");
        }
    }

    #[test]
    fn codes_are_named_as_the_spec_names_them() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
        assert_eq!(code_name(Code::Unimplemented), "UNIMPLEMENTED");
        let res = http::Response::builder()
            .header("grpc-status", "5")
            .body(())
            .unwrap();
        assert_eq!(response_code(&res), Code::NotFound);
        assert_eq!(response_code(&http::Response::new(())), Code::Ok);
    }

    #[test]
    fn phases_render_once_enabled() {
        enable(None);
        observe_phase(Phase::Format, Duration::from_millis(12));
        let text = render();
        for p in Phase::ALL {
            assert!(
                text.contains(&format!(
                    "blockcsi_node_stage_phase_duration_seconds_count{{phase=\"{}\"}}",
                    p.as_str()
                )),
                "{text}"
            );
        }
        assert!(
            text.contains("blockcsi_node_stage_phase_duration_seconds_count{phase=\"format\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("blockcsi_process_resident_memory_bytes "),
            "{text}"
        );
    }
}
