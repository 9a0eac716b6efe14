//! The publish context: what the controller tells a node about one publication, through
//! ControllerPublishVolume's `publish_context` (the CO stores it on the attachment and hands it to
//! every NodeStage/NodePublish of that attachment). It is the only channel from controller to
//! node, so a node never needs the controller's store or credentials to stage a volume.
//!
//! Every key is a constant here with its parser; both halves use this file and nothing else.
//! Versioning: `blockcsi.dev/context` names the layout. A node refuses a version it does not
//! know (the controller is newer than the node) instead of guessing what a key means.

use std::collections::HashMap;

/// The layout version this build writes and reads.
pub const VERSION: u32 = 1;

/// Key of the layout version.
pub const KEY_VERSION: &str = "blockcsi.dev/context";
/// Key of the device hint: for the file pool the image path relative to the pool directory
/// (`volumes/<id>.img`); for a cloud backend the device name the hypervisor was asked for.
pub const KEY_DEVICE: &str = "blockcsi.dev/device";
/// Key of the format grant: `allowed` or `never`.
pub const KEY_FORMAT: &str = "blockcsi.dev/format";

/// Whether the controller allows this publication to format a blank device. The node still
/// formats only on positive evidence of blankness and a clean ledger (`node::format::decide`);
/// the grant adds the controller's knowledge of the volume's history, which a node alone lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatGrant {
    /// The controller knows nothing that forbids a format (a volume created empty whose history
    /// is in a ledger the node reads, or on its first publication).
    Allowed,
    /// The volume may hold data the node cannot see: never format it.
    Never,
}

impl FormatGrant {
    fn as_str(self) -> &'static str {
        match self {
            FormatGrant::Allowed => "allowed",
            FormatGrant::Never => "never",
        }
    }
}

/// A parsed publish context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishContext {
    /// Where the node finds the device (see [`KEY_DEVICE`]).
    pub device: Option<String>,
    pub format: FormatGrant,
}

/// Why a publish context cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("publish context version {0:?} is not supported by this node (it knows {VERSION}); upgrade the node plugin")]
    Version(String),
    #[error("publish context has an invalid {key}: {value:?}")]
    Invalid { key: &'static str, value: String },
}

impl PublishContext {
    /// The map sent on the wire.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert(KEY_VERSION.to_string(), VERSION.to_string());
        if let Some(d) = &self.device {
            m.insert(KEY_DEVICE.to_string(), d.clone());
        }
        m.insert(KEY_FORMAT.to_string(), self.format.as_str().to_string());
        m
    }

    /// Parses a context received by the node. An empty map is `Ok(None)`: the request carried
    /// no context (a CO that does not publish, or an operator's call), and the device source
    /// decides whether it can do without. Keys of other drivers are ignored.
    pub fn parse(m: &HashMap<String, String>) -> Result<Option<PublishContext>, ContextError> {
        let Some(v) = m.get(KEY_VERSION) else {
            return Ok(None);
        };
        if v.parse::<u32>().ok() != Some(VERSION) {
            return Err(ContextError::Version(v.chars().take(16).collect()));
        }
        let format = match m.get(KEY_FORMAT).map(String::as_str) {
            Some("allowed") => FormatGrant::Allowed,
            Some("never") => FormatGrant::Never,
            other => {
                return Err(ContextError::Invalid {
                    key: KEY_FORMAT,
                    value: other.unwrap_or("").chars().take(32).collect(),
                })
            }
        };
        Ok(Some(PublishContext {
            device: m.get(KEY_DEVICE).cloned(),
            format,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_survives_the_round_trip() {
        for format in [FormatGrant::Allowed, FormatGrant::Never] {
            for device in [None, Some("volumes/vol-1.img".to_string())] {
                let c = PublishContext {
                    device: device.clone(),
                    format,
                };
                assert_eq!(PublishContext::parse(&c.to_map()).unwrap(), Some(c));
            }
        }
    }

    #[test]
    fn no_version_is_no_context_and_a_strange_one_is_refused() {
        assert_eq!(PublishContext::parse(&HashMap::new()).unwrap(), None);
        let mut m = PublishContext {
            device: None,
            format: FormatGrant::Never,
        }
        .to_map();
        m.insert(KEY_VERSION.into(), "2".into());
        assert!(matches!(
            PublishContext::parse(&m),
            Err(ContextError::Version(_))
        ));
        m.insert(KEY_VERSION.into(), "1".into());
        m.insert(KEY_FORMAT.into(), "maybe".into());
        assert!(matches!(
            PublishContext::parse(&m),
            Err(ContextError::Invalid { .. })
        ));
        m.remove(KEY_FORMAT);
        assert!(
            PublishContext::parse(&m).is_err(),
            "a missing grant is not a grant"
        );
    }
}
