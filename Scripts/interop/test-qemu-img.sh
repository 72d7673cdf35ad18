#!/usr/bin/env bash
# qemu-img against a real daemon: info on the live and snapshot exports, convert (a file into the
# live export, an export out to qcow2 and raw, and a qcow2 copy back in), compare (a snapshot
# against a copy taken before the volume changed, and the changed volume against it), and map
# (data exactly where written).
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires qemu-img qemu-io python3

start_daemon --volume disk:32M
disk=$(nbd_uri disk)

check "qemu-img info: raw, 32 MiB, on the live export"
qemu-img info --output=json "$disk" >"$tmp/info.json"
assert_eq "$(json "$tmp/info.json" 'd["virtual-size"]')" $((32 * MiB)) "virtual size"
assert_eq "$(json "$tmp/info.json" 'd["format"]')" raw "format"

check "qemu-img convert: a file into the live export, then compare says they are identical"
random_file "$tmp/seed.raw" $((32 * MiB)) $((1 * MiB)):$((3 * MiB)) $((16 * MiB)):$((256 * KiB)) \
    $((31 * MiB)):$((1 * MiB))
qemu-img convert -n -f raw -O raw "$tmp/seed.raw" "$disk"
qemu-img compare -f raw -F raw "$tmp/seed.raw" "$disk" >/dev/null || fail "the export differs from the file"

check "qemu-img convert: the live export out to qcow2 (the copy before changes)"
qemu-img convert -f raw -O qcow2 "$disk" "$tmp/before.qcow2"
qemu-img check -q "$tmp/before.qcow2"

check "a snapshot; qemu-img info on it"
snap=$(snapshot_create disk)
snap_uri=$(nbd_uri "disk@$snap")
qemu-img info --output=json "$snap_uri" >"$tmp/info.json"
assert_eq "$(json "$tmp/info.json" 'd["virtual-size"]')" $((32 * MiB)) "virtual size of the snapshot"

check "qemu-img map on the snapshot: data exactly where the file had data"
qemu-img map --output=json -f raw "$snap_uri" >"$tmp/map.json"
assert_eq "$(json "$tmp/map.json" '" ".join("%d:%d" % (e["start"], e["length"]) for e in d if e["data"])')" \
    "$((1 * MiB)):$((3 * MiB)) $((16 * MiB)):$((256 * KiB)) $((31 * MiB)):$((1 * MiB))" "data extents"
assert_eq "$(json "$tmp/map.json" 'all(e["zero"] for e in d if not e["data"])')" true "holes read as zeroes"

check "the live volume changes; the snapshot still compares identical to the copy before"
qemu-io -f raw "$disk" -c 'write -P 0x77 2M 64k' -c 'write -z 16M 256k' -c 'write -P 0x78 20M 1M' \
    -c 'discard 31M 1M' -c flush >/dev/null
qemu-img compare -f raw -F qcow2 "$snap_uri" "$tmp/before.qcow2" >/dev/null ||
    fail "the snapshot differs from the copy taken before the changes"
status=0
qemu-img compare -f raw -F qcow2 "$disk" "$tmp/before.qcow2" >"$tmp/compare.out" || status=$?
assert_eq "$status" 1 "qemu-img compare status for the changed volume"
assert_match "$(cat "$tmp/compare.out")" "Content mismatch at offset $((2 * MiB))!" "first difference"

check "qemu-img map on the live export follows the changes (zeroed and discarded ranges are holes)"
qemu-img map --output=json -f raw "$disk" >"$tmp/map.json"
assert_eq "$(json "$tmp/map.json" '" ".join("%d:%d" % (e["start"], e["length"]) for e in d if e["data"])')" \
    "$((1 * MiB)):$((3 * MiB)) $((20 * MiB)):$((1 * MiB))" "data extents of the live volume"

check "qemu-img convert: the snapshot out to raw equals the seed file, sparse"
qemu-img convert -f raw -O raw "$snap_uri" "$tmp/snap.raw"
cmp "$tmp/seed.raw" "$tmp/snap.raw" || fail "the raw copy of the snapshot differs from the seed"
allocated=$(($(stat -c %b "$tmp/snap.raw") * 512))
[ "$allocated" -le $((6 * MiB)) ] || fail "the raw copy is not sparse ($allocated bytes allocated)"

check "qemu-img convert: the qcow2 copy back into the live export restores it"
qemu-img convert -n -f qcow2 -O raw "$tmp/before.qcow2" "$disk"
qemu-img compare -f raw -F raw "$snap_uri" "$disk" >/dev/null || fail "the restored volume differs from the snapshot"

check "qemu-img convert into the snapshot export is refused"
if qemu-img convert -n -f raw -O raw "$tmp/seed.raw" "$snap_uri" 2>"$tmp/err"; then
    fail "qemu-img wrote into a snapshot"
fi
say "refused: $(head -n1 "$tmp/err")"

stop_daemon
say "passed"
