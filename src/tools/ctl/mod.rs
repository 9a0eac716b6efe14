//! `blockcsi ctl`: a CSI client for people, over the driver's Unix socket. Each subcommand is one
//! or two CSI calls; the answer prints as a table, or as JSON with `--json` for scripts. A failed
//! call prints its gRPC code and message on stderr and exits 1.
//!
//! This module holds the command line and the dispatch; `info`, `volume` and `snapshot` each
//! hold one subcommand group, one function per subcommand; `output` the table and JSON forms.

mod info;
mod output;
mod snapshot;
mod volume;

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use tonic::transport::Channel;
use tonic::Status;

use crate::client::connect;
use crate::daemon::config::{socket_path, DEFAULT_ENDPOINT};
use crate::error::code_name;
use crate::pb;
use crate::pb::controller_client::ControllerClient;
use crate::pb::identity_client::IdentityClient;
use crate::pb::node_client::NodeClient;

pub use output::{table, Output};

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The driver's CSI socket
    #[arg(long, env = "CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT, global = true)]
    pub endpoint: String,
    /// Print JSON instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Plugin name, version, capabilities, readiness and node information
    Info,
    /// Volumes: provisioning, publication, staging and mounting
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots of volumes
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// CreateVolume
    Create {
        /// The CSI name (the idempotency key: the same name returns the same volume)
        name: String,
        /// Size: bytes, or with a suffix Ki/Mi/Gi/Ti (binary) or K/M/G/T (decimal)
        #[arg(long, default_value = "1Gi", value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        cap: CapArgs,
        /// A StorageClass parameter KEY=VALUE (repeatable)
        #[arg(long = "param", value_parser = parse_key_value)]
        params: Vec<(String, String)>,
        /// Restore the new volume from this snapshot
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone the new volume from this volume
        #[arg(long)]
        from_volume: Option<String>,
    },
    /// ListVolumes (every page)
    List,
    /// ControllerGetVolume
    Get { volume_id: String },
    /// DeleteVolume
    Delete { volume_id: String },
    /// ControllerPublishVolume to a node
    Publish {
        volume_id: String,
        /// The node [default: the node id of the driver behind --endpoint]
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// ControllerUnpublishVolume from a node
    Unpublish {
        volume_id: String,
        /// The node [default: the node id of the driver behind --endpoint]
        #[arg(long)]
        node: Option<String>,
    },
    /// NodeStageVolume: attach, format if blank, mount at the staging path
    Stage {
        volume_id: String,
        #[arg(long)]
        staging_path: PathBuf,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodeUnstageVolume
    Unstage {
        volume_id: String,
        #[arg(long)]
        staging_path: PathBuf,
    },
    /// NodePublishVolume: bind the staged volume onto a target path
    Mount {
        volume_id: String,
        #[arg(long)]
        staging_path: PathBuf,
        #[arg(long)]
        target: PathBuf,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        cap: CapArgs,
    },
    /// NodeUnpublishVolume
    Unmount {
        volume_id: String,
        #[arg(long)]
        target: PathBuf,
    },
    /// NodeGetVolumeStats of a staged or published path
    Stats {
        volume_id: String,
        #[arg(long)]
        path: PathBuf,
    },
    /// ControllerExpandVolume, then NodeExpandVolume when --path is given and the node must act
    Expand {
        volume_id: String,
        /// The new size (same syntax as create)
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Where the volume is published or staged on this node, for the node-side step
        #[arg(long)]
        path: Option<PathBuf>,
        #[arg(long)]
        staging_path: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// CreateSnapshot
    Create {
        /// The CSI name of the snapshot
        name: String,
        #[arg(long)]
        volume: String,
    },
    /// ListSnapshots (every page)
    List {
        /// Only the snapshots of this volume
        #[arg(long)]
        volume: Option<String>,
    },
    /// DeleteSnapshot
    Delete { snapshot_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessModeArg {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

/// The volume capability of a request: filesystem (default ext4 by the driver) or raw block.
#[derive(Debug, Clone, Args)]
pub struct CapArgs {
    /// Raw block access instead of a filesystem
    #[arg(long, conflicts_with_all = ["fs", "mount_flags"])]
    pub block: bool,
    /// Filesystem type (ext4, xfs) [default: the driver's, ext4]
    #[arg(long)]
    pub fs: Option<String>,
    /// A mount option (repeatable)
    #[arg(long = "mount-flag")]
    pub mount_flags: Vec<String>,
    #[arg(long, value_enum, default_value = "single-node-writer")]
    pub access_mode: AccessModeArg,
}

impl CapArgs {
    pub(super) fn capability(&self) -> pb::VolumeCapability {
        use pb::volume_capability::access_mode::Mode;
        use pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
        let mode = match self.access_mode {
            AccessModeArg::SingleNodeWriter => Mode::SingleNodeWriter,
            AccessModeArg::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
            AccessModeArg::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
            AccessModeArg::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
            AccessModeArg::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
            AccessModeArg::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
            AccessModeArg::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
        };
        pb::VolumeCapability {
            access_type: Some(if self.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: self.fs.clone().unwrap_or_default(),
                    mount_flags: self.mount_flags.clone(),
                    ..Default::default()
                })
            }),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }
}

/// Parses `1Gi`, `512Mi`, `10G`, `4096`: binary suffixes with `i`, decimal without, an optional
/// trailing `B`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 1Gi, 512Mi or 4096"))?;
    let mult: u64 = match suffix {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown size suffix {suffix:?} (use Ki, Mi, Gi, Ti, K, M, G or T)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|&b| b <= i64::MAX as u64)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} must be KEY=VALUE"))
}

/// Why a ctl command failed.
#[derive(Debug)]
pub enum CtlError {
    /// The driver answered with an error status.
    Rpc { call: &'static str, status: Status },
    /// No connection, or a bad argument found before any call.
    Other(String),
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtlError::Rpc { call, status } => write!(
                f,
                "{call}: {}: {}",
                code_name(status.code()),
                status.message()
            ),
            CtlError::Other(m) => f.write_str(m),
        }
    }
}

pub(super) fn rpc(call: &'static str) -> impl Fn(Status) -> CtlError {
    move |status| CtlError::Rpc { call, status }
}

pub(super) struct Clients {
    pub(super) identity: IdentityClient<Channel>,
    pub(super) controller: ControllerClient<Channel>,
    pub(super) node: NodeClient<Channel>,
}

/// Runs a ctl command; returns the process exit status.
pub fn main(args: CtlArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(out) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out.json).unwrap_or_default()
                );
            } else {
                print!("{}", out.text);
            }
            0
        }
        Err(e) => {
            if args.json {
                let (code, message) = match &e {
                    CtlError::Rpc { status, .. } => {
                        (code_name(status.code()), status.message().to_string())
                    }
                    CtlError::Other(m) => ("CLIENT", m.clone()),
                };
                println!("{}", json!({"error": {"code": code, "message": message}}));
            }
            eprintln!("error: {e}");
            1
        }
    }
}

pub async fn run(args: &CtlArgs) -> Result<Output, CtlError> {
    let socket = socket_path(&args.endpoint).map_err(|e| CtlError::Other(e.to_string()))?;
    let channel = connect(&socket)
        .await
        .map_err(|e| CtlError::Other(format!("cannot connect to {}: {e}", socket.display())))?;
    let mut c = Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    };
    match &args.command {
        CtlCommand::Info => info::info(&mut c).await,
        CtlCommand::Volume(v) => volume::run(&mut c, v).await,
        CtlCommand::Snapshot(s) => snapshot::run(&mut c, s).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (s, want) in [
            ("4096", Some(4096)),
            ("1Gi", Some(1 << 30)),
            ("512Mi", Some(512 << 20)),
            ("512MiB", Some(512 << 20)),
            ("10G", Some(10_000_000_000)),
            ("1k", Some(1000)),
            ("", None),
            ("Gi", None),
            ("1Xi", None),
            ("-1", None),
            ("99999999999Ti", None),
        ] {
            assert_eq!(parse_size(s).ok(), want, "{s:?}");
        }
    }
}
