#!/usr/bin/env bash
# Records the fuzz seed corpus: real clients (nbdinfo, qemu-img, qemu-io, nbdcopy, nbd-client,
# nbdsh) talk to a real `umbra serve` through nbd-recorder.py, which keeps what each client sent
# (WRITE payloads cut short, snapshot GUIDs replaced by the fuzz catalog's) in Fuzz/Corpus/.
#   Scripts/fuzz/record-sessions.sh      replaces Fuzz/Corpus/ with fresh captures
# The daemon serves `disk` (64 MiB, like the fuzz catalog) and two snapshots of it; the newer one
# becomes `disk@00000000-0000-4000-8000-000000000001`, the older one ...-000000000000.
source "$(dirname "$0")/../interop/lib.sh"
requires nbdinfo nbdsh nbdcopy qemu-img qemu-io nbd-client python3

corpus=$repo_root/Fuzz/Corpus
older_id=00000000-0000-4000-8000-000000000000
newer_id=00000000-0000-4000-8000-000000000001

start_daemon --volume disk:64M --log-level warning
# Zero runs stay under 32 MiB: nbdcopy (libnbd 1.14) zeroes a run in one WRITE_ZEROES even past the
# advertised maximum block size, which umbra refuses (EINVAL).
random_file "$tmp/data.img" 64M 0:3M 20M:1M 40M:1M 63M:1M
nbdcopy "$tmp/data.img" "$(nbd_uri disk)"
older=$(snapshot_create disk)
nbdsh -u "$(nbd_uri disk)" -c 'h.pwrite(b"\xab" * 65536, 1 << 20); h.flush()'
newer=$(snapshot_create disk)

captures=$tmp/captures
mkdir "$captures"
exec {recorder_out}< <(exec python3 "$repo_root/Scripts/fuzz/nbd-recorder.py" "$UMBRA_SOCKET" "$captures" \
    --rename "$older=$older_id" --rename "$newer=$newer_id")
recorder_pid=$!
defer "kill $recorder_pid 2>/dev/null"
read -r -u "$recorder_out" _ port || fail "the recorder did not start"
uri=nbd://127.0.0.1:$port
say "recording through port $port"

record() {
    local label=$1
    shift
    echo "$label" >"$captures/label"
    "$@" >/dev/null || fail "$label: $* failed"
}
record nbdinfo nbdinfo "$uri/disk"
record nbdinfo-list nbdinfo --list "$uri"
record nbdinfo-map nbdinfo --map "$uri/disk"
record nbdinfo-map-dirty nbdinfo --map="qemu:dirty-bitmap:$older" "$uri/disk@$newer"
record qemu-img-info qemu-img info -f raw "$uri/disk"
record qemu-img-convert-read qemu-img convert -f raw -O raw "$uri/disk@$newer" "$tmp/out.img"
record qemu-img-convert-write qemu-img convert -n -f raw -O raw "$tmp/data.img" "$uri/disk"
record qemu-io qemu-io -f raw -c 'write -P 0xcd 4096 8k' -c 'read -P 0xcd 4096 8k' -c 'write -z 1M 64k' \
    -c 'discard 2M 64k' -c 'aio_write -P 1 0 4k' -c 'aio_flush' -c 'flush' "$uri/disk"
record nbdcopy-write nbdcopy "$tmp/data.img" "$uri/disk"
record nbdcopy-read nbdcopy "$uri/disk@$newer" null:
record nbd-client-list nbd-client -l 127.0.0.1 "$port"
record nbdsh nbdsh -c "
h.add_meta_context('base:allocation')
h.add_meta_context('qemu:dirty-bitmap:$older')
h.connect_uri('$uri/disk@$newer')
h.block_status(65536, 0, lambda *a: 0)
h.cache(4096, 0)
h.pread(4096, 1 << 20)
h.shutdown()"

kill -TERM "$recorder_pid"
wait "$recorder_pid" 2>/dev/null || true
rm -f "$captures/label"
rm -rf "$corpus"
mkdir -p "$corpus"
cp "$captures"/* "$corpus/"
say "$(find "$corpus" -type f | wc -l) sessions, $(du -sh "$corpus" | cut -f1) in Fuzz/Corpus"
stop_daemon
