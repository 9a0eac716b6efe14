#!/usr/bin/env bash
# Assembles (once) the root filesystems the node-level e2e turns into base images, there being
# no image registry to pull from, and caches them as tarballs under
# ${BLOCKCSI_CACHE:-$HOME/.cache/blockcsi}/e2e/rootfs:
#
#   base     Debian minbase with e2fsprogs and xfsprogs: the runtime base the Dockerfile takes
#            as BASE_IMAGE (it has the filesystem tools, so the Dockerfile installs nothing),
#            and the image of the test workloads (a shell and coreutils)
#   builder  Debian minbase with a C toolchain (the linker rustc calls) and this machine's Rust
#            toolchain under /usr/local/rust: the Dockerfile's BUILDER_IMAGE. Both are the same
#            Debian release, as the Dockerfile requires (one C library). It trusts what this
#            machine trusts (its CA bundle), since cargo fetches crates through this machine's
#            network, which may inspect TLS with a CA of its own.
#
# A tarball's name holds a hash of what made it (suite, packages, rustc version), so a change
# builds a new one. Output: "base=/abs/path.tar" and "builder=/abs/path.tar" on stdout, plus
# "rust=VERSION"; progress on stderr.
#
# Environment: BLOCKCSI_CACHE, E2E_DEBIAN_SUITE (default: this machine's release),
# E2E_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

cache="${BLOCKCSI_CACHE:-$HOME/.cache/blockcsi}/e2e/rootfs"
mkdir -p "$cache"
log() { printf 'rootfs.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v debootstrap >/dev/null || die "debootstrap is required (apt-get install debootstrap)"
command -v rustc >/dev/null || die "rustc is required"
suite="${E2E_DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-}")}"
[ -n "$suite" ] || die "cannot tell the Debian release; set E2E_DEBIAN_SUITE"
mirror="${E2E_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

base_pkgs="e2fsprogs,xfsprogs"
builder_pkgs="gcc,libc6-dev,ca-certificates"
sysroot="$(rustc --print sysroot)"
rust_version="$(rustc --version | awk '{ print $2 }')"
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca_bundle" ] || die "no CA bundle at $ca_bundle"
key() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }
base_tar="$cache/base-$suite-$(key "$suite" "$base_pkgs" "$mirror").tar"
builder_tar="$cache/builder-$suite-rust$rust_version-$(key "$suite" "$builder_pkgs" "$mirror" "$rust_version" "$(sha256sum <"$ca_bundle")").tar"

# assemble TARBALL PACKAGES [RUST]: debootstrap into a temporary directory, trim what an image
# does not need, optionally add the Rust toolchain, and tar it up; moved into place when whole.
assemble() {
  local out="$1" pkgs="$2" rust="${3:-}" dir start=$SECONDS
  dir="$(mktemp -d "$cache/.build.XXXXXX")"
  # A failure leaves nothing half-made behind.
  trap 'rm -rf --one-file-system "$dir"' RETURN
  log "debootstrap $suite ($pkgs) -> $(basename "$out") ..."
  debootstrap --variant=minbase --include="$pkgs" "$suite" "$dir/root" "$mirror" >"$dir/debootstrap.log" 2>&1 ||
    { tail -n 20 "$dir/debootstrap.log" >&2; die "debootstrap $suite failed"; }
  rm -rf "$dir/root/var/cache/apt/archives/"*.deb "$dir/root/var/lib/apt/lists/"* \
    "$dir/root/usr/share/doc" "$dir/root/usr/share/man" "$dir/root/usr/share/info"
  # Files a container runtime provides at run time.
  : >"$dir/root/etc/resolv.conf"
  : >"$dir/root/etc/hostname"
  if [ -n "$rust" ]; then
    # The toolchain without its documentation; rustc and cargo find their libraries relative
    # to their own path, so a copy works wherever it lands.
    mkdir -p "$dir/root/usr/local/rust"
    cp -a "$sysroot/bin" "$sysroot/lib" "$dir/root/usr/local/rust/"
    [ -d "$sysroot/libexec" ] && cp -a "$sysroot/libexec" "$dir/root/usr/local/rust/"
    cp "$ca_bundle" "$dir/root/etc/ssl/certs/ca-certificates.crt"
  fi
  tar -C "$dir/root" --numeric-owner -cf "$dir/rootfs.tar" .
  mv "$dir/rootfs.tar" "$out"
  log "$(basename "$out"): $(du -h "$out" | cut -f1) in $((SECONDS - start))s"
}

pids=()
[ -f "$base_tar" ] || { assemble "$base_tar" "$base_pkgs" & pids+=("$!"); }
[ -f "$builder_tar" ] || { assemble "$builder_tar" "$builder_pkgs" rust & pids+=("$!"); }
for p in "${pids[@]}"; do wait "$p" || die "assembling a root filesystem failed"; done

# Drop tarballs of earlier pins.
find "$cache" -maxdepth 1 -name '*.tar' ! -path "$base_tar" ! -path "$builder_tar" -delete
echo "base=$base_tar"
echo "builder=$builder_tar"
echo "rust=$rust_version"
