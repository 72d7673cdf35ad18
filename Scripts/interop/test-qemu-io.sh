#!/usr/bin/env bash
# qemu-io against a real daemon: write -P, write -f (FUA), write -z, write -z -u, write -z -u -n
# (fast zero), discard, flush, and read -P verifying every pattern, on the live export; on a snapshot
# export the old patterns read back and every write is refused, by qemu-io and, with libnbd's
# client-side checks off, by the server itself with EPERM.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires qemu-io nbdsh nbdinfo

start_daemon --volume disk:16M
disk=$(nbd_uri disk)

# qemu_io URI COMMAND...: runs each command with -c; fails the test if qemu-io fails or a command's
# output says it failed (qemu-io's exit status reflects only some failures).
qemu_io() {
    local uri=$1 arguments=() command
    shift
    for command in "$@"; do arguments+=(-c "$command"); done
    qemu-io -f raw "$uri" "${arguments[@]}" >"$tmp/qemu-io.out" 2>&1 ||
        fail "qemu-io $*: $(cat "$tmp/qemu-io.out")"
    ! grep -Eiq 'fail|error|denied|not supported' "$tmp/qemu-io.out" ||
        fail "qemu-io $*: $(cat "$tmp/qemu-io.out")"
}

check "qemu-io write -P fills 0-8 MiB with 0x55"
qemu_io "$disk" 'write -P 0x55 0 8M' 'read -P 0x55 0 8M'

check "qemu-io write -P, write -f, write -z, -z -u, -z -u -n, discard, flush"
qemu_io "$disk" \
    'write -P 0xab 0 1M' \
    'write -f -P 0xcd 1M 64k' \
    'write -P 0xef 1200k 4k' \
    'write -z 2M 64k' \
    'write -z -u 3M 1M' \
    'write -z -u -n 4M 1M' \
    'write -z 5M 1k' \
    'discard 6M 1M' \
    'flush'

check "qemu-io read -P verifies every range"
qemu_io "$disk" \
    'read -P 0xab 0 1M' \
    'read -P 0xcd 1M 64k' \
    'read -P 0x55 1088k 112k' \
    'read -P 0xef 1200k 4k' \
    'read -P 0x55 1204k 844k' \
    'read -P 0 2M 64k' \
    'read -P 0x55 2112k 960k' \
    'read -P 0 3M 1M' \
    'read -P 0 4M 1M' \
    'read -P 0 5M 1k' \
    'read -P 0x55 5121k 1023k' \
    'read -P 0 6M 1M' \
    'read -P 0x55 7M 1M' \
    'read -P 0 8M 8M'

check "write -z -u, write -z -u -n and discard left holes; write -z (no unmap) kept the data allocated"
assert_eq "$(nbdinfo --map "$disk" | ranges_from_map 3 | tr '\n' ' ')" \
    "$((3 * MiB)):$((2 * MiB)) $((6 * MiB)):$((1 * MiB)) $((8 * MiB)):$((8 * MiB)) " "holes (base:allocation)"

check "a snapshot reads back the same patterns"
snap=$(snapshot_create disk)
snap_uri=$(nbd_uri "disk@$snap")
qemu_io "$disk" 'write -P 0x99 0 16M' 'flush'
qemu-io -r -f raw "$snap_uri" -c 'read -P 0xab 0 1M' -c 'read -P 0xcd 1M 64k' -c 'read -P 0xef 1200k 4k' \
    -c 'read -P 0 2M 64k' -c 'read -P 0 3M 2M' -c 'read -P 0x55 7M 1M' -c 'read -P 0 8M 8M' >"$tmp/qemu-io.out" 2>&1 ||
    fail "reading the snapshot: $(cat "$tmp/qemu-io.out")"
! grep -qi fail "$tmp/qemu-io.out" || fail "reading the snapshot: $(cat "$tmp/qemu-io.out")"
qemu_io "$disk" 'read -P 0x99 0 16M'

check "qemu-io cannot write, zero or discard on the snapshot export"
for command in 'write -P 0x11 0 64k' 'write -z 0 64k' 'discard 0 64k'; do
    if qemu-io -f raw "$snap_uri" -c "$command" >"$tmp/qemu-io.out" 2>&1 &&
        ! grep -Eiq 'fail|denied|read-only|read only' "$tmp/qemu-io.out"; then
        fail "qemu-io $command on the snapshot: $(cat "$tmp/qemu-io.out")"
    fi
done

check "the server itself refuses writes, zeroes and trims on the snapshot with EPERM"
nbdsh -u "$snap_uri" -c '
import errno
assert h.is_read_only()
h.set_strict_mode(0)
for name, request in [
    ("write", lambda: h.pwrite(b"\x11" * 65536, 0)),
    ("write-zeroes", lambda: h.zero(65536, 0)),
    ("trim", lambda: h.trim(65536, 0)),
]:
    try:
        request()
    except nbd.Error as error:
        assert error.errnum == errno.EPERM, "%s: %s" % (name, error)
    else:
        raise AssertionError(name + " on a snapshot succeeded")
assert h.pread(65536, 0) == b"\xab" * 65536
'

stop_daemon
say "passed"
