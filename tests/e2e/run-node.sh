#!/usr/bin/env bash
# Node-level end-to-end test: a real kubelet, containerd and runc run blockcsi from the images
# the project's Dockerfile builds and the objects deploy/kubernetes/ holds, and a workload
# StatefulSet keeps its data through pod restarts, snapshots, expansion and a node plugin
# restart.
#
# Usage: tests/e2e/run-node.sh [--keep]
#
#   --keep   keep the temporary directory (logs, certificates, containerd state) after the run
#
# What runs, on this machine, as root, with TLS made here:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, snapshot-controller (with its
#   CRDs), kube-proxy (iptables) and kubelet, all from the pinned Kubernetes module
#   (tests/e2e/build.sh); containerd and runc from Debian, with the CNI bridge plugin; BuildKit
#   and a registry on loopback to build the images (tests/e2e/imagetools).
#
# Images, since there is no registry to pull from: Debian root filesystems are assembled with
# debootstrap (tests/e2e/rootfs.sh) and pushed to the loopback registry as the base images; the
# blockcsi image is the project's Dockerfile built by BuildKit with those two bases as its
# build arguments (BUILDER_IMAGE, BASE_IMAGE); the sidecars are their Go binaries on an empty
# image, named as the manifests name them; the pod sandbox is Kubernetes' pause. All are
# imported into containerd with `ctr images import`.
#
# Host paths: deploy/ uses kubelet's directory /var/lib/kubelet and the pool
# /var/lib/blockcsi/pool, so this test does too. It refuses to run when either exists or a
# kubelet or containerd already runs, and removes both at the end. /var/lib/kubelet is made a
# shared bind mount of itself (Bidirectional mount propagation needs a shared mount; the root
# mount is left as it is).
#
# Steps (each prints "step NAME: passed|failed|skipped: why"):
#   preflight       root, tools, host paths free
#   build           Go binaries, root filesystems, pause (all cached)
#   images          base images pushed, Dockerfile built, sidecar/pause/workload images made
#   control-plane   etcd, API server, controller manager, scheduler, snapshot CRDs + controller
#   node            CNI bridge, containerd (images imported), kube-proxy, kubelet; node Ready
#   install         deploy/kubernetes/ applied; the controller StatefulSet and node DaemonSet
#                   Ready; CSINode lists the driver with the pool topology; liveness probes pass
#   workload        a 2-replica StatefulSet on the chart's StorageClass writes a file per
#                   replica; fsGroup owns the files
#   pod-restart     a deleted replica comes back on the same claim with its data
#   snapshot        VolumeSnapshot -> new claim -> a pod reads the snapshot-time data
#   expand          a claim grows; the running pod sees the bigger filesystem
#   plugin-restart  the node plugin pod is deleted; the DaemonSet recreates it; the workloads
#                   keep their data
#   teardown        workloads scaled to 0, claims and snapshots deleted: PVs gone, the pool
#                   empty, no loop device or mount left
#   uninstall       deploy/ deleted: the driver deregisters from kubelet (CSINode empty)
#   shutdown        kubelet, containerd and the control plane stop; nothing left on the host
# A step runs only when the steps it depends on passed. The last line is the summary,
# "N passed, N failed, N skipped"; the exit status is non-zero when any step failed.
#
# Environment: BLOCKCSI_CACHE (build cache, default ~/.cache/blockcsi), E2E_WAIT (seconds per
# wait, default 180), E2E_TMPDIR (parent of the temporary directory, default /tmp).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
manifests="$repo/deploy/kubernetes"
cache="${BLOCKCSI_CACHE:-$HOME/.cache/blockcsi}/e2e"
keep=0
wait_s="${E2E_WAIT:-180}"

while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-node.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "run-node.sh: run as root: kubelet, containerd and the node plugin need it" >&2
  exit 2
fi
for d in "$HOME/.cargo/bin" /usr/local/go/bin; do
  case ":$PATH:" in *":$d:"*) ;; *) [ -d "$d" ] && PATH="$d:$PATH" ;; esac
done
export PATH

# The host paths deploy/ names.
readonly KUBELET_DIR=/var/lib/kubelet
readonly POOL_PARENT=/var/lib/blockcsi
# The node and its networks: a bridge for the pods whose address is also the node's and the
# API server's, so pods reach the API server through the kubernetes Service (kube-proxy).
readonly NODE=blockcsi-e2e-node
readonly BRIDGE=bcsi-e2e0
readonly POD_CIDR=10.213.0.0/24
readonly NODE_IP=10.213.0.1
readonly SERVICE_CIDR=10.213.1.0/24
readonly SERVICE_IP=10.213.1.1
readonly CNI_NETWORK=blockcsi-e2e
# The scenario.
readonly NS=e2e
readonly FS_GROUP=4242
readonly WORKLOAD_IMAGE=blockcsi-e2e/workload:1

tmp="$(mktemp -d "${E2E_TMPDIR:-/tmp}/bcsi-node.XXXXXX")"
tmp="$(realpath "$tmp")"
logs="$tmp/logs"
pki="$tmp/pki"
images="$tmp/images"
mkdir -p "$logs" "$pki" "$images"
export KUBECONFIG="$pki/admin.kubeconfig"
API_HOST="$NODE_IP"
# shellcheck source=tests/e2e/lib.sh
. "$here/lib.sh"

# ---------------------------------------------------------------------------------------------
# Cleanup: whatever happened, nothing of this run stays on the host.

made_kubelet_dir=0
made_pool_dir=0
made_bridge=0
netns_before=" "
loops_before=" "

# pool_loops: the loop devices attached during this run to images of the pool. sysfs shows the
# image path as the attaching container saw it, cut to the mount's root ("/volumes/x.img") once
# that container is gone; devices attached before the run are never touched.
pool_loops() {
  local f b n
  for f in /sys/block/loop*/loop/backing_file; do
    [ -r "$f" ] || continue
    b="$(cat "$f" 2>/dev/null)" || continue
    n="${f#/sys/block/}"
    n="/dev/${n%%/*}"
    case "$loops_before" in *" $n "*) continue ;; esac
    case "${b% (deleted)}" in "$POOL_PARENT"/* | /volumes/*.img | "$tmp"/*) echo "$n" ;; esac
  done
}

# kill_shims: containerd's shims (and so the containers) outlive containerd; the ones of this
# run's containerd carry its address on their command line.
kill_shims() {
  local p
  for p in /proc/[0-9]*; do
    { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q -- "-address $tmp/containerd.sock" || continue
    kill -KILL "${p#/proc/}" 2>/dev/null || true
  done
}

cleanup() {
  local rc=$? i name m dev n
  trap - EXIT INT TERM
  if [ -n "${CTR:-}" ] && [ -S "$tmp/containerd.sock" ]; then
    # Pods first: kubelet would restart what is killed, so it stops before containerd's tasks.
    if pid_of kubelet >/dev/null; then stop kubelet 10; fi
    for n in $(ctr_ list tasks -q 2>/dev/null); do ctr_ tasks kill -s KILL "$n" >/dev/null 2>&1 || true; done
  fi
  for ((i = ${#proc_names[@]} - 1; i >= 0; i--)); do
    name="${proc_names[$i]}"
    case "$stopped" in *" $name "*) continue ;; esac
    stop "$name" 10
  done
  kill_shims
  if [ -n "${KUBE_PROXY:-}" ]; then "$KUBE_PROXY" --cleanup --proxy-mode=iptables >/dev/null 2>&1 || true; fi
  for _ in 1 2 3 4 5; do
    m="$( (mounts_under "$KUBELET_DIR"; mounts_under "$POOL_PARENT"; mounts_under "$tmp") | sort -r -u)"
    [ -n "$m" ] || break
    for n in $m; do umount "$n" 2>/dev/null || umount -l "$n" 2>/dev/null || true; done
  done
  for dev in $(pool_loops); do losetup -d "$dev" 2>/dev/null || true; done
  for n in /var/run/netns/cni-*; do
    [ -e "$n" ] || continue
    case "$netns_before" in *" $n "*) continue ;; esac
    umount "$n" 2>/dev/null || true
    rm -f "$n"
  done
  [ "$made_bridge" -eq 0 ] || ip link del "$BRIDGE" 2>/dev/null || true
  # The pod cgroups kubelet made, deepest first.
  find /sys/fs/cgroup/*/kubepods* -depth -type d -exec rmdir {} + 2>/dev/null || true
  [ "$made_kubelet_dir" -eq 0 ] || [ -n "$(mounts_under "$KUBELET_DIR")" ] ||
    rm -rf --one-file-system "$KUBELET_DIR"
  [ "$made_pool_dir" -eq 0 ] || [ -n "$(mounts_under "$POOL_PARENT")" ] ||
    rm -rf --one-file-system "$POOL_PARENT"
  if [ "$keep" -eq 1 ]; then
    log "kept $tmp"
  elif [ -n "$(mounts_under "$tmp")" ]; then
    log "warning: mounts left under $tmp; not removing it"
  else
    rm -rf --one-file-system "$tmp"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Whether this process, and so containerd and the containers it starts, holds
# CAP_SYS_RESOURCE (bit 24).
has_cap_sys_resource() {
  local eff
  eff="$(awk '/^CapEff:/ {print $2}' /proc/self/status)"
  (( (16#$eff >> 24) & 1 ))
}

# ctr_ ARGS...: ctr on this run's containerd, in kubelet's namespace.
ctr_() { "$CTR" --address "$tmp/containerd.sock" --namespace k8s.io "$@"; }

# ---------------------------------------------------------------------------------------------
# preflight

step_preflight() {
  local t missing=()
  for t in containerd:containerd ctr:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
           iptables:iptables conntrack:conntrack debootstrap:debootstrap openssl:openssl go:golang \
           cc:gcc ip:iproute2 mountpoint:util-linux; do
    command -v "${t%%:*}" >/dev/null 2>&1 || [ -x "${t%%:*}" ] || missing+=("${t##*:}")
  done
  [ "${#missing[@]}" -eq 0 ] || fail "missing tools (packages: ${missing[*]})" || return
  CTR="$(command -v ctr)"
  if pgrep -x kubelet >/dev/null || pgrep -x containerd >/dev/null; then
    fail "a kubelet or containerd already runs on this machine; this test runs its own" || return
  fi
  # Refuse to touch a node's real state.
  if [ -e "$KUBELET_DIR" ] && [ -n "$(ls -A "$KUBELET_DIR" 2>/dev/null)" ]; then
    fail "$KUBELET_DIR exists and is not empty: not a machine for this test" || return
  fi
  if [ -e "$POOL_PARENT" ]; then
    fail "$POOL_PARENT exists: it may hold volumes; not a machine for this test" || return
  fi
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    fail "network interface $BRIDGE exists" || return
  fi
  if ip route show | grep -q "^${POD_CIDR%/*}"; then
    fail "$POD_CIDR is routed on this machine already" || return
  fi
  local n
  for n in /var/run/netns/cni-*; do [ -e "$n" ] && netns_before+="$n "; done
  for n in /sys/block/loop*/loop; do [ -e "$n" ] && n="${n#/sys/block/}" && loops_before+="/dev/${n%%/*} "; done
  log "$(containerd --version | awk '{ print $1, $3 }'); $(runc --version | head -n 1)"
}

# ---------------------------------------------------------------------------------------------
# build

step_build() {
  local lines line
  lines="$("$here/build.sh")" || return 1
  lines+=$'\n'"$("$here/rootfs.sh")" || return 1
  load_build_output <<<"$lines"
  for v in KUBE_APISERVER KUBE_CONTROLLER_MANAGER KUBE_SCHEDULER KUBECTL KUBELET KUBE_PROXY ETCD CSI_PROVISIONER CSI_ATTACHER CSI_SNAPSHOTTER \
           SNAPSHOT_CONTROLLER CSI_RESIZER CRDS PAUSE PAUSE_TAG BUILDKITD BUILDCTL REGISTRY BASE \
           BUILDER RUST; do
    [ -n "${!v:-}" ] || fail "build did not report $v" || return
  done
  "$KUBELET" --version >&2
}

# ---------------------------------------------------------------------------------------------
# images

# image_of FILE CONTAINER: the image a container of a manifest runs, read from the rendered
# YAML (no API server is up yet to parse it).
image_of() {
  awk -v c="$2" '$1 == "-" && $2 == "name:" { name = $3 } $1 == "image:" && name == c { print $2; exit }' "$1"
}

# buildctl_ ARGS...: a build on this run's BuildKit daemon.
buildctl_() { "$BUILDCTL" --addr "unix://$tmp/buildkitd.sock" build --progress=plain "$@"; }

# registry_has REPO TAG: whether the loopback registry holds REPO:TAG.
registry_has() {
  curl -fsS -o /dev/null -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://$REGISTRY_ADDR/v2/$1/manifests/$2"
}

# push_rootfs TARBALL REPO TAG [PATH-PREFIX]: the root filesystem as a one-layer image in the
# loopback registry (kept in the cache: done once per tarball).
push_rootfs() {
  local ctx
  if registry_has "$2" "$3"; then
    log "registry has $2:$3"
    return 0
  fi
  ctx="$tmp/ctx-${2##*/}"
  mkdir -p "$ctx"
  ln "$1" "$ctx/rootfs.tar" 2>/dev/null || cp "$1" "$ctx/rootfs.tar"
  cat >"$ctx/Dockerfile" <<EOF
FROM scratch
ADD rootfs.tar /
ENV PATH=${4:-}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["bash"]
EOF
  buildctl_ --frontend dockerfile.v0 --local context="$ctx" --local dockerfile="$ctx" \
    --output "type=image,name=$REGISTRY_ADDR/$2:$3,push=true,registry.insecure=true" \
    >>"$logs/build-${2##*/}.log" 2>&1 || { show_log "build-${2##*/}"; return 1; }
  rm -rf "$ctx"
}

# binary_image BINARY IMAGE: a static binary alone on an empty image, as its entrypoint.
binary_image() {
  local name ctx
  name="$(basename "${2%%:*}")"
  ctx="$tmp/ctx-$name"
  mkdir -p "$ctx"
  cp "$1" "$ctx/$name"
  printf 'FROM scratch\nCOPY %s /%s\nENTRYPOINT ["/%s"]\n' "$name" "$name" "$name" >"$ctx/Dockerfile"
  buildctl_ --frontend dockerfile.v0 --local context="$ctx" --local dockerfile="$ctx" \
    --output "type=docker,name=$2,dest=$images/$name.tar" >>"$logs/build-$name.log" 2>&1 ||
    { show_log "build-$name"; return 1; }
  rm -rf "$ctx"
}

step_images() {
  local reg_port base_tag builder_tag name bin
  free_port && reg_port="$PORT" || return 1
  REGISTRY_ADDR="127.0.0.1:$reg_port"
  # The registry's storage is cached: the base images are pushed once per root filesystem.
  mkdir -p "$cache/registry" "$cache/buildkit"
  cat >"$tmp/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $cache/registry}
  delete: {enabled: true}
http: {addr: $REGISTRY_ADDR}
EOF
  # No tracing collector here: without this the registry retries exports forever.
  OTEL_TRACES_EXPORTER=none start registry "$REGISTRY" serve "$tmp/registry.yml"
  wait_until "the registry" curl -fsS "http://$REGISTRY_ADDR/v2/" || return 1
  cat >"$tmp/buildkitd.toml" <<EOF
root = "$cache/buildkit"
[grpc]
  address = ["unix://$tmp/buildkitd.sock"]
[worker.oci]
  enabled = true
  snapshotter = "overlayfs"
  # Collect old layers, but keep the cache mounts (crate downloads, target directory) that
  # make a rebuild quick: by default BuildKit collects down to a share of the whole disk.
  gc = true
  reservedSpace = "8GB"
  maxUsedSpace = "16GB"
  minFreeSpace = "2GB"
[worker.containerd]
  enabled = false
[registry."$REGISTRY_ADDR"]
  http = true
  insecure = true
EOF
  # Build steps (cargo fetching crates) use the host's network: no CNI for BuildKit here.
  start buildkitd "$BUILDKITD" --config "$tmp/buildkitd.toml" --oci-worker-net=host
  wait_until "BuildKit" "$BUILDCTL" --addr "unix://$tmp/buildkitd.sock" debug workers || return 1

  base_tag="$(basename "$BASE" .tar)"
  builder_tag="$(basename "$BUILDER" .tar)"
  push_rootfs "$BASE" blockcsi-e2e/debian "$base_tag" || fail "pushing the base image" || return
  push_rootfs "$BUILDER" blockcsi-e2e/rust "$builder_tag" /usr/local/rust/bin: ||
    fail "pushing the builder image" || return

  # The blockcsi image: the project's Dockerfile, as a user builds it, from the two bases.
  DRIVER_IMAGE="$(image_of "$manifests/40-node.yaml" blockcsi)"
  [ -n "$DRIVER_IMAGE" ] || fail "no blockcsi image in $manifests/40-node.yaml" || return
  local start_build=$SECONDS
  log "building $DRIVER_IMAGE from $repo/Dockerfile (rust $RUST builder) ..."
  buildctl_ --frontend dockerfile.v0 --local context="$repo" --local dockerfile="$repo" \
    --opt "build-arg:BUILDER_IMAGE=$REGISTRY_ADDR/blockcsi-e2e/rust:$builder_tag" \
    --opt "build-arg:BASE_IMAGE=$REGISTRY_ADDR/blockcsi-e2e/debian:$base_tag" \
    --output "type=docker,name=$DRIVER_IMAGE,dest=$images/blockcsi.tar" >"$logs/build-blockcsi.log" 2>&1 ||
    { show_log build-blockcsi 40; fail "building the Dockerfile"; return; }
  log "built $DRIVER_IMAGE in $((SECONDS - start_build))s ($(du -h "$images/blockcsi.tar" | cut -f1) uncompressed)"

  # The sidecars of the manifests, each its binary on an empty image under the manifest's name.
  for name in csi-provisioner csi-attacher csi-snapshotter csi-resizer; do
    case "$name" in
      csi-provisioner) bin="$CSI_PROVISIONER" ;;
      csi-attacher) bin="$CSI_ATTACHER" ;;
      csi-snapshotter) bin="$CSI_SNAPSHOTTER" ;;
      csi-resizer) bin="$CSI_RESIZER" ;;
    esac
    local img
    img="$(image_of "$manifests/30-controller.yaml" "$name")"
    [ -n "$img" ] || { log "$name is not in the manifests"; continue; }
    binary_image "$bin" "$img" || fail "image $img" || return
  done
  binary_image "$PAUSE" "registry.k8s.io/pause:$PAUSE_TAG" || fail "pause image" || return
  # The workloads' image: the Debian base (a shell, coreutils).
  mkdir -p "$tmp/ctx-workload"
  printf 'FROM %s\n' "$REGISTRY_ADDR/blockcsi-e2e/debian:$base_tag" >"$tmp/ctx-workload/Dockerfile"
  buildctl_ --frontend dockerfile.v0 --local context="$tmp/ctx-workload" --local dockerfile="$tmp/ctx-workload" \
    --output "type=docker,name=docker.io/$WORKLOAD_IMAGE,dest=$images/workload.tar" >"$logs/build-workload.log" 2>&1 ||
    { show_log build-workload; fail "workload image"; return; }
  ls -la "$images" >&2
  stop buildkitd 20
  stop registry 10
}

# ---------------------------------------------------------------------------------------------
# control-plane

step_control_plane() {
  local etcd_port peer_port
  free_port && etcd_port="$PORT" && free_port && peer_port="$PORT" && free_port && API_PORT="$PORT" || return 1
  # The API server and the node share the bridge's address: pods reach it through it.
  ip link add "$BRIDGE" type bridge || fail "creating bridge $BRIDGE" || return
  made_bridge=1
  ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE" && ip link set "$BRIDGE" up || fail "addressing $BRIDGE" || return

  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" -subj "/CN=blockcsi-e2e-ca" 2>/dev/null || fail "CA" || return
  cert apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:$NODE_IP,IP:$SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth" || fail "API server certificate" || return
  cert admin "/O=system:masters/CN=blockcsi-e2e-admin" "extendedKeyUsage=clientAuth" || fail "admin certificate" || return
  cert kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth" ||
    fail "API server's kubelet client certificate" || return
  cert node "/O=system:nodes/CN=system:node:$NODE" "extendedKeyUsage=clientAuth" || fail "node certificate" || return
  cert kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth" || fail "kube-proxy certificate" || return
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null &&
    openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null || fail "service-account key" || return
  kubeconfig "$KUBECONFIG" --client-certificate="$pki/admin.crt" --client-key="$pki/admin.key" --embed-certs &&
    kubeconfig "$pki/node.kubeconfig" --client-certificate="$pki/node.crt" --client-key="$pki/node.key" --embed-certs &&
    kubeconfig "$pki/kube-proxy.kubeconfig" --client-certificate="$pki/kube-proxy.crt" \
      --client-key="$pki/kube-proxy.key" --embed-certs || fail "kubeconfigs" || return

  start etcd "$ETCD" --name e2e --data-dir "$tmp/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "e2e=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn
  start kube-apiserver "$KUBE_APISERVER" \
    --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --cert-dir="$tmp/apiserver" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --anonymous-auth=false --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="$pki/kubelet-client.crt" --kubelet-client-key="$pki/kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true --profiling=false --v=1
  wait_until "the API server to be ready" k get --raw /readyz || return 1
  start kube-controller-manager "$KUBE_CONTROLLER_MANAGER" --kubeconfig="$KUBECONFIG" --secure-port=0 --leader-elect=false \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --use-service-account-credentials=true --v=2
  start kube-scheduler "$KUBE_SCHEDULER" --kubeconfig="$KUBECONFIG" --secure-port=0 --leader-elect=false --v=2
  wait_until "the default ServiceAccount (controller manager working)" k -n default get serviceaccount default || return 1
  k apply --server-side -f "$CRDS" >&2 || fail "applying the CRDs in $CRDS" || return
  k wait --for=condition=Established --timeout="${wait_s}s" -f "$CRDS" >&2 || return 1
  # snapshot-controller is a cluster add-on, not part of deploy/: a host process here.
  start snapshot-controller "$SNAPSHOT_CONTROLLER" --kubeconfig="$KUBECONFIG" --leader-election=false \
    --http-endpoint=127.0.0.1:0 --v=2
  k version >&2 || true
}

# ---------------------------------------------------------------------------------------------
# node

node_ready() { [ "$(k get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }

step_node() {
  local kubelet_port proxy_health proxy_metrics img
  # kubelet's directory as deploy/ expects it, a shared mount so that the node plugin's mounts
  # (Bidirectional propagation) reach the host and the pods.
  if [ ! -e "$KUBELET_DIR" ]; then made_kubelet_dir=1; fi
  mkdir -p "$KUBELET_DIR" "$KUBELET_DIR/plugins_registry"
  made_pool_dir=1
  mount --bind "$KUBELET_DIR" "$KUBELET_DIR" && mount --make-rshared "$KUBELET_DIR" ||
    fail "making $KUBELET_DIR a shared mount" || return

  mkdir -p "$tmp/cni/net.d" "$tmp/cni/ipam"
  cat >"$tmp/cni/net.d/10-$CNI_NETWORK.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$tmp/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$tmp/containerd.toml" <<EOF
version = 2
root = "$tmp/containerd/root"
state = "$tmp/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$tmp/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$tmp/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:$PAUSE_TAG"
  # This machine withholds CAP_SYS_RESOURCE even from root, and lowering a process's
  # oom_score_adj (kubelet asks -998 for sandboxes) needs it; a real node has it.
  restrict_oom_score_adj = $(has_cap_sys_resource && echo false || echo true)
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$tmp/cni/net.d"
EOF
  start containerd containerd --config "$tmp/containerd.toml"
  wait_until "containerd" ctr_ version || return 1
  for img in "$images"/*.tar; do
    ctr_ images import "$img" >&2 || fail "importing $img" || return
  done
  ctr_ images ls -q >&2

  free_port && kubelet_port="$PORT" && free_port && proxy_health="$PORT" && free_port && proxy_metrics="$PORT" || return 1
  start kube-proxy "$KUBE_PROXY" --kubeconfig="$pki/kube-proxy.kubeconfig" --hostname-override="$NODE" \
    --cluster-cidr="$POD_CIDR" --proxy-mode=iptables --conntrack-max-per-core=0 \
    --healthz-bind-address="127.0.0.1:$proxy_health" --metrics-bind-address="127.0.0.1:$proxy_metrics" --v=2

  cat >"$tmp/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host mounts cgroup v1 (hybrid); kubelet 1.35 refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$tmp/containerd.sock
address: $NODE_IP
port: $kubelet_port
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: Webhook
failSwapOn: false
resolvConf: /etc/resolv.conf
volumePluginDir: $tmp/kubelet-volume-plugins
# The images were imported, not pulled: never collect them, never evict for this shared disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
serializeImagePulls: false
EOF
  start kubelet "$KUBELET" --config="$tmp/kubelet.yaml" --kubeconfig="$pki/node.kubeconfig" \
    --hostname-override="$NODE" --node-ip="$NODE_IP" --cert-dir="$tmp/kubelet-pki" --v=2
  wait_until "node $NODE to be Ready" node_ready || return 1
  k get node -o wide >&2
}

# ---------------------------------------------------------------------------------------------
# install

# ready_replicas KIND NAME: whether every wanted replica of the workload is ready.
rollout_done() { k -n "$DRIVER_NS" rollout status "$1" --timeout=5s >/dev/null 2>&1; }

csinode_has_driver() {
  [ "$(k get csinode "$NODE" -o jsonpath="{.spec.drivers[?(@.name==\"$DRIVER\")].name}" 2>/dev/null)" = "$DRIVER" ]
}

# restarts SELECTOR: the total container restarts of the pods selected in the driver namespace.
restarts() {
  k -n "$DRIVER_NS" get pods -l "$1" -o jsonpath='{range .items[*]}{range .status.containerStatuses[*]}{.restartCount}{"\n"}{end}{end}' |
    awk '{ s += $1 } END { print s + 0 }'
}

step_install() {
  DRIVER="$(k create --dry-run=client -f "$manifests/20-csidriver.yaml" -o jsonpath='{.metadata.name}')"
  DRIVER_NS="$(k create --dry-run=client -f "$manifests/00-namespace.yaml" -o jsonpath='{.metadata.name}')"
  STORAGE_CLASS="$(k create --dry-run=client -f "$manifests/50-storageclass.yaml" -o jsonpath='{.metadata.name}')"
  SNAPSHOT_CLASS="$(k create --dry-run=client -f "$manifests/60-volumesnapshotclass.yaml" -o jsonpath='{.metadata.name}')"
  POOL_PATH="$(k create --dry-run=client -f "$manifests/40-node.yaml" -o jsonpath='{.spec.template.spec.volumes[?(@.name=="pool")].hostPath.path}')"
  [ -n "$DRIVER" ] && [ -n "$DRIVER_NS" ] && [ -n "$STORAGE_CLASS" ] && [ -n "$POOL_PATH" ] ||
    fail "reading names from $manifests" || return
  case "$POOL_PATH" in "$POOL_PARENT"/*) ;; *) fail "the pool $POOL_PATH is not under $POOL_PARENT" || return ;; esac
  k apply --server-side -f "$manifests/00-namespace.yaml" >&2 || return 1
  k apply --server-side -f "$manifests" >&2 || fail "applying $manifests" || return
  wait_until "the node DaemonSet to be ready" rollout_done daemonset/blockcsi-node || { k -n "$DRIVER_NS" describe pods >&2; return 1; }
  wait_until "the controller StatefulSet to be ready" rollout_done statefulset/blockcsi-controller ||
    { k -n "$DRIVER_NS" describe pods >&2; return 1; }
  k -n "$DRIVER_NS" get pods -o wide >&2
  wait_until "CSINode $NODE to list $DRIVER (kubelet plugin registration)" csinode_has_driver || return 1
  local key value
  key="$(k get csinode "$NODE" -o jsonpath="{.spec.drivers[?(@.name==\"$DRIVER\")].topologyKeys[0]}")"
  value="$(k get node "$NODE" -o jsonpath="{.metadata.labels['${key//./\\.}']}")"
  [ -n "$key" ] && [ -n "$value" ] || fail "no topology key on CSINode or label on the node" || return
  TOPOLOGY="$key=$value"
  log "CSINode: $DRIVER with topology $TOPOLOGY"
  # The liveness probes have run a few times: no container was restarted.
  sleep 25
  local r
  r="$(restarts app.kubernetes.io/name=blockcsi)"
  [ "$r" -eq 0 ] || { k -n "$DRIVER_NS" get events >&2; fail "driver containers restarted $r times"; return; }
  if k -n "$DRIVER_NS" get events -o jsonpath='{range .items[*]}{.reason}{"\n"}{end}' | grep -qx Unhealthy; then
    k -n "$DRIVER_NS" get events >&2
    fail "a probe reported Unhealthy" || return
  fi
  log "liveness probes passing, no restarts"
}

# ---------------------------------------------------------------------------------------------
# Workloads.

# in_pod POD CMD...: run CMD in the pod's container.
in_pod() {
  local pod="$1"
  shift
  k -n "$NS" exec "$pod" -- "$@"
}
pod_ready() { [ "$(k -n "$NS" get pod "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; }
pod_uid() { k -n "$NS" get pod "$1" -o jsonpath='{.metadata.uid}'; }

# The workload writes its identity once (a second start must find it, not rewrite it) and
# counts its starts.
readonly WORKLOAD_SCRIPT='set -e; [ -f /data/id ] || { echo "$(cat /etc/hostname) $(od -An -N8 -tx8 /dev/urandom | tr -d " ")" > /data/id; sync /data/id; }; echo start >> /data/starts; sync /data/starts; exec sleep infinity'

step_workload() {
  k create namespace "$NS" >&2 || return 1
  wait_until "the default ServiceAccount in $NS" k -n "$NS" get serviceaccount default || return 1
  k apply -f - >&2 <<EOF || return 1
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
  namespace: $NS
spec:
  serviceName: web
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 2
      securityContext: {fsGroup: $FS_GROUP}
      containers:
        - name: app
          image: $WORKLOAD_IMAGE
          imagePullPolicy: Never
          command: [sh, -c, '$WORKLOAD_SCRIPT']
          volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        accessModes: [ReadWriteOnce]
        storageClassName: $STORAGE_CLASS
        resources: {requests: {storage: 64Mi}}
EOF
  wait_until "StatefulSet web to be ready" k -n "$NS" rollout status statefulset/web --timeout=5s || {
    k -n "$NS" describe pods >&2; return 1; }
  local p gid
  for p in web-0 web-1; do
    ID[$p]="$(in_pod "$p" cat /data/id)" || fail "reading /data/id in $p" || return
    case "${ID[$p]}" in "$p "*) ;; *) fail "$p wrote '${ID[$p]}'" || return ;; esac
    gid="$(in_pod "$p" stat -c %g /data/id)"
    [ "$gid" = "$FS_GROUP" ] || fail "/data/id in $p belongs to group $gid, not fsGroup $FS_GROUP" || return
    gid="$(in_pod "$p" stat -c %g /data)"
    [ "$gid" = "$FS_GROUP" ] || fail "/data in $p belongs to group $gid, not fsGroup $FS_GROUP" || return
    [ "$(in_pod "$p" findmnt -n -o FSTYPE /data)" = ext4 ] || fail "/data in $p is not the ext4 the class names" || return
    log "$p: /data/id = ${ID[$p]} (group $FS_GROUP)"
  done
}
declare -A ID=()

step_pod_restart() {
  local old new
  old="$(pod_uid web-0)"
  k -n "$NS" delete pod web-0 --wait=true >&2 || return 1
  recreated() { new="$(pod_uid web-0 2>/dev/null)" && [ -n "$new" ] && [ "$new" != "$old" ] && pod_ready web-0; }
  wait_until "web-0 to come back" recreated || return 1
  [ "$(in_pod web-0 cat /data/id)" = "${ID[web-0]}" ] || fail "web-0 lost its data across the restart" || return
  [ "$(in_pod web-0 sh -c 'wc -l < /data/starts')" -eq 2 ] ||
    fail "web-0 should have started exactly twice on its claim" || return
  log "web-0 is back (pod $new) with its data"
}

snapshot_ready() { [ "$(k -n "$NS" get volumesnapshot snap -o jsonpath='{.status.readyToUse}' 2>/dev/null)" = true ]; }
pvc_bound() { [ "$(k -n "$NS" get pvc "$1" -o jsonpath='{.status.phase}' 2>/dev/null)" = Bound ]; }

# pod_with_claim NAME CLAIM: a pod that mounts CLAIM at /data and sleeps.
pod_with_claim() {
  k apply -f - >&2 <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  namespace: $NS
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 2
  securityContext: {fsGroup: $FS_GROUP}
  containers:
    - name: app
      image: $WORKLOAD_IMAGE
      imagePullPolicy: Never
      command: [sleep, infinity]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: $2}
EOF
}

step_snapshot() {
  k apply -f - >&2 <<EOF || return 1
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: snap
  namespace: $NS
spec:
  volumeSnapshotClassName: $SNAPSHOT_CLASS
  source: {persistentVolumeClaimName: data-web-0}
EOF
  wait_until "VolumeSnapshot snap to be ready" snapshot_ready || return 1
  # Written after the snapshot: the restored claim must not have it.
  in_pod web-0 sh -c 'echo after-snapshot > /data/later; sync /data/later' || return 1
  k apply -f - >&2 <<EOF || return 1
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: restored
  namespace: $NS
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: $STORAGE_CLASS
  resources: {requests: {storage: 64Mi}}
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}
EOF
  pod_with_claim reader restored || return 1
  wait_until "pod reader" pod_ready reader || { k -n "$NS" describe pod reader >&2; return 1; }
  [ "$(in_pod reader cat /data/id)" = "${ID[web-0]}" ] || fail "the restored claim lacks web-0's data" || return
  if in_pod reader test -e /data/later; then fail "the restored claim has data written after the snapshot"; return; fi
  [ "$(in_pod web-0 cat /data/later)" = after-snapshot ] || fail "web-0 lost a write" || return
  log "claim restored from snapshot holds the snapshot-time data"
}

# fs_size POD: the size in bytes of the filesystem at /data, seen from inside the pod.
fs_size() { in_pod "$1" sh -c 'stat -f -c "%b %S" /data' | awk '{ print $1 * $2 }'; }

step_expand() {
  local class="$STORAGE_CLASS" before after uid_before restarts_before grown
  if ! has_cap_sys_resource; then
    # This machine withholds CAP_SYS_RESOURCE even from root, and so from the privileged node
    # plugin: ext4 cannot grow while mounted here (a real node has the capability). XFS grows
    # online with CAP_SYS_ADMIN alone: a class like the chart's, with xfs, as a user makes one.
    class="$STORAGE_CLASS-xfs"
    k get storageclass "$STORAGE_CLASS" -o json |
      sed -e "s/\"name\": \"$STORAGE_CLASS\"/\"name\": \"$class\"/" \
        -e 's/"csi.storage.k8s.io\/fstype": "ext4"/"csi.storage.k8s.io\/fstype": "xfs"/' |
      grep -v '"resourceVersion"\|"uid"\|"creationTimestamp"' | k apply -f - >&2 || return 1
    log "no CAP_SYS_RESOURCE on this machine: expanding an xfs claim of class $class"
  fi
  k apply -f - >&2 <<EOF || return 1
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: grow
  namespace: $NS
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: $class
  resources: {requests: {storage: 512Mi}}
EOF
  pod_with_claim grower grow || return 1
  wait_until "pod grower" pod_ready grower || { k -n "$NS" describe pod grower >&2; return 1; }
  in_pod grower sh -c 'echo before-growth > /data/mark; sync /data/mark' || return 1
  before="$(fs_size grower)" || return 1
  uid_before="$(pod_uid grower)"
  restarts_before="$(k -n "$NS" get pod grower -o jsonpath='{.status.containerStatuses[0].restartCount}')"
  k -n "$NS" patch pvc grow --type=merge -p '{"spec":{"resources":{"requests":{"storage":"1Gi"}}}}' >&2 || return 1
  grown() { after="$(fs_size grower)" && [ "$after" -gt $((before + 256 * 1048576)) ]; }
  wait_until "the filesystem in pod grower to grow (ControllerExpand, then kubelet's NodeExpand)" grown || {
    k -n "$NS" describe pvc grow >&2; return 1; }
  [ "$(pod_uid grower)" = "$uid_before" ] &&
    [ "$(k -n "$NS" get pod grower -o jsonpath='{.status.containerStatuses[0].restartCount}')" = "$restarts_before" ] ||
    fail "the pod was restarted to grow its filesystem" || return
  capacity_done() { [ "$(k -n "$NS" get pvc grow -o jsonpath='{.status.capacity.storage}')" = 1Gi ]; }
  wait_until "claim grow to report 1Gi" capacity_done || return 1
  [ "$(in_pod grower cat /data/mark)" = before-growth ] || fail "data lost in the expansion" || return
  log "filesystem in the running pod: $before -> $after bytes"
}

step_plugin_restart() {
  local old new p
  old="$(k -n "$DRIVER_NS" get pods -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}')"
  [ -n "$old" ] || fail "no node plugin pod" || return
  k -n "$DRIVER_NS" delete pod "$old" --wait=true >&2 || return 1
  replaced() {
    new="$(k -n "$DRIVER_NS" get pods -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}' 2>/dev/null)" &&
      [ -n "$new" ] && [ "$new" != "$old" ] &&
      [ "$(k -n "$DRIVER_NS" get pod "$new" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
  }
  wait_until "the DaemonSet to recreate the node plugin" replaced || return 1
  wait_until "CSINode to list $DRIVER again" csinode_has_driver || return 1
  for p in web-0 web-1; do
    [ "$(in_pod "$p" cat /data/id)" = "${ID[$p]}" ] || fail "$p lost its data while the plugin restarted" || return
    in_pod "$p" sh -c 'echo during-restart > /data/probe && sync /data/probe && cat /data/probe' >/dev/null ||
      fail "$p cannot write after the plugin restart" || return
  done
  log "node plugin $old replaced by $new; workloads kept their data"
}

# ---------------------------------------------------------------------------------------------
# teardown, uninstall, shutdown

none_left() { [ -z "$(k get "$@" -o name 2>/dev/null)" ]; }

pool_leftovers() {
  find "$POOL_PATH" -type f ! -path "$POOL_PATH/pool.json" ! -path "$POOL_PATH/meta/nodes/*" ! -path "$POOL_PATH/locks/*"
}

# Mounts of CSI volumes kubelet made or asked for: staging and publish paths.
csi_mounts() { mounts_under "$KUBELET_DIR" | grep -E 'kubernetes.io/csi|kubernetes.io~csi' || true; }

step_teardown() {
  local ok=0 left
  k -n "$NS" scale statefulset web --replicas=0 >&2 || ok=1
  k -n "$NS" delete pod reader grower --ignore-not-found --wait=false >&2 || ok=1
  wait_until "the workload pods to go" none_left -n "$NS" pods || ok=1
  wait_until "the VolumeAttachments to go" none_left volumeattachments || ok=1
  k -n "$NS" delete volumesnapshot --all --wait=false >&2 || ok=1
  k -n "$NS" delete pvc --all --wait=false >&2 || ok=1
  wait_until "the PVs to go (DeleteVolume)" none_left pv || ok=1
  wait_until "the VolumeSnapshotContents to go (DeleteSnapshot)" none_left volumesnapshotcontents || ok=1
  left="$(pool_leftovers)"
  [ -z "$left" ] || { log "left in the pool:"; echo "$left" >&2; ok=1; }
  left="$(csi_mounts)"
  [ -z "$left" ] || { log "CSI mounts left: $left"; ok=1; }
  left="$(pool_loops)"
  [ -z "$left" ] || { log "loop devices left: $left"; ok=1; }
  [ "$ok" -eq 0 ] || return 1
  log "pool empty; no CSI mount or loop device left"
}

registration_socket_gone() { [ -z "$(ls -A "$KUBELET_DIR/plugins_registry" 2>/dev/null)" ]; }

step_uninstall() {
  k delete -f "$manifests/30-controller.yaml" -f "$manifests/40-node.yaml" --wait=true --timeout="${wait_s}s" >&2 || return 1
  wait_until "the driver pods to go" none_left -n "$DRIVER_NS" pods || return 1
  wait_until "the registration socket to go" registration_socket_gone || return 1
  wait_until "kubelet to deregister $DRIVER from CSINode" eval '! csinode_has_driver' || return 1
  k delete -f "$manifests" --ignore-not-found --wait=true --timeout="${wait_s}s" >&2 || return 1
  log "driver deregistered and removed"
}

step_shutdown() {
  local ok=0 m l name
  report_usage
  stop kubelet 30
  # Kubelet keeps the records of exited containers for a while; none may still run.
  for name in $(ctr_ tasks ls 2>/dev/null | awk '$3 == "RUNNING" { print $1 }'); do
    log "container still running after the pods were deleted: $name"
    ok=1
  done
  for name in kube-proxy containerd snapshot-controller kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop "$name" 20
  done
  kill_shims
  m="$(csi_mounts)"
  l="$(pool_loops)"
  [ -z "$m" ] || { log "mounts left: $m"; ok=1; }
  [ -z "$l" ] || { log "loop devices left: $l"; ok=1; }
  return "$ok"
}

# ---------------------------------------------------------------------------------------------

on_failure_logs() {
  local n
  for n in "${proc_names[@]}"; do show_log "$n" 20; done
  if [ -n "${CTR:-}" ] && [ -S "$tmp/containerd.sock" ] && [ -n "${DRIVER_NS:-}" ]; then
    k -n "$DRIVER_NS" logs -l app.kubernetes.io/name=blockcsi --all-containers --tail=20 --prefix >&2 2>/dev/null || true
  fi
}

log "temporary directory $tmp"
start_time=$SECONDS
step preflight "" step_preflight
step build "preflight" step_build
step images "build" step_images
step control-plane "build" step_control_plane
step node "control-plane images" step_node
step install "node" step_install
step workload "install" step_workload
step pod-restart "workload" step_pod_restart
step snapshot "workload" step_snapshot
step expand "install" step_expand
step plugin-restart "workload" step_plugin_restart
step teardown "install" step_teardown
step uninstall "install" step_uninstall
step shutdown "node" step_shutdown
[ "$failed" -eq 0 ] || on_failure_logs
log "finished in $((SECONDS - start_time))s"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
