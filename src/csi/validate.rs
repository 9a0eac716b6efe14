//! Validation at the edge: every field of a request is checked and turned into a domain value here,
//! before it can reach a path, a record or a command line. Failures are INVALID_ARGUMENT with a
//! message that names the field.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::host::MountOptions;
use crate::pb;
use crate::storage::{AccessMode, AccessType, Capability, Provisioning};

/// Longest CSI name accepted. Kubernetes sends `pvc-<uuid>`; csi-sanity sends up to 128 bytes.
pub const MAX_NAME_BYTES: usize = 1024;
const MAX_PATH_BYTES: usize = 4096;

/// Prefix of the parameters the Kubernetes sidecars add to CreateVolume; they are accepted and
/// not stored.
pub const SIDECAR_PARAMETER_PREFIX: &str = "csi.storage.k8s.io/";

pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    Ok(value)
}

/// A CSI name: any non-empty text without control characters, up to [`MAX_NAME_BYTES`].
pub fn name(value: &str) -> Result<&str> {
    required(value, "name")?;
    if value.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "name is {} bytes; the limit is {MAX_NAME_BYTES}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(
            "name must not contain control characters".into(),
        ));
    }
    Ok(value)
}

/// An absolute path without `..`, NUL or empty components, returned normalised (no `.`, no
/// trailing slash). Paths come from the CO and are used for mounts, so anything odd is refused.
pub fn path(value: &str, field: &str) -> Result<PathBuf> {
    required(value, field)?;
    if value.len() > MAX_PATH_BYTES || value.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{field} is not a valid path"
        )));
    }
    let p = Path::new(value);
    if !p.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{field} must be an absolute path, got {value:?}"
        )));
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::InvalidArgument(format!(
                    "{field} must not contain '..', got {value:?}"
                )))
            }
        }
    }
    if out == Path::new("/") {
        return Err(Error::InvalidArgument(format!("{field} must not be /")));
    }
    Ok(out)
}

/// Refuses a path of which any existing component is a symbolic link. mount(2), mkdir and
/// unlink follow links in every component, so a link planted at (or above) a staging or target
/// path would make the driver mount over, create or remove whatever the link points to. The
/// components that do not exist yet are created by the driver itself (the last one only).
pub fn no_symlinks(path: &Path, field: &str) -> Result<()> {
    let mut prefix = PathBuf::new();
    for c in path.components() {
        prefix.push(c);
        match std::fs::symlink_metadata(&prefix) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(Error::InvalidArgument(format!(
                    "{field} {} goes through the symbolic link {}; refusing to follow it",
                    path.display(),
                    prefix.display()
                )))
            }
            Ok(_) => {}
            // Nothing below a missing (or non-directory) component exists to be a link.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

fn access_mode(mode: i32) -> Result<AccessMode> {
    use pb::volume_capability::access_mode::Mode;
    Ok(match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "access mode {mode} is not supported"
            )))
        }
    })
}

/// A volume capability, including the checks of its fs_type and mount flags.
pub fn capability(cap: Option<&pb::VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?;
    let mode = access_mode(
        cap.access_mode
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("access_mode is required".into()))?
            .mode,
    )?;
    let access = match &cap.access_type {
        Some(pb::volume_capability::AccessType::Block(_)) => AccessType::Block,
        Some(pb::volume_capability::AccessType::Mount(m)) => {
            let fs_type = match m.fs_type.as_str() {
                "" => None,
                "ext4" | "xfs" => Some(m.fs_type.clone()),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "fs_type {other:?} is not supported; use ext4 or xfs"
                    )))
                }
            };
            mount_options(&m.mount_flags, false)?;
            AccessType::Mount {
                fs_type,
                mount_flags: m.mount_flags.clone(),
            }
        }
        None => return Err(Error::InvalidArgument("access_type is required".into())),
    };
    // A filesystem can only be mounted read-write on one node; several nodes writing one ext4 or
    // XFS destroy it. Raw block volumes leave coordination to the user (clustered software).
    if matches!(access, AccessType::Mount { .. })
        && matches!(
            mode,
            AccessMode::MultiNodeMultiWriter | AccessMode::MultiNodeSingleWriter
        )
    {
        return Err(Error::InvalidArgument(format!(
            "access mode {mode:?} is only supported for block volumes"
        )));
    }
    Ok(Capability { access, mode })
}

pub fn capabilities(caps: &[pb::VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities is required".into(),
        ));
    }
    caps.iter().map(|c| capability(Some(c))).collect()
}

/// The one parameter the driver defines: how the image reserves pool space. It is accepted as a
/// StorageClass parameter and as a mutable parameter (VolumeAttributesClass).
pub const PROVISIONING_KEY: &str = "provisioning";

fn provisioning(value: &str) -> Result<Provisioning> {
    Provisioning::parse(value).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{PROVISIONING_KEY} must be thin or thick, got {value:?}"
        ))
    })
}

/// StorageClass parameters of CreateVolume: `provisioning`, plus the sidecars' own keys (accepted
/// and dropped); anything else is a typo the user must hear about.
pub fn create_parameters(
    params: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut unknown: Vec<&str> = Vec::new();
    let mut kept = BTreeMap::new();
    for (k, v) in params {
        if k == PROVISIONING_KEY {
            provisioning(v)?;
            kept.insert(k.clone(), v.clone());
        } else if !k.starts_with(SIDECAR_PARAMETER_PREFIX) {
            unknown.push(k);
        }
    }
    if !unknown.is_empty() {
        unknown.sort_unstable();
        return Err(Error::InvalidArgument(format!(
            "unknown parameters: {}",
            unknown.join(", ")
        )));
    }
    Ok(kept)
}

/// Mutable parameters (CreateVolume, ControllerModifyVolume): only `provisioning`. Any unknown
/// key fails the whole request, so nothing is half applied.
pub fn mutable_parameters(
    params: &std::collections::HashMap<String, String>,
) -> Result<Option<Provisioning>> {
    let mut out = None;
    for (k, v) in params {
        if k != PROVISIONING_KEY {
            return Err(Error::InvalidArgument(format!(
                "mutable parameter {k:?} is not supported; only {PROVISIONING_KEY} is"
            )));
        }
        out = Some(provisioning(v)?);
    }
    Ok(out)
}

/// Mount flags that are plain kernel flags.
const FLAG_OPTIONS: &[(&str, u64)] = &[
    ("noatime", libc::MS_NOATIME),
    ("relatime", libc::MS_RELATIME),
    ("strictatime", libc::MS_STRICTATIME),
    ("nodiratime", libc::MS_NODIRATIME),
    ("lazytime", libc::MS_LAZYTIME),
    ("nosuid", libc::MS_NOSUID),
    ("nodev", libc::MS_NODEV),
    ("noexec", libc::MS_NOEXEC),
    ("sync", libc::MS_SYNCHRONOUS),
    ("dirsync", libc::MS_DIRSYNC),
];

/// Defaults that need no flag.
const NOOP_OPTIONS: &[&str] = &[
    "rw", "defaults", "async", "atime", "diratime", "suid", "dev", "exec",
];

/// Filesystem options passed through as mount data (ext4 and XFS). Anything not listed is refused:
/// mount data is parsed by the kernel, and a CO-supplied string must not reach it unchecked.
const DATA_OPTIONS: &[&str] = &[
    "discard",
    "nodiscard",
    "nouuid",
    "acl",
    "noacl",
    "user_xattr",
    "nouser_xattr",
    "inode64",
    "inode32",
    "largeio",
    "nolargeio",
    "grpid",
    "nogrpid",
    "usrquota",
    "grpquota",
    "prjquota",
    "quota",
    "noquota",
    "uquota",
    "gquota",
    "pquota",
    "init_itable",
    "noinit_itable",
    "auto_da_alloc",
    "noauto_da_alloc",
    "delalloc",
    "nodelalloc",
    "journal_checksum",
    "nojournal_checksum",
];

/// Filesystem options with a value, and what the value may be.
const DATA_VALUE_OPTIONS: &[(&str, &[&str])] = &[
    ("errors", &["remount-ro", "continue"]),
    ("data", &["ordered", "writeback", "journal"]),
];
const DATA_NUMERIC_OPTIONS: &[&str] = &[
    "commit",
    "logbufs",
    "logbsize",
    "allocsize",
    "stripe",
    "stride",
];

fn numeric_with_unit(v: &str) -> bool {
    let digits = v.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G']);
    !digits.is_empty()
        && digits.len() <= 12
        && digits.bytes().all(|b| b.is_ascii_digit())
        && v.len() - digits.len() <= 1
}

/// Turns CSI mount flags into a mount request, refusing anything outside the allowlist.
pub fn mount_options(flags: &[String], read_only: bool) -> Result<MountOptions> {
    let mut out = MountOptions {
        read_only,
        ..Default::default()
    };
    let mut data: Vec<&str> = Vec::new();
    // Kubernetes passes each StorageClass mountOption as one entry, but an entry may itself be a
    // comma-separated list ("noatime,nodiratime").
    for opt in flags.iter().flat_map(|f| f.split(',')).map(str::trim) {
        if opt.is_empty() {
            continue;
        }
        if opt == "ro" {
            out.read_only = true;
        } else if let Some((_, bit)) = FLAG_OPTIONS.iter().find(|(n, _)| *n == opt) {
            out.flags |= bit;
        } else if NOOP_OPTIONS.contains(&opt) {
        } else if DATA_OPTIONS.contains(&opt) {
            data.push(opt);
        } else if let Some((key, value)) = opt.split_once('=') {
            let ok = DATA_VALUE_OPTIONS
                .iter()
                .any(|(k, vs)| *k == key && vs.contains(&value))
                || (DATA_NUMERIC_OPTIONS.contains(&key) && numeric_with_unit(value));
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "mount option {opt:?} is not allowed"
                )));
            }
            data.push(opt);
        } else {
            return Err(Error::InvalidArgument(format!(
                "mount option {opt:?} is not allowed"
            )));
        }
    }
    out.data = data.join(",");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_absolute_normalised_and_free_of_parent_components() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/var/lib/kubelet/x", Some("/var/lib/kubelet/x")),
            ("/a/./b/", Some("/a/b")),
            ("//a//b", Some("/a/b")),
            ("", None),
            ("relative/path", None),
            ("/a/../etc", None),
            ("/", None),
            ("/a\0b", None),
        ];
        for (input, want) in cases {
            let got = path(input, "target_path").ok();
            assert_eq!(got.as_deref(), want.map(Path::new), "{input:?}");
        }
    }

    #[test]
    fn symlinks_anywhere_in_a_path_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("dangling")).unwrap();
        let cases: &[(&str, bool)] = &[
            ("real", true),
            ("real/not-yet", true),
            ("missing/deeper/still", true),
            ("link", false),
            ("link/target", false),
            ("dangling", false),
            ("dangling/x", false),
        ];
        for (rel, ok) in cases {
            let res = no_symlinks(&dir.path().join(rel), "target_path");
            assert_eq!(res.is_ok(), *ok, "{rel}: {res:?}");
            if let Err(e) = res {
                assert!(matches!(e, Error::InvalidArgument(_)), "{rel}");
            }
        }
    }

    #[test]
    fn names_reject_empty_control_and_oversized() {
        assert!(name("pvc-1234").is_ok());
        assert!(name(&"x".repeat(128)).is_ok());
        assert!(name("").is_err());
        assert!(name("a\nb").is_err());
        assert!(name(&"x".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn mount_options_follow_the_allowlist() {
        let ok: &[(&[&str], bool, u64, &str)] = &[
            (&[], false, 0, ""),
            (&["ro"], true, 0, ""),
            (
                &["noatime", "nodev"],
                false,
                libc::MS_NOATIME | libc::MS_NODEV,
                "",
            ),
            (&["noatime,discard"], false, libc::MS_NOATIME, "discard"),
            (
                &["errors=remount-ro", "commit=30"],
                false,
                0,
                "errors=remount-ro,commit=30",
            ),
            (&["logbsize=256k", "rw"], false, 0, "logbsize=256k"),
        ];
        for (flags, ro, bits, data) in ok {
            let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            let got = mount_options(&flags, false).unwrap();
            assert_eq!(
                (got.read_only, got.flags, got.data.as_str()),
                (*ro, *bits, *data),
                "{flags:?}"
            );
        }
        for bad in [
            "bind",
            "remount",
            "errors=panic",
            "commit=1;rm",
            "data=evil",
            "x-mount.mkdir",
            "commit=",
            "context=\"x\"",
        ] {
            assert!(mount_options(&[bad.to_string()], false).is_err(), "{bad}");
        }
    }

    #[test]
    fn parameters_accept_only_sidecar_keys() {
        let mut p = std::collections::HashMap::new();
        p.insert("csi.storage.k8s.io/pvc/name".to_string(), "x".to_string());
        assert!(create_parameters(&p).unwrap().is_empty());
        p.insert("provisioning".to_string(), "thick".to_string());
        assert_eq!(create_parameters(&p).unwrap().len(), 1);
        p.insert("provisioning".to_string(), "fat".to_string());
        assert!(create_parameters(&p).is_err());
        p.remove("provisioning");
        p.insert("iops".to_string(), "5".to_string());
        let err = create_parameters(&p).unwrap_err().to_string();
        assert!(err.contains("iops"), "{err}");
    }

    #[test]
    fn mutable_parameters_accept_only_provisioning() {
        let mk =
            |k: &str, v: &str| std::collections::HashMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(mutable_parameters(&Default::default()).unwrap(), None);
        assert_eq!(
            mutable_parameters(&mk("provisioning", "thick")).unwrap(),
            Some(Provisioning::Thick)
        );
        assert!(mutable_parameters(&mk("provisioning", "x")).is_err());
        assert!(mutable_parameters(&mk("XXX_FakeKey", "XXX_FakeValue")).is_err());
    }

    #[test]
    fn capabilities_are_checked() {
        use pb::volume_capability::{
            access_mode::Mode, AccessMode as PbMode, AccessType as PbType, BlockVolume, MountVolume,
        };
        let mk = |t: PbType, m: Mode| pb::VolumeCapability {
            access_type: Some(t),
            access_mode: Some(PbMode { mode: m as i32 }),
        };
        let mount = |fs: &str| {
            PbType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })
        };
        assert!(capability(Some(&mk(mount(""), Mode::SingleNodeWriter))).is_ok());
        assert!(capability(Some(&mk(mount("xfs"), Mode::SingleNodeSingleWriter))).is_ok());
        assert!(capability(Some(&mk(mount("btrfs"), Mode::SingleNodeWriter))).is_err());
        assert!(capability(Some(&mk(mount(""), Mode::Unknown))).is_err());
        assert!(capability(Some(&mk(mount(""), Mode::MultiNodeMultiWriter))).is_err());
        assert!(capability(Some(&mk(
            PbType::Block(BlockVolume {}),
            Mode::MultiNodeMultiWriter
        )))
        .is_ok());
        assert!(capability(None).is_err());
        assert!(capabilities(&[]).is_err());
    }
}
