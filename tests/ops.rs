//! Operability features against the real binary, as root: the metrics endpoint, kubelet plugin
//! registration and `/healthz`, a `ctl` round trip through a running driver, `doctor`, and a
//! short `bench` run.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_blockcsi");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request; returns the status line and the body.
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "metrics port never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Multi-threaded: the test blocks its thread waiting for the driver to exit, and the client's
// connection is closed by a background task that must still get to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_rpc_phase_and_pool_families() {
    let sb = Sandbox::new();
    let port = free_port();
    let socket = sb.socket();
    let log = sb.path("driver.log");
    let mut child = Reap(
        Command::new(BIN)
            .args([
                "serve",
                "--mode",
                "all",
                "--node-id",
                NODE,
                "--log-format",
                "json",
            ])
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pool")
            .arg(sb.pool())
            .arg("--metrics-address")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "socket never served");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut c = Client::connect(&socket).await;
    let cap = mount_cap("ext4");
    let id = c.create("metrics-vol", 64 * MIB, &cap).await;
    c.identity
        .probe(blockcsi::pb::ProbeRequest {})
        .await
        .unwrap();
    let missing = c
        .controller
        .delete_volume(blockcsi::pb::DeleteVolumeRequest {
            volume_id: "vol-zz".into(),
            ..Default::default()
        })
        .await;
    assert!(missing.is_ok(), "deleting an unknown id is OK: {missing:?}");
    let unimplemented = c
        .controller
        .list_snapshots(blockcsi::pb::ListSnapshotsRequest::default())
        .await;

    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    for needle in [
        "blockcsi_rpc_requests_total{method=\"CreateVolume\",code=\"OK\"} 1",
        "blockcsi_rpc_requests_total{method=\"Probe\",code=\"OK\"} 1",
        "blockcsi_rpc_duration_seconds_count{method=\"CreateVolume\",code=\"OK\"} 1",
        "blockcsi_rpc_in_flight{method=\"CreateVolume\"} 0",
        "blockcsi_node_stage_phase_duration_seconds_count{phase=\"format\"}",
        "blockcsi_node_stage_phase_duration_seconds_count{phase=\"attach\"}",
        "blockcsi_pool_capacity_bytes{pool=",
        "blockcsi_pool_available_bytes{pool=",
        "blockcsi_volumes{pool=",
        "blockcsi_attachments{pool=",
        "blockcsi_process_resident_memory_bytes ",
        "# EOF",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in:\n{body}");
    }
    let volumes = body
        .lines()
        .find(|l| l.starts_with("blockcsi_volumes{"))
        .unwrap();
    assert!(volumes.ends_with(" 1"), "{volumes}");
    if let Err(s) = unimplemented {
        let line = format!(
            "blockcsi_rpc_requests_total{{method=\"ListSnapshots\",code=\"{}\"}} 1",
            blockcsi::error::code_name(s.code())
        );
        assert!(body.contains(&line), "missing {line:?} in:\n{body}");
    }

    let (status, _) = http_get(port, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http_get(port, "/metricsx");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // JSON logs: one object a line, the RPC line carrying method, volume id and code.
    c.controller
        .delete_volume(blockcsi::pb::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let rpc = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .find(|v| v["method"] == "DeleteVolume" && v["volume_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no DeleteVolume line in:\n{text}"));
    assert_eq!(rpc["code"], "OK");
    assert!(rpc["elapsed_ms"].is_number(), "{rpc}");
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// A driver process killed when the test ends before it does (a failed assertion), so no
/// server outlives its test.
struct Reap(std::process::Child);

impl std::ops::Deref for Reap {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reap {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// GetInfo over a raw HTTP/2 connection whose request carries the socket path as its
/// `:authority`, the way kubelet's plugin watcher sends it; panics unless the answer is a
/// whole gRPC success.
fn kubelet_style_get_info(
    socket: &std::path::Path,
) -> blockcsi::daemon::registration::pb::PluginInfo {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
    let path = socket.to_str().unwrap().as_bytes();
    let fields: [(&[u8], &[u8]); 6] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/pluginregistration.Registration/GetInfo"),
        (b":authority", path),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ];
    let block = loona_hpack::Encoder::new().encode(fields);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4, 1, &block));
    // An empty InfoRequest: no compression flag, zero length; END_STREAM.
    out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    let mut conn = std::os::unix::net::UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(&out).unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let (mut headers, mut data) = (Vec::new(), Vec::new());
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head)
            .expect("the server closed before answering");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).unwrap();
        match head[3] {
            0x4 if head[4] & 0x1 == 0 => conn.write_all(&frame(0x4, 0x1, 0, &[])).unwrap(),
            0x3 => panic!("RST_STREAM {payload:?}: the request was refused"),
            0x7 => panic!("GOAWAY {payload:?}"),
            0x1 => {
                assert_eq!(head[4] & 0x4, 0x4, "response headers in one frame");
                headers.extend(decoder.decode(&payload).unwrap());
                if head[4] & 0x1 != 0 {
                    break;
                }
            }
            0x0 => data.extend(payload),
            _ => {}
        }
    }
    let find = |name: &[u8]| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(find(b":status").as_deref(), Some("200"), "{headers:?}");
    assert_eq!(find(b"grpc-status").as_deref(), Some("0"), "{headers:?}");
    assert!(data.len() >= 5 && data[0] == 0, "{data:?}");
    prost::Message::decode(&data[5..]).unwrap()
}

// Multi-threaded for the same reason as the metrics test: the test thread blocks on HTTP
// requests and on the driver's exit while client connections are closed in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registers_with_kubelet_and_answers_healthz() {
    use blockcsi::daemon::registration::pb;
    use blockcsi::daemon::registration::pb::registration_client::RegistrationClient;

    let sb = Sandbox::new();
    let port = free_port();
    let socket = sb.socket();
    let registry = sb.path("plugins_registry");
    let reg_socket = registry.join("blockcsi.dev-reg.sock");
    let host_path = "/var/lib/kubelet/plugins/blockcsi.dev/csi.sock";
    // A predecessor's registration socket that nobody serves any more is replaced.
    std::fs::create_dir_all(&registry).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&reg_socket).unwrap());
    assert!(is_socket(&reg_socket));

    let log = sb.path("driver.log");
    let mut child = Reap(
        Command::new(BIN)
            .args(["serve", "--mode", "node", "--node-id", NODE])
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pool")
            .arg(sb.pool())
            .arg("--registration-dir")
            .arg(&registry)
            .args(["--kubelet-registration-path", host_path])
            // One address for both: one listener serves both routes.
            .arg(format!("--health-address=127.0.0.1:{port}"))
            .arg(format!("--metrics-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the registration socket served", || {
        std::os::unix::net::UnixStream::connect(&reg_socket).is_ok()
    });
    // The registration socket appears only once the CSI socket is served.
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "{}",
        log_text()
    );
    let mode = std::fs::metadata(&reg_socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o660
    );

    // What kubelet's plugin watcher does with the socket.
    let mut reg = RegistrationClient::new(blockcsi::client::connect(&reg_socket).await.unwrap());
    let info = reg.get_info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, "blockcsi.dev");
    assert_eq!(info.endpoint, host_path);
    assert_eq!(info.supported_versions, vec!["1.0.0".to_string()]);
    reg.notify_registration_status(pb::RegistrationStatus {
        plugin_registered: true,
        error: String::new(),
    })
    .await
    .unwrap();
    reg.notify_registration_status(pb::RegistrationStatus {
        plugin_registered: false,
        error: "name clash with another-driver".into(),
    })
    .await
    .unwrap();
    let text = log_text();
    assert!(
        text.lines()
            .any(|l| l.contains("removed stale socket") && l.contains("-reg.sock")),
        "{text}"
    );
    assert!(text.contains("kubelet registered the driver"), "{text}");
    let refused = text
        .lines()
        .find(|l| l.contains("kubelet refused to register the driver"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{text}"));
    assert!(refused.contains("ERROR"), "{refused}");
    assert!(
        refused.contains("name clash with another-driver"),
        "{refused}"
    );
    drop(reg);

    // Kubelet's plugin watcher (grpc-go dialling a bare path) sends the socket path as
    // :authority, which is not an authority at all; the call must still succeed.
    let info = kubelet_style_get_info(&reg_socket);
    assert_eq!(info.name, "blockcsi.dev");
    assert_eq!(info.endpoint, host_path);

    wait_for_port(port);
    assert_eq!(
        http_get(port, "/healthz"),
        ("HTTP/1.1 200 OK".into(), "ok\n".into())
    );
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.contains("blockcsi_process_resident_memory_bytes"),
        "{body}"
    );
    assert_eq!(http_get(port, "/health").0, "HTTP/1.1 404 Not Found");

    // Kubelet forgets a plugin whose registration socket is gone: the driver must be restarted.
    let moved = sb.path("moved-reg.sock");
    std::fs::rename(&reg_socket, &moved).unwrap();
    let (status, body) = http_get(port, "/healthz");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("registration socket"), "{body}");
    std::fs::rename(&moved, &reg_socket).unwrap();
    assert_eq!(http_get(port, "/healthz").0, "HTTP/1.1 200 OK");

    // Nothing answers at the CSI socket's path.
    let moved = sb.path("moved-csi.sock");
    std::fs::rename(&socket, &moved).unwrap();
    let (status, body) = http_get(port, "/healthz");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.starts_with("cannot reach"), "{body}");
    std::fs::rename(&moved, &socket).unwrap();
    assert_eq!(http_get(port, "/healthz").0, "HTTP/1.1 200 OK");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success(), "{}", log_text());
    assert!(!reg_socket.exists(), "registration socket left behind");
    assert!(!socket.exists(), "CSI socket left behind");
    // The registry directory belongs to kubelet: only our socket goes.
    assert!(registry.is_dir());
}

fn ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("ctl")
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `ctl --json ...`, requires success, and parses stdout.
fn ctl_json(endpoint: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ctl(endpoint, &all);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ctl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn ctl_round_trip() {
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let ep = format!("unix://{}", driver.socket.display());
    let staging = sb.dir("staging");
    let target = format!("{}/target", sb.dir("pods"));

    let info = ctl_json(&ep, &["info"]);
    assert_eq!(info["name"], "blockcsi.dev");
    assert_eq!(info["ready"], true);
    assert_eq!(info["node"]["node_id"], NODE);

    let created = ctl_json(&ep, &["volume", "create", "ctl-vol", "--size", "64Mi"]);
    let id = created["volume_id"].as_str().unwrap().to_string();
    assert_eq!(created["capacity_bytes"], 64 * MIB);

    let list = ctl_json(&ep, &["volume", "list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|v| v["volume_id"] == id.as_str()),
        "{list}"
    );
    ctl_json(&ep, &["volume", "publish", &id]);
    let got = ctl_json(&ep, &["volume", "get", &id]);
    assert_eq!(got["published_node_ids"], serde_json::json!([NODE]));

    ctl_json(&ep, &["volume", "stage", &id, "--staging-path", &staging]);
    ctl_json(
        &ep,
        &[
            "volume",
            "mount",
            &id,
            "--staging-path",
            &staging,
            "--target",
            &target,
        ],
    );
    assert!(sb.mounts().contains(&target), "{:?}", sb.mounts());
    let stats = ctl_json(&ep, &["volume", "stats", &id, "--path", &target]);
    assert_eq!(stats["usage"][0]["unit"], "bytes");
    assert!(stats["usage"][0]["total"].as_i64().unwrap() > 0, "{stats}");

    // The table form is for people, but it must name the volume too.
    let table = ctl(&ep, &["volume", "list"]);
    assert!(table.status.success());
    assert!(String::from_utf8_lossy(&table.stdout).contains(&id));

    ctl_json(&ep, &["volume", "unmount", &id, "--target", &target]);
    ctl_json(&ep, &["volume", "unstage", &id, "--staging-path", &staging]);
    ctl_json(&ep, &["volume", "unpublish", &id]);
    ctl_json(&ep, &["volume", "delete", &id]);
    assert_eq!(ctl_json(&ep, &["volume", "list"]), serde_json::json!([]));

    // Errors: the gRPC code, on stderr and in the JSON, and a non-zero exit.
    let out = ctl(
        &ep,
        &["volume", "get", "vol-00000000000000000000000000000000"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NOT_FOUND"), "{err}");
    let out = ctl(
        &ep,
        &[
            "--json",
            "volume",
            "get",
            "vol-00000000000000000000000000000000",
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "NOT_FOUND");

    let out = ctl("unix:///nonexistent/blockcsi.sock", &["info"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    sb.assert_no_leaks();
}

fn doctor(args: &[&str]) -> (i32, Vec<Value>) {
    let out = Command::new(BIN)
        .arg("doctor")
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code().unwrap(), checks)
}

fn status_of<'a>(checks: &'a [Value], name: &str) -> &'a str {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {checks:?}"))["status"]
        .as_str()
        .unwrap()
}

#[test]
fn doctor_passes_here_and_fails_on_a_missing_pool() {
    let sb = Sandbox::new();
    let pool = sb.dir("pool");
    let endpoint = format!("unix://{}", sb.path("sock/csi.sock").display());
    let (code, checks) = doctor(&["--pool", &pool, "--endpoint", &endpoint]);
    for name in [
        "privileges",
        "loop attach",
        "free loop devices",
        "tool blkid",
        "tool mkfs.ext4",
        "tool mkfs.xfs",
        "pool",
        "socket directory",
    ] {
        assert_eq!(status_of(&checks, name), "OK", "{name}: {checks:?}");
    }
    // Reflink and propagation depend on the machine: present, and never a failure.
    for name in ["reflink", "mount propagation", "LOOP_CONFIGURE"] {
        assert_ne!(status_of(&checks, name), "FAIL", "{name}: {checks:?}");
    }
    assert_eq!(code, 0, "{checks:?}");

    let missing = sb.path("no-such-pool");
    let (code, checks) = doctor(&["--pool", missing.to_str().unwrap(), "--endpoint", &endpoint]);
    assert_eq!(status_of(&checks, "pool"), "FAIL", "{checks:?}");
    assert!(checks
        .iter()
        .all(|c| c["status"] != "FAIL" || c["hint"].is_string()));
    assert_eq!(code, 1);

    // The text form: one line a check, starting with its status.
    let out = Command::new(BIN)
        .args(["doctor", "--pool"])
        .arg(&missing)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("pool")),
        "{text}"
    );
    assert!(
        text.lines()
            .all(|l| ["OK ", "WARN", "FAIL"].iter().any(|p| l.starts_with(p))),
        "{text}"
    );
    sb.assert_no_leaks();
}

/// The benchmark's short mode: every section runs and the report is written. The figures of
/// so short a run are not checked (the full run writes BENCHMARKS.md).
#[test]
fn bench_quick_mode_runs_and_writes_its_table() {
    let sb = Sandbox::new();
    let out_file = sb.path("BENCHMARKS.md");
    std::fs::write(&out_file, "# Benchmarks\n\nnotes kept\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "bench",
            "--quick",
            "--iterations",
            "1",
            "--soak",
            "4",
            "--pairs",
            "16",
            "--probes",
            "20",
            "--startups",
            "1",
        ])
        .arg("--dir")
        .arg(sb.path("bench"))
        .arg("--out")
        .arg(&out_file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(&out_file).unwrap();
    assert!(md.contains("notes kept"), "{md}");
    for needle in [
        "mount lifecycle ratio driver/shell",
        "block lifecycle ratio driver/shell",
        "pairs/s, 64 clients",
        "Probe p50",
        "RSS, idle node-mode process",
        "start-up to a served socket",
        "release binary size",
        "| kernel |",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in:\n{md}");
    }
    sb.assert_no_leaks();
}

/// A directory holding links to the tools the driver runs, except those of `hidden`: a PATH for
/// a node image that lacks one filesystem's package.
fn tool_dir_without(sb: &Sandbox, hidden: &[&str]) -> String {
    let dir = sb.path("tools");
    std::fs::create_dir_all(&dir).unwrap();
    for tool in blockcsi::host::TOOLS
        .iter()
        .filter(|t| !hidden.contains(&t.name))
    {
        let found = blockcsi::host::find_tool(tool.name)
            .unwrap_or_else(|| panic!("{} is needed to run this test", tool.name));
        std::os::unix::fs::symlink(found, dir.join(tool.name)).unwrap();
    }
    dir.to_str().unwrap().to_string()
}

/// A node without xfsprogs is ready and stages ext4; only an xfs stage fails, naming the package.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_xfs_tools_is_ready_and_serves_ext4() {
    let sb = Sandbox::new();
    let xfs = ["mkfs.xfs", "xfs_growfs", "xfs_admin"];
    let path = tool_dir_without(&sb, &xfs);
    let driver = Driver::start_with(&sb, "all", &sb.socket(), 0, &[("PATH", &path)]);
    let mut c = driver.client().await;

    let probe = c.identity.probe(blockcsi::pb::ProbeRequest {}).await;
    assert!(probe.is_ok(), "{probe:?}");

    let ext4 = mount_cap("ext4");
    let id = c.create("pvc-ext4", 16 * MIB, &ext4).await;
    c.controller_publish(&id, &ext4).await;
    let staging = sb.dir("staging-ext4");
    c.stage(&id, &staging, &ext4).await.unwrap();
    c.unstage(&id, &staging).await;
    c.remove(&id).await;
    // The CreateVolume line ties the CO's name to the new volume id.
    let log = driver.log_text();
    assert!(
        log.lines().any(|l| l.contains("CreateVolume")
            && l.contains("pvc-ext4")
            && l.contains(&id)
            && l.contains("code=\"OK\"")),
        "{log}"
    );

    let xfs_cap = mount_cap("xfs");
    let id = c.create("pvc-xfs", 300 * MIB, &xfs_cap).await;
    c.controller_publish(&id, &xfs_cap).await;
    let staging = sb.dir("staging-xfs");
    let err = c.stage(&id, &staging, &xfs_cap).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("mkfs.xfs"), "{err:?}");
    assert!(err.message().contains("xfsprogs"), "{err:?}");
    // The failed stage left nothing behind; the volume is still removable.
    assert_eq!(sb.loops(), Vec::<String>::new(), "{}", driver.log_text());
    c.unstage(&id, &staging).await;
    c.remove(&id).await;
    let probe = c.identity.probe(blockcsi::pb::ProbeRequest {}).await;
    assert!(
        probe.is_ok(),
        "a failed xfs stage must not make the node unready: {probe:?}"
    );
    assert!(driver.stop().success());

    // doctor judges the same way: the xfs tools WARN, and nothing FAILs for them.
    let pool = sb.dir("doctor-pool");
    let out = Command::new(BIN)
        .args(["doctor", "--json", "--pool", &pool])
        .env("PATH", &path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for tool in xfs {
        assert_eq!(
            status_of(&checks, &format!("tool {tool}")),
            "WARN",
            "{checks:?}"
        );
    }
    assert_eq!(status_of(&checks, "tool blkid"), "OK", "{checks:?}");
    assert_eq!(status_of(&checks, "tool mkfs.ext4"), "OK", "{checks:?}");
    sb.assert_no_leaks();
}

/// `--version` names the commit the binary was built from.
#[test]
fn version_names_the_commit() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("blockcsi {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want), "{text}");
    let commit = text
        .trim()
        .strip_prefix(&want)
        .unwrap()
        .strip_suffix(')')
        .unwrap();
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        // Built from this checkout: the commit, perhaps marked dirty. (A commit made after the
        // build would differ; the test binary is built with the driver, so it does not.)
        Some(head) => assert!(
            commit == head || commit == format!("{head}-dirty"),
            "{commit} vs {head}"
        ),
        None => assert_eq!(commit, "unknown"),
    }
}
