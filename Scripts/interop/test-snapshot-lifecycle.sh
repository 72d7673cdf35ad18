#!/usr/bin/env bash
# Snapshots over NBD through their life: a new snapshot's export is usable the moment
# `snapshot create` returns; deleting a snapshot (or its set) while clients are connected to it
# ends their requests (with ESHUTDOWN, or by closing the connection) and never returns wrong data,
# while the daemon keeps serving every other export;
# `snapshot changes` agrees with qemu:dirty-bitmap on the live export and on a newer snapshot;
# after a restart the same snapshots are served with the same content and change tracking.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires nbdsh nbdinfo nbdcopy python3 timeout

start_daemon --volume disk:32M --volume logs:8M
disk=$(nbd_uri disk)

check "a new snapshot's export serves its content as soon as snapshot create returns"
snaps=()
for pattern in 1 2 3; do
    nbdsh -u "$disk" -c "h.pwrite(bytes([$pattern]) * (1 << 20), $pattern << 20); h.flush()"
    live_sum=$(checksum "$disk")
    snaps+=("$(snapshot_create disk)")
    assert_eq "$(checksum "$(nbd_uri "disk@${snaps[-1]}")")" "$live_sum" "content of snapshot $pattern"
done

check "snapshot list --json names the three snapshots, oldest first, with their exports"
umbra snapshot list disk --json >"$tmp/list.json"
assert_eq "$(json "$tmp/list.json" '" ".join(s["id"] for s in d["snapshots"])')" "${snaps[*]}" "snapshot ids"
assert_eq "$(json "$tmp/list.json" '" ".join(s["export"] for s in d["snapshots"])')" \
    "disk@${snaps[0]} disk@${snaps[1]} disk@${snaps[2]}" "snapshot exports"

check "deleting a snapshot while clients use it: their requests fail, the others keep working"
doomed=${snaps[1]}
arguments=("$UMBRA" "$UMBRA_SOCKET" "$doomed" "${snaps[2]}" "$tmp/busy-outcome")
python3 - "${arguments[@]}" <<'PY' | sed "s/^/$test_name: /" || fail "see above"
import errno, subprocess, sys, time
import nbd

umbra, socket, doomed, survivor, outcome_file = sys.argv[1:6]


def connect(name):
    handle = nbd.NBD()
    handle.connect_uri("nbd+unix:///%s?socket=%s" % (name, socket))
    return handle


def describe(error):
    """ESHUTDOWN (the server said the export is going away), closed (the connection ended), or the error."""
    if error.errnum == errno.ESHUTDOWN:
        return "ESHUTDOWN"
    if error.errnum in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE) or "invalid state: DEAD" in error.string:
        return "closed"
    raise AssertionError("unexpected error from a deleted snapshot: %s" % error)


busy, idle, other, live = (connect(n) for n in ("disk@" + doomed, "disk@" + doomed, "disk@" + survivor, "disk"))
expected = bytes([2]) * (1 << 20)
assert busy.pread(1 << 20, 2 << 20) == expected
assert idle.pread(4096, 0) == bytes(4096)

# Delete while "busy" keeps 8 reads in flight: reads return the right data until they fail.
deleter = subprocess.Popen([umbra, "snapshot", "delete", doomed], stdout=subprocess.DEVNULL)
deadline = time.monotonic() + 20
outcomes = []
while not outcomes:
    buffers = [nbd.Buffer(1 << 20) for _ in range(8)]
    cookies = []
    try:
        for buffer in buffers:
            cookies.append(busy.aio_pread(buffer, 2 << 20))
        while busy.aio_in_flight() > 0:
            busy.poll(-1)
    except nbd.Error as error:
        outcomes.append(describe(error))
    for cookie, buffer in zip(cookies, buffers):
        try:
            if busy.aio_command_completed(cookie):
                assert buffer.to_bytearray() == expected, "a read returned wrong data while the snapshot was deleted"
        except nbd.Error as error:
            outcomes.append(describe(error))
    assert time.monotonic() < deadline, "the snapshot was still served 20 s after the delete"
assert deleter.wait(30) == 0, "umbra snapshot delete failed"
print("busy client (8 reads in flight): reads failed with " + ", ".join(sorted(set(outcomes))))
open(outcome_file, "w").write(" ".join(sorted(set(outcomes))))

# The idle client: its next request fails too (ESHUTDOWN, or the connection is closed already).
try:
    idle.pread(4096, 0)
except nbd.Error as error:
    print("idle client: its next read failed with " + describe(error))
else:
    raise AssertionError("a read from a deleted snapshot succeeded")

# Everything else is served as before, on the connections opened before and on new ones.
assert other.pread(1 << 20, 3 << 20) == bytes([3]) * (1 << 20)
assert live.pread(1 << 20, 1 << 20) == bytes([1]) * (1 << 20)
live.pwrite(b"\xff" * 4096, 0)
live.flush()
assert connect("disk").pread(4096, 0) == b"\xff" * 4096
assert connect("disk@" + survivor).pread(4096, 0) == bytes(4096)
PY
# The NBD spec asks for ESHUTDOWN on requests in flight and received during a shutdown: the
# server keeps the connection open answering ESHUTDOWN (for a grace period) rather than resetting
# requests the client had already pipelined.
case $(cat "$tmp/busy-outcome") in
*ESHUTDOWN*) ;;
*) fail "a client with reads in flight while its snapshot was deleted got $(cat "$tmp/busy-outcome"), not ESHUTDOWN" ;;
esac

check "the deleted snapshot's export is gone: not listed, not opened"
assert_eq "$(nbdinfo --list --json "$(nbd_uri "")" | json /dev/stdin \
    '" ".join(sorted(e["export-name"] for e in d["exports"]))')" \
    "$(printf '%s\n' disk "disk@${snaps[0]}" "disk@${snaps[2]}" logs | sort | tr '\n' ' ' | sed 's/ $//')" \
    "exports after the delete"
if nbdinfo "$(nbd_uri "disk@$doomed")" >/dev/null 2>&1; then fail "the deleted snapshot's export still opens"; fi

check "deleting a set by its GUID removes the export of each of its snapshots"
umbra snapshot create disk logs --no-writers --json >"$tmp/set.json"
set_id=$(json "$tmp/set.json" 'd["set"]')
set_exports=$(json "$tmp/set.json" '" ".join(s["export"] for s in d["snapshots"])')
for name in $set_exports; do nbdinfo --size "$(nbd_uri "$name")" >/dev/null; done
umbra snapshot delete "$set_id"
for name in $set_exports; do
    if nbdinfo "$(nbd_uri "$name")" >/dev/null 2>&1; then fail "export $name survived its set's deletion"; fi
done

check "snapshot changes agrees with qemu:dirty-bitmap (unaligned writes round out to whole chunks)"
since=${snaps[2]}
nbdsh -u "$disk" -c '
h.pwrite(b"\x10" * 100, 1000)
h.pwrite(b"\x11" * 70000, (5 << 20) + 300)
h.zero(1 << 20, 2 << 20)
h.trim(128 << 10, 3 << 20)
h.flush()
'
# changes_of ARGUMENTS...: `umbra snapshot changes --json` as OFFSET:LENGTH words.
changes_of() {
    umbra snapshot changes disk "$@" --json >"$tmp/changes.json"
    json "$tmp/changes.json" '" ".join("%d:%d" % (e["offset"], e["length"]) for e in d["extents"])'
}
dirty_of() { nbdinfo --map="qemu:dirty-bitmap:$1" "$2" | ranges_from_map 1 | tr '\n' ' ' | sed 's/ $//'; }
expected="0:$((64 * KiB)) $((2 * MiB)):$((1 * MiB + 128 * KiB)) $((5 * MiB)):$((128 * KiB))"
assert_eq "$(changes_of --since "$since")" "$expected" "snapshot changes --since"
assert_eq "$(dirty_of "$since" "$disk")" "$expected" "dirty bitmap on the live export"
assert_eq "$(json "$tmp/changes.json" 'd["chunkSize"]')" $((64 * KiB)) "chunk size"

check "snapshot changes --until agrees with the dirty bitmap on the newer snapshot's export"
newest=$(snapshot_create disk)
nbdsh -u "$disk" -c 'h.pwrite(b"\x20" * 4096, 30 << 20); h.flush()'
assert_eq "$(changes_of --since "$since" --until "$newest")" "$expected" "snapshot changes --until"
assert_eq "$(dirty_of "$since" "$(nbd_uri "disk@$newest")")" "$expected" "dirty bitmap on the newer snapshot"
assert_eq "$(changes_of --since "$newest")" "$((30 * MiB)):$((64 * KiB))" "changes since the newest"
assert_eq "$(dirty_of "$newest" "$disk")" "$((30 * MiB)):$((64 * KiB))" "dirty bitmap since the newest"
assert_eq "$(changes_of --since "${snaps[0]}" --until "$since")" \
    "$(dirty_of "${snaps[0]}" "$(nbd_uri "disk@$since")")" "changes between the first and third snapshots"

check "a second daemon on the same data directory is refused"
status=0
timeout 60 "$UMBRA" serve --data "$tmp/data" --listen "unix:$tmp/second.sock" --control "$tmp/second.ctl" \
    >"$tmp/second.out" 2>"$tmp/second.err" || status=$?
assert_eq "$status" 1 "exit status of the second daemon"
say "refused: $(head -n1 "$tmp/second.err")"

check "after a restart: the same snapshots, content and change tracking"
sums=()
for id in "${snaps[0]}" "$since" "$newest"; do sums+=("$(checksum "$(nbd_uri "disk@$id")")"); done
live_sum=$(checksum "$disk")
stop_daemon
start_daemon
i=0
for id in "${snaps[0]}" "$since" "$newest"; do
    assert_eq "$(checksum "$(nbd_uri "disk@$id")")" "${sums[i]}" "content of snapshot $id after the restart"
    i=$((i + 1))
done
assert_eq "$(checksum "$disk")" "$live_sum" "content of the live volume after the restart"
assert_eq "$(dirty_of "$since" "$(nbd_uri "disk@$newest")")" "$expected" "dirty bitmap after the restart"
assert_eq "$(dirty_of "$newest" "$disk")" "$((30 * MiB)):$((64 * KiB))" "live dirty bitmap after the restart"

stop_daemon
say "passed"
