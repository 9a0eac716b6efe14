//! Settings of `blockcsi serve`, merged from three sources: flags beat environment variables
//! (both parsed by clap), which beat the YAML file named by `--config`, which beats the defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::host::FsType;

fn parse_fs_type(s: &str) -> Result<FsType, String> {
    FsType::parse(s).ok_or_else(|| format!("{s:?} is not ext4 or xfs"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Controller and node services in one process.
    All,
    Controller,
    Node,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::All | Mode::Controller)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::All | Mode::Node)
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

pub const DEFAULT_ENDPOINT: &str = "unix:///run/blockcsi/csi.sock";
pub const DEFAULT_POOL: &str = "/var/lib/blockcsi/pool";
pub const DEFAULT_DRIVER_NAME: &str = "blockcsi.dev";

/// Flags of `serve`; every one may also come from the environment variable it names.
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// Which services to run [default: all]
    #[arg(long, env = "BLOCKCSI_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// The CSI socket, as unix:///absolute/path.sock [default: unix:///run/blockcsi/csi.sock]
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<String>,
    /// This node's id [default: the host name]
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,
    /// The pool directory holding volume images and records [default: /var/lib/blockcsi/pool]
    #[arg(long, env = "BLOCKCSI_POOL")]
    pub pool: Option<PathBuf>,
    /// The CSI driver name (the StorageClass provisioner) [default: blockcsi.dev]
    #[arg(long, env = "BLOCKCSI_DRIVER_NAME")]
    pub driver_name: Option<String>,
    /// A YAML file with any of these settings (keys as the flag names, without dashes prefix)
    #[arg(long, env = "BLOCKCSI_CONFIG")]
    pub config: Option<PathBuf>,
    /// Most volumes published to this node at once; 0 = no limit [default: 0]
    #[arg(long, env = "BLOCKCSI_MAX_VOLUMES_PER_NODE")]
    pub max_volumes_per_node: Option<u64>,
    /// Filesystem for volumes whose capability names none: ext4 or xfs [default: ext4]
    #[arg(long, env = "BLOCKCSI_DEFAULT_FS_TYPE", value_parser = parse_fs_type)]
    pub default_fs_type: Option<FsType>,
    /// Most mkfs/fsck/resize processes at once; 0 = no limit [default: 4]
    #[arg(long, env = "BLOCKCSI_MAX_CONCURRENT_FORMATS")]
    pub max_concurrent_formats: Option<usize>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive [default: info]
    #[arg(long, env = "BLOCKCSI_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log line format [default: text]
    #[arg(long, env = "BLOCKCSI_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics on http://HOST:PORT/metrics [default: off]
    #[arg(long, env = "BLOCKCSI_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,
    /// Serve a liveness check on http://HOST:PORT/healthz (calls this driver's Probe) [default: off]
    #[arg(long, env = "BLOCKCSI_HEALTH_ADDRESS")]
    pub health_address: Option<String>,
    /// Kubelet's plugin registry directory: node mode registers with kubelet through a socket
    /// DIR/<driver-name>-reg.sock [default: off]
    #[arg(long, env = "BLOCKCSI_REGISTRATION_DIR")]
    pub registration_dir: Option<PathBuf>,
    /// The CSI socket's absolute path as kubelet sees it on the host (needed with --registration-dir)
    #[arg(long, env = "BLOCKCSI_KUBELET_REGISTRATION_PATH")]
    pub kubelet_registration_path: Option<PathBuf>,
}

/// The YAML config file: the same settings, named as the flags are.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    mode: Option<Mode>,
    endpoint: Option<String>,
    node_id: Option<String>,
    pool: Option<PathBuf>,
    driver_name: Option<String>,
    max_volumes_per_node: Option<u64>,
    default_fs_type: Option<FsType>,
    max_concurrent_formats: Option<usize>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    metrics_address: Option<String>,
    health_address: Option<String>,
    registration_dir: Option<PathBuf>,
    kubelet_registration_path: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    pub socket: PathBuf,
    pub node_id: String,
    pub pool: PathBuf,
    pub driver_name: String,
    pub max_volumes_per_node: u64,
    pub default_fs_type: FsType,
    pub max_concurrent_formats: usize,
    pub log_level: String,
    pub log_format: LogFormat,
    /// `HOST:PORT` of the metrics endpoint; `None` = no metrics.
    pub metrics_address: Option<String>,
    /// `HOST:PORT` of the `/healthz` endpoint; `None` = none.
    pub health_address: Option<String>,
    /// Registration with kubelet's plugin watcher; `None` = kubelet is told some other way.
    pub registration: Option<Registration>,
}

/// Where the registration socket goes and what it tells kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// `<registration dir>/<driver name>-reg.sock`.
    pub socket: PathBuf,
    /// The CSI socket's path on the host, which kubelet dials after GetInfo. It differs from
    /// our own socket path when the driver runs in a container with the directory mounted
    /// elsewhere.
    pub kubelet_endpoint: PathBuf,
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ServeArgs {
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let endpoint = self
            .endpoint
            .or(file.endpoint)
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let node_id = match self.node_id.or(file.node_id) {
            Some(id) => id,
            None => nix::unistd::gethostname()
                .map_err(|e| ConfigError::Invalid(format!("cannot read the host name: {e}")))?
                .to_string_lossy()
                .into_owned(),
        };
        let cfg = Config {
            mode: self.mode.or(file.mode).unwrap_or(Mode::All),
            socket: socket_path(&endpoint)?,
            node_id,
            pool: self
                .pool
                .or(file.pool)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_POOL)),
            driver_name: self
                .driver_name
                .or(file.driver_name)
                .unwrap_or_else(|| DEFAULT_DRIVER_NAME.to_string()),
            max_volumes_per_node: self
                .max_volumes_per_node
                .or(file.max_volumes_per_node)
                .unwrap_or(0),
            default_fs_type: self
                .default_fs_type
                .or(file.default_fs_type)
                .unwrap_or(FsType::Ext4),
            max_concurrent_formats: self
                .max_concurrent_formats
                .or(file.max_concurrent_formats)
                .unwrap_or(crate::host::linux::DEFAULT_MAX_CONCURRENT_FORMATS),
            log_level: self
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".to_string()),
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            metrics_address: self
                .metrics_address
                .or(file.metrics_address)
                .filter(|a| !a.is_empty()),
            health_address: self
                .health_address
                .or(file.health_address)
                .filter(|a| !a.is_empty()),
            registration: None,
        };
        // Checked first: the registration socket's name is made from the driver name.
        cfg.check()?;
        // An empty value (an unset-looking environment variable) means off, as for the addresses.
        let non_empty = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let registration = registration(
            &cfg,
            non_empty(self.registration_dir.or(file.registration_dir)),
            non_empty(
                self.kubelet_registration_path
                    .or(file.kubelet_registration_path),
            ),
        )?;
        Ok(Config {
            registration,
            ..cfg
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// `unix:///abs/path` (or a bare absolute path) to the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ConfigError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') || path.contains('\0') {
        return Err(ConfigError::Invalid(format!(
            "endpoint {endpoint:?} must be unix:///absolute/path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// CSI driver names: at most 63 characters, alphanumeric at both ends, '-', '.' and
/// alphanumerics between.
pub fn valid_driver_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.'))
}

/// The registration settings, checked: both or neither given, node mode only, paths a Unix
/// socket can have. The socket name carries the driver name so that several drivers share
/// kubelet's directory.
fn registration(
    cfg: &Config,
    dir: Option<PathBuf>,
    kubelet_path: Option<PathBuf>,
) -> Result<Option<Registration>, ConfigError> {
    let invalid = |m: String| Err(ConfigError::Invalid(m));
    let (dir, kubelet_endpoint) = match (dir, kubelet_path) {
        (None, None) => return Ok(None),
        (None, Some(_)) => {
            return invalid(
                "kubelet registration path is set but registration dir is not: without the \
                 registration dir kubelet is never told the path"
                    .into(),
            )
        }
        (Some(_), None) => {
            return invalid(
                "registration dir needs kubelet registration path (the CSI socket's path on \
                 the host)"
                    .into(),
            )
        }
        (Some(dir), Some(path)) => (dir, path),
    };
    if !cfg.mode.node() {
        return invalid(
            "registration dir is for the node plugin; controller mode has nothing to register"
                .into(),
        );
    }
    if !dir.is_absolute() {
        return invalid(format!(
            "registration dir {} must be an absolute path",
            dir.display()
        ));
    }
    // Kubelet dials this path and the proto field is a string: UTF-8, absolute, no `..`
    // (checked and normalised as request paths are), short enough for a socket address.
    let Some(text) = kubelet_endpoint.to_str() else {
        return invalid(format!(
            "kubelet registration path {} is not UTF-8",
            kubelet_endpoint.display()
        ));
    };
    let kubelet_endpoint = crate::csi::validate::path(text, "kubelet registration path")
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
    if kubelet_endpoint.as_os_str().len() > MAX_SOCKET_PATH {
        return invalid(format!(
            "kubelet registration path {text:?} is longer than {MAX_SOCKET_PATH} bytes"
        ));
    }
    let socket = dir.join(format!("{}-reg.sock", cfg.driver_name));
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return invalid(format!(
            "registration socket {} is longer than {MAX_SOCKET_PATH} bytes",
            socket.display()
        ));
    }
    Ok(Some(Registration {
        socket,
        kubelet_endpoint,
    }))
}

/// `HOST:PORT` with a numeric port; the host is resolved when the listener binds.
fn valid_listen_address(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    }
}

impl Config {
    fn check(&self) -> Result<(), ConfigError> {
        if !valid_driver_name(&self.driver_name) {
            return Err(ConfigError::Invalid(format!(
                "driver name {:?} must be 1-63 characters, alphanumeric at both ends, with '-', '.' \
                 and alphanumerics between",
                self.driver_name
            )));
        }
        if self.mode.node() && !crate::storage::filepool::is_node_id(&self.node_id) {
            return Err(ConfigError::Invalid(format!(
                "node id {:?} must be 1-128 letters, digits, '.', '_' or '-', alphanumeric at both ends",
                self.node_id
            )));
        }
        for (what, address) in [
            ("metrics", &self.metrics_address),
            ("health", &self.health_address),
        ] {
            if let Some(address) = address {
                if !valid_listen_address(address) {
                    return Err(ConfigError::Invalid(format!(
                        "{what} address {address:?} must be HOST:PORT (for example 0.0.0.0:9808 or [::1]:9808)"
                    )));
                }
            }
        }
        if !self.pool.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "pool {} must be an absolute path",
                self.pool.display()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "mode: node\nendpoint: unix:///tmp/from-file.sock\nnode-id: file-node\npool: /srv/pool\nmax-volumes-per-node: 7\nmax-concurrent-formats: 2\n",
        )
        .unwrap();
        let cfg = ServeArgs {
            config: Some(file),
            node_id: Some("flag-node".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.mode, Mode::Node);
        assert_eq!(cfg.socket, PathBuf::from("/tmp/from-file.sock"));
        assert_eq!(cfg.node_id, "flag-node");
        assert_eq!(cfg.pool, PathBuf::from("/srv/pool"));
        assert_eq!(cfg.max_volumes_per_node, 7);
        assert_eq!(cfg.max_concurrent_formats, 2);
        assert_eq!(cfg.driver_name, DEFAULT_DRIVER_NAME);
    }

    #[test]
    fn defaults_apply_without_any_source() {
        let cfg = ServeArgs {
            node_id: Some("n".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.mode, Mode::All);
        assert_eq!(cfg.socket, PathBuf::from("/run/blockcsi/csi.sock"));
        assert_eq!(cfg.pool, PathBuf::from(DEFAULT_POOL));
        assert_eq!(cfg.max_volumes_per_node, 0);
        assert_eq!(
            cfg.max_concurrent_formats,
            crate::host::linux::DEFAULT_MAX_CONCURRENT_FORMATS
        );
        assert_eq!(cfg.log_format, LogFormat::Text);
        assert_eq!(cfg.metrics_address, None);
    }

    #[test]
    fn metrics_address_and_log_format() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "log-format: json\nmetrics-address: 127.0.0.1:9808\n").unwrap();
        let cfg = ServeArgs {
            config: Some(file),
            node_id: Some("n".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.metrics_address.as_deref(), Some("127.0.0.1:9808"));
        for (address, ok) in [
            ("0.0.0.0:9808", true),
            ("[::1]:9808", true),
            ("localhost:1", true),
            ("9808", false),
            (":9808", false),
            ("host:port", false),
        ] {
            let res = ServeArgs {
                node_id: Some("n".into()),
                metrics_address: Some(address.into()),
                ..Default::default()
            }
            .resolve();
            assert_eq!(res.is_ok(), ok, "{address}");
        }
    }

    #[test]
    fn registration_and_health_come_from_the_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "mode: node\nhealth-address: 0.0.0.0:9809\nregistration-dir: /registration\n\
             kubelet-registration-path: /var/lib/kubelet/plugins/blockcsi.dev/csi.sock\n",
        )
        .unwrap();
        let cfg = ServeArgs {
            config: Some(file),
            node_id: Some("n".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(cfg.health_address.as_deref(), Some("0.0.0.0:9809"));
        assert_eq!(
            cfg.registration,
            Some(Registration {
                socket: PathBuf::from("/registration/blockcsi.dev-reg.sock"),
                kubelet_endpoint: PathBuf::from("/var/lib/kubelet/plugins/blockcsi.dev/csi.sock"),
            })
        );
    }

    #[test]
    fn registration_needs_both_paths_node_mode_and_socket_sized_paths() {
        let long = format!("/{}/csi.sock", "d".repeat(100));
        // (mode, registration dir, kubelet path, the socket it serves, or None for an error)
        type Case<'a> = (Mode, Option<&'a str>, Option<&'a str>, Option<&'a str>);
        let cases: &[Case] = &[
            (Mode::Node, None, None, None),
            (
                Mode::Node,
                Some("/reg"),
                Some("/k/csi.sock"),
                Some("/reg/blockcsi.dev-reg.sock"),
            ),
            (
                Mode::All,
                Some("/reg"),
                Some("/k/csi.sock"),
                Some("/reg/blockcsi.dev-reg.sock"),
            ),
            // Empty means unset, as an empty environment variable would be.
            (Mode::Node, Some(""), Some(""), None),
            (Mode::Controller, Some("/reg"), Some("/k/csi.sock"), None),
            (Mode::Node, Some("/reg"), None, None),
            (Mode::Node, Some("/reg"), Some(""), None),
            (Mode::Node, None, Some("/k/csi.sock"), None),
            (Mode::Node, Some("reg"), Some("/k/csi.sock"), None),
            (Mode::Node, Some("/reg"), Some("k/csi.sock"), None),
            (Mode::Node, Some("/reg"), Some("/k/../csi.sock"), None),
            (Mode::Node, Some("/reg"), Some("/"), None),
            (Mode::Node, Some("/reg"), Some(&long), None),
            (Mode::Node, Some(&long), Some("/k/csi.sock"), None),
        ];
        for &(mode, dir, path, want) in cases {
            let res = ServeArgs {
                mode: Some(mode),
                node_id: Some("n".into()),
                registration_dir: dir.map(PathBuf::from),
                kubelet_registration_path: path.map(PathBuf::from),
                ..Default::default()
            }
            .resolve();
            let unset = dir.unwrap_or("").is_empty() && path.unwrap_or("").is_empty();
            match (res, want) {
                (Ok(cfg), Some(socket)) => {
                    let r = cfg.registration.expect("registration on");
                    assert_eq!(r.socket, PathBuf::from(socket));
                    assert_eq!(r.kubelet_endpoint, PathBuf::from(path.unwrap()));
                }
                (Ok(cfg), None) if unset => assert_eq!(cfg.registration, None),
                (Err(ConfigError::Invalid(_)), None) if !unset => {}
                (res, _) => panic!("{mode:?} {dir:?} {path:?}: {res:?}"),
            }
        }
        // The kubelet path is normalised the way request paths are.
        let cfg = ServeArgs {
            mode: Some(Mode::Node),
            node_id: Some("n".into()),
            registration_dir: Some("/reg".into()),
            kubelet_registration_path: Some("/k/./d//csi.sock".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            cfg.registration.unwrap().kubelet_endpoint,
            PathBuf::from("/k/d/csi.sock")
        );
    }

    #[test]
    fn health_address_is_checked_like_the_metrics_address() {
        for (address, ok) in [("0.0.0.0:9809", true), ("9809", false), ("", true)] {
            let res = ServeArgs {
                node_id: Some("n".into()),
                health_address: Some(address.into()),
                ..Default::default()
            }
            .resolve();
            assert_eq!(res.is_ok(), ok, "{address}");
            if let Ok(cfg) = res {
                assert_eq!(
                    cfg.health_address.is_some(),
                    !address.is_empty(),
                    "{address}"
                );
            }
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "nodeid: typo\n").unwrap();
        let err = ServeArgs {
            config: Some(file),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        for endpoint in ["tcp://1.2.3.4:5", "unix://relative.sock", ""] {
            assert!(socket_path(endpoint).is_err(), "{endpoint}");
        }
        for (name, ok) in [
            ("blockcsi.dev", true),
            ("a", true),
            ("-a", false),
            ("a_b", false),
            (&"a".repeat(64), false),
        ] {
            assert_eq!(valid_driver_name(name), ok, "{name}");
        }
    }
}
