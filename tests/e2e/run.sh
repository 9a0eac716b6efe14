#!/usr/bin/env bash
# End-to-end test: blockcsi driven by a real Kubernetes control plane and the real CSI sidecars.
#
# Usage: tests/e2e/run.sh [--binary PATH] [--keep]
#
#   --binary PATH  the blockcsi binary (default target/release/blockcsi, built when missing)
#   --keep         keep the temporary directory (logs, certificates, pool) after the run
#
# What runs, all as local processes on loopback, with TLS and a service-account key made here:
#   etcd, kube-apiserver, kube-controller-manager (PV binder, attach/detach, expander,
#   protection and service-account controllers), kube-scheduler; the VolumeSnapshot CRDs and
#   snapshot-controller of the pinned external-snapshotter; blockcsi in controller mode and in
#   node mode (two processes, one pool); csi-provisioner, csi-attacher, csi-snapshotter and
#   csi-resizer with the arguments deploy/kubernetes/ gives them, and the credentials of the
#   controller's ServiceAccount, so the RBAC of the manifests is what they run with.
#   tests/e2e/build.sh builds and caches all of it (see there for the versions).
#
# There is no kubelet: csictl (tests/e2e/csictl) registers the node the way kubelet does
# (Node, CSINode from NodeGetInfo) and makes kubelet's NodeStage/NodePublish/NodeExpand/
# NodeUnpublish/NodeUnstage calls on the node socket, with kubelet's paths.
#
# Steps (each prints "step NAME: passed|failed|skipped: why"):
#   render-check   deploy/kubernetes/ is what deploy/render.sh makes of the Helm chart
#   build          the binaries above (cached)
#   control-plane  etcd, API server, controller manager, scheduler healthy
#   snapshot-crds  VolumeSnapshot CRDs established
#   manifests      every object in deploy/kubernetes/, and in a render of the chart with every
#                  option on (tests/e2e/values-all.yaml; ServiceMonitor and PodMonitor CRDs
#                  installed for it), passes a server-side dry-run apply; the namespace, RBAC,
#                  CSIDriver and classes of deploy/kubernetes/ are then created for real
#   driver         blockcsi controller and node up; the node registered like kubelet would
#   sidecars       the sidecars up and leading, snapshot-controller up
#   provision      PVC (WaitForFirstConsumer) + Pod -> scheduler picks the node ->
#                  provisioner creates the volume in that node's pool -> PV bound
#   attach         attach/detach controller -> VolumeAttachment -> attacher -> attached
#   stage-publish  NodeStage + NodePublish at kubelet's paths, data written
#   snapshot       VolumeSnapshot ready -> PVC from it -> attached, staged, data verified
#                  (skipped when the driver lacks CREATE_DELETE_SNAPSHOT)
#   expand         PVC grown -> resizer -> ControllerExpand -> NodeExpand -> bigger filesystem
#                  (skipped when the driver lacks EXPAND_VOLUME)
#   delete         unpublish, unstage, pods, claims, snapshots deleted -> VolumeAttachments,
#                  PVs and snapshot contents gone, the pool empty
#   shutdown       both drivers exit 0 on SIGTERM and remove their sockets (the node's
#                  kubelet registration socket too); no loop device or mount left
# A step runs only when the steps it depends on passed. The last line is the summary,
# "N passed, N failed, N skipped"; the exit status is non-zero when any step failed.
# Every wait is bounded (E2E_WAIT, default 120s, for each); everything started is stopped
# and every mount and loop device under the temporary directory removed on exit.
#
# Environment: BLOCKCSI_CACHE (build cache, default ~/.cache/blockcsi), E2E_WAIT (seconds),
# E2E_TMPDIR (parent of the temporary directory, default /tmp; Unix socket paths must stay short).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
manifests="$repo/deploy/kubernetes"
binary="$repo/target/release/blockcsi"
keep=0
wait_s="${E2E_WAIT:-120}"

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --binary=*) binary="${1#*=}"; shift ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "run.sh: run as root: the node plugin attaches loop devices and mounts" >&2
  exit 2
fi
for d in "$HOME/.cargo/bin" /usr/local/go/bin; do
  case ":$PATH:" in *":$d:"*) ;; *) [ -d "$d" ] && PATH="$d:$PATH" ;; esac
done
export PATH
for tool in openssl go; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is required" >&2; exit 2; }
done

# The names the scenario uses; the driver name and namespaces come from the manifests.
readonly NODE=e2e-node-1
readonly NS=e2e
readonly PVC=data
readonly PVC_SIZE=64Mi
readonly PVC_BIGGER=128Mi

tmp="$(mktemp -d "${E2E_TMPDIR:-/tmp}/blockcsi-e2e.XXXXXX")"
tmp="$(realpath "$tmp")"
logs="$tmp/logs"
pki="$tmp/pki"
pool="$tmp/pool"
kubelet="$tmp/kubelet"
mkdir -p "$logs" "$pki" "$pool" "$kubelet"
export KUBECONFIG="$pki/admin.kubeconfig"
# shellcheck source=tests/e2e/lib.sh
. "$here/lib.sh"

# ---------------------------------------------------------------------------------------------
# Cleanup.

cleanup() {
  local rc=$? i name mp dev
  trap - EXIT INT TERM
  # Stop in reverse order of start: sidecars before the drivers, the API server before etcd.
  for ((i = ${#proc_names[@]} - 1; i >= 0; i--)); do
    name="${proc_names[$i]}"
    case "$stopped" in *" $name "*) continue ;; esac
    stop "$name" 10
  done
  for _ in 1 2 3 4 5; do
    mp="$(mounts_under "$tmp")"
    [ -n "$mp" ] || break
    for m in $mp; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  done
  for dev in $(loops_under "$tmp"); do losetup -d "$dev" 2>/dev/null || true; done
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

# ---------------------------------------------------------------------------------------------
# render-check

step_render_check() {
  "$repo/deploy/render.sh" --check >&2
}

# ---------------------------------------------------------------------------------------------
# build

step_build() {
  local lines line
  [ -x "$binary" ] || {
    log "no $binary: cargo build --release"
    (cd "$repo" && cargo build --release --locked) >&2 || return 1
  }
  binary="$(realpath "$binary")"
  lines="$("$here/build.sh")" || return 1
  load_build_output <<<"$lines"
  for v in KUBE_APISERVER KUBE_CONTROLLER_MANAGER KUBE_SCHEDULER KUBECTL ETCD CSI_PROVISIONER CSI_ATTACHER CSI_SNAPSHOTTER \
           SNAPSHOT_CONTROLLER CSI_RESIZER CSICTL CRDS; do
    [ -n "${!v:-}" ] || fail "build.sh did not report $v" || return
  done
  "$KUBECTL" version --client 2>/dev/null | head -n 1 >&2 || true
}

# ---------------------------------------------------------------------------------------------
# control-plane
step_control_plane() {
  local etcd_port peer_port
  free_port && etcd_port="$PORT" && free_port && peer_port="$PORT" && free_port && API_PORT="$PORT" || return 1

  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" -subj "/CN=blockcsi-e2e-ca" 2>/dev/null || fail "CA" || return
  cert apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth" || fail "API server certificate" || return
  cert admin "/O=system:masters/CN=blockcsi-e2e-admin" "extendedKeyUsage=clientAuth" || fail "admin certificate" || return
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null &&
    openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null || fail "service-account key" || return
  kubeconfig "$KUBECONFIG" --client-certificate="$pki/admin.crt" --client-key="$pki/admin.key" --embed-certs ||
    fail "admin kubeconfig" || return

  start etcd "$ETCD" --name e2e --data-dir "$tmp/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "e2e=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level warn
  start kube-apiserver "$KUBE_APISERVER" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --cert-dir="$tmp/apiserver" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --anonymous-auth=false --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" --service-cluster-ip-range=10.0.0.0/24 \
    --endpoint-reconciler-type=none --allow-privileged=true --profiling=false --v=1
  wait_until "the API server to be ready" k get --raw /readyz || return 1

  # Only the controllers the storage path needs; in particular no node-lifecycle controller,
  # which would mark the kubelet-less node NotReady and evict its pods.
  start kube-controller-manager "$KUBE_CONTROLLER_MANAGER" --kubeconfig="$KUBECONFIG" --secure-port=0 --leader-elect=false \
    --controllers=serviceaccount-token-controller,serviceaccount-controller,namespace-controller,garbage-collector-controller,persistentvolume-binder-controller,persistentvolume-attach-detach-controller,persistentvolume-expander-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller,root-ca-certificate-publisher-controller \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --use-service-account-credentials=false --v=2
  start kube-scheduler "$KUBE_SCHEDULER" --kubeconfig="$KUBECONFIG" --secure-port=0 --leader-elect=false --v=2
  wait_until "the default ServiceAccount (controller manager working)" k -n default get serviceaccount default || return 1
  k version >&2 || true
}

# ---------------------------------------------------------------------------------------------
# snapshot-crds

step_snapshot_crds() {
  k apply --server-side -f "$CRDS" >&2 || fail "applying the CRDs in $CRDS" || return
  k wait --for=condition=Established --timeout="${wait_s}s" -f "$CRDS" >&2 || return 1
}

# ---------------------------------------------------------------------------------------------
# manifests

# Facts read from the rendered manifests, so that the test follows them.
manifest_facts() {
  DRIVER="$(k create --dry-run=client -f "$manifests/20-csidriver.yaml" -o jsonpath='{.metadata.name}')" &&
    DRIVER_NS="$(k create --dry-run=client -f "$manifests/00-namespace.yaml" -o jsonpath='{.metadata.name}')" &&
    STORAGE_CLASS="$(k create --dry-run=client -f "$manifests/50-storageclass.yaml" -o jsonpath='{.metadata.name}')" &&
    SNAPSHOT_CLASS="$(k create --dry-run=client -f "$manifests/60-volumesnapshotclass.yaml" -o jsonpath='{.metadata.name}')" &&
    CONTROLLER_SA="$(k create --dry-run=client -f "$manifests/30-controller.yaml" -o jsonpath='{.spec.template.spec.serviceAccountName}')" &&
    CONTROLLER_POD="$(k create --dry-run=client -f "$manifests/30-controller.yaml" -o jsonpath='{.metadata.name}')-0" &&
    POOL_PATH="$(k create --dry-run=client -f "$manifests/30-controller.yaml" -o jsonpath='{.spec.template.spec.volumes[?(@.name=="pool")].hostPath.path}')" &&
    [ -n "$DRIVER" ] && [ -n "$DRIVER_NS" ] && [ -n "$STORAGE_CLASS" ] && [ -n "$CONTROLLER_SA" ] && [ -n "$POOL_PATH" ]
}

step_manifests() {
  local objects
  manifest_facts || fail "reading driver name, namespace, classes and pool path from $manifests" || return
  log "driver $DRIVER, namespace $DRIVER_NS, StorageClass $STORAGE_CLASS, VolumeSnapshotClass $SNAPSHOT_CLASS"
  # Namespaced objects can only be dry-run into a namespace that exists.
  k apply --server-side -f "$manifests/00-namespace.yaml" >&2 || return 1
  objects="$(k apply --server-side --dry-run=server --validate=strict -f "$manifests" -o name)" ||
    fail "server-side dry-run of $manifests" || return
  log "validated by the API server: $(echo "$objects" | wc -l) objects"
  echo "$objects" | sed 's/^/  /' >&2
  validate_all_options || return 1
  # The objects the scenario needs, for real; the workloads stay dry-run (no kubelet runs them).
  k apply --server-side -f "$manifests/10-rbac.yaml" -f "$manifests/20-csidriver.yaml" \
    -f "$manifests/50-storageclass.yaml" -f "$manifests/60-volumesnapshotclass.yaml" >&2 || return 1
}

# validate_all_options: the chart rendered with tests/e2e/values-all.yaml (every option on,
# helm test hooks included) passes the same dry run. The monitors need the Prometheus Operator
# CRDs; each optional kind must be among the objects, so the values file cannot silently stop
# covering one.
validate_all_options() {
  local dir="$tmp/manifests-all" objects kind
  [ -n "${MONITORING_CRDS:-}" ] || fail "build.sh did not report monitoring-crds" || return
  k apply --server-side -f "$MONITORING_CRDS" >&2 || fail "applying the CRDs in $MONITORING_CRDS" || return
  k wait --for=condition=Established --timeout="${wait_s}s" -f "$MONITORING_CRDS" >&2 || return 1
  "$repo/deploy/render.sh" --values "$here/values-all.yaml" --out "$dir" >&2 ||
    fail "rendering the chart with $here/values-all.yaml" || return
  objects="$(k apply --server-side --dry-run=server --validate=strict -f "$dir" -o name)" ||
    fail "server-side dry-run of the chart with every option on ($dir)" || return
  for kind in servicemonitor.monitoring.coreos.com podmonitor.monitoring.coreos.com \
    poddisruptionbudget.policy service volumesnapshotclass.snapshot.storage.k8s.io \
    role.rbac.authorization.k8s.io pod persistentvolumeclaim; do
    grep -q "^$kind/" <<<"$objects" || fail "no $kind in the render of values-all.yaml" || return
  done
  log "validated by the API server with every option on: $(echo "$objects" | wc -l) objects"
}

# ---------------------------------------------------------------------------------------------
# driver

# container_args FILE CONTAINER: the container's arguments in the manifest, one per line.
container_args() {
  k create --dry-run=client -f "$1" \
    -o jsonpath="{range .spec.template.spec.containers[?(@.name==\"$2\")].args[*]}{@}{\"\\n\"}{end}"
}

# container_env FILE CONTAINER: the container's environment in the manifest, one NAME=VALUE a
# line; a value from the downward API becomes what it would be here (the node, the namespace,
# the pod name the first StatefulSet replica would have).
container_env() {
  local name field value
  # "|" as the separator: IFS whitespace would merge the empty fields.
  while IFS='|' read -r name field value; do
    [ -n "$name" ] || continue
    case "$field" in
      "") ;;
      spec.nodeName) value="$NODE" ;;
      metadata.namespace) value="$DRIVER_NS" ;;
      metadata.name) value="$CONTROLLER_POD" ;;
      *) log "container_env: no local value for $name (fieldRef $field)"; return 1 ;;
    esac
    printf '%s=%s\n' "$name" "$value"
  done < <(k create --dry-run=client -f "$1" \
    -o jsonpath="{range .spec.template.spec.containers[?(@.name==\"$2\")].env[*]}{.name}|{.valueFrom.fieldRef.fieldPath}|{.value}{\"\\n\"}{end}")
}

# localise SOCKET: rewrite manifest arguments or NAME=VALUE environment lines (stdin) for a
# local process: the socket, the pool path, the node name, and diagnostics endpoints moved to
# loopback (port 0: any free port, as several processes share the host's network here, unlike
# containers in a pod).
localise() {
  local a
  while IFS= read -r a; do
    [ -n "$a" ] || continue
    case "$a" in
      --http-endpoint=*) a="--http-endpoint=127.0.0.1:0" ;;
      # The CSIStorageCapacity objects' owner is looked up from the provisioner's pod, which
      # does not exist here (no kubelet runs the StatefulSet): objects without an owner.
      --capacity-ownerref-level=*) a="--capacity-ownerref-level=-1" ;;
      --metrics-address=*) a="--metrics-address=127.0.0.1:0" ;;
      --health-address=*) a="--health-address=127.0.0.1:0" ;;
      # Kubelet's plugin registry and the CSI socket's host path, under our kubelet directory.
      --registration-dir=*) a="--registration-dir=$kubelet/plugins_registry" ;;
      --kubelet-registration-path=*) a="--kubelet-registration-path=$1" ;;
    esac
    a="${a//unix:\/\/\/csi\/csi.sock/unix://$1}"
    a="${a//\/csi\/csi.sock/$1}"
    a="${a//$POOL_PATH/$pool}"
    a="${a//\$(NODE_ID)/$NODE}"
    printf '%s\n' "$a"
  done
}

step_driver() {
  local -a cargs nargs cenv nenv
  CTRL_SOCK="$tmp/controller/csi.sock"
  NODE_SOCK="$kubelet/plugins/$DRIVER/csi.sock"
  mapfile -t cargs < <(container_args "$manifests/30-controller.yaml" blockcsi | localise "$CTRL_SOCK")
  mapfile -t nargs < <(container_args "$manifests/40-node.yaml" blockcsi | localise "$NODE_SOCK")
  [ "${#cargs[@]}" -gt 2 ] && [ "${#nargs[@]}" -gt 2 ] || fail "no blockcsi arguments in the manifests" || return
  # The manifests give the socket as CSI_ENDPOINT in the environment.
  mapfile -t cenv < <(container_env "$manifests/30-controller.yaml" blockcsi | localise "$CTRL_SOCK")
  mapfile -t nenv < <(container_env "$manifests/40-node.yaml" blockcsi | localise "$NODE_SOCK")
  log "controller: ${cenv[*]} blockcsi ${cargs[*]}"
  log "node:       ${nenv[*]} blockcsi ${nargs[*]}"
  # The controller creates the pool; the node then registers in it.
  start blockcsi-controller env "${cenv[@]}" "$binary" "${cargs[@]}"
  wait_until "the controller socket" test -S "$CTRL_SOCK" || return 1
  start blockcsi-node env "${nenv[@]}" "$binary" "${nargs[@]}"
  wait_until "the node socket" test -S "$NODE_SOCK" || return 1
  # The manifest makes the node plugin register with kubelet: its registration socket appears
  # once the CSI socket is served.
  local a
  REG_SOCK=""
  for a in "${nargs[@]}"; do
    case "$a" in --registration-dir=*) REG_SOCK="$kubelet/plugins_registry/$DRIVER-reg.sock" ;; esac
  done
  if [ -n "$REG_SOCK" ]; then
    wait_until "the registration socket" test -S "$REG_SOCK" || return 1
  fi

  CTRL_CAPS="$("$CSICTL" -endpoint "unix://$CTRL_SOCK" controller-caps)" || fail "ControllerGetCapabilities" || return
  NODE_CAPS="$("$CSICTL" -endpoint "unix://$NODE_SOCK" node-caps)" || fail "NodeGetCapabilities" || return
  log "controller capabilities: $(echo $CTRL_CAPS)"
  log "node capabilities: $(echo $NODE_CAPS)"

  # What kubelet does once the registration socket named the driver: NodeGetInfo, then the
  # node id annotation, the topology labels and the CSINode entry.
  local info node_id max topo_key topo_value
  info="$("$CSICTL" -endpoint "unix://$NODE_SOCK" node-info)" || fail "NodeGetInfo" || return
  node_id="$(awk '$1 == "node_id" { print $2 }' <<<"$info")"
  max="$(awk '$1 == "max_volumes" { print $2 }' <<<"$info")"
  topo_key="$(awk '$1 == "topology" { print $2; exit }' <<<"$info")"
  topo_value="$(awk '$1 == "topology" { print $3; exit }' <<<"$info")"
  [ "$node_id" = "$NODE" ] || fail "NodeGetInfo node_id is '$node_id', expected $NODE" || return
  [ -n "$topo_key" ] && [ -n "$topo_value" ] || fail "NodeGetInfo reports no topology" || return
  TOPOLOGY="$topo_key=$topo_value"
  log "node $node_id: topology $TOPOLOGY, max volumes $max"

  local now allocatable=""
  now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  [ "${max:-0}" -gt 0 ] && allocatable="
      allocatable: {count: $max}"
  k apply --server-side -f - >&2 <<EOF || fail "creating Node and CSINode" || return
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  labels:
    kubernetes.io/hostname: $NODE
    kubernetes.io/os: linux
    $topo_key: "$topo_value"
  annotations:
    volumes.kubernetes.io/controller-managed-attach-detach: "true"
    csi.volume.kubernetes.io/nodeid: '{"$DRIVER":"$node_id"}'
---
apiVersion: storage.k8s.io/v1
kind: CSINode
metadata:
  name: $NODE
spec:
  drivers:
    - name: $DRIVER
      nodeID: $node_id
      topologyKeys: [$topo_key]$allocatable
EOF
  # Like kubelet, report the status separately: Ready, and room for pods.
  local res='{"cpu":"2","memory":"4Gi","pods":"110"}'
  k patch node "$NODE" --subresource=status --type=merge -p "{\"status\":{\"capacity\":$res,\"allocatable\":$res,
    \"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",
    \"message\":\"no kubelet: tests/e2e\",\"lastHeartbeatTime\":\"$now\",\"lastTransitionTime\":\"$now\"}]}}" >&2 ||
    fail "patching the status of node $NODE" || return
  [ "$(k get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] ||
    fail "node $NODE is not Ready" || return
  # The API server taints every new node not-ready; the node-lifecycle controller, not run here
  # (it would see no kubelet heartbeat and evict), lifts the taint once the node is Ready.
  if k get node "$NODE" -o jsonpath='{.spec.taints[*].key}' | grep -q node.kubernetes.io/not-ready; then
    k taint node "$NODE" node.kubernetes.io/not-ready:NoSchedule- >&2 || fail "untainting $NODE" || return
  fi
}

# ---------------------------------------------------------------------------------------------
# sidecars

step_sidecars() {
  local token sa_kubeconfig="$pki/controller-sa.kubeconfig" name bin cap want=0 capacity=0
  local -a args envs
  # The sidecars authenticate as the controller's ServiceAccount: the manifests' RBAC is tested.
  token="$(k -n "$DRIVER_NS" create token "$CONTROLLER_SA" --duration=2h)" || fail "token for $CONTROLLER_SA" || return
  kubeconfig "$sa_kubeconfig" --token="$token" || return 1
  for name in csi-provisioner csi-attacher csi-snapshotter csi-resizer; do
    case "$name" in
      csi-provisioner) bin="$CSI_PROVISIONER" cap=CREATE_DELETE_VOLUME ;;
      csi-attacher) bin="$CSI_ATTACHER" cap=PUBLISH_UNPUBLISH_VOLUME ;;
      csi-snapshotter) bin="$CSI_SNAPSHOTTER" cap=CREATE_DELETE_SNAPSHOT ;;
      csi-resizer) bin="$CSI_RESIZER" cap=EXPAND_VOLUME ;;
    esac
    # These sidecars exit at once when the driver lacks their capability (in a pod they would
    # restart in a loop); the steps that need them are skipped then.
    if ! grep -qx "$cap" <<<"$CTRL_CAPS"; then
      log "$name not started: the driver lacks $cap"
      continue
    fi
    mapfile -t args < <(container_args "$manifests/30-controller.yaml" "$name" | localise "$CTRL_SOCK")
    if [ "${#args[@]}" -eq 0 ]; then
      log "$name not started: it is not in the manifests"
      continue
    fi
    # csi-provisioner's capacity tracking reads NAMESPACE and POD_NAME.
    mapfile -t envs < <(container_env "$manifests/30-controller.yaml" "$name" | localise "$CTRL_SOCK")
    printf '%s\n' "${args[@]}" | grep -q '^--leader-election$' && want=$((want + 1))
    printf '%s\n' "${args[@]}" | grep -q '^--enable-capacity$' && capacity=1
    log "$name ${envs[*]} ${args[*]}"
    start "$name" env "${envs[@]}" "$bin" "${args[@]}" --kubeconfig="$sa_kubeconfig"
  done
  # snapshot-controller is a cluster add-on, not part of our manifests: cluster credentials.
  start snapshot-controller "$SNAPSHOT_CONTROLLER" --kubeconfig="$KUBECONFIG" --leader-election=false \
    --http-endpoint=127.0.0.1:0 --v=2
  # A sidecar with leader election works once it holds its Lease.
  leases_held() { [ "$(k -n "$DRIVER_NS" get leases -o name | wc -l)" -ge "$want" ]; }
  wait_until "$want sidecar leases in $DRIVER_NS" leases_held || return 1
  k -n "$DRIVER_NS" get leases >&2 || true
  # With capacity tracking on, the scheduler places a pod only where a CSIStorageCapacity
  # object says the pool has room: the provisioner must publish one for the node's pool.
  if [ "$capacity" -eq 1 ]; then
    capacity_published() { [ -n "$(k -n "$DRIVER_NS" get csistoragecapacities -o name)" ]; }
    wait_until "a CSIStorageCapacity object in $DRIVER_NS" capacity_published || return 1
    k -n "$DRIVER_NS" get csistoragecapacities \
      -o custom-columns=NAME:.metadata.name,CLASS:.storageClassName,TOPOLOGY:.nodeTopology.matchLabels,CAPACITY:.capacity >&2 || true
  fi
  sleep 2
  [ -z "$(dead_procs)" ] || fail "exited: $(dead_procs)" || return
}

# ---------------------------------------------------------------------------------------------
# Kubelet's part, per volume: the paths and arguments kubelet 1.35 uses.

# RWO becomes SINGLE_NODE_MULTI_WRITER for a driver that offers it, as in kubelet.
access_mode() {
  if grep -qx SINGLE_NODE_MULTI_WRITER <<<"$NODE_CAPS"; then echo SINGLE_NODE_MULTI_WRITER; else echo SINGLE_NODE_WRITER; fi
}

# volume_facts PVC POD: sets PV, HANDLE, FSTYPE, VOLCTX, STAGING, TARGET for a bound claim.
volume_facts() {
  local pod_uid
  PV="$(k -n "$NS" get pvc "$1" -o jsonpath='{.spec.volumeName}')" && [ -n "$PV" ] || return 1
  HANDLE="$(k get pv "$PV" -o jsonpath='{.spec.csi.volumeHandle}')" && [ -n "$HANDLE" ] || return 1
  FSTYPE="$(k get pv "$PV" -o jsonpath='{.spec.csi.fsType}')" || return 1
  VOLCTX="$(k get pv "$PV" -o jsonpath='{.spec.csi.volumeAttributes}')" || return 1
  pod_uid="$(k -n "$NS" get pod "$2" -o jsonpath='{.metadata.uid}')" && [ -n "$pod_uid" ] || return 1
  STAGING="$kubelet/plugins/kubernetes.io/csi/$DRIVER/$(printf '%s' "$HANDLE" | sha256sum | cut -d' ' -f1)/globalmount"
  TARGET="$kubelet/pods/$pod_uid/volumes/kubernetes.io~csi/$PV/mount"
}

va_of() {
  k get volumeattachments -o jsonpath="{range .items[?(@.spec.source.persistentVolumeName==\"$1\")]}{.metadata.name}{\"\\n\"}{end}"
}
va_attached() {
  local va
  va="$(va_of "$1")" && [ -n "$va" ] &&
    [ "$(k get volumeattachment "$va" -o jsonpath='{.status.attached}')" = true ]
}

# stages: kubelet stages only for a driver with STAGE_UNSTAGE_VOLUME, and then passes the
# staging path to the later calls.
stages() { grep -qx STAGE_UNSTAGE_VOLUME <<<"$NODE_CAPS"; }

# stage_publish PVC POD: NodeStage and NodePublish as kubelet does for a scheduled pod.
stage_publish() {
  local va pubctx
  volume_facts "$1" "$2" || fail "reading PV and pod of $1" || return
  va="$(va_of "$PV")"
  pubctx="$(k get volumeattachment "$va" -o jsonpath='{.status.attachmentMetadata}')" || return 1
  # kubelet makes the staging directory and the target's parent; the driver makes the target.
  mkdir -p "$(dirname "$TARGET")"
  if stages; then
    mkdir -p "$STAGING"
    "$CSICTL" -endpoint "unix://$NODE_SOCK" stage -volume-id "$HANDLE" -staging "$STAGING" \
      -fstype "$FSTYPE" -access-mode "$(access_mode)" -publish-context "$pubctx" -volume-context "$VOLCTX" ||
      fail "NodeStageVolume $HANDLE" || return
  else
    STAGING=""
  fi
  "$CSICTL" -endpoint "unix://$NODE_SOCK" publish -volume-id "$HANDLE" -staging "$STAGING" -target "$TARGET" \
    -fstype "$FSTYPE" -access-mode "$(access_mode)" -publish-context "$pubctx" -volume-context "$VOLCTX" ||
    fail "NodePublishVolume $HANDLE" || return
  mountpoint -q "$TARGET" || fail "$TARGET is not a mount point after NodePublish" || return
  published+=("$HANDLE|$STAGING|$TARGET")
  log "$1: $PV ($HANDLE) staged at $STAGING, published at $TARGET"
}
published=()

# unpublish_unstage HANDLE STAGING TARGET
unpublish_unstage() {
  "$CSICTL" -endpoint "unix://$NODE_SOCK" unpublish -volume-id "$1" -target "$3" || fail "NodeUnpublishVolume $1" || return
  [ ! -e "$3" ] || fail "NodeUnpublishVolume left $3 behind" || return
  # kubelet removes the directories it made.
  rmdir "$(dirname "$3")" 2>/dev/null || true
  [ -n "$2" ] || return 0
  "$CSICTL" -endpoint "unix://$NODE_SOCK" unstage -volume-id "$1" -staging "$2" || fail "NodeUnstageVolume $1" || return
  rmdir "$2" "$(dirname "$2")" 2>/dev/null || true
}

fs_bytes() { local b s; read -r b s < <(stat -f -c '%b %S' "$1") && echo $((b * s)); }

# ---------------------------------------------------------------------------------------------
# Scenario objects.

pod_manifest() {
  cat <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
  namespace: $NS
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 0
  containers:
    - name: app
      image: registry.invalid/no-kubelet-runs-this:0
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: $2}
EOF
}

pvc_bound() { [ "$(k -n "$NS" get pvc "$1" -o jsonpath='{.status.phase}')" = Bound ]; }
pod_on_node() { [ "$(k -n "$NS" get pod "$1" -o jsonpath='{.spec.nodeName}')" = "$NODE" ]; }

step_provision() {
  k create namespace "$NS" >&2 || return 1
  wait_until "the default ServiceAccount in $NS" k -n "$NS" get serviceaccount default || return 1
  k apply -f - >&2 <<EOF || return 1
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $PVC
  namespace: $NS
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: $STORAGE_CLASS
  resources: {requests: {storage: $PVC_SIZE}}
EOF
  sleep 2
  [ "$(k -n "$NS" get pvc "$PVC" -o jsonpath='{.status.phase}')" = Pending ] ||
    fail "a WaitForFirstConsumer claim must stay Pending until a pod uses it" || return
  pod_manifest writer "$PVC" | k apply -f - >&2 || return 1
  wait_until "the scheduler to place pod writer on $NODE" pod_on_node writer || return 1
  wait_until "claim $PVC to be Bound" pvc_bound "$PVC" || return 1
  local pv sel aff
  pv="$(k -n "$NS" get pvc "$PVC" -o jsonpath='{.spec.volumeName}')"
  sel="$(k -n "$NS" get pvc "$PVC" -o jsonpath='{.metadata.annotations.volume\.kubernetes\.io/selected-node}')"
  aff="$(k get pv "$pv" -o jsonpath='{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].key}={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}')"
  log "PV $pv: selected node $sel, node affinity $aff"
  [ "$sel" = "$NODE" ] || fail "selected-node is '$sel'" || return
  [ "$aff" = "$TOPOLOGY" ] || fail "PV topology is '$aff', expected $TOPOLOGY" || return
  [ "$(k get pv "$pv" -o jsonpath='{.spec.csi.driver}')" = "$DRIVER" ] || fail "PV not from $DRIVER" || return
}

step_attach() {
  local pv
  pv="$(k -n "$NS" get pvc "$PVC" -o jsonpath='{.spec.volumeName}')"
  wait_until "a VolumeAttachment of $pv to be attached" va_attached "$pv" || return 1
  log "VolumeAttachment $(va_of "$pv") attached to $NODE"
}

step_stage_publish() {
  stage_publish "$PVC" writer || return 1
  head -c 4194304 /dev/urandom >"$TARGET/payload" && sync -f "$TARGET/payload" || fail "writing to $TARGET" || return
  DATA_SUM="$(sha256sum <"$TARGET/payload" | cut -d' ' -f1)"
  WRITER_TARGET="$TARGET"
  log "wrote 4 MiB to $TARGET/payload (sha256 $DATA_SUM)"
}

# ---------------------------------------------------------------------------------------------
# snapshot

snapshot_ready() { [ "$(k -n "$NS" get volumesnapshot snap -o jsonpath='{.status.readyToUse}')" = true ]; }

step_snapshot() {
  if ! grep -qx CREATE_DELETE_SNAPSHOT <<<"$CTRL_CAPS"; then
    skip_reason="driver lacks CREATE_DELETE_SNAPSHOT"
    return 3
  fi
  k apply -f - >&2 <<EOF || return 1
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: snap
  namespace: $NS
spec:
  volumeSnapshotClassName: $SNAPSHOT_CLASS
  source: {persistentVolumeClaimName: $PVC}
EOF
  wait_until "VolumeSnapshot snap to be ready" snapshot_ready || return 1
  log "snapshot ready: $(k -n "$NS" get volumesnapshot snap -o jsonpath='{.status.boundVolumeSnapshotContentName} {.status.restoreSize}')"
  k apply -f - >&2 <<EOF || return 1
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: restored
  namespace: $NS
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: $STORAGE_CLASS
  resources: {requests: {storage: $PVC_SIZE}}
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}
EOF
  pod_manifest reader restored | k apply -f - >&2 || return 1
  wait_until "pod reader on $NODE" pod_on_node reader || return 1
  wait_until "claim restored to be Bound" pvc_bound restored || return 1
  local pv
  pv="$(k -n "$NS" get pvc restored -o jsonpath='{.spec.volumeName}')"
  wait_until "the VolumeAttachment of $pv" va_attached "$pv" || return 1
  stage_publish restored reader || return 1
  [ -f "$TARGET/payload" ] || fail "no payload in the restored volume" || return
  [ "$(sha256sum <"$TARGET/payload" | cut -d' ' -f1)" = "$DATA_SUM" ] || fail "restored payload differs" || return
  log "restored volume holds the snapshot's data"
}

# ---------------------------------------------------------------------------------------------
# expand

# Whether this process (and so the driver it starts) holds CAP_SYS_RESOURCE (bit 24).
has_cap_sys_resource() {
  local eff
  eff="$(awk '/^CapEff:/ {print $2}' /proc/self/status)"
  (( (16#$eff >> 24) & 1 ))
}

pv_capacity_is() { [ "$(k get pv "$1" -o jsonpath='{.spec.capacity.storage}')" = "$2" ]; }

step_expand() {
  if ! grep -qx EXPAND_VOLUME <<<"$CTRL_CAPS"; then
    skip_reason="driver lacks EXPAND_VOLUME"
    return 3
  fi
  local before after want pending
  volume_facts "$PVC" writer || return 1
  before="$(fs_bytes "$TARGET")" || return 1
  k -n "$NS" patch pvc "$PVC" --type=merge -p "{\"spec\":{\"resources\":{\"requests\":{\"storage\":\"$PVC_BIGGER\"}}}}" >&2 || return 1
  wait_until "PV $PV to grow to $PVC_BIGGER (ControllerExpandVolume)" pv_capacity_is "$PV" "$PVC_BIGGER" || return 1
  pending="$(k -n "$NS" get pvc "$PVC" -o jsonpath='{.status.conditions[*].type}')"
  log "PV $PV is $PVC_BIGGER; claim conditions: ${pending:-none}"
  # kubelet's part: NodeExpandVolume when the node service offers it, then the claim's status.
  if grep -qx EXPAND_VOLUME <<<"$NODE_CAPS"; then
    want=$(( ${PVC_BIGGER%Mi} * 1048576 ))
    stages || STAGING=""
    if [ "$FSTYPE" = ext4 ] && ! has_cap_sys_resource; then
      # ext4 grows online only with CAP_SYS_RESOURCE, which this machine withholds even from
      # root (a privileged node plugin has it). Do what kubelet does when the volume is not in
      # use: bring it down and up again; the driver grows ext4 before it mounts it.
      log "no CAP_SYS_RESOURCE here: growing ext4 offline (unpublish, unstage, stage, publish)"
      unpublish_unstage "$HANDLE" "$STAGING" "$TARGET" || return
      stage_publish "$PVC" writer || return
      stages || STAGING=""
    fi
    "$CSICTL" -endpoint "unix://$NODE_SOCK" expand -volume-id "$HANDLE" -target "$TARGET" -staging "$STAGING" \
      -bytes "$want" -fstype "$FSTYPE" -access-mode "$(access_mode)" >&2 || fail "NodeExpandVolume" || return
  fi
  after="$(fs_bytes "$TARGET")" || return 1
  log "filesystem at $TARGET: $before -> $after bytes"
  [ "$after" -gt "$before" ] || fail "the filesystem did not grow" || return
  k -n "$NS" patch pvc "$PVC" --subresource=status --type=merge \
    -p "{\"status\":{\"capacity\":{\"storage\":\"$PVC_BIGGER\"},\"conditions\":null,\"allocatedResourceStatuses\":null}}" >&2 || return 1
  [ "$(sha256sum <"$WRITER_TARGET/payload" | cut -d' ' -f1)" = "$DATA_SUM" ] || fail "data changed by the expansion" || return
}

# ---------------------------------------------------------------------------------------------
# delete

none_left() { [ -z "$(k get "$@" -o name 2>/dev/null)" ]; }

# Files in the pool besides its identity, node registrations and lock files.
pool_leftovers() {
  find "$pool" -type f ! -path "$pool/pool.json" ! -path "$pool/meta/nodes/*" ! -path "$pool/locks/*"
}

step_delete() {
  local entry ok=0
  local handle staging target
  for entry in "${published[@]}"; do
    IFS='|' read -r handle staging target <<<"$entry"
    unpublish_unstage "$handle" "$staging" "$target" || ok=1
  done
  published=()
  k -n "$NS" delete pod --all --grace-period=0 --force --wait=false >&2 2>/dev/null || ok=1
  wait_until "the pods to go" none_left -n "$NS" pods || ok=1
  wait_until "the VolumeAttachments to go (attach/detach controller, attacher)" none_left volumeattachments || ok=1
  k -n "$NS" delete pvc --all --wait=false >&2 || ok=1
  wait_until "the PVs to go (provisioner DeleteVolume)" none_left pv || ok=1
  if k api-resources --api-group=snapshot.storage.k8s.io -o name 2>/dev/null | grep -q volumesnapshots; then
    k -n "$NS" delete volumesnapshot --all --wait=false >&2 || ok=1
    wait_until "the VolumeSnapshotContents to go (DeleteSnapshot)" none_left volumesnapshotcontents || ok=1
  fi
  local left
  left="$(pool_leftovers)"
  [ -z "$left" ] || { log "left in the pool:"; echo "$left" >&2; ok=1; }
  [ "$ok" -eq 0 ] || return 1
  log "the pool holds no volume or snapshot"
}

# ---------------------------------------------------------------------------------------------
# shutdown

step_shutdown() {
  local ok=0 rc name sock
  report_usage
  # The sidecars first, as in a pod being deleted they would all get SIGTERM together.
  for name in csi-provisioner csi-attacher csi-snapshotter csi-resizer snapshot-controller; do
    if pid_of "$name" >/dev/null; then stop "$name" 10; fi
  done
  for name in blockcsi-node blockcsi-controller; do
    sock="$NODE_SOCK"
    [ "$name" = blockcsi-controller ] && sock="$CTRL_SOCK"
    stop "$name" 20
    rc="$stop_rc"
    [ "$rc" -eq 0 ] || { log "$name exited with status $rc after SIGTERM"; show_log "$name"; ok=1; }
    [ ! -e "$sock" ] || { log "$name left its socket $sock"; ok=1; }
  done
  # Kubelet deregisters the driver when this socket goes.
  if [ -n "${REG_SOCK:-}" ] && [ -e "$REG_SOCK" ]; then
    log "blockcsi-node left its registration socket $REG_SOCK"
    ok=1
  fi
  local m l
  m="$(mounts_under "$tmp")"
  l="$(loops_under "$tmp")"
  [ -z "$m" ] || { log "mounts left: $m"; ok=1; }
  [ -z "$l" ] || { log "loop devices left: $l"; ok=1; }
  return "$ok"
}

log "temporary directory $tmp"
start_time=$SECONDS
step render-check "" step_render_check
step build "" step_build
step control-plane "build" step_control_plane
step snapshot-crds "control-plane" step_snapshot_crds
step manifests "snapshot-crds" step_manifests
step driver "manifests" step_driver
step sidecars "driver" step_sidecars
step provision "sidecars" step_provision
step attach "provision" step_attach
step stage-publish "attach" step_stage_publish
step snapshot "stage-publish" step_snapshot
step expand "stage-publish" step_expand
step delete "provision" step_delete
step shutdown "driver" step_shutdown
[ "$failed" -eq 0 ] || on_failure_logs
log "finished in $((SECONDS - start_time))s"
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
