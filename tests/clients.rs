//! Clients of other gRPC stacks on the CSI socket: grpcio (gRPC C-core, configured with
//! `grpc.default_authority=localhost` as README says, since its default authority is the
//! percent-encoded socket path), grpc-go (tests/e2e/csictl) and tonic with their defaults.
//!
//! The Python client's packages are installed by this test into a cached virtualenv, so a
//! fresh machine needs only python3 and the package index; the Go client builds from the Go
//! module cache or proxy.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blockcsi::pb;
use common::*;

/// Pinned, so a new release cannot change what the test proves.
const GRPCIO: &str = "1.85.1";

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
        .join("blockcsi")
}

/// The virtualenv's python, with grpcio and grpcio-tools at the pinned version.
fn python() -> PathBuf {
    let venv = cache_dir().join(format!("venv-grpc-{GRPCIO}"));
    let python = venv.join("bin/python");
    let ready = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                &format!("import grpc, grpc_tools; assert grpc.__version__ == '{GRPCIO}'"),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ready(&python) {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            &format!("grpcio=={GRPCIO}"),
            &format!("grpcio-tools=={GRPCIO}"),
        ]));
        assert!(ready(&python), "grpcio {GRPCIO} did not install");
    }
    python
}

#[test]
fn grpcio_client_with_localhost_authority() {
    let python = python();
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let scratch = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run(Command::new(python)
        .arg(root.join("tests/clients/csi_client.py"))
        .arg(&driver.socket)
        .arg(root.join("proto"))
        .arg(scratch.path()));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 211 calls");
    drop(driver);
    sb.assert_no_leaks();
}

#[test]
fn grpc_go_client() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("csictl");
    run(Command::new("go")
        .current_dir(root.join("tests/e2e/csictl"))
        .args(["build", "-o"])
        .arg(&bin)
        .arg("."));
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let endpoint = format!("unix://{}", driver.socket.display());
    let csictl = |command: &str| {
        let out = run(Command::new(&bin).args(["-endpoint", &endpoint, command]));
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(csictl("controller-caps").contains("CREATE_DELETE_VOLUME"));
    assert!(csictl("node-caps").contains("STAGE_UNSTAGE_VOLUME"));
    assert!(csictl("node-info").contains(&format!("node_id {NODE}")));
    drop(driver);
    sb.assert_no_leaks();
}

#[tokio::test]
async fn tonic_client() {
    let sb = Sandbox::new();
    let driver = Driver::all(&sb);
    let mut c = driver.client().await;
    for _ in 0..50 {
        let probe = c.identity.probe(pb::ProbeRequest {}).await.unwrap();
        assert_eq!(probe.into_inner().ready, Some(true));
    }
    let id = c.create("tonic-client", 16 * MIB, &mount_cap("ext4")).await;
    let listed = c
        .controller
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed
        .entries
        .iter()
        .any(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == id)));
    c.remove(&id).await;
    drop(driver);
    sb.assert_no_leaks();
}
