# Shared by the interoperability tests: sourced, never run. Each test starts its own `umbra serve` on
# a fresh data directory in a temporary directory, talks to it with real NBD clients, and leaves
# nothing behind: every resource is registered with `defer` as it is made, and the EXIT trap undoes
# them last-made first (unmount before detaching the loop device, before stopping nbdfuse, before
# stopping the daemon, before removing the directory).
#
# Exit status: 0 passed, 1 failed, 77 skipped (automake's convention). A test skips only when the
# machine cannot provide something (FUSE, loop devices, the nbd kernel module); a missing tool is a
# failure, because CI installs every tool (Scripts/install-dependencies.sh).
#
# Environment: UMBRA (the binary; default .build/debug/umbra), UMBRA_INTEROP_KEEP=1 keeps the
# temporary directory of a failed test for a look at daemon.log.

set -euo pipefail

interop_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$interop_dir/../.." && pwd)
# shellcheck source=../env.sh
source "$repo_root/Scripts/env.sh"

UMBRA=${UMBRA:-$repo_root/.build/debug/umbra}
readonly SKIP_STATUS=77
# shellcheck disable=SC2034 # for the tests
readonly KiB=1024 MiB=$((1024 * 1024))
test_name=$(basename "$0" .sh)

# MARK: - Reporting

say() { printf '%s: %s\n' "$test_name" "$*"; }
check() { printf '%s: checking %s\n' "$test_name" "$*"; }
fail() {
    printf '%s: FAIL: %s\n' "$test_name" "$*" >&2
    exit 1
}
skip() {
    printf '%s: SKIP: %s\n' "$test_name" "$*" >&2
    note "whole test skipped" "$*"
    exit "$SKIP_STATUS"
}
# skip_part REASON: the test goes on but could not check everything; run-all.sh reports it.
skip_part() {
    printf '%s: SKIPPED PART: %s\n' "$test_name" "$*" >&2
    note "part skipped" "$*"
}
# known_issue TEXT...: a known defect that the test tolerates and run-all.sh reports loudly;
# with UMBRA_INTEROP_STRICT=1 it fails the test instead (to check a fix).
known_issue() {
    [ "${UMBRA_INTEROP_STRICT:-}" != 1 ] || fail "$* (UMBRA_INTEROP_STRICT=1)"
    printf '%s: KNOWN ISSUE: %s\n' "$test_name" "$*" >&2
    note "known issue" "$*"
}
# note KIND TEXT: one line for run-all.sh's summary.
note() {
    [ -z "${UMBRA_INTEROP_NOTES:-}" ] || printf '%s (%s): %s\n' "$test_name" "$1" "$2" >>"$UMBRA_INTEROP_NOTES"
}

# MARK: - Cleanup

cleanup_actions=()
defer() { cleanup_actions+=("$*"); }

run_cleanup() {
    local status=$? i
    trap - EXIT
    set +e
    for ((i = ${#cleanup_actions[@]} - 1; i >= 0; i--)); do
        eval "${cleanup_actions[i]}"
    done
    exit "$status"
}
trap run_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The test's temporary directory: short, because Unix socket paths are limited to 107 bytes.
tmp=$(mktemp -d /tmp/umbra-interop.XXXXXX)
remove_tmp() {
    local status=$1
    if [ "$status" -ne 0 ] && [ "$status" -ne "$SKIP_STATUS" ] && [ "${UMBRA_INTEROP_KEEP:-}" = 1 ]; then
        say "kept $tmp"
        return
    fi
    # --one-file-system: never reach into a FUSE mount that failed to go away.
    rm -rf --one-file-system "$tmp"
}
# shellcheck disable=SC2016 # expanded when the cleanup runs: the exit status
defer 'remove_tmp $status'
# Tools that leave files in the working directory (fio's verify state, for one) leave them here.
cd "$tmp"

# MARK: - Requirements

requires() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 ||
            fail "the tool '$tool' is missing (Scripts/install-dependencies.sh installs what the tests need)"
    done
}

# Skips unless FUSE works here: /dev/fuse exists and a 1 MiB nbdkit memory disk can be mounted.
requires_fuse() {
    requires nbdfuse fusermount3 nbdkit
    [ -c /dev/fuse ] || skip "FUSE is not available on this machine (no /dev/fuse)"
    local probe=$tmp/fuse-probe
    mkdir "$probe"
    if ! mount_nbdfuse -r "$probe/disk" --command nbdkit -s --exit-with-parent memory 1M \
        2>"$tmp/fuse-probe.log"; then
        skip "FUSE does not work on this machine: $(tr '\n' ' ' <"$tmp/fuse-probe.log")"
    fi
    unmount_nbdfuse "$probe"
}

# Skips unless a loop device can be attached here.
requires_loop() {
    requires losetup
    [ -e /dev/loop-control ] || skip "loop devices are not available on this machine (no /dev/loop-control)"
    local probe=$tmp/loop-probe.img device
    truncate -s 1M "$probe"
    device=$(losetup -f --show "$probe" 2>"$tmp/loop-probe.log") ||
        skip "loop devices do not work on this machine: $(tr '\n' ' ' <"$tmp/loop-probe.log")"
    losetup -d "$device"
    rm -f "$probe"
}

# MARK: - The daemon

# start_daemon [SERVE-ARGUMENT]...: runs `umbra serve` on $tmp/data (or $UMBRA_DATA), listening on $UMBRA_SOCKET
# (plus whatever --listen the arguments add), and returns once it prints its ready line. Sets
# UMBRA_PID, UMBRA_SOCKET, UMBRA_CONTROL (exported, so `umbra` commands find the daemon),
# UMBRA_READY (the ready line) and UMBRA_TCP_PORT (the first TCP port in it, if any).
start_daemon() {
    [ -x "$UMBRA" ] || fail "no umbra binary at $UMBRA (swift build --product umbra, or set UMBRA)"
    UMBRA_SOCKET=$tmp/nbd.sock
    export UMBRA_CONTROL=$tmp/control.sock
    rm -f "$tmp/ready"
    mkfifo "$tmp/ready"
    "$UMBRA" serve --data "${UMBRA_DATA:-$tmp/data}" --listen "unix:$UMBRA_SOCKET" --control "$UMBRA_CONTROL" "$@" \
        >"$tmp/ready" 2>>"$tmp/daemon.log" &
    UMBRA_PID=$!
    if [ -z "${daemon_cleanup_registered:-}" ]; then
        defer stop_daemon_quietly
        daemon_cleanup_registered=1
    fi
    # The daemon's stdout stays open here until it exits: then this descriptor reads end-of-file,
    # which is how stop_daemon knows it is gone without polling.
    exec {umbra_stdout}<"$tmp/ready"
    if ! read -r -t 120 -u "$umbra_stdout" UMBRA_READY; then
        sed 's/^/    daemon: /' "$tmp/daemon.log" >&2
        fail "umbra serve did not print its ready line"
    fi
    case $UMBRA_READY in
    "ready nbd="*" control=$UMBRA_CONTROL") ;;
    *) fail "unexpected ready line: $UMBRA_READY" ;;
    esac
    # shellcheck disable=SC2034 # for the tests
    UMBRA_TCP_PORT=$(sed -n 's/.*nbd=\([^ ]*,\)*tcp:\/\/[^ ,]*:\([0-9]*\).*/\2/p' <<<"$UMBRA_READY")
    say "daemon $UMBRA_PID: $UMBRA_READY"
}

# stop_daemon: SIGTERM, then waits for the daemon to exit and checks it exited 0.
stop_daemon() {
    local status=0
    kill -TERM "$UMBRA_PID"
    wait "$UMBRA_PID" || status=$?
    UMBRA_PID=
    exec {umbra_stdout}<&-
    [ "$status" -eq 0 ] || {
        sed 's/^/    daemon: /' "$tmp/daemon.log" >&2
        fail "umbra serve exited with status $status after SIGTERM"
    }
}

# For the EXIT trap: stops the daemon unless stop_daemon did (so the pid, not yet waited for, is
# still ours), SIGKILL if it takes over 30 seconds.
stop_daemon_quietly() {
    local pid=${UMBRA_PID:-} rest read_status=0
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    while :; do
        read -r -t 30 -u "$umbra_stdout" rest 2>/dev/null || {
            read_status=$?
            break
        }
    done
    if [ "$read_status" -le 128 ]; then
        wait "$pid" 2>/dev/null
    else
        say "the daemon did not stop within 30 s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    fi
    if [ "${status:-0}" -ne 0 ]; then
        say "daemon log (last 40 lines):"
        tail -n 40 "$tmp/daemon.log" | sed 's/^/    daemon: /'
    fi
}

umbra() { "$UMBRA" "$@"; }

# nbd_uri EXPORT: the NBD URI of an export on the daemon's Unix socket.
nbd_uri() { printf 'nbd+unix:///%s?socket=%s' "$1" "$UMBRA_SOCKET"; }

# snapshot_create VOLUME...: takes a crash-consistent set; prints the snapshot GUIDs, one a line,
# in the order of the volumes.
snapshot_create() {
    umbra snapshot create "$@" --no-writers --json >"$tmp/set.json"
    json "$tmp/set.json" '"\n".join(s["id"] for s in d["snapshots"])'
}

# MARK: - Data

# json FILE EXPRESSION: evaluates the Python expression with the document as `d`; prints the result.
json() {
    python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
r = eval(sys.argv[2])
print(json.dumps(r) if isinstance(r, (dict, list, bool)) or r is None else r)' "$1" "$2"
}

assert_eq() {
    local actual=$1 expected=$2 what=$3
    [ "$actual" = "$expected" ] || fail "$what: expected '$expected', got '$actual'"
}

assert_match() {
    local text=$1 pattern=$2 what=$3
    grep -Eq -- "$pattern" <<<"$text" || fail "$what: '$pattern' not found in: $text"
}

# checksum FILE-OR-URI: the SHA-256 of a file, or of an export's whole content.
checksum() {
    case $1 in
    nbd*://*) nbdcopy -- "$1" - | sha256sum | cut -d' ' -f1 ;;
    *) sha256sum <"$1" | cut -d' ' -f1 ;;
    esac
}

# random_file PATH SIZE [OFFSET:LENGTH]...: a sparse file of SIZE bytes with random data in the
# given ranges (sizes in bytes) and zeroes elsewhere.
random_file() {
    local path=$1 size=$2 range
    shift 2
    truncate -s "$size" "$path"
    for range in "$@"; do
        head -c "${range#*:}" /dev/urandom | dd of="$path" bs=64K seek="${range%:*}" oflag=seek_bytes \
            conv=notrunc status=none iflag=fullblock
    done
}

# ranges_from_map TYPE: reads `nbdinfo --map` lines (offset length type description) on stdin and
# prints the merged ranges of the given type as OFFSET:LENGTH, one a line.
ranges_from_map() {
    awk -v want="$1" '
        $3 == want {
            if (have && $1 == start + length_) { length_ += $2; next }
            if (have) print start ":" length_
            start = $1; length_ = $2; have = 1
        }
        END { if (have) print start ":" length_ }'
}

# MARK: - FUSE and loop devices

# mount_nbdfuse [-r] MOUNTPOINT/FILE SOURCE... : runs nbdfuse in the background (SOURCE is an NBD URI
# or nbdfuse's --command ...) and returns once FILE is there. nbdfuse writes its pid file when it
# is ready; here the pid file is a FIFO, so this waits without polling, and the subshell around
# nbdfuse writes "exited N" to the same FIFO when nbdfuse ends (first, if it fails). Registers the unmount.
mount_nbdfuse() {
    local options=() file mountpoint fifo result fd
    if [ "$1" = -r ]; then
        options+=(--readonly)
        shift
    fi
    file=$1
    mountpoint=$(dirname "$file")
    shift
    fifo=$(mktemp -u "$tmp/nbdfuse-ready.XXXXXX")
    mkfifo "$fifo"
    exec {fd}<>"$fifo"
    (
        status=0
        nbdfuse "${options[@]}" -P "$fifo" "$file" "$@" </dev/null || status=$?
        echo "exited $status" >&"$fd"
    ) &
    # nbdfuse writes its pid without a newline: one character is enough to tell the two apart.
    result=
    read -r -t 60 -n 1 -u "$fd" result || true
    if [ "$result" = e ]; then
        read -r -t 5 -u "$fd" result || true
        result="e$result"
    fi
    exec {fd}<&-
    rm -f "$fifo"
    case $result in
    [0-9]) ;;
    *)
        echo "nbdfuse did not mount $file (${result:-no answer in 60 s})" >&2
        return 1
        ;;
    esac
    defer unmount_nbdfuse "$mountpoint"
}

# unmount_nbdfuse MOUNTPOINT: unmounts (nbdfuse then exits by itself); idempotent.
unmount_nbdfuse() {
    mountpoint -q "$1" || return 0
    fusermount3 -u "$1" || fusermount3 -u -z "$1"
}

# attach_loop VARIABLE FILE [LOSETUP-OPTION]...: attaches FILE to a free loop device, stores the
# device in VARIABLE and registers its detach.
attach_loop() {
    local -n device_=$1
    local file=$2
    shift 2
    device_=$(losetup -f --show "$@" "$file")
    defer detach_loop "$device_" "'$(loop_backing "$device_")'"
}

# loop_backing DEVICE: the device number and inode of the file behind a loop device. Unlike its
# path, they stay the same when the FUSE mount holding the file goes away first.
loop_backing() { losetup -n -O BACK-MAJ:MIN,BACK-INO "$1" 2>/dev/null | tr -s ' ' | sed 's/^ //; s/ $//'; }

# detach_loop DEVICE BACKING: detaches DEVICE if it is still backed by the same file (after a
# detach, the number may already serve someone else); idempotent.
detach_loop() {
    [ -n "$2" ] && [ "$(loop_backing "$1")" = "$2" ] || return 0
    losetup -d "$1"
}

# mount_fs DEVICE MOUNTPOINT [MOUNT-OPTION]...: mounts and registers the unmount.
mount_fs() {
    local device=$1 mountpoint=$2
    shift 2
    mkdir -p "$mountpoint"
    mount "$@" "$device" "$mountpoint"
    defer "mountpoint -q $mountpoint && { umount $mountpoint || umount -l $mountpoint; }"
}
