#!/usr/bin/env bash
# nbd-client (the kernel NBD client's user-space half) against a real daemon on TCP (a port the
# kernel picks, read from the ready line) and on the Unix socket: -l lists the live and snapshot
# exports with their descriptions. Where the kernel has the nbd module, the snapshot is also attached
# read-only (nbd-client -N VOLUME@GUID ... -readonly), read and checksummed, and detached.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires nbd-client nbdcopy sha256sum

start_daemon --listen tcp://127.0.0.1:0 --volume disk:16M --volume other:8M
case $UMBRA_TCP_PORT in
"" | 0) fail "no TCP port in the ready line: $UMBRA_READY" ;;
esac
say "TCP port $UMBRA_TCP_PORT"
head -c $((2 * MiB)) /dev/urandom | nbdcopy --flush - "$(nbd_uri disk)"
snap=$(snapshot_create disk)

# list_exports ARGUMENT...: nbd-client -l's export names ("NAME: DESCRIPTION" lines), sorted, on one line.
list_exports() {
    nbd-client "$@" >"$tmp/list.out" 2>&1 || fail "nbd-client $*: $(cat "$tmp/list.out")"
    grep -v '^Negotiation:' "$tmp/list.out" | sed '/^$/d; s/: .*//' | sort | tr '\n' ' ' | sed 's/ $//'
}

check "nbd-client -l 127.0.0.1 PORT lists the volumes and the snapshot"
assert_eq "$(list_exports -l 127.0.0.1 "$UMBRA_TCP_PORT")" "disk disk@$snap other" "exports listed"
assert_match "$(cat "$tmp/list.out")" "^disk@$snap: Umbra snapshot of disk taken " "the snapshot's description"

check "nbd-client -unix SOCKET -l lists the same over the Unix socket"
assert_eq "$(list_exports -unix "$UMBRA_SOCKET" -l)" "disk disk@$snap other" "exports listed on the Unix socket"

check "nbd-client -l follows a deleted snapshot"
umbra snapshot delete "$snap" >/dev/null
assert_eq "$(list_exports -l 127.0.0.1 "$UMBRA_TCP_PORT")" "disk other" "exports listed after the delete"
snap=$(snapshot_create disk)

check "attaching the snapshot with the kernel client (nbd-client -N disk@GUID ... -readonly)"
if [ ! -e /sys/module/nbd ] || [ ! -b /dev/nbd0 ]; then
    skip_part "this kernel has no nbd module (no /sys/module/nbd or /dev/nbd0): the attach was not run"
else
    device=
    for candidate in /dev/nbd*; do
        [[ $candidate =~ ^/dev/nbd[0-9]+$ ]] || continue
        [ "$(cat "/sys/block/${candidate#/dev/}/size")" = 0 ] && device=$candidate && break
    done
    [ -n "$device" ] || skip_part "every /dev/nbd device is in use"
    if [ -n "$device" ]; then
        nbd-client -N "disk@$snap" 127.0.0.1 "$UMBRA_TCP_PORT" "$device" -readonly
        defer "nbd-client -d $device >/dev/null 2>&1"
        assert_eq "$(blockdev --getsize64 "$device")" $((16 * MiB)) "size of $device"
        assert_eq "$(checksum "$device")" "$(checksum "$(nbd_uri "disk@$snap")")" "content of $device"
        nbd-client -d "$device"
    fi
fi

stop_daemon
say "passed"
