//! Shared helpers of the real-kernel tests: run the `blockcsi` binary on a private directory,
//! talk CSI to it over its socket, and check that nothing (loop device, mount, image) leaks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockcsi::pb;
use blockcsi::pb::controller_client::ControllerClient;
use blockcsi::pb::group_controller_client::GroupControllerClient;
use blockcsi::pb::identity_client::IdentityClient;
use blockcsi::pb::node_client::NodeClient;
use tonic::transport::Channel;

pub const MIB: i64 = 1 << 20;
pub const NODE: &str = "test-node";

/// Real-kernel tests attach loop devices and mount filesystems.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the real-kernel tests need root (loop devices, mkfs, mount); run them as root, \
         or run `cargo test --lib` for the unit tests alone"
    );
}

/// A private directory with a pool, a socket and room for staging and target paths.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        require_root();
        Sandbox {
            dir: tempfile::Builder::new()
                .prefix("blockcsi-test-")
                .tempdir()
                .unwrap(),
        }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn pool(&self) -> PathBuf {
        self.path("pool")
    }
    pub fn socket(&self) -> PathBuf {
        self.path("csi.sock")
    }
    /// Creates a directory under the sandbox (as the CO would) and returns its path as a string.
    pub fn dir(&self, rel: &str) -> String {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// Loop devices backed by a file inside the sandbox.
    pub fn loops(&self) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
                if backing
                    .trim()
                    .starts_with(self.dir.path().to_str().unwrap())
                {
                    out.push(format!("{name} -> {}", backing.trim()));
                }
            }
        }
        out
    }

    /// Mount points inside the sandbox.
    pub fn mounts(&self) -> Vec<String> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let entries = blockcsi::host::mountinfo::parse(&text).unwrap();
        entries
            .into_iter()
            // A test may mount a filesystem of its choice as the pool itself.
            .filter(|m| m.mount_point.starts_with(self.dir.path()) && m.mount_point != self.pool())
            .map(|m| m.mount_point.display().to_string())
            .collect()
    }

    pub fn images(&self) -> Vec<String> {
        match std::fs::read_dir(self.pool().join("volumes")) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => vec![],
        }
    }

    pub fn assert_no_leaks(&self) {
        assert_eq!(self.loops(), Vec::<String>::new(), "leaked loop devices");
        assert_eq!(self.mounts(), Vec::<String>::new(), "leaked mounts");
        assert_eq!(self.images(), Vec::<String>::new(), "leaked images");
    }

    /// Last-resort cleanup so a failing test does not poison the machine.
    fn force_clean(&self) {
        let mut mounts = self.mounts();
        mounts.reverse();
        for m in mounts {
            let _ = nix::mount::umount2(Path::new(&m), nix::mount::MntFlags::MNT_DETACH);
        }
        for l in self.loops() {
            let dev = format!("/dev/{}", l.split(' ').next().unwrap());
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.force_clean();
    }
}

/// A running `blockcsi serve`.
pub struct Driver {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Driver {
    pub fn start(sb: &Sandbox, mode: &str, socket: &Path, max_volumes: u32) -> Driver {
        Driver::start_with(sb, mode, socket, max_volumes, &[])
    }

    /// Starts the driver with extra environment variables (fault injection, limits).
    pub fn start_with(
        sb: &Sandbox,
        mode: &str,
        socket: &Path,
        max_volumes: u32,
        env: &[(&str, &str)],
    ) -> Driver {
        let log = sb.path(&format!(
            "driver-{mode}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_blockcsi"))
            .envs(env.iter().copied())
            .args([
                "serve",
                "--mode",
                mode,
                "--node-id",
                NODE,
                "--log-level",
                "debug",
            ])
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--pool")
            .arg(sb.pool())
            .arg("--max-volumes-per-node")
            .arg(max_volumes.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Driver {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        d.wait_for_socket();
        d
    }

    pub fn all(sb: &Sandbox) -> Driver {
        Driver::start(sb, "all", &sb.socket(), 0)
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("driver exited with {status}: {}", self.log_text());
            }
            // A socket file may be the stale one of a killed predecessor: only a connection
            // proves this process is serving.
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("driver socket never appeared: {}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "driver ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash at an arbitrary moment.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
pub struct Client {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub group: GroupControllerClient<Channel>,
}

impl Client {
    pub async fn connect(socket: &Path) -> Client {
        let channel = blockcsi::client::connect(socket).await.unwrap();
        Client {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            group: GroupControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }
}

pub fn mount_cap(fs: &str) -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.to_string(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn block_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

impl Client {
    pub async fn create(&mut self, name: &str, bytes: i64, cap: &pb::VolumeCapability) -> String {
        self.controller
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    }

    pub async fn controller_publish(&mut self, id: &str, cap: &pb::VolumeCapability) {
        self.controller
            .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                volume_id: id.into(),
                node_id: NODE.into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    pub async fn stage(
        &mut self,
        id: &str,
        staging: &str,
        cap: &pb::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn publish(
        &mut self,
        id: &str,
        staging: &str,
        target: &str,
        cap: &pb::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.into(),
                target_path: target.into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn unpublish(&mut self, id: &str, target: &str) {
        self.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.into(),
            })
            .await
            .unwrap();
    }

    pub async fn unstage(&mut self, id: &str, staging: &str) {
        self.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.into(),
            })
            .await
            .unwrap();
    }

    /// ControllerUnpublish and DeleteVolume, both of which must succeed.
    pub async fn remove(&mut self, id: &str) {
        self.controller
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: id.into(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        self.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// blkid's UUID of a device or image, to tell whether a filesystem was recreated.
pub fn fs_uuid(path: &Path) -> Option<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "UUID"])
        .arg(path)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn image_of(sb: &Sandbox, id: &str) -> PathBuf {
    sb.pool().join("volumes").join(format!("{id}.img"))
}

/// Writes a file and fsyncs it and its directory.
pub fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    std::fs::File::open(path.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}
