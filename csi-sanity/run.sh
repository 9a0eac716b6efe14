#!/usr/bin/env bash
# Run the csi-sanity conformance suites against blockcsi.
#
# Usage: csi-sanity/run.sh [--binary PATH] [--only mount|block|split]
#                          [--artifacts DIR] [--keep-tmp] [-- CSI-SANITY-ARGS...]
#
#   --binary PATH     blockcsi binary (default: <repo>/target/release/blockcsi).
#                     This script never builds it.
#   --only SUITE      run a single suite: mount, block or split.
#   --artifacts DIR   copy each suite's driver logs, csi-sanity output and JUnit
#                     report to DIR/<suite>/ (created if missing).
#   --keep-tmp        do not delete the temporary directories (after cleaning up
#                     mounts, loop devices and images); their paths are printed.
#   -- ARGS...        extra arguments for csi-sanity, e.g. -ginkgo.focus=NodeStage
#
# Suites (serial, each on a fresh mktemp -d directory holding the pool, the
# socket(s), the mount-dir parent and the staging dir):
#   mount  one `serve --mode all` process, -csi.testvolumeaccesstype=mount
#   block  one `serve --mode all` process, -csi.testvolumeaccesstype=block
#   split  `--mode controller` + `--mode node` (separate sockets, one pool), mount,
#          with --default-fs-type xfs and 512 MiB volumes (XFS's minimum is 300 MiB)
# Every suite passes csi-sanity/mutable-parameters.yaml (ControllerModifyVolume tests).
#
# After each suite the driver(s) get SIGTERM (they must exit 0 and remove their
# socket), then the suite's temp dir is checked for leaks: loop devices backed by
# a file in it, mount points under it, *.img files left in <pool>/volumes or
# <pool>/snapshots. Leaks are cleaned up and fail the suite.
#
# Output: one line per suite `csi-sanity <suite>: N passed, N failed, N skipped`
# and, last, the aggregate `N passed, N failed, N skipped`. Harness-level
# problems (driver did not start or died, no ginkgo summary, csi-sanity exited
# non-zero without reporting failures, unclean driver shutdown, leaks) are each
# reported on their own line and counted as one extra failure of that suite, so
# "0 failed" always means a clean run. Exit status is non-zero on any failure.
#
# Environment:
#   CSI_SANITY            csi-sanity binary to use (default: csi-sanity/install.sh)
#   NODE_ID               --node-id for the driver (default: blockcsi-sanity-node)
#   MAX_VOLUMES_PER_NODE  --max-volumes-per-node (default: 16)
#   TEST_VOLUME_SIZE      -csi.testvolumesize (default: 67108864, 64 MiB)
#   TEST_VOLUME_EXPAND_SIZE  -csi.testvolumeexpandsize (default: 134217728)
#   TEST_XFS_VOLUME_SIZE, TEST_XFS_VOLUME_EXPAND_SIZE  the same for the split (XFS) suite
#                         (defaults: 536870912, 805306368)
#   SANITY_TIMEOUT        -ginkgo.timeout (default: 20m)
#   SOCKET_WAIT_SECONDS   how long to wait for a driver socket (default: 30)
#   STOP_WAIT_SECONDS     how long to wait after SIGTERM (default: 20)
#   LOG_TAIL_LINES        driver log lines shown on failure (default: 60)
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"

binary="${repo_root}/target/release/blockcsi"
only=""
artifacts=""
keep_tmp=0
extra_args=()

node_id="${NODE_ID:-blockcsi-sanity-node}"
max_volumes="${MAX_VOLUMES_PER_NODE:-16}"
volume_size="${TEST_VOLUME_SIZE:-67108864}"
xfs_volume_size="${TEST_XFS_VOLUME_SIZE:-536870912}"
xfs_expand_size="${TEST_XFS_VOLUME_EXPAND_SIZE:-805306368}"
expand_size="${TEST_VOLUME_EXPAND_SIZE:-134217728}"
sanity_timeout="${SANITY_TIMEOUT:-20m}"
socket_wait="${SOCKET_WAIT_SECONDS:-30}"
stop_wait="${STOP_WAIT_SECONDS:-20}"
tail_lines="${LOG_TAIL_LINES:-60}"

# State used by the EXIT trap.
driver_pids=()   # every driver process started (may already be gone)
tmp_dirs=()      # every temp dir created

log() { printf 'run.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# ---------------------------------------------------------------------------
# Leak detection and cleanup. Each function takes an absolute, canonical
# directory and works on everything inside it (the directory itself included
# for mounts).

# Print the mount points (decoded) at or under $1, most recent first, one per
# line. /proc/self/mountinfo field 5 is the mount point, with space, tab,
# newline and backslash escaped as \040 \011 \012 \134.
mounts_under() {
    local dir="$1" line mp
    local -a fields found=()
    while IFS= read -r line; do
        read -r -a fields <<<"$line"
        mp="${fields[4]}"
        # \NNN -> \0NNN so that printf %b decodes it as octal.
        printf -v mp '%b' "${mp//\\/\\0}"
        if [[ "$mp" == "$dir" || "$mp" == "$dir"/* ]]; then
            found+=("$mp")
        fi
    done </proc/self/mountinfo
    local i
    for ((i = ${#found[@]} - 1; i >= 0; i--)); do
        printf '%s\n' "${found[i]}"
    done
}

# Print "<device> <backing file>" for each loop device whose backing file is
# under $1. The kernel appends " (deleted)" when the file was unlinked.
loops_under() {
    local dir="$1" f backing dev
    for f in /sys/block/loop*/loop/backing_file; do
        [[ -r "$f" ]] || continue
        backing="$(cat "$f" 2>/dev/null)" || continue
        backing="${backing% (deleted)}"
        if [[ "$backing" == "$dir"/* ]]; then
            dev="${f#/sys/block/}"
            dev="/dev/${dev%%/*}"
            printf '%s %s\n' "$dev" "$backing"
        fi
    done
}

# Print leftover image files in the pool.
images_under() {
    local pool="$1" d
    for d in "$pool/volumes" "$pool/snapshots"; do
        [[ -d "$d" ]] || continue
        find "$d" -name '*.img' -print
    done
}

# Report leaks under temp dir $1 (pool $2) and clean them up. Prints one line
# per leak on stdout. Returns 1 if anything leaked, 0 otherwise. Everything is
# listed before anything is cleaned (unmounting a mount made with `-o loop`
# would auto-detach its loop device and hide that leak).
check_leaks() {
    local dir="$1" pool="$2" leaked=0 mp line img round
    local -a mps=() loops=() imgs=()

    mapfile -t mps < <(mounts_under "$dir")
    mapfile -t loops < <(loops_under "$dir")
    mapfile -t imgs < <(images_under "$pool")
    for mp in "${mps[@]}"; do
        printf 'leak: mount point %s\n' "$mp"
        leaked=1
    done
    for line in "${loops[@]}"; do
        printf 'leak: loop device %s backed by %s\n' "${line%% *}" "${line#* }"
        leaked=1
    done
    for img in "${imgs[@]}"; do
        printf 'leak: image file %s\n' "$img"
        leaked=1
    done

    # Unmount (most recent first); stacked mounts show up once per layer, so
    # a few rounds unmount all of them.
    for ((round = 0; round < 5 && ${#mps[@]} > 0; round++)); do
        for mp in "${mps[@]}"; do
            umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
        done
        mapfile -t mps < <(mounts_under "$dir")
    done
    for mp in "${mps[@]}"; do
        log "warning: could not unmount $mp"
    done
    # Re-list: some loop devices may have gone with their mounts (autoclear).
    mapfile -t loops < <(loops_under "$dir")
    for line in "${loops[@]}"; do
        losetup -d "${line%% *}" 2>/dev/null || log "warning: losetup -d ${line%% *} failed"
    done
    for img in "${imgs[@]}"; do
        rm -f -- "$img"
    done

    return "$leaked"
}

# Silent best-effort cleanup used by the EXIT trap.
cleanup_dir() {
    local dir="$1" mp dev backing round
    local -a mps=()
    for ((round = 0; round < 5; round++)); do
        mapfile -t mps < <(mounts_under "$dir")
        ((${#mps[@]} > 0)) || break
        for mp in "${mps[@]}"; do
            umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
        done
    done
    while read -r dev backing; do
        if [[ -n "$dev" ]]; then
            losetup -d "$dev" 2>/dev/null || true
        fi
    done < <(loops_under "$dir")
}

# ---------------------------------------------------------------------------
# Result parsing.

# Print "passed failed skipped" parsed from ginkgo output file $1, or from the
# JUnit report $2 if the output has no summary. Returns 1 if neither works.
parse_results() {
    local out="$1" junit="$2" line p f=0 s=0
    if [[ -f "$out" ]]; then
        # Last summary line; strip ANSI colours in case they are on.
        line="$(sed 's/\x1b\[[0-9;]*m//g' "$out" |
            grep -E '[0-9]+ Passed \| [0-9]+ Failed \|.*[0-9]+ Skipped' | tail -n 1 || true)"
        if [[ "$line" =~ ([0-9]+)\ Passed ]]; then
            p="${BASH_REMATCH[1]}"
            [[ "$line" =~ ([0-9]+)\ Failed ]] && f="${BASH_REMATCH[1]}"
            [[ "$line" =~ ([0-9]+)\ Skipped ]] && s="${BASH_REMATCH[1]}"
            printf '%s %s %s\n' "$p" "$f" "$s"
            return 0
        fi
    fi
    if [[ -s "$junit" ]]; then
        # Count the [It] test cases by status (suite setup nodes excluded).
        local counts
        counts="$(grep -o '<testcase name="\[It\][^>]*' "$junit" |
            grep -o 'status="[a-z]*"' |
            awk -F'"' '
                $2 == "passed"  { p++; next }
                $2 == "skipped" { s++; next }
                $2 == "pending" { next }
                { f++ }
                END { printf "%d %d %d\n", p, f, s }')"
        if [[ "$counts" != "0 0 0" ]]; then
            printf '%s\n' "$counts"
            return 0
        fi
    fi
    return 1
}

# ---------------------------------------------------------------------------
# Driver processes.

# alive PID: true while PID exists and is not a zombie (kill -0 succeeds on
# zombies, which our own exited-but-unreaped children are).
alive() {
    local state
    [[ -r "/proc/$1/stat" ]] || return 1
    state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# reap PID: wait for PID, store its exit status in $reaped_rc, drop it from
# driver_pids. Must not run in a subshell (only the parent can wait).
reaped_rc=0
reap() {
    local pid="$1" keep=() p
    reaped_rc=0
    wait "$pid" 2>/dev/null || reaped_rc=$?
    for p in "${driver_pids[@]}"; do
        [[ "$p" == "$pid" ]] || keep+=("$p")
    done
    driver_pids=("${keep[@]}")
}

# start_driver MODE SOCKET POOL LOGFILE: start `blockcsi serve` in the
# background; its pid is appended to driver_pids and stored in $last_pid.
last_pid=""
start_driver() {
    local mode="$1" sock="$2" pool="$3" logfile="$4" fs="$5"
    printf '+ %s serve --mode %s --endpoint unix://%s --node-id %s --pool %s --max-volumes-per-node %s --default-fs-type %s\n' \
        "$binary" "$mode" "$sock" "$node_id" "$pool" "$max_volumes" "$fs" >>"$logfile"
    "$binary" serve \
        --mode "$mode" \
        --endpoint "unix://${sock}" \
        --node-id "$node_id" \
        --pool "$pool" \
        --max-volumes-per-node "$max_volumes" \
        --default-fs-type "$fs" \
        </dev/null >>"$logfile" 2>&1 &
    last_pid=$!
    driver_pids+=("$last_pid")
}

show_log() {
    local logfile="$1"
    [[ -f "$logfile" ]] || return 0
    printf -- '----- last %s lines of %s -----\n' "$tail_lines" "$logfile" >&2
    tail -n "$tail_lines" "$logfile" >&2 || true
    printf -- '----- end of %s -----\n' "$logfile" >&2
}

# wait_socket PID SOCKET LOGFILE: wait until SOCKET is a socket. Fails if the
# driver exits first or the wait times out.
wait_socket() {
    local pid="$1" sock="$2" logfile="$3" deadline=$((SECONDS + socket_wait))
    while [[ ! -S "$sock" ]]; do
        if ! alive "$pid"; then
            reap "$pid"
            log "driver (pid $pid) exited with status $reaped_rc before creating $sock"
            show_log "$logfile"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "socket $sock did not appear within ${socket_wait}s"
            show_log "$logfile"
            return 1
        fi
        sleep 0.2
    done
}

# stop_driver PID SOCKET LOGFILE NAME: SIGTERM, bounded wait, SIGKILL on
# timeout. Fails unless the driver was still running, exited 0 and removed
# its socket.
stop_driver() {
    local pid="$1" sock="$2" logfile="$3" name="$4" rc=0 ok=0
    if ! alive "$pid"; then
        reap "$pid"
        log "$name driver (pid $pid) died during the run (status $reaped_rc)"
        show_log "$logfile"
        return 1
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + stop_wait))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            log "$name driver (pid $pid) still running ${stop_wait}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            reap "$pid"
            show_log "$logfile"
            return 1
        fi
        sleep 0.2
    done
    reap "$pid"
    rc="$reaped_rc"
    if ((rc != 0)); then
        log "$name driver exited with status $rc after SIGTERM (expected 0)"
        ok=1
    fi
    if [[ -e "$sock" ]]; then
        log "$name driver did not remove its socket $sock"
        rm -f -- "$sock"
        ok=1
    fi
    ((ok == 0)) || show_log "$logfile"
    return "$ok"
}

# ---------------------------------------------------------------------------
# One suite.

total_passed=0
total_failed=0
total_skipped=0
any_failure=0

# run_suite NAME: runs the suite, prints its summary line, adds to the totals.
run_suite() {
    local name="$1" access="mount" split=0 fs="ext4"
    local size="$volume_size" grow="$expand_size"
    case "$name" in
        mount) ;;
        block) access="block" ;;
        # The split run formats with XFS, so the suite covers both filesystems; XFS needs
        # at least 300 MiB (images are sparse, so this costs no disk).
        split) split=1 fs="xfs" size="$xfs_volume_size" grow="$xfs_expand_size" ;;
        *) die "unknown suite $name" ;;
    esac

    local tmp
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/blockcsi-sanity-${name}.XXXXXX")"
    tmp="$(realpath -e "$tmp")"
    tmp_dirs+=("$tmp")

    local pool="$tmp/pool" out="$tmp/csi-sanity.out" junit="$tmp/junit.xml"
    local ctrl_sock node_sock ctrl_log node_log
    if ((split)); then
        ctrl_sock="$tmp/controller.sock"
        node_sock="$tmp/node.sock"
        ctrl_log="$tmp/driver-controller.log"
        node_log="$tmp/driver-node.log"
    else
        ctrl_sock="$tmp/csi.sock"
        node_sock="$ctrl_sock"
        ctrl_log="$tmp/driver.log"
        node_log="$ctrl_log"
    fi
    # sun_path holds 107 bytes plus the terminating NUL.
    if ((${#ctrl_sock} > 107 || ${#node_sock} > 107)); then
        die "socket path too long for a Unix socket: $ctrl_sock (set TMPDIR to a shorter directory)"
    fi

    log "suite $name: temp dir $tmp"
    local -a problems=()
    local passed=0 failed=0 skipped=0 started=1 ctrl_pid="" node_pid=""

    # Start the driver(s). The controller (or `all`) process goes first: it
    # creates the pool, which the node process then registers itself in.
    if ((split)); then
        start_driver controller "$ctrl_sock" "$pool" "$ctrl_log" "$fs"
        ctrl_pid="$last_pid"
        if wait_socket "$ctrl_pid" "$ctrl_sock" "$ctrl_log"; then
            start_driver node "$node_sock" "$pool" "$node_log" "$fs"
            node_pid="$last_pid"
            wait_socket "$node_pid" "$node_sock" "$node_log" || started=0
        else
            started=0
        fi
    else
        start_driver all "$ctrl_sock" "$pool" "$ctrl_log" "$fs"
        ctrl_pid="$last_pid"
        wait_socket "$ctrl_pid" "$ctrl_sock" "$ctrl_log" || started=0
    fi
    # A driver that already exited (and was reaped) has nothing left to stop.
    [[ -z "$ctrl_pid" ]] || alive "$ctrl_pid" || ctrl_pid=""
    [[ -z "$node_pid" ]] || alive "$node_pid" || node_pid=""

    if ((started)); then
        local -a sargs=(
            "-csi.endpoint=unix://${node_sock}"
            "-csi.mountdir=${tmp}/mnt"
            "-csi.stagingdir=${tmp}/staging"
            "-csi.testvolumeaccesstype=${access}"
            "-csi.testvolumesize=${size}"
            "-csi.testvolumeexpandsize=${grow}"
            "-csi.testvolumemutableparameters=${script_dir}/mutable-parameters.yaml"
            "-csi.testnodevolumeattachlimit"
            "-ginkgo.junit-report=${junit}"
            "-ginkgo.timeout=${sanity_timeout}"
            "-ginkgo.no-color"
        )
        if ((split)); then
            sargs+=("-csi.controllerendpoint=unix://${ctrl_sock}")
        fi
        sargs+=("${extra_args[@]}")

        log "suite $name: $sanity ${sargs[*]}"
        local src=0
        # Run from the temp dir so stray relative paths land there. The outer
        # timeout is a safety net should ginkgo's own timeout not fire.
        # --foreground keeps csi-sanity in our process group so Ctrl-C reaches it.
        (cd "$tmp" && timeout --foreground --kill-after=30s "$(to_seconds "$sanity_timeout" 300)" \
            "$sanity" "${sargs[@]}") 2>&1 | tee "$out" || src=$?

        local res
        if res="$(parse_results "$out" "$junit")"; then
            read -r passed failed skipped <<<"$res"
            if ((src != 0 && failed == 0)); then
                problems+=("csi-sanity exited with status $src but reported no failed spec")
            fi
        else
            problems+=("no ginkgo summary found (csi-sanity exit status $src)")
        fi
        if ((failed > 0 || src != 0)); then
            show_log "$ctrl_log"
            [[ "$node_log" == "$ctrl_log" ]] || show_log "$node_log"
        fi
    else
        problems+=("driver did not start")
    fi

    # Stop the driver(s): node first, then controller.
    if [[ -n "$node_pid" && "$node_pid" != "$ctrl_pid" ]]; then
        stop_driver "$node_pid" "$node_sock" "$node_log" node ||
            problems+=("node driver did not shut down cleanly")
    fi
    if [[ -n "$ctrl_pid" ]]; then
        local ctrl_name=all
        ((split == 0)) || ctrl_name=controller
        stop_driver "$ctrl_pid" "$ctrl_sock" "$ctrl_log" "$ctrl_name" ||
            problems+=("$ctrl_name driver did not shut down cleanly")
    fi

    local leaks
    if ! leaks="$(check_leaks "$tmp" "$pool")"; then
        while IFS= read -r l; do log "suite $name: $l"; done <<<"$leaks"
        problems+=("leaked resources (cleaned up)")
    fi

    if [[ -n "$artifacts" ]]; then
        mkdir -p "$artifacts/$name"
        local f
        for f in "$tmp"/*.log "$out" "$junit"; do
            [[ -f "$f" ]] && cp -- "$f" "$artifacts/$name/"
        done
    fi

    local p
    for p in "${problems[@]}"; do
        printf 'csi-sanity %s: harness failure: %s\n' "$name" "$p"
        failed=$((failed + 1))
    done
    printf 'csi-sanity %s: %d passed, %d failed, %d skipped\n' "$name" "$passed" "$failed" "$skipped"

    total_passed=$((total_passed + passed))
    total_failed=$((total_failed + failed))
    total_skipped=$((total_skipped + skipped))
    if ((failed > 0)); then
        any_failure=1
    fi
}

# Convert a Go duration such as 20m, 1h, 90s, 1h30m to seconds and add $2.
# Falls back to 2 hours for anything it cannot parse.
to_seconds() {
    local d="$1" extra="$2" total=0 rest n unit
    rest="$d"
    while [[ "$rest" =~ ^([0-9]+)(h|m|s)(.*)$ ]]; do
        n="${BASH_REMATCH[1]}" unit="${BASH_REMATCH[2]}" rest="${BASH_REMATCH[3]}"
        case "$unit" in
            h) total=$((total + n * 3600)) ;;
            m) total=$((total + n * 60)) ;;
            s) total=$((total + n)) ;;
        esac
    done
    if [[ -n "$rest" || "$total" -eq 0 ]]; then
        total=7200
    fi
    printf '%d\n' $((total + extra))
}

# ---------------------------------------------------------------------------

cleanup() {
    local rc=$? pid dir
    trap - EXIT INT TERM
    # Drivers still listed were started and not yet reaped by stop_driver.
    for pid in "${driver_pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${driver_pids[@]}"; do
        local i
        for ((i = 0; i < 50; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for dir in "${tmp_dirs[@]}"; do
        [[ -d "$dir" ]] || continue
        cleanup_dir "$dir"
        if ((keep_tmp)); then
            log "kept $dir"
        elif [[ -n "$(mounts_under "$dir")" ]]; then
            log "warning: $dir still has mounts; not removing it"
        else
            rm -rf --one-file-system -- "$dir"
        fi
    done
    exit "$rc"
}

main() {
    while (($# > 0)); do
        case "$1" in
            --binary) (($# >= 2)) || die "--binary needs a path"; binary="$2"; shift 2 ;;
            --binary=*) binary="${1#*=}"; shift ;;
            --only) (($# >= 2)) || die "--only needs mount, block or split"; only="$2"; shift 2 ;;
            --only=*) only="${1#*=}"; shift ;;
            --artifacts) (($# >= 2)) || die "--artifacts needs a directory"; artifacts="$2"; shift 2 ;;
            --artifacts=*) artifacts="${1#*=}"; shift ;;
            --keep-tmp) keep_tmp=1; shift ;;
            -h | --help) usage; exit 0 ;;
            --) shift; extra_args=("$@"); break ;;
            *) usage >&2; die "unknown argument: $1" ;;
        esac
    done

    local -a suites=(mount block split)
    if [[ -n "$only" ]]; then
        case "$only" in
            mount | block | split) suites=("$only") ;;
            *) die "--only must be mount, block or split (got '$only')" ;;
        esac
    fi

    if ((EUID != 0)); then
        die "must run as root (the driver attaches loop devices and mounts filesystems); try: sudo $0 $*"
    fi
    [[ -x "$binary" ]] || die "driver binary $binary not found or not executable (build it first: cargo build --release)"
    binary="$(realpath -e "$binary")"
    if [[ -n "$artifacts" ]]; then
        mkdir -p "$artifacts"
        artifacts="$(realpath -e "$artifacts")"
    fi

    if [[ -n "${CSI_SANITY:-}" ]]; then
        sanity="$CSI_SANITY"
    else
        sanity="$("${script_dir}/install.sh" | tail -n 1)" || die "installing csi-sanity failed"
    fi
    [[ -x "$sanity" ]] || die "csi-sanity binary '$sanity' is not executable"

    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    local s
    for s in "${suites[@]}"; do
        run_suite "$s"
    done

    printf '%d passed, %d failed, %d skipped\n' "$total_passed" "$total_failed" "$total_skipped"
    return "$any_failure"
}

sanity=""
# Allow sourcing for tests: only run main when executed.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
