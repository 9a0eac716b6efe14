#!/usr/bin/env bash
# Install csi-sanity (kubernetes-csi/csi-test) into a versioned cache directory.
#
# Usage: csi-sanity/install.sh
#
# Environment:
#   BLOCKCSI_CACHE        cache root (default: $HOME/.cache/blockcsi); the binary
#                         goes to $BLOCKCSI_CACHE/bin/csi-sanity-<tag>
#   CSI_SANITY_VERSIONS   space-separated tags to try in order
#                         (default: "v5.5.0 v5.4.0")
#
# The last line printed on stdout is the absolute path of the binary; all
# progress messages go to stderr. If a cached binary for a tag already exists,
# nothing is built.
set -euo pipefail

readonly MODULE="github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
cache_root="${BLOCKCSI_CACHE:-$HOME/.cache/blockcsi}"
bin_dir="${cache_root}/bin"
read -r -a versions <<<"${CSI_SANITY_VERSIONS:-v5.5.0 v5.4.0}"

log() { printf 'install.sh: %s\n' "$*" >&2; }

mkdir -p "$bin_dir"

# Tags are tried in order: a cached binary for a tag is used as is; otherwise
# the tag is built, and only if that fails is the next tag considered.
for v in "${versions[@]}"; do
    target="${bin_dir}/csi-sanity-${v}"
    if [[ -x "$target" ]]; then
        log "using cached $target"
        printf '%s\n' "$target"
        exit 0
    fi
    if ! command -v go >/dev/null 2>&1; then
        log "error: 'go' not found in PATH (csi-sanity v5.5.0 needs Go >= 1.25)"
        exit 1
    fi
    # Build into a private GOBIN so a partial build never shows up as cached.
    gobin="$(mktemp -d "${bin_dir}/.gobin.XXXXXX")"
    log "go install ${MODULE}@${v} ..."
    start=$SECONDS
    if GOBIN="$gobin" go install "${MODULE}@${v}" >&2; then
        mv -f "${gobin}/csi-sanity" "$target"
        rm -rf "$gobin"
        log "installed $target (tag ${v}) in $((SECONDS - start))s"
        printf '%s\n' "$target"
        exit 0
    fi
    rm -rf "$gobin"
    log "warning: ${MODULE}@${v} did not install; trying next tag"
done

log "error: could not install csi-sanity (tried: ${versions[*]})"
exit 1
