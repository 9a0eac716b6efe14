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
}

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
        };
        cfg.check()?;
        Ok(cfg)
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
        if self.mode.node() && !crate::backend::filepool::is_node_id(&self.node_id) {
            return Err(ConfigError::Invalid(format!(
                "node id {:?} must be 1-128 letters, digits, '.', '_' or '-', alphanumeric at both ends",
                self.node_id
            )));
        }
        if let Some(address) = &self.metrics_address {
            if !valid_listen_address(address) {
                return Err(ConfigError::Invalid(format!(
                    "metrics address {address:?} must be HOST:PORT (for example 0.0.0.0:9808 or [::1]:9808)"
                )));
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
