#!/usr/bin/env bash
# Builds (once) every Go binary tests/e2e/run.sh needs and caches it under
# ${BLOCKCSI_CACHE:-$HOME/.cache/blockcsi}/e2e/bin:
#
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy
#       from tests/e2e/tools (pinned Kubernetes and etcd; see its go.mod)
#   csi-provisioner, csi-attacher, csi-snapshotter, snapshot-controller, csi-resizer
#       from the kubernetes-csi modules, at the versions deploy/kubernetes/ pins for the images
#   pause
#       compiled (static, with the host's C compiler) from the pause.c of the same Kubernetes
#       module: the pod sandbox of run-node.sh's containerd
#   buildkitd, buildctl, registry
#       from tests/e2e/imagetools (BuildKit and a distribution registry, for run-node.sh's images)
#   csictl
#       from tests/e2e/csictl (the stand-in for kubelet's CSI calls)
#
# and copies the VolumeSnapshot CRDs of the pinned external-snapshotter to .../e2e/crds-<version>
# and the ServiceMonitor and PodMonitor CRDs of a pinned Prometheus Operator to
# .../e2e/monitoring-crds-<version>.
# A cached file's name holds its version (or a hash of the module that builds it), so changing
# a pin builds again and nothing stale is used. Builds go to a temporary directory and are moved
# into place only when complete. Output: one "name=/abs/path" line per binary on stdout, plus
# "crds=/abs/dir"; progress goes to stderr.
#
# Environment: BLOCKCSI_CACHE (cache root), E2E_GO_PARALLEL (go build -p, default 2: the
# machine is shared with other builds).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${BLOCKCSI_CACHE:-$HOME/.cache/blockcsi}/e2e"
bin="$cache/bin"
par="${E2E_GO_PARALLEL:-2}"
mkdir -p "$bin"

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v go >/dev/null || die "go is required"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -trimpath"

hash_of() { cat "$@" | sha256sum | cut -c1-12; }

# ---------------------------------------------------------------------------------------------
# Kubernetes and etcd, from our tools module.

tools="$here/tools"
k8s_version="$(cd "$tools" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
etcd_version="$(cd "$tools" && go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)"
# Every staging module must be replaced by the release that matches k8s.io/kubernetes
# (v1.X.Y -> v0.X.Y): a mismatch would build a Kubernetes nobody released.
staging_version="v0.${k8s_version#v1.}"
if bad="$(grep -E '^\s*k8s\.io/[a-z0-9-]+ => k8s\.io/' "$tools/go.mod" | grep -v " => k8s.io/[a-z0-9-]* $staging_version\$")"; then
  die "tools/go.mod: staging replacements must all be $staging_version for k8s.io/kubernetes $k8s_version: $bad"
fi
k8s_key="$k8s_version-$(hash_of "$tools/go.mod" "$tools/go.sum")"
k8s_tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

need_k8s=0
for t in "${k8s_tools[@]}"; do [ -x "$bin/$t-$k8s_key" ] || need_k8s=1; done
[ -x "$bin/etcd-$etcd_version" ] || need_k8s=1
if [ "$need_k8s" -eq 1 ]; then
  log "building Kubernetes $k8s_version and etcd $etcd_version (the slow part of a cold run) ..."
  start=$SECONDS
  out="$(mktemp -d "$bin/.k8s.XXXXXX")"
  minor="${k8s_version#v1.}"; minor="${minor%%.*}"
  ldflags="-s -w"
  # What `make` stamps into a release, so that version reports and skew checks are right.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  if ! (cd "$tools" && go build -p "$par" -ldflags "$ldflags" -o "$out/" tool >&2); then
    rm -rf "$out"
    die "building the Kubernetes tools failed"
  fi
  # go names the etcd main package after its module directory, "server".
  mv "$out/server" "$bin/etcd-$etcd_version"
  for t in "${k8s_tools[@]}"; do mv "$out/$t" "$bin/$t-$k8s_key"; done
  rm -rf "$out"
  log "built Kubernetes and etcd in $((SECONDS - start))s"
fi
# prune NAME CURRENT: drop cached builds of NAME other than CURRENT (an old pin's binaries).
prune() {
  find "$bin" -maxdepth 1 -name "$1-*" ! -name "$2" -exec rm -rf {} + 2>/dev/null || true
}

for t in "${k8s_tools[@]}"; do
  prune "$t" "$t-$k8s_key"
  echo "$t=$bin/$t-$k8s_key"
done
prune etcd "etcd-$etcd_version"
echo "etcd=$bin/etcd-$etcd_version"

# ---------------------------------------------------------------------------------------------
# Sidecars, at the tags of the images in the rendered manifests.

# image_tag NAME: the tag of registry.../NAME:TAG in the controller manifest.
manifest="$repo/deploy/kubernetes/30-controller.yaml"
[ -f "$manifest" ] || die "$manifest is missing (run deploy/render.sh)"
image_tag() {
  local tag
  tag="$(sed -n "s|^ *image: .*/$1:\(v[0-9][0-9.]*\)\$|\1|p" "$manifest" | head -n 1)"
  [ -n "$tag" ] || die "no image $1:vX.Y.Z in $manifest"
  echo "$tag"
}

# module_of REPO TAG: the Go module path of a kubernetes-csi repository at a tag (a /vN suffix
# from v2 on).
module_of() {
  local major="${2%%.*}"
  major="${major#v}"
  if [ "$major" -ge 2 ]; then echo "github.com/kubernetes-csi/$1/v$major"; else echo "github.com/kubernetes-csi/$1"; fi
}

# build_sidecar REPO TAG CMD...: builds cmd/CMD of the repository's module at TAG.
# `go install module/cmd/x@tag` refuses these modules (their go.mod has replace directives),
# so the module source is copied from the module cache and built where it stands, with its
# own go.sum: the same dependency graph its release was built from.
build_sidecar() {
  local repo_name="$1" tag="$2" mod dir src c missing=0
  shift 2
  for c in "$@"; do [ -x "$bin/$c-$tag" ] || missing=1; done
  if [ "$missing" -eq 1 ]; then
    mod="$(module_of "$repo_name" "$tag")"
    log "building $* from $mod@$tag ..."
    local start=$SECONDS
    dir="$(go mod download -json "$mod@$tag" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
    [ -d "$dir" ] || die "go mod download $mod@$tag failed"
    src="$(mktemp -d "$cache/.src.XXXXXX")"
    cp -r "$dir/." "$src/"
    chmod -R u+w "$src"
    # external-snapshotter replaces its client module by ./client, which is a module of its own
    # and so not in the module zip: use the client released with the same tag instead.
    if grep -q '=> ./client' "$src/go.mod"; then
      local client="${mod%/v*}/client/${tag%%.*}"
      (cd "$src" && go mod edit -replace "$client=$client@$tag") || die "go mod edit failed in $src"
    fi
    for c in "$@"; do
      if ! (cd "$src" && go build -mod=mod -p "$par" -ldflags "-s -w -X main.version=$tag" -o "$src/.out/$c" "./cmd/$c" >&2); then
        rm -rf "$src"
        die "building $c from $mod@$tag failed"
      fi
    done
    for c in "$@"; do mv "$src/.out/$c" "$bin/$c-$tag"; done
    rm -rf "$src"
    log "built $* in $((SECONDS - start))s"
  fi
  for c in "$@"; do
    prune "$c" "$c-$tag"
    echo "$c=$bin/$c-$tag"
  done
}

prov_tag="$(image_tag csi-provisioner)"
att_tag="$(image_tag csi-attacher)"
snap_tag="$(image_tag csi-snapshotter)"
res_tag="$(image_tag csi-resizer)"
build_sidecar external-provisioner "$prov_tag" csi-provisioner
build_sidecar external-attacher "$att_tag" csi-attacher
build_sidecar external-snapshotter "$snap_tag" csi-snapshotter snapshot-controller
build_sidecar external-resizer "$res_tag" csi-resizer

# VolumeSnapshot CRDs of the same external-snapshotter release (they live in its client module).
crds="$cache/crds-$snap_tag"
if [ ! -d "$crds" ]; then
  snap_major="${snap_tag%%.*}"
  client_mod="github.com/kubernetes-csi/external-snapshotter/client/$snap_major"
  dir="$(go mod download -json "$client_mod@$snap_tag" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
  [ -d "$dir/config/crd" ] || die "no config/crd in $client_mod@$snap_tag"
  tmp_crds="$(mktemp -d "$cache/.crds.XXXXXX")"
  cp "$dir"/config/crd/*.yaml "$tmp_crds/"
  chmod u+w "$tmp_crds"/*.yaml
  rm -f "$tmp_crds/kustomization.yaml"
  mv "$tmp_crds" "$crds"
fi
echo "crds=$crds"

# The Prometheus Operator CRDs of the chart's ServiceMonitor and PodMonitor, so that run.sh can
# validate them with the API server (they live in the operator's root module).
readonly PROMETHEUS_OPERATOR_VERSION=v0.85.0
mcrds="$cache/monitoring-crds-$PROMETHEUS_OPERATOR_VERSION"
if [ ! -d "$mcrds" ]; then
  po_mod="github.com/prometheus-operator/prometheus-operator"
  dir="$(go mod download -json "$po_mod@$PROMETHEUS_OPERATOR_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
  src_crds="$dir/example/prometheus-operator-crd"
  [ -f "$src_crds/monitoring.coreos.com_servicemonitors.yaml" ] || die "no CRDs in $po_mod@$PROMETHEUS_OPERATOR_VERSION"
  tmp_crds="$(mktemp -d "$cache/.crds.XXXXXX")"
  cp "$src_crds"/monitoring.coreos.com_{servicemonitors,podmonitors}.yaml "$tmp_crds/"
  chmod u+w "$tmp_crds"/*.yaml
  mv "$tmp_crds" "$mcrds"
fi
echo "monitoring-crds=$mcrds"

# ---------------------------------------------------------------------------------------------
# The pod sandbox's pause process, at the version Kubernetes' own build gives its image.

k8s_dir="$(cd "$tools" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
pause_src="$k8s_dir/build/pause/linux/pause.c"
[ -f "$pause_src" ] || die "no $pause_src"
pause_tag="$(sed -n 's/^TAG ?= *\([0-9][0-9.]*\)$/\1/p' "$k8s_dir/build/pause/Makefile")"
[ -n "$pause_tag" ] || die "no pause TAG in $k8s_dir/build/pause/Makefile"
if [ ! -x "$bin/pause-$pause_tag" ]; then
  command -v cc >/dev/null || die "a C compiler (cc) is required for the pause binary"
  cc -Os -Wall -static -DVERSION="v$pause_tag-blockcsi-e2e" -o "$bin/.pause-$pause_tag" "$pause_src" ||
    die "compiling $pause_src failed"
  mv "$bin/.pause-$pause_tag" "$bin/pause-$pause_tag"
fi
prune pause "pause-$pause_tag"
echo "pause=$bin/pause-$pause_tag"
echo "pause_tag=$pause_tag"

# ---------------------------------------------------------------------------------------------
# Image tools, keyed by a hash of their module.

imagetools="$here/imagetools"
img_key="$(hash_of "$imagetools/go.mod" "$imagetools/go.sum")"
img_tools=(buildkitd buildctl registry)
need_img=0
for t in "${img_tools[@]}"; do [ -x "$bin/$t-$img_key" ] || need_img=1; done
if [ "$need_img" -eq 1 ]; then
  log "building BuildKit and the registry ..."
  start=$SECONDS
  out="$(mktemp -d "$bin/.img.XXXXXX")"
  if ! (cd "$imagetools" && go build -p "$par" -ldflags "-s -w" -o "$out/" tool >&2); then
    rm -rf "$out"
    die "building the image tools failed"
  fi
  for t in "${img_tools[@]}"; do mv "$out/$t" "$bin/$t-$img_key"; done
  rm -rf "$out"
  log "built the image tools in $((SECONDS - start))s"
fi
for t in "${img_tools[@]}"; do
  prune "$t" "$t-$img_key"
  echo "$t=$bin/$t-$img_key"
done

# ---------------------------------------------------------------------------------------------
# csictl, keyed by a hash of its sources.

csictl_key="$(hash_of "$here"/csictl/go.mod "$here"/csictl/go.sum "$here"/csictl/*.go)"
if [ ! -x "$bin/csictl-$csictl_key" ]; then
  log "building csictl ..."
  (cd "$here/csictl" && go build -p "$par" -o "$bin/.csictl-$csictl_key" . >&2) || die "building csictl failed"
  mv "$bin/.csictl-$csictl_key" "$bin/csictl-$csictl_key"
fi
prune csictl "csictl-$csictl_key"
echo "csictl=$bin/csictl-$csictl_key"
