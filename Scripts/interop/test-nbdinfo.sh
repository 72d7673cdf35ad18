#!/usr/bin/env bash
# nbdinfo against a real daemon: --list, --json (size, read-only, meta contexts), --map on
# base:allocation (holes on a fresh volume, data where written) and --map=qemu:dirty-bitmap:GUID
# (exactly the chunks written since the snapshot, on the live export and on a newer snapshot).
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires nbdinfo nbdsh python3

start_daemon --volume disk:64M --volume other:16M
disk=$(nbd_uri disk)

check "nbdinfo --list shows every volume"
nbdinfo --list --json "$(nbd_uri "")" >"$tmp/list.json"
assert_eq "$(json "$tmp/list.json" '" ".join(sorted(e["export-name"] for e in d["exports"]))')" "disk other" \
    "exports listed"

check "nbdinfo --json on the live export: size, writable, base:allocation"
nbdinfo --json "$disk" >"$tmp/disk.json"
assert_eq "$(json "$tmp/disk.json" 'd["exports"][0]["export-size"]')" $((64 * MiB)) "size of disk"
assert_eq "$(json "$tmp/disk.json" 'd["exports"][0]["is_read_only"]')" false "disk is read-only"
assert_eq "$(json "$tmp/disk.json" 'd["exports"][0]["contexts"]')" '["base:allocation"]' "contexts of disk"
for flag in can_flush can_fua can_trim can_zero can_fast_zero can_multi_conn can_cache can_df; do
    assert_eq "$(json "$tmp/disk.json" "d['exports'][0]['$flag']")" true "$flag on disk"
done
assert_eq "$(json "$tmp/disk.json" 'd["structured"]')" true "structured replies"

check "the empty export name is the first volume by name (disk)"
assert_eq "$(nbdinfo --size "$(nbd_uri "")")" $((64 * MiB)) "size of the default export"

check "nbdinfo --map on a fresh volume: one hole"
assert_eq "$(nbdinfo --map "$disk" | ranges_from_map 3)" "0:$((64 * MiB))" "holes on a fresh volume"

check "nbdinfo --map after writes: data exactly where written"
nbdsh -u "$disk" -c '
h.pwrite(b"\xa5" * 65536, 1048576)
h.pwrite(b"\x5a" * 131072, 8388608)
h.flush()
'
assert_eq "$(nbdinfo --map "$disk" | ranges_from_map 0 | tr '\n' ' ')" \
    "$((1 * MiB)):$((64 * KiB)) $((8 * MiB)):$((128 * KiB)) " "data extents"

check "a snapshot: read-only, same size, base:allocation only, its own map"
first=$(snapshot_create disk)
nbdinfo --json "$(nbd_uri "disk@$first")" >"$tmp/first.json"
assert_eq "$(json "$tmp/first.json" 'd["exports"][0]["export-name"]')" "disk@$first" "export name"
assert_eq "$(json "$tmp/first.json" 'd["exports"][0]["is_read_only"]')" true "snapshot is read-only"
assert_eq "$(json "$tmp/first.json" 'd["exports"][0]["export-size"]')" $((64 * MiB)) "size of the snapshot"
assert_eq "$(json "$tmp/first.json" 'd["exports"][0]["contexts"]')" '["base:allocation"]' "contexts of the snapshot"
nbdinfo --is read-only "$(nbd_uri "disk@$first")" || fail "nbdinfo --is read-only says the snapshot is writable"
assert_eq "$(nbdinfo --map "$(nbd_uri "disk@$first")" | ranges_from_map 0 | tr '\n' ' ')" \
    "$((1 * MiB)):$((64 * KiB)) $((8 * MiB)):$((128 * KiB)) " "data extents of the snapshot"

check "the live export now offers qemu:dirty-bitmap:$first"
assert_eq "$(nbdinfo --json "$disk" | json /dev/stdin 'd["exports"][0]["contexts"]')" \
    "[\"base:allocation\", \"qemu:dirty-bitmap:$first\"]" "contexts of disk"

check "nbdinfo --list shows the snapshot, read-only"
nbdinfo --list --json "$(nbd_uri "")" >"$tmp/list.json"
assert_eq "$(json "$tmp/list.json" '" ".join(sorted(e["export-name"] for e in d["exports"]))')" \
    "disk disk@$first other" "exports listed"
assert_eq "$(json "$tmp/list.json" \
    '[e["is_read_only"] for e in d["exports"] if e["export-name"] == "disk@'"$first"'"]')" "[true]" \
    "snapshot listed read-only"

check "nbdinfo --map=qemu:dirty-bitmap: clean before any write, then exactly the chunks written"
assert_eq "$(nbdinfo --map="qemu:dirty-bitmap:$first" "$disk" | ranges_from_map 1)" "" \
    "dirty ranges right after the snapshot"
# Chunk-aligned writes (64 KiB chunks), a rewrite of an already dirty chunk, zeroes over data.
nbdsh -u "$disk" -c '
h.pwrite(b"\x01" * 65536, 0)
h.pwrite(b"\x02" * 196608, 4194304)
h.pwrite(b"\x03" * 65536, 4194304)
h.zero(65536, 8454144)
h.flush()
'
expected="0:$((64 * KiB)) $((4 * MiB)):$((192 * KiB)) $((8 * MiB + 64 * KiB)):$((64 * KiB)) "
assert_eq "$(nbdinfo --map="qemu:dirty-bitmap:$first" "$disk" | ranges_from_map 1 | tr '\n' ' ')" \
    "$expected" "dirty ranges on the live export"
nbdinfo --map="qemu:dirty-bitmap:$first" "$disk" | awk '$3 == 1 && $4 != "dirty" { exit 1 }' ||
    fail "nbdinfo does not describe type 1 as dirty"

check "a second snapshot offers qemu:dirty-bitmap:$first with the same ranges"
second=$(snapshot_create disk)
nbdinfo --json "$(nbd_uri "disk@$second")" >"$tmp/second.json"
assert_eq "$(json "$tmp/second.json" 'd["exports"][0]["contexts"]')" \
    "[\"base:allocation\", \"qemu:dirty-bitmap:$first\"]" "contexts of the second snapshot"
assert_eq "$(nbdinfo --map="qemu:dirty-bitmap:$first" "$(nbd_uri "disk@$second")" | ranges_from_map 1 |
    tr '\n' ' ')" "$expected" "dirty ranges between the snapshots"
assert_eq "$(nbdinfo --map="qemu:dirty-bitmap:$second" "$disk" | ranges_from_map 1)" "" \
    "dirty ranges since the second snapshot"

check "an unknown export is refused"
if nbdinfo "$(nbd_uri nosuch)" >/dev/null 2>"$tmp/err"; then fail "nbdinfo opened an export that does not exist"; fi

stop_daemon
say "passed"
