//! ARCHITECTURE.md invariant 10 under attack: while a thread keeps swapping a directory of the
//! target's path for a symbolic link to a directory outside, LinuxHost's bind and filesystem
//! mounts either land on the real path or are refused as a symlink; no mount ever appears
//! under the outside directory.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use blockcsi::host::linux::LinuxHost;
use blockcsi::host::{Error, Host, MountOptions};

const ITERATIONS: usize = 400;
const CALLS_PER_ITERATION: usize = 5;

fn mount_points_under(prefix: &Path) -> Vec<PathBuf> {
    LinuxHost::new()
        .mounts()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(prefix))
        .collect()
}

/// Swaps `pods` for a link to `outside` and back until told to stop; leaves the real
/// directory in place.
fn swap_until(stop: &AtomicBool, base: &Path) {
    let (pods, away, outside) = (
        base.join("pods"),
        base.join("pods.away"),
        base.join("outside"),
    );
    while !stop.load(Ordering::Relaxed) {
        std::fs::rename(&pods, &away).unwrap();
        std::os::unix::fs::symlink(&outside, &pods).unwrap();
        std::thread::yield_now();
        std::fs::remove_file(&pods).unwrap();
        std::fs::rename(&away, &pods).unwrap();
    }
}

fn race(mount: impl Fn(&LinuxHost, &Path) -> Result<(), Error>) {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    for d in ["pods/vol/mount", "outside/vol/mount", "source"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
    let target = base.join("pods/vol/mount");
    let host = LinuxHost::new();
    let (mut mounted, mut refused) = (0, 0);
    for _ in 0..ITERATIONS {
        let stop = AtomicBool::new(false);
        let mut ok = 0;
        std::thread::scope(|s| {
            s.spawn(|| swap_until(&stop, base));
            for _ in 0..CALLS_PER_ITERATION {
                match mount(&host, &target) {
                    Ok(()) => ok += 1,
                    Err(Error::Symlink(_)) => refused += 1,
                    // The directory renamed away and the link not yet planted.
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        let outside = mount_points_under(&base.join("outside"));
        let inside = mount_points_under(&base.join("pods"));
        for _ in 0..inside.len() {
            host.unmount(&target).unwrap();
        }
        assert!(outside.is_empty(), "a mount escaped the path: {outside:?}");
        assert_eq!(inside, vec![target.clone(); ok], "mounts on the real path");
        mounted += ok;
    }
    assert!(mount_points_under(base).is_empty());
    assert!(
        mounted > 0,
        "mounted {mounted}, refused {refused} while racing"
    );
    // Whether the race ever hit the window depends on scheduling, so the swapped state itself
    // is checked once, for certain: a link in the path is refused and nothing is mounted.
    let pods = base.join("pods");
    std::fs::rename(&pods, base.join("pods.away")).unwrap();
    std::os::unix::fs::symlink(base.join("outside"), &pods).unwrap();
    let planted = mount(&host, &target);
    assert!(
        matches!(planted, Err(Error::Symlink(_))),
        "a planted link must be refused, got {planted:?}"
    );
    assert!(
        mount_points_under(base).is_empty(),
        "nothing mounted through the link"
    );
    std::fs::remove_file(&pods).unwrap();
    std::fs::rename(base.join("pods.away"), &pods).unwrap();
    println!("symlink race: {mounted} mounts on the real path, {refused} refused mid-swap");
}

#[test]
fn bind_mounts_never_follow_a_swapped_symlink() {
    race(|host, target| {
        let source = target.ancestors().nth(3).unwrap().join("source");
        host.bind_mount(&source, target, false)
    });
}

#[test]
fn read_only_binds_never_follow_a_swapped_symlink() {
    race(|host, target| {
        let source = target.ancestors().nth(3).unwrap().join("source");
        host.bind_mount(&source, target, true)
    });
}

#[test]
fn filesystem_mounts_never_follow_a_swapped_symlink() {
    race(|host, target| {
        host.mount(
            Path::new("tmpfs"),
            target,
            "tmpfs",
            &MountOptions::default(),
        )
    });
}
