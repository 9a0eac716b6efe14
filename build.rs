//! Compiles proto/csi.proto and proto/pluginregistration.proto with protox (pure Rust), so
//! building needs no system protoc. Clients are generated too: `ctl` and the tests use them.

const PROTOS: [&str; 2] = ["csi.proto", "pluginregistration.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rustc-env=BLOCKCSI_GIT_COMMIT={}", git_commit());
    // A new commit moves HEAD or the branch it names; the index changes with what is dirty.
    // `--git-path` finds them in a worktree too, where `.git` is a file.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "index"]
        .into_iter()
        .map(String::from)
        .chain(branch)
    {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    for proto in PROTOS {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

/// The short commit this is built from, `-dirty` when tracked files differ from it; `unknown`
/// outside a git checkout (the Docker build copies the tree without `.git`).
fn git_commit() -> String {
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) if !commit.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit}-dirty")
            } else {
                commit
            }
        }
        _ => "unknown".to_string(),
    }
}

/// The trimmed output of a successful git command; `None` when git is absent or fails.
fn git(args: &[&str]) -> Option<String> {
    std::process::Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}
