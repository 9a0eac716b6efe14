# Shared by the end-to-end tests (run.sh, run-node.sh): background processes with their logs,
# bounded waits, free ports, test certificates and kubeconfigs, the step bookkeeping, and the
# cleanup helpers for mounts and loop devices. Sourced, never run. The caller sets $logs, $pki,
# $wait_s, and once known $KUBECTL and $API_PORT ($API_HOST defaults to 127.0.0.1).

log() { printf '%s %s: %s\n' "$(date +%H:%M:%S)" "${0##*/}" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Processes.

proc_names=()
proc_pids=()

# start NAME CMD...: run CMD in the background, output in $logs/NAME.log.
start() {
  local name="$1"
  shift
  printf '+ %s\n' "$*" >"$logs/$name.log"
  "$@" </dev/null >>"$logs/$name.log" 2>&1 &
  proc_names+=("$name")
  proc_pids+=("$!")
}

pid_of() {
  local i
  for i in "${!proc_names[@]}"; do
    [ "${proc_names[$i]}" = "$1" ] && { echo "${proc_pids[$i]}"; return 0; }
  done
  return 1
}

# alive PID: running and not a zombie.
alive() {
  local state
  state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# dead_procs: the started processes that have exited, if any (but not those stopped on purpose).
stopped=" "
dead_procs() {
  local i
  for i in "${!proc_names[@]}"; do
    case "$stopped" in *" ${proc_names[$i]} "*) continue ;; esac
    alive "${proc_pids[$i]}" || echo "${proc_names[$i]}"
  done
}

# stop NAME [SECONDS]: SIGTERM, bounded wait, SIGKILL. The exit status goes to $stop_rc
# (not printed: `wait` works only in this shell, never in a command substitution).
stop_rc=0
stop() {
  local pid i
  stop_rc=255
  pid="$(pid_of "$1")" || return 0
  stopped+="$1 "
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < ${2:-20} * 10; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    log "$1 (pid $pid) ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  stop_rc=0
  wait "$pid" 2>/dev/null || stop_rc=$?
}

show_log() {
  [ -f "$logs/$1.log" ] || return 0
  echo "----- last ${2:-25} lines of $1.log -----" >&2
  tail -n "${2:-25}" "$logs/$1.log" >&2
}

# wait_until DESCRIPTION CMD...: retry CMD until it succeeds, for at most $wait_s seconds.
# Fails early when one of the started processes died.
wait_until() {
  local what="$1" deadline=$((SECONDS + wait_s)) dead
  shift
  until "$@" >/dev/null 2>&1; do
    dead="$(dead_procs)"
    if [ -n "$dead" ]; then
      sleep 0.5 # let their last words reach the log
      log "while waiting for $what: exited: $(echo $dead)"
      for p in $dead; do show_log "$p"; done
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "timed out after ${wait_s}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

fail() { log "FAILED: $*"; return 1; }

# free_port sets $PORT to a TCP port nobody on this machine uses (any state, IPv4 or IPv6),
# below the ephemeral range, and not handed out before. Call it in this shell, not in $(...).
given_ports=" "
PORT=""
free_port() {
  local used p _ a
  used=" $(for f in /proc/net/tcp /proc/net/tcp6; do
      [ -r "$f" ] && tail -n +2 "$f" | while read -r _ a _; do echo -n "$((16#${a##*:})) "; done
    done) "
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    case "$used$given_ports" in *" $p "*) continue ;; esac
    given_ports+="$p "
    PORT="$p"
    return 0
  done
  return 1
}

k() { "$KUBECTL" --request-timeout=30s "$@"; }

# ---------------------------------------------------------------------------------------------
# What a run leaves on the host: mounts and loop devices under a directory.

mounts_under() {
  # Field 5 of mountinfo is the mount point; our paths hold no characters it would escape.
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | tac
}

loops_under() {
  local f b
  for f in /sys/block/loop*/loop/backing_file; do
    [ -r "$f" ] || continue
    b="$(cat "$f" 2>/dev/null)" || continue
    b="${b% (deleted)}"
    case "$b" in "$1"/*) f="${f#/sys/block/}"; echo "/dev/${f%%/*}" ;; esac
  done
}

# ---------------------------------------------------------------------------------------------
# Steps and their bookkeeping.

declare -A result=()
order=()
passed=0 failed=0 skipped=0
skip_reason=""

# step NAME "DEPENDENCIES" FUNCTION: runs FUNCTION when every dependency passed. A function
# returns 0 (passed), 1 (failed) or 3 with $skip_reason set (skipped).
step() {
  local name="$1" deps="$2" fn="$3" d rc=0 start=$SECONDS
  order+=("$name")
  for d in $deps; do
    if [ "${result[$d]:-}" != passed ]; then
      result[$name]="skipped"
      skipped=$((skipped + 1))
      echo "step $name: skipped: $d did not pass"
      return 0
    fi
  done
  log "== $name"
  skip_reason=""
  "$fn" || rc=$?
  case "$rc" in
    0) result[$name]=passed; passed=$((passed + 1)); echo "step $name: passed ($((SECONDS - start))s)" ;;
    3) result[$name]=skipped; skipped=$((skipped + 1)); echo "step $name: skipped: $skip_reason" ;;
    *) result[$name]=failed; failed=$((failed + 1)); echo "step $name: FAILED ($((SECONDS - start))s)" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Build results.

# load_build_output: reads the "name=value" lines of build.sh and rootfs.sh on stdin into
# variables named after them, upper-cased with dashes as underscores (kube-apiserver=/x sets
# KUBE_APISERVER=/x).
load_build_output() {
  local line name
  while IFS= read -r line; do
    case "$line" in [a-z]*=*) ;; *) continue ;; esac
    name="${line%%=*}"
    name="${name^^}"
    name="${name//-/_}"
    printf -v "$name" '%s' "${line#*=}"
  done
}

# ---------------------------------------------------------------------------------------------
# Certificates and kubeconfigs.

# cert NAME SUBJECT EXTENSIONS: a key and a certificate signed by the test CA.
cert() {
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/$1.key" -subj "$2" -out "$pki/$1.csr" 2>/dev/null &&
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 2 -extfile <(printf '%s\n' "$3") -out "$pki/$1.crt" 2>/dev/null
}

# kubeconfig FILE USER-ARGS...: a kubeconfig for the test API server.
kubeconfig() {
  local file="$1"
  shift
  "$KUBECTL" config --kubeconfig="$file" set-cluster e2e --server="https://${API_HOST:-127.0.0.1}:$API_PORT" \
    --certificate-authority="$pki/ca.crt" --embed-certs >/dev/null &&
    "$KUBECTL" config --kubeconfig="$file" set-credentials user "$@" >/dev/null &&
    "$KUBECTL" config --kubeconfig="$file" set-context e2e --cluster=e2e --user=user >/dev/null &&
    "$KUBECTL" config --kubeconfig="$file" use-context e2e >/dev/null
}

# Peak memory and CPU time of each process: what the chart's requests and limits are sized from.
report_usage() {
  local i pid hwm ticks hz
  hz="$(getconf CLK_TCK)"
  for i in "${!proc_names[@]}"; do
    pid="${proc_pids[$i]}"
    alive "$pid" || continue
    hwm="$(awk '/^VmHWM:/ { printf "%d", $2 / 1024 }' "/proc/$pid/status" 2>/dev/null)"
    ticks="$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null)"
    printf 'usage: %-24s peak RSS %4s MiB, CPU %5.1fs\n' "${proc_names[$i]}" "${hwm:-?}" \
      "$(echo "${ticks:-0} $hz" | awk '{ print $1 / $2 }')" >&2
  done
}

# ---------------------------------------------------------------------------------------------

on_failure_logs() {
  local n
  for n in "${proc_names[@]}"; do show_log "$n" 15; done
}
