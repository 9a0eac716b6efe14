//! Property tests (bounded fuzzing) of everything that turns untrusted text into something the
//! driver acts on: request validation, id and name shapes, size rounding, the mountinfo parser
//! and the endpoint. Generated inputs mix well-formed values, near misses and raw noise. No root
//! needed. `BLOCKCSI_PROPTEST_CASES` scales every property (default 10000 cases each); the total
//! number of executions of each property is printed as `fuzz: <property>: N executions`.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use blockcsi::csi::validate;
use blockcsi::error::Error;
use blockcsi::pb;
use blockcsi::storage::filepool::{self, GRANULARITY, MAX_SIZE};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn cases() -> u32 {
    std::env::var("BLOCKCSI_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Runs one property for the configured number of cases and counts the executions.
fn check<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let n = std::cell::Cell::new(0u64);
    let res = runner.run(&strategy, |v| {
        n.set(n.get() + 1);
        test(v)
    });
    let n = n.get();
    println!("fuzz: {name}: {n} executions");
    if let Err(e) = res {
        panic!("{name}: {e}");
    }
}

/// Text with the characters that break naive handling: separators, dots, NUL, controls, quotes,
/// shell and option syntax, non-ASCII.
fn nasty_text(max: usize) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("\0".to_string()),
        Just(",".to_string()),
        Just("=".to_string()),
        Just(" ".to_string()),
        Just(";rm -rf /".to_string()),
        Just("$(id)".to_string()),
        Just("\n".to_string()),
        Just("\\".to_string()),
        Just("é".to_string()),
        "[a-z0-9_-]{1,8}",
        any::<char>().prop_map(|c| c.to_string()),
    ];
    prop::collection::vec(piece, 0..max).prop_map(|v| v.concat())
}

#[test]
fn request_paths_are_absolute_normalised_and_stable() {
    check("validate::path", nasty_text(24), |input| {
        match validate::path(&input, "target_path") {
            Ok(p) => {
                prop_assert!(p.is_absolute());
                prop_assert!(p != Path::new("/"));
                prop_assert!(!p.as_os_str().as_bytes().contains(&0));
                prop_assert!(!p.as_os_str().as_bytes().ends_with(b"/"));
                for c in p.components().skip(1) {
                    prop_assert!(matches!(c, Component::Normal(_)), "{c:?} in {p:?}");
                }
                // Normalising is idempotent and keeps exactly the named components.
                let again = validate::path(p.to_str().unwrap(), "target_path").unwrap();
                prop_assert_eq!(&again, &p);
                let named: Vec<_> = Path::new(&input)
                    .components()
                    .filter(|c| matches!(c, Component::Normal(_)))
                    .collect();
                prop_assert_eq!(p.components().skip(1).collect::<Vec<_>>(), named);
            }
            Err(e) => {
                prop_assert!(matches!(e, Error::InvalidArgument(_)));
                let has_parent = Path::new(&input)
                    .components()
                    .any(|c| c == Component::ParentDir);
                prop_assert!(
                    input.is_empty()
                        || !input.starts_with('/')
                        || input.contains('\0')
                        || has_parent
                        || Path::new(&input)
                            .components()
                            .all(|c| c == Component::RootDir || c == Component::CurDir),
                    "refused a good path {input:?}: {e}"
                );
            }
        }
        Ok(())
    });
}

#[test]
fn names_are_accepted_exactly_when_printable_and_bounded() {
    let strategy = prop_oneof![
        nasty_text(16),
        (1usize..4).prop_map(|k| "n".repeat(validate::MAX_NAME_BYTES - 2 + k)),
    ];
    check("validate::name", strategy, |input| {
        let want = !input.is_empty()
            && input.len() <= validate::MAX_NAME_BYTES
            && !input.chars().any(char::is_control);
        let got = validate::name(&input);
        prop_assert_eq!(got.is_ok(), want, "{:?}", got.err());
        if let Err(e) = got {
            prop_assert!(matches!(e, Error::InvalidArgument(_)));
        }
        Ok(())
    });
}

/// Option tokens: allowed ones, near misses, and the classic injections.
fn option_token() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "noatime",
            "nodev",
            "nosuid",
            "ro",
            "rw",
            "discard",
            "errors=remount-ro",
            "data=ordered",
            "commit=30",
            "logbsize=256k",
            "defaults",
            "lazytime",
        ])
        .prop_map(str::to_string),
        prop::sample::select(vec![
            "remount",
            "bind",
            "rbind",
            "x-mount.mkdir",
            "context=system_u:object_r:x",
            "errors=panic",
            "commit=1;rm",
            "data=evil",
            "commit=",
            "uid=0",
            "loop",
            "upperdir=/etc",
            "ext4 -o",
            "ext4;rm",
            "exec\0",
            "nodev\n",
            "commit=99999999999999",
            "fscontext=x",
            "x-systemd.automount",
            "user",
            "suid",
        ])
        .prop_map(str::to_string),
        nasty_text(6),
        "[a-z_]{1,10}(=[a-z0-9]{0,6})?",
    ]
}

#[test]
fn mount_options_never_let_unlisted_text_through() {
    let strategy = (
        prop::collection::vec(
            prop::collection::vec(option_token(), 1..4).prop_map(|v| v.join(",")),
            0..5,
        ),
        any::<bool>(),
    );
    check("validate::mount_options", strategy, |(flags, ro)| {
        let got = validate::mount_options(&flags, ro);
        // Whole list accepted exactly when every single token is.
        let tokens: Vec<String> = flags
            .iter()
            .flat_map(|f| f.split(','))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        let each_ok = tokens
            .iter()
            .all(|t| validate::mount_options(std::slice::from_ref(t), false).is_ok());
        prop_assert_eq!(got.is_ok(), each_ok);
        match got {
            Ok(opts) => {
                prop_assert!(opts.read_only || !ro);
                prop_assert!(
                    opts.data.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b"=,_-".contains(&b)),
                    "{:?}",
                    opts.data
                );
                for token in opts.data.split(',') {
                    let key = token.split('=').next().unwrap_or_default();
                    for forbidden in ["remount", "bind", "rbind", "uid", "gid", "loop"] {
                        prop_assert!(key != forbidden, "{:?}", opts.data);
                    }
                    for prefix in ["context", "fscontext", "x-", "upperdir", "lowerdir"] {
                        prop_assert!(!key.starts_with(prefix), "{:?}", opts.data);
                    }
                }
                let known = libc::MS_NOATIME
                    | libc::MS_RELATIME
                    | libc::MS_STRICTATIME
                    | libc::MS_NODIRATIME
                    | libc::MS_LAZYTIME
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC
                    | libc::MS_SYNCHRONOUS
                    | libc::MS_DIRSYNC;
                prop_assert_eq!(opts.flags & !known, 0);
                // The data string is itself an accepted option list with the same meaning.
                let again =
                    validate::mount_options(std::slice::from_ref(&opts.data), false).unwrap();
                prop_assert_eq!(again.data, opts.data);
            }
            Err(e) => prop_assert!(matches!(e, Error::InvalidArgument(_))),
        }
        Ok(())
    });
}

fn capability() -> impl Strategy<Value = pb::VolumeCapability> {
    use pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    let fs = prop_oneof![
        Just(String::new()),
        Just("ext4".to_string()),
        Just("xfs".to_string()),
        Just("ext4 -o".to_string()),
        Just("ext4;rm".to_string()),
        Just("btrfs".to_string()),
        nasty_text(4),
    ];
    let access = prop_oneof![
        Just(None),
        Just(Some(AccessType::Block(BlockVolume {}))),
        (fs, prop::collection::vec(option_token(), 0..3)).prop_map(|(fs_type, mount_flags)| {
            Some(AccessType::Mount(MountVolume {
                fs_type,
                mount_flags,
                volume_mount_group: String::new(),
            }))
        }),
    ];
    let mode = prop_oneof![
        Just(None),
        (-2i32..10).prop_map(|mode| Some(AccessMode { mode }))
    ];
    (access, mode).prop_map(|(access_type, access_mode)| pb::VolumeCapability {
        access_type,
        access_mode,
    })
}

#[test]
fn capabilities_are_checked_completely() {
    use blockcsi::storage::{AccessMode, AccessType};
    check("validate::capability", capability(), |cap| {
        match validate::capability(Some(&cap)) {
            Ok(c) => {
                prop_assert!(matches!(c.fs_type(), None | Some("ext4") | Some("xfs")));
                if let AccessType::Mount { mount_flags, .. } = &c.access {
                    prop_assert!(validate::mount_options(mount_flags, false).is_ok());
                    prop_assert!(!matches!(
                        c.mode,
                        AccessMode::MultiNodeMultiWriter | AccessMode::MultiNodeSingleWriter
                    ));
                }
                prop_assert!(cap.access_type.is_some() && cap.access_mode.is_some());
            }
            Err(e) => prop_assert!(matches!(e, Error::InvalidArgument(_))),
        }
        Ok(())
    });
}

fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "vol-[0-9a-f]{32}",
        "vol-[0-9a-fA-F./]{30,34}",
        "[a-zA-Z0-9._-]{0,130}",
        nasty_text(10),
    ]
}

#[test]
fn ids_that_pass_are_safe_file_names() {
    check("filepool::is_volume_id/is_node_id", id_like(), |id| {
        let safe_name = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && !s.contains('/')
                && !s.contains('\0')
                && s.chars().all(|c| c.is_ascii_graphic())
        };
        if filepool::is_volume_id(&id) {
            prop_assert!(safe_name(&id));
            prop_assert_eq!(id.len(), 36);
            prop_assert!(id[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        if filepool::is_node_id(&id) {
            prop_assert!(safe_name(&id));
            prop_assert!(id.len() <= 128);
            prop_assert!(id != "." && id != "..");
        }
        Ok(())
    });
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1u64..(64 << 20),
        (0u64..1 << 20).prop_map(|n| n * GRANULARITY),
        (0u64..1 << 20).prop_map(|n| (n * GRANULARITY).saturating_sub(1)),
        Just(MAX_SIZE),
        Just(MAX_SIZE + 1),
        Just(i64::MAX as u64),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

#[test]
fn sizes_are_granular_inside_the_range_or_out_of_range() {
    check(
        "filepool::round_size",
        (size(), size(), size()),
        |(required, limit, min)| {
            let round_up = |n: u64| n.div_ceil(GRANULARITY).saturating_mul(GRANULARITY);
            let lo = round_up(required.max(min).max(1));
            let hi = if limit == 0 {
                MAX_SIZE
            } else {
                limit.min(MAX_SIZE)
            } / GRANULARITY
                * GRANULARITY;
            let feasible = (limit == 0 || required <= limit) && lo <= hi;
            match filepool::round_size(required, limit, min) {
                Ok(size) => {
                    prop_assert!(feasible);
                    prop_assert_eq!(size % GRANULARITY, 0);
                    prop_assert!(size >= required && size >= min && size > 0);
                    prop_assert!(limit == 0 || size <= limit);
                    prop_assert!(size <= MAX_SIZE);
                    if required != 0 {
                        // The smallest size that fits, so a request in whole MiB comes back exact.
                        prop_assert_eq!(size, lo);
                    }
                }
                Err(e) => {
                    prop_assert!(!feasible, "refused a feasible range: {e}");
                    prop_assert!(matches!(e, blockcsi::storage::Error::OutOfRange(_)));
                }
            }
            Ok(())
        },
    );
}

/// Path bytes as the kernel has them (anything but NUL and '/') and as it prints them in
/// mountinfo (space, tab, newline and backslash as three-digit octal).
fn path_bytes() -> impl Strategy<Value = Vec<u8>> {
    let component = prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(b"abz09._- \t\n\\#".to_vec()),
            1 => (1u8..=255).prop_filter("no slash", |b| *b != b'/'),
        ],
        1..8,
    );
    prop::collection::vec(component, 0..4).prop_map(|cs| {
        let mut p = Vec::new();
        for c in cs {
            p.push(b'/');
            p.extend(c);
        }
        if p.is_empty() {
            p.push(b'/');
        }
        p
    })
}

fn mangle(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in bytes {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\\') {
            out.extend(format!("\\{b:03o}").bytes());
        } else {
            out.push(b);
        }
    }
    out
}

#[test]
fn mountinfo_round_trips_escaped_paths() {
    let entry = (
        any::<u32>(),
        any::<u32>(),
        (any::<u32>(), any::<u32>()),
        path_bytes(),
        path_bytes(),
        prop::collection::vec("(shared|master):[0-9]{1,3}", 0..3),
        "[a-z0-9]{1,8}",
        path_bytes(),
        any::<bool>(),
    );
    check(
        "mountinfo::parse_bytes round trip",
        prop::collection::vec(entry, 0..5),
        |entries| {
            let mut text = Vec::new();
            for (id, parent, (major, minor), root, point, optional, fs, source, ro) in &entries {
                text.extend(format!("{id} {parent} {major}:{minor} ").bytes());
                text.extend(mangle(root));
                text.push(b' ');
                text.extend(mangle(point));
                text.extend(format!(" {},relatime", if *ro { "ro" } else { "rw" }).bytes());
                for o in optional {
                    text.extend(format!(" {o}").bytes());
                }
                text.extend(format!(" - {fs} ").bytes());
                text.extend(mangle(source));
                text.extend(b" rw,seclabel\n");
            }
            let got = blockcsi::host::mountinfo::parse_bytes(&text).map_err(|e| {
                TestCaseError::fail(format!("{e}: {:?}", String::from_utf8_lossy(&text)))
            })?;
            prop_assert_eq!(got.len(), entries.len());
            for (g, (id, parent, (major, minor), root, point, _, fs, source, ro)) in
                got.iter().zip(&entries)
            {
                prop_assert_eq!(g.mount_id, *id);
                prop_assert_eq!(g.parent_id, *parent);
                prop_assert_eq!((g.dev.major, g.dev.minor), (*major, *minor));
                prop_assert_eq!(g.root.as_os_str().as_bytes(), &root[..]);
                prop_assert_eq!(g.mount_point.as_os_str().as_bytes(), &point[..]);
                prop_assert_eq!(&g.fs_type, fs);
                prop_assert_eq!(
                    g.source.clone(),
                    String::from_utf8_lossy(source).into_owned()
                );
                prop_assert_eq!(g.read_only(), *ro);
            }
            Ok(())
        },
    );
}

#[test]
fn mountinfo_parser_never_panics_on_noise() {
    let valid: &[u8] = b"27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
        90 27 7:0 /a\\040b /mnt/with\\040space rw - ext4 /pool/my\\040image rw\n";
    let mutated = prop::collection::vec((0usize..valid.len(), any::<u8>(), 0u8..3), 0..12)
        .prop_map(move |edits| {
            let mut v = valid.to_vec();
            for (at, byte, op) in edits {
                let at = at.min(v.len().saturating_sub(1));
                match op {
                    0 if !v.is_empty() => v[at] = byte,
                    1 => v.insert(at, byte),
                    _ if !v.is_empty() => {
                        v.remove(at);
                    }
                    _ => {}
                }
            }
            v
        });
    let strategy = prop_oneof![prop::collection::vec(any::<u8>(), 0..300), mutated];
    check("mountinfo::parse_bytes noise", strategy, |data| {
        if let Ok(entries) = blockcsi::host::mountinfo::parse_bytes(&data) {
            prop_assert!(entries.len() <= data.iter().filter(|&&b| b == b'\n').count() + 1);
        }
        if let Ok(text) = std::str::from_utf8(&data) {
            let _ = blockcsi::host::mountinfo::parse(text);
        }
        Ok(())
    });
}

#[test]
fn endpoints_become_absolute_socket_paths_or_errors() {
    let strategy = prop_oneof![
        nasty_text(10),
        nasty_text(10).prop_map(|s| format!("unix://{s}")),
        nasty_text(10).prop_map(|s| format!("unix:///{s}")),
        nasty_text(6).prop_map(|s| format!("tcp://{s}")),
    ];
    check("config::socket_path", strategy, |endpoint| {
        match blockcsi::daemon::config::socket_path(&endpoint) {
            Ok(p) => {
                prop_assert!(p.is_absolute());
                prop_assert!(!p.as_os_str().as_bytes().contains(&0));
                prop_assert!(!endpoint.starts_with("tcp:"));
                let raw = endpoint.strip_prefix("unix://").unwrap_or(&endpoint);
                prop_assert_eq!(p.as_os_str().as_bytes(), raw.as_bytes());
            }
            Err(_) => {
                let raw = endpoint.strip_prefix("unix://").unwrap_or(&endpoint);
                prop_assert!(!raw.starts_with('/') || raw.contains('\0'));
            }
        }
        Ok(())
    });
}
