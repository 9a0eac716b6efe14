//! `blockcsi ctl`: a CSI client for people, over the driver's Unix socket. Each subcommand is one
//! or two CSI calls; the answer prints as a table, or as JSON with `--json` for scripts. A failed
//! call prints its gRPC code and message on stderr and exits 1.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::client::connect;
use crate::daemon::config::{socket_path, DEFAULT_ENDPOINT};
use crate::error::code_name;
use crate::pb;
use crate::pb::controller_client::ControllerClient;
use crate::pb::identity_client::IdentityClient;
use crate::pb::node_client::NodeClient;
use crate::tools::human_bytes;

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
    fn capability(&self) -> pb::VolumeCapability {
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

fn rpc(call: &'static str) -> impl Fn(Status) -> CtlError {
    move |status| CtlError::Rpc { call, status }
}

struct Clients {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
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

/// A command's answer in both forms.
pub struct Output {
    pub json: Value,
    pub text: String,
}

impl Output {
    fn new(json: Value, text: String) -> Output {
        Output { json, text }
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
        CtlCommand::Info => info(&mut c).await,
        CtlCommand::Volume(v) => volume(&mut c, v).await,
        CtlCommand::Snapshot(s) => snapshot(&mut c, s).await,
    }
}

async fn info(c: &mut Clients) -> Result<Output, CtlError> {
    let plugin = c
        .identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .map_err(rpc("GetPluginInfo"))?
        .into_inner();
    let caps = c
        .identity
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .map_err(rpc("GetPluginCapabilities"))?
        .into_inner();
    let plugin_caps: Vec<String> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::plugin_capability::Type::Service(s)) => {
                pb::plugin_capability::service::Type::try_from(s.r#type)
                    .ok()
                    .map(|t| t.as_str_name().to_string())
            }
            Some(pb::plugin_capability::Type::VolumeExpansion(e)) => {
                pb::plugin_capability::volume_expansion::Type::try_from(e.r#type)
                    .ok()
                    .map(|t| format!("VOLUME_EXPANSION_{}", t.as_str_name()))
            }
            None => None,
        })
        .collect();
    // Probe's failure is an answer worth showing, not a reason to stop.
    let (ready, probe_error) = match c.identity.probe(pb::ProbeRequest {}).await {
        Ok(r) => (r.into_inner().ready.unwrap_or(true), None),
        Err(s) => (
            false,
            Some(format!("{}: {}", code_name(s.code()), s.message())),
        ),
    };
    // A node-mode driver serves no Controller service and a controller-mode one no Node
    // service: UNIMPLEMENTED there just means "not in this process".
    let controller_caps = match c
        .controller
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
    {
        Ok(r) => Some(
            r.into_inner()
                .capabilities
                .iter()
                .filter_map(|c| match &c.r#type {
                    Some(pb::controller_service_capability::Type::Rpc(r)) => {
                        pb::controller_service_capability::rpc::Type::try_from(r.r#type)
                            .ok()
                            .map(|t| t.as_str_name().to_string())
                    }
                    None => None,
                })
                .collect::<Vec<_>>(),
        ),
        Err(s) if s.code() == Code::Unimplemented => None,
        Err(s) => return Err(rpc("ControllerGetCapabilities")(s)),
    };
    let node_info = match c.node.node_get_info(pb::NodeGetInfoRequest {}).await {
        Ok(r) => Some(r.into_inner()),
        Err(s) if s.code() == Code::Unimplemented => None,
        Err(s) => return Err(rpc("NodeGetInfo")(s)),
    };
    let node_caps = match &node_info {
        Some(_) => Some(
            c.node
                .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
                .await
                .map_err(rpc("NodeGetCapabilities"))?
                .into_inner()
                .capabilities
                .iter()
                .filter_map(|c| match &c.r#type {
                    Some(pb::node_service_capability::Type::Rpc(r)) => {
                        pb::node_service_capability::rpc::Type::try_from(r.r#type)
                            .ok()
                            .map(|t| t.as_str_name().to_string())
                    }
                    None => None,
                })
                .collect::<Vec<_>>(),
        ),
        None => None,
    };

    let node_json = node_info.as_ref().map(|n| {
        json!({
            "node_id": n.node_id,
            "max_volumes_per_node": n.max_volumes_per_node,
            "topology": n.accessible_topology.as_ref().map(|t| &t.segments),
        })
    });
    let json = json!({
        "name": plugin.name,
        "vendor_version": plugin.vendor_version,
        "manifest": plugin.manifest,
        "plugin_capabilities": plugin_caps,
        "ready": ready,
        "probe_error": probe_error,
        "controller_capabilities": controller_caps,
        "node": node_json,
        "node_capabilities": node_caps,
    });

    let mut rows = vec![
        vec!["name".to_string(), plugin.name.clone()],
        vec!["version".into(), plugin.vendor_version.clone()],
        vec!["plugin capabilities".into(), plugin_caps.join(", ")],
        vec![
            "ready".into(),
            match &probe_error {
                Some(e) => format!("no ({e})"),
                None => ready.to_string(),
            },
        ],
        vec![
            "controller capabilities".into(),
            controller_caps
                .as_ref()
                .map(|c| c.join(", "))
                .unwrap_or_else(|| "(no controller service here)".into()),
        ],
    ];
    match &node_info {
        Some(n) => {
            rows.push(vec!["node id".into(), n.node_id.clone()]);
            rows.push(vec![
                "max volumes per node".into(),
                match n.max_volumes_per_node {
                    0 => "no limit".to_string(),
                    m => m.to_string(),
                },
            ]);
            rows.push(vec![
                "node topology".into(),
                n.accessible_topology
                    .as_ref()
                    .map(|t| segments(&t.segments))
                    .unwrap_or_default(),
            ]);
            rows.push(vec![
                "node capabilities".into(),
                node_caps.unwrap_or_default().join(", "),
            ]);
        }
        None => rows.push(vec!["node".into(), "(no node service here)".into()]),
    }
    Ok(Output::new(json, table(&[], &rows)))
}

fn segments<'a>(s: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    s.into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn volume_json(
    v: &pb::Volume,
    published: Option<&[String]>,
    cond: Option<&pb::VolumeCondition>,
) -> Value {
    let mut j = json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": v.volume_context,
        "accessible_topology": v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>(),
    });
    if let Some(src) = &v.content_source {
        j["content_source"] = match &src.r#type {
            Some(pb::volume_content_source::Type::Snapshot(s)) => {
                json!({"snapshot_id": s.snapshot_id})
            }
            Some(pb::volume_content_source::Type::Volume(s)) => json!({"volume_id": s.volume_id}),
            None => Value::Null,
        };
    }
    if let Some(p) = published {
        j["published_node_ids"] = json!(p);
    }
    if let Some(c) = cond {
        j["condition"] = json!({"abnormal": c.abnormal, "message": c.message});
    }
    j
}

fn volume_row(
    v: &pb::Volume,
    published: Option<&[String]>,
    cond: Option<&pb::VolumeCondition>,
) -> Vec<String> {
    vec![
        v.volume_id.clone(),
        human_bytes(v.capacity_bytes),
        v.accessible_topology
            .iter()
            .map(|t| segments(&t.segments))
            .collect::<Vec<_>>()
            .join(" "),
        published.map(|p| p.join(",")).unwrap_or_default(),
        match cond {
            Some(c) if c.abnormal => format!("ABNORMAL: {}", c.message),
            Some(_) => "ok".into(),
            None => String::new(),
        },
    ]
}

const VOLUME_HEADER: [&str; 5] = ["VOLUME", "SIZE", "TOPOLOGY", "PUBLISHED ON", "CONDITION"];

/// The node to publish to: the one given, or the node of the driver we are talking to.
async fn node_id(c: &mut Clients, given: &Option<String>) -> Result<String, CtlError> {
    if let Some(n) = given {
        return Ok(n.clone());
    }
    match c.node.node_get_info(pb::NodeGetInfoRequest {}).await {
        Ok(r) => Ok(r.into_inner().node_id),
        Err(s) => Err(CtlError::Other(format!(
            "no --node given and the driver here serves no node ({}: {}); pass --node",
            code_name(s.code()),
            s.message()
        ))),
    }
}

fn path_str(p: &Path) -> Result<String, CtlError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| CtlError::Other(format!("{} is not UTF-8", p.display())))
}

/// An absolute form of a path given on the command line: the driver resolves paths in its own
/// working directory, not ours.
fn abs_path(p: &Path) -> Result<String, CtlError> {
    if p.is_absolute() {
        return path_str(p);
    }
    let cwd =
        std::env::current_dir().map_err(|e| CtlError::Other(format!("current directory: {e}")))?;
    path_str(&cwd.join(p))
}

fn done(json: Value, text: String) -> Result<Output, CtlError> {
    Ok(Output::new(json, text + "\n"))
}

async fn volume(c: &mut Clients, cmd: &VolumeCommand) -> Result<Output, CtlError> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            cap,
            params,
            from_snapshot,
            from_volume,
        } => {
            use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: s.clone(),
                })),
                (None, Some(v)) => Some(Type::Volume(VolumeSource {
                    volume_id: v.clone(),
                })),
                (None, None) => None,
            };
            let v = c
                .controller
                .create_volume(pb::CreateVolumeRequest {
                    name: name.clone(),
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: *size as i64,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![cap.capability()],
                    parameters: params.iter().cloned().collect(),
                    volume_content_source: source
                        .map(|t| pb::VolumeContentSource { r#type: Some(t) }),
                    ..Default::default()
                })
                .await
                .map_err(rpc("CreateVolume"))?
                .into_inner()
                .volume
                .unwrap_or_default();
            Ok(Output::new(
                volume_json(&v, None, None),
                table(
                    &VOLUME_HEADER[..3],
                    &[volume_row(&v, None, None)[..3].to_vec()],
                ),
            ))
        }
        VolumeCommand::List => {
            let mut entries = Vec::new();
            let mut token = String::new();
            loop {
                let r = c
                    .controller
                    .list_volumes(pb::ListVolumesRequest {
                        max_entries: 0,
                        starting_token: token.clone(),
                    })
                    .await
                    .map_err(rpc("ListVolumes"))?
                    .into_inner();
                entries.extend(r.entries);
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            let mut js = Vec::new();
            let mut rows = Vec::new();
            for e in &entries {
                let v = e.volume.clone().unwrap_or_default();
                let published = e.status.as_ref().map(|s| s.published_node_ids.as_slice());
                let cond = e.status.as_ref().and_then(|s| s.volume_condition.as_ref());
                js.push(volume_json(&v, published, cond));
                rows.push(volume_row(&v, published, cond));
            }
            Ok(Output::new(Value::Array(js), table(&VOLUME_HEADER, &rows)))
        }
        VolumeCommand::Get { volume_id } => {
            let r = c
                .controller
                .controller_get_volume(pb::ControllerGetVolumeRequest {
                    volume_id: volume_id.clone(),
                })
                .await
                .map_err(rpc("ControllerGetVolume"))?
                .into_inner();
            let v = r.volume.unwrap_or_default();
            let published = r.status.as_ref().map(|s| s.published_node_ids.as_slice());
            let cond = r.status.as_ref().and_then(|s| s.volume_condition.as_ref());
            Ok(Output::new(
                volume_json(&v, published, cond),
                table(&VOLUME_HEADER, &[volume_row(&v, published, cond)]),
            ))
        }
        VolumeCommand::Delete { volume_id } => {
            c.controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: volume_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(rpc("DeleteVolume"))?;
            done(
                json!({"volume_id": volume_id, "deleted": true}),
                format!("deleted {volume_id}"),
            )
        }
        VolumeCommand::Publish {
            volume_id,
            node,
            readonly,
            cap,
        } => {
            let node = node_id(c, node).await?;
            let r = c
                .controller
                .controller_publish_volume(pb::ControllerPublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    node_id: node.clone(),
                    volume_capability: Some(cap.capability()),
                    readonly: *readonly,
                    ..Default::default()
                })
                .await
                .map_err(rpc("ControllerPublishVolume"))?
                .into_inner();
            done(
                json!({"volume_id": volume_id, "node_id": node, "publish_context": r.publish_context}),
                format!("published {volume_id} to node {node}"),
            )
        }
        VolumeCommand::Unpublish { volume_id, node } => {
            let node = node_id(c, node).await?;
            c.controller
                .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    node_id: node.clone(),
                    ..Default::default()
                })
                .await
                .map_err(rpc("ControllerUnpublishVolume"))?;
            done(
                json!({"volume_id": volume_id, "node_id": node, "unpublished": true}),
                format!("unpublished {volume_id} from node {node}"),
            )
        }
        VolumeCommand::Stage {
            volume_id,
            staging_path,
            cap,
        } => {
            let staging = abs_path(staging_path)?;
            c.node
                .node_stage_volume(pb::NodeStageVolumeRequest {
                    volume_id: volume_id.clone(),
                    staging_target_path: staging.clone(),
                    volume_capability: Some(cap.capability()),
                    ..Default::default()
                })
                .await
                .map_err(rpc("NodeStageVolume"))?;
            done(
                json!({"volume_id": volume_id, "staging_path": staging, "staged": true}),
                format!("staged {volume_id} at {staging}"),
            )
        }
        VolumeCommand::Unstage {
            volume_id,
            staging_path,
        } => {
            let staging = abs_path(staging_path)?;
            c.node
                .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    volume_id: volume_id.clone(),
                    staging_target_path: staging.clone(),
                })
                .await
                .map_err(rpc("NodeUnstageVolume"))?;
            done(
                json!({"volume_id": volume_id, "staging_path": staging, "unstaged": true}),
                format!("unstaged {volume_id} from {staging}"),
            )
        }
        VolumeCommand::Mount {
            volume_id,
            staging_path,
            target,
            readonly,
            cap,
        } => {
            let staging = abs_path(staging_path)?;
            let target = abs_path(target)?;
            c.node
                .node_publish_volume(pb::NodePublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    staging_target_path: staging.clone(),
                    target_path: target.clone(),
                    volume_capability: Some(cap.capability()),
                    readonly: *readonly,
                    ..Default::default()
                })
                .await
                .map_err(rpc("NodePublishVolume"))?;
            done(
                json!({"volume_id": volume_id, "staging_path": staging, "target": target, "mounted": true}),
                format!("mounted {volume_id} at {target}"),
            )
        }
        VolumeCommand::Unmount { volume_id, target } => {
            let target = abs_path(target)?;
            c.node
                .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    target_path: target.clone(),
                })
                .await
                .map_err(rpc("NodeUnpublishVolume"))?;
            done(
                json!({"volume_id": volume_id, "target": target, "unmounted": true}),
                format!("unmounted {volume_id} from {target}"),
            )
        }
        VolumeCommand::Stats { volume_id, path } => {
            let path = abs_path(path)?;
            let r = c
                .node
                .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id: volume_id.clone(),
                    volume_path: path.clone(),
                    ..Default::default()
                })
                .await
                .map_err(rpc("NodeGetVolumeStats"))?
                .into_inner();
            let unit = |u: i32| match pb::volume_usage::Unit::try_from(u) {
                Ok(pb::volume_usage::Unit::Bytes) => "bytes",
                Ok(pb::volume_usage::Unit::Inodes) => "inodes",
                _ => "unknown",
            };
            let usage: Vec<Value> = r
                .usage
                .iter()
                .map(|u| json!({"unit": unit(u.unit), "total": u.total, "used": u.used, "available": u.available}))
                .collect();
            let rows: Vec<Vec<String>> = r
                .usage
                .iter()
                .map(|u| {
                    let f = |n: i64| {
                        if u.unit == pb::volume_usage::Unit::Bytes as i32 {
                            human_bytes(n)
                        } else {
                            n.to_string()
                        }
                    };
                    vec![
                        unit(u.unit).to_string(),
                        f(u.total),
                        f(u.used),
                        f(u.available),
                    ]
                })
                .collect();
            let cond = r.volume_condition.as_ref();
            let mut text = table(&["UNIT", "TOTAL", "USED", "AVAILABLE"], &rows);
            if let Some(c) = cond {
                text.push_str(&format!(
                    "condition: {}\n",
                    if c.abnormal {
                        format!("ABNORMAL: {}", c.message)
                    } else {
                        "ok".into()
                    }
                ));
            }
            Ok(Output::new(
                json!({
                    "volume_id": volume_id,
                    "path": path,
                    "usage": usage,
                    "condition": cond.map(|c| json!({"abnormal": c.abnormal, "message": c.message})),
                }),
                text,
            ))
        }
        VolumeCommand::Expand {
            volume_id,
            size,
            path,
            staging_path,
        } => {
            let r = c
                .controller
                .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                    volume_id: volume_id.clone(),
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: *size as i64,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map_err(rpc("ControllerExpandVolume"))?
                .into_inner();
            let mut capacity = r.capacity_bytes;
            let mut node_expanded = false;
            if let (true, Some(p)) = (r.node_expansion_required, path) {
                let n = c
                    .node
                    .node_expand_volume(pb::NodeExpandVolumeRequest {
                        volume_id: volume_id.clone(),
                        volume_path: abs_path(p)?,
                        capacity_range: Some(pb::CapacityRange {
                            required_bytes: *size as i64,
                            limit_bytes: 0,
                        }),
                        staging_target_path: staging_path
                            .as_deref()
                            .map(abs_path)
                            .transpose()?
                            .unwrap_or_default(),
                        ..Default::default()
                    })
                    .await
                    .map_err(rpc("NodeExpandVolume"))?
                    .into_inner();
                if n.capacity_bytes > 0 {
                    capacity = n.capacity_bytes;
                }
                node_expanded = true;
            }
            let pending = r.node_expansion_required && !node_expanded;
            done(
                json!({
                    "volume_id": volume_id,
                    "capacity_bytes": capacity,
                    "node_expansion_required": r.node_expansion_required,
                    "node_expanded": node_expanded,
                }),
                format!(
                    "expanded {volume_id} to {}{}",
                    human_bytes(capacity),
                    if pending {
                        " (the node must still grow the filesystem: repeat with --path)"
                    } else {
                        ""
                    }
                ),
            )
        }
    }
}

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": s.creation_time.as_ref().map(|t| t.seconds),
        "ready_to_use": s.ready_to_use,
    })
}

fn snapshot_row(s: &pb::Snapshot) -> Vec<String> {
    vec![
        s.snapshot_id.clone(),
        s.source_volume_id.clone(),
        human_bytes(s.size_bytes),
        s.ready_to_use.to_string(),
    ]
}

const SNAPSHOT_HEADER: [&str; 4] = ["SNAPSHOT", "SOURCE VOLUME", "SIZE", "READY"];

async fn snapshot(c: &mut Clients, cmd: &SnapshotCommand) -> Result<Output, CtlError> {
    match cmd {
        SnapshotCommand::Create { name, volume } => {
            let s = c
                .controller
                .create_snapshot(pb::CreateSnapshotRequest {
                    source_volume_id: volume.clone(),
                    name: name.clone(),
                    ..Default::default()
                })
                .await
                .map_err(rpc("CreateSnapshot"))?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            Ok(Output::new(
                snapshot_json(&s),
                table(&SNAPSHOT_HEADER, &[snapshot_row(&s)]),
            ))
        }
        SnapshotCommand::List { volume } => {
            let mut snaps = Vec::new();
            let mut token = String::new();
            loop {
                let r = c
                    .controller
                    .list_snapshots(pb::ListSnapshotsRequest {
                        starting_token: token.clone(),
                        source_volume_id: volume.clone().unwrap_or_default(),
                        ..Default::default()
                    })
                    .await
                    .map_err(rpc("ListSnapshots"))?
                    .into_inner();
                snaps.extend(r.entries.into_iter().filter_map(|e| e.snapshot));
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            Ok(Output::new(
                Value::Array(snaps.iter().map(snapshot_json).collect()),
                table(
                    &SNAPSHOT_HEADER,
                    &snaps.iter().map(snapshot_row).collect::<Vec<_>>(),
                ),
            ))
        }
        SnapshotCommand::Delete { snapshot_id } => {
            c.controller
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: snapshot_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(rpc("DeleteSnapshot"))?;
            done(
                json!({"snapshot_id": snapshot_id, "deleted": true}),
                format!("deleted {snapshot_id}"),
            )
        }
    }
}

/// Left-aligned columns separated by two spaces; a header row when given. Without a header the
/// rows are key/value pairs.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = rows
        .iter()
        .map(Vec::len)
        .chain(std::iter::once(header.len()))
        .max()
        .unwrap_or(0);
    let mut widths = vec![0; cols];
    let all = std::iter::once(header.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .filter(|h| !h.is_empty())
        .chain(rows.iter().cloned())
        .collect::<Vec<_>>();
    for row in &all {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if all.is_empty() || (rows.is_empty() && !header.is_empty()) {
        out.push_str("(none)\n");
    }
    out
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

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONG HEADER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "2".into()],
            ],
        );
        assert_eq!(t, "A     LONG HEADER\nxxxx  1\ny     2\n");
        assert_eq!(table(&["A", "B"], &[]), "A  B\n(none)\n");
    }
}
