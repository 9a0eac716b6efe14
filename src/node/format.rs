//! The fail-closed format decision of NodeStageVolume, as a pure function over what the device
//! shows (the probe), what the controller allows (the publish context's grant), what the ledger
//! remembers (the volume's past) and what the request asks for. Losing data is only possible
//! here, so nothing else in the node decides whether mkfs runs.

use crate::host::FsType;
use crate::storage::contract::FormatGrant;

/// What the ledger remembers of a volume's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Past {
    /// Nothing ever staged it: a blank device is a new volume.
    Unused,
    /// A node set out to format it and never recorded the end: the process died during mkfs,
    /// so whatever the device holds is the driver's own half-made filesystem.
    Formatting(FsType),
    /// It held this filesystem: from now on a blank device means lost data.
    Filesystem(FsType),
    /// It was handed out as a raw block device: its contents are the user's, whatever a probe says.
    RawBlock,
}

/// What the probe of the device found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Positive evidence that nothing is there.
    Blank,
    /// A filesystem signature (named as blkid names it).
    Filesystem(String),
    /// Some other signature (a partition table, LUKS, RAID metadata).
    Other(String),
    /// The probe failed: nobody knows what is there.
    Unreadable(String),
}

/// What stage does with the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Create this filesystem on a blank, never used volume.
    Format(FsType),
    /// Redo this driver's own interrupted format.
    RedoFormat(FsType),
    /// Mount the filesystem that is there.
    Adopt(FsType),
    Refuse(Refusal),
}

/// Why stage will not format or mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Unreadable(String),
    Foreign(String),
    Unsupported(String),
    NotRequested {
        found: FsType,
        want: FsType,
    },
    /// The ledger remembers a filesystem the device no longer shows.
    DataAtRisk {
        recorded: FsType,
        probe_error: Option<String>,
    },
    UsedRaw,
    /// The controller forbids formatting and the device shows no filesystem.
    NotGranted,
    /// A format of this driver was interrupted, but the controller now forbids formatting.
    InterruptedNotGranted(FsType),
}

impl Refusal {
    pub fn message(&self, volume_id: &str) -> String {
        match self {
            Refusal::Unreadable(e) => format!(
                "cannot tell whether volume {volume_id} holds data ({e}); refusing to format it"
            ),
            Refusal::Foreign(d) => format!(
                "volume {volume_id} holds {d}, not a filesystem; refusing to format or mount it"
            ),
            Refusal::Unsupported(fs) => {
                format!("volume {volume_id} holds an unsupported {fs} filesystem")
            }
            Refusal::NotRequested { found, want } => format!(
                "volume {volume_id} holds {}, not the requested {}",
                found.as_str(),
                want.as_str()
            ),
            Refusal::DataAtRisk {
                recorded,
                probe_error,
            } => format!(
                "volume {volume_id} recorded a {} filesystem but its device reads {}: \
                 data may be at risk, refusing to format",
                recorded.as_str(),
                probe_error
                    .as_deref()
                    .map_or("blank".to_string(), |e| format!("as unreadable ({e})"))
            ),
            Refusal::UsedRaw => {
                format!("volume {volume_id} was used as a raw block device; refusing to format it")
            }
            Refusal::NotGranted => format!(
                "volume {volume_id} reads blank but its publication does not allow formatting it \
                 (it may hold data this node cannot see)"
            ),
            Refusal::InterruptedNotGranted(fs) => format!(
                "a {} format of volume {volume_id} was interrupted, but its publication does not \
                 allow formatting it",
                fs.as_str()
            ),
        }
    }
}

/// The verdict for staging as a filesystem. `want` is the requested filesystem (none: any, or
/// `default` when one must be made).
///
/// Format only on a blank probe, a grant, and a past that never held anything; redo only the
/// driver's own interrupted format under a grant; a recorded filesystem that the device no
/// longer shows is lost data, never a new volume.
pub fn decide(
    seen: &Seen,
    grant: FormatGrant,
    past: Past,
    want: Option<FsType>,
    default: FsType,
) -> Decision {
    if let Past::Formatting(started) = past {
        // The half-made device may probe as anything; only this driver ever wrote to it.
        return match grant {
            FormatGrant::Allowed => Decision::RedoFormat(want.unwrap_or(started)),
            FormatGrant::Never => Decision::Refuse(Refusal::InterruptedNotGranted(started)),
        };
    }
    match seen {
        Seen::Unreadable(e) => Decision::Refuse(match past {
            Past::Filesystem(recorded) => Refusal::DataAtRisk {
                recorded,
                probe_error: Some(e.clone()),
            },
            _ => Refusal::Unreadable(e.clone()),
        }),
        Seen::Other(d) => Decision::Refuse(Refusal::Foreign(d.clone())),
        Seen::Filesystem(name) => match FsType::parse(name) {
            None => Decision::Refuse(Refusal::Unsupported(name.clone())),
            Some(found) => match want {
                Some(w) if w != found => Decision::Refuse(Refusal::NotRequested { found, want: w }),
                _ => Decision::Adopt(found),
            },
        },
        Seen::Blank => match (past, grant) {
            (Past::Filesystem(recorded), _) => Decision::Refuse(Refusal::DataAtRisk {
                recorded,
                probe_error: None,
            }),
            (Past::RawBlock, _) => Decision::Refuse(Refusal::UsedRaw),
            (_, FormatGrant::Never) => Decision::Refuse(Refusal::NotGranted),
            (Past::Unused, FormatGrant::Allowed) => Decision::Format(want.unwrap_or(default)),
            (Past::Formatting(_), FormatGrant::Allowed) => {
                unreachable!("handled before the probe is looked at")
            }
        },
    }
}

/// Whether a request for `want` can be served by a volume with this past, checked before
/// anything is attached: a volume known to hold one filesystem is never staged as another.
pub fn fits(past: Past, want: Option<FsType>) -> Result<(), (FsType, FsType)> {
    match (past, want) {
        (Past::Filesystem(have), Some(w)) if have != w => Err((have, w)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FsType::{Ext4, Xfs};

    fn seens() -> Vec<Seen> {
        vec![
            Seen::Blank,
            Seen::Filesystem("ext4".into()),
            Seen::Filesystem("xfs".into()),
            Seen::Filesystem("btrfs".into()),
            Seen::Other("a dos partition table".into()),
            Seen::Unreadable("i/o error".into()),
        ]
    }

    fn pasts() -> Vec<Past> {
        vec![
            Past::Unused,
            Past::Formatting(Ext4),
            Past::Formatting(Xfs),
            Past::Filesystem(Ext4),
            Past::Filesystem(Xfs),
            Past::RawBlock,
        ]
    }

    /// The verdict, written out rule by rule independently of `decide`'s control flow.
    fn expected(
        seen: &Seen,
        grant: FormatGrant,
        past: Past,
        want: Option<FsType>,
        default: FsType,
    ) -> Decision {
        use Decision::*;
        let allowed = grant == FormatGrant::Allowed;
        if let Past::Formatting(s) = past {
            return if allowed {
                RedoFormat(want.unwrap_or(s))
            } else {
                Refuse(Refusal::InterruptedNotGranted(s))
            };
        }
        let recorded = match past {
            Past::Filesystem(f) => Some(f),
            _ => None,
        };
        match (seen, recorded) {
            (Seen::Unreadable(e), Some(r)) => Refuse(Refusal::DataAtRisk {
                recorded: r,
                probe_error: Some(e.clone()),
            }),
            (Seen::Unreadable(e), None) => Refuse(Refusal::Unreadable(e.clone())),
            (Seen::Other(d), _) => Refuse(Refusal::Foreign(d.clone())),
            (Seen::Filesystem(n), _) if n == "btrfs" => Refuse(Refusal::Unsupported(n.clone())),
            (Seen::Filesystem(n), _) => {
                let found = FsType::parse(n).unwrap();
                match want {
                    Some(w) if w != found => Refuse(Refusal::NotRequested { found, want: w }),
                    _ => Adopt(found),
                }
            }
            (Seen::Blank, Some(r)) => Refuse(Refusal::DataAtRisk {
                recorded: r,
                probe_error: None,
            }),
            (Seen::Blank, None) if past == Past::RawBlock => Refuse(Refusal::UsedRaw),
            (Seen::Blank, None) if !allowed => Refuse(Refusal::NotGranted),
            (Seen::Blank, None) => {
                assert_eq!(past, Past::Unused);
                Format(want.unwrap_or(default))
            }
        }
    }

    #[test]
    fn every_combination_gets_the_fail_closed_verdict() {
        let mut formats = 0;
        let mut cases = 0;
        for seen in seens() {
            for grant in [FormatGrant::Allowed, FormatGrant::Never] {
                for past in pasts() {
                    for want in [None, Some(Ext4), Some(Xfs)] {
                        for default in [Ext4, Xfs] {
                            cases += 1;
                            let got = decide(&seen, grant, past, want, default);
                            assert_eq!(
                                got,
                                expected(&seen, grant, past, want, default),
                                "{seen:?} {grant:?} {past:?} {want:?} {default:?}"
                            );
                            // The invariants, stated once more as the guarantees they are.
                            if let Decision::Format(fs) = got {
                                formats += 1;
                                assert_eq!(seen, Seen::Blank);
                                assert_eq!(grant, FormatGrant::Allowed);
                                assert_eq!(past, Past::Unused);
                                assert_eq!(fs, want.unwrap_or(default));
                            }
                            if let Decision::RedoFormat(_) = got {
                                assert!(matches!(past, Past::Formatting(_)));
                                assert_eq!(grant, FormatGrant::Allowed);
                            }
                            if matches!(past, Past::Filesystem(_) | Past::RawBlock) {
                                assert!(
                                    !matches!(got, Decision::Format(_) | Decision::RedoFormat(_)),
                                    "{past:?} must never be formatted"
                                );
                            }
                            if matches!(past, Past::Filesystem(_))
                                && matches!(seen, Seen::Blank | Seen::Unreadable(_))
                            {
                                let Decision::Refuse(r) = &got else {
                                    panic!("{seen:?} {past:?}: {got:?}")
                                };
                                assert!(r.message("v").contains("data may be at risk"));
                            }
                            if grant == FormatGrant::Never && seen == Seen::Blank {
                                assert!(matches!(got, Decision::Refuse(_)), "{got:?}");
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 6 * 2 * 6 * 3 * 2);
        // Blank, allowed, unused: every want and default.
        assert_eq!(formats, 3 * 2);
    }

    #[test]
    fn a_request_for_another_filesystem_than_recorded_does_not_fit() {
        assert_eq!(fits(Past::Filesystem(Ext4), Some(Xfs)), Err((Ext4, Xfs)));
        assert!(fits(Past::Filesystem(Ext4), Some(Ext4)).is_ok());
        assert!(fits(Past::Filesystem(Ext4), None).is_ok());
        for past in [Past::Unused, Past::RawBlock, Past::Formatting(Ext4)] {
            assert!(fits(past, Some(Xfs)).is_ok(), "{past:?}");
        }
    }
}
