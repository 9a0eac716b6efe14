#!/usr/bin/env bash
# Runs every test of blockcsi: unit tests, real-kernel integration tests, the csi-sanity
# conformance suites (mount, block, split controller/node) and the two Kubernetes end-to-end
# tests: the control plane with the sidecars (tests/e2e/run.sh) and a real node with kubelet
# and containerd running the images and manifests (tests/e2e/run-node.sh). Needs root (loop
# devices, mkfs, mounts, containers). Installs what is missing on a fresh Debian machine from
# apt: e2fsprogs, xfsprogs, util-linux, openssl, and for the node test containerd, runc, the
# CNI plugins, iptables, conntrack, debootstrap, curl and a C compiler; csi-sanity, and for the
# e2e Kubernetes, the CSI sidecars, BuildKit, a registry and helm, built from their Go modules
# (cached under ~/.cache/blockcsi).
# The last line is the total over everything: "N passed, N failed, N skipped".
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [ "$(id -u)" -ne 0 ]; then
  echo "test-all.sh: run as root: the tests attach loop devices, run mkfs and mount" >&2
  exit 1
fi

# Toolchains live outside the default PATH on a fresh machine of this kind.
for d in "$HOME/.cargo/bin" /usr/local/go/bin "$HOME/go/bin"; do
  case ":$PATH:" in *":$d:"*) ;; *) [ -d "$d" ] && PATH="$d:$PATH" ;; esac
done
export PATH

missing=()
for tool in mkfs.ext4:e2fsprogs resize2fs:e2fsprogs mkfs.xfs:xfsprogs xfs_growfs:xfsprogs \
            xfs_admin:xfsprogs blkid:util-linux losetup:mount openssl:openssl \
            containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
            iptables:iptables conntrack:conntrack debootstrap:debootstrap curl:curl cc:gcc; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "${tool%%:*}" ] || missing+=("${tool##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(printf '%s\n' "${missing[@]}" | sort -u)
fi
for tool in cargo go; do
  command -v "$tool" >/dev/null || { echo "test-all.sh: $tool is required" >&2; exit 1; }
done
[ -e /dev/loop-control ] || modprobe loop || { echo "test-all.sh: no loop device support" >&2; exit 1; }

echo "== csi-sanity"
sanity_bin="$(csi-sanity/install.sh | tail -n 1)"

echo "== cargo test (release: the integration tests drive target/release/blockcsi)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo_status=0
# --no-fail-fast: one failing test binary must not hide the others' results.
# --show-output: the reliability suites print their counts (hostile cases, fuzz executions,
# kills survived, operations verified), gathered into the summary below.
cargo test --release --locked --no-fail-fast -- --show-output 2>&1 | tee "$log" || cargo_status=$?
read -r c_pass c_fail c_skip < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^passed;?$/) p += $(i-1);
      if ($(i) ~ /^failed;?$/) f += $(i-1);
      if ($(i) ~ /^ignored;?$/) s += $(i-1);
    } } END { print p+0, f+0, s+0 }' "$log")
if [ "$cargo_status" -ne 0 ] && [ "$c_fail" -eq 0 ]; then c_fail=1; fi
reliability="$(grep -E '^(hostile|fuzz|crash|torture|powercut): ' "$log" | sort -u || true)"
reliability_totals="$(awk '
    /^hostile: .* cases$/ { cases += $(NF-1) }
    /^fuzz: .* executions$/ { runs += $(NF-1) }
    END { printf "hostile cases: %d, fuzz executions: %d", cases, runs }' <<<"$reliability")"

echo "== csi-sanity suites"
sanity_status=0
CSI_SANITY="$sanity_bin" csi-sanity/run.sh --binary target/release/blockcsi 2>&1 | tee "$log" || sanity_status=$?
read -r s_pass s_fail s_skip < <(awk 'NF == 6 && $2 == "passed," && $4 == "failed," { l = $1 " " $3 " " $5 }
    END { print (l == "" ? "0 1 0" : l) }' "$log")
if [ "$sanity_status" -ne 0 ] && [ "$s_fail" -eq 0 ]; then s_fail=1; fi

echo "== end-to-end test (Kubernetes control plane and CSI sidecars)"
e2e_status=0
tests/e2e/run.sh --binary target/release/blockcsi 2>&1 | tee "$log" || e2e_status=$?
read -r e_pass e_fail e_skip < <(awk 'NF == 6 && $2 == "passed," && $4 == "failed," { l = $1 " " $3 " " $5 }
    END { print (l == "" ? "0 1 0" : l) }' "$log")
if [ "$e2e_status" -ne 0 ] && [ "$e_fail" -eq 0 ]; then e_fail=1; fi

echo "== end-to-end test on a real node (kubelet, containerd, the images and deploy/)"
node_status=0
tests/e2e/run-node.sh 2>&1 | tee "$log" || node_status=$?
read -r n_pass n_fail n_skip < <(awk 'NF == 6 && $2 == "passed," && $4 == "failed," { l = $1 " " $3 " " $5 }
    END { print (l == "" ? "0 1 0" : l) }' "$log")
if [ "$node_status" -ne 0 ] && [ "$n_fail" -eq 0 ]; then n_fail=1; fi

echo "== summary"
echo "reliability:"
printf '%s\n' "$reliability" | sed 's/^/  /'
echo "  ${reliability_totals}"
echo "cargo test: ${c_pass} passed, ${c_fail} failed, ${c_skip} skipped"
echo "csi-sanity: ${s_pass} passed, ${s_fail} failed, ${s_skip} skipped (skipped = specs gated by capabilities not advertised)"
echo "e2e: ${e_pass} passed, ${e_fail} failed, ${e_skip} skipped steps (skipped = steps gated by capabilities not advertised)"
echo "e2e node: ${n_pass} passed, ${n_fail} failed, ${n_skip} skipped steps"
echo "$((c_pass + s_pass + e_pass + n_pass)) passed, $((c_fail + s_fail + e_fail + n_fail)) failed, $((c_skip + s_skip + e_skip + n_skip)) skipped"
[ "$cargo_status" -eq 0 ] && [ "$sanity_status" -eq 0 ] && [ "$e2e_status" -eq 0 ] && [ "$node_status" -eq 0 ] &&
  [ "$c_fail" -eq 0 ] && [ "$s_fail" -eq 0 ] && [ "$e_fail" -eq 0 ] && [ "$n_fail" -eq 0 ]
