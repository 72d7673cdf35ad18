#!/usr/bin/env bash
# Backups meet real tools and a real full disk. The backup directory is a small ext4 file system on a
# loop device. A first backup of a small volume fits; `qemu-img check` and `qemu-img compare` against
# the snapshot's export agree with it, and `backup verify` passes. A backup of a volume too big for
# what is left fails with a sentence saying the disk is full. After that failure: its set is aborted
# (no snapshot left), no half-written image remains, the manifest lists exactly what it listed before,
# and the earlier backup still verifies. A restore of the earlier image reads back byte for byte.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires mkfs.ext4 mount umount qemu-img nbdcopy python3
requires_loop

check "a 24 MiB ext4 file system on a loop device holds the backup directory"
truncate -s 24M "$tmp/fs.img"
mkfs.ext4 -q -F -E nodiscard "$tmp/fs.img"
attach_loop device "$tmp/fs.img"
mount_fs "$device" "$tmp/fs"
backups=$tmp/fs/backups
start_daemon --volume small:8M --volume big:64M
random_file "$tmp/small.img" $((8 * MiB)) 0:$((4 * MiB))
random_file "$tmp/big.img" $((64 * MiB)) 0:$((64 * MiB))
nbdcopy --flush "$tmp/small.img" "$(nbd_uri small)"
nbdcopy --flush "$tmp/big.img" "$(nbd_uri big)"

check "a backup that fits: qemu-img check and compare agree with it"
umbra backup small --to "$backups" --json >"$tmp/first.json"
image=$backups/$(json "$tmp/first.json" 'd["backups"][0]["file"]')
snapshot=$(json "$tmp/first.json" 'd["backups"][0]["snapshot"]')
qemu-img check "$image" >"$tmp/check.txt" || fail "qemu-img check: $(cat "$tmp/check.txt")"
qemu-img compare -f qcow2 -F raw "$image" "$(nbd_uri "small@$snapshot")" >/dev/null || fail "the image differs from its snapshot"
umbra backup verify "$backups" >/dev/null || fail "verify failed on a good backup"
cp "$backups/umbra-backups.json" "$tmp/manifest.before"

check "a backup that does not fit fails with a sentence and leaves nothing behind"
if umbra backup big --to "$backups" 2>"$tmp/full.err"; then
    fail "a 64 MiB backup fit in what was left of 24 MiB"
fi
say "the error: $(cat "$tmp/full.err")"
grep -q "No space left on device" "$tmp/full.err" && grep -q "is as it was before" "$tmp/full.err" || fail "the error does not say the disk is full: $(cat "$tmp/full.err")"
cmp -s "$backups/umbra-backups.json" "$tmp/manifest.before" || fail "the manifest changed"
leftovers=$(find "$backups/big" -type f 2>/dev/null | wc -l)
assert_eq "$leftovers" 0 "files left in the failed volume's folder"
assert_eq "$(umbra snapshot list big --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["snapshots"]))')" 0 \
    "snapshots of the failed backup's set"
umbra backup verify "$backups" >/dev/null || fail "the earlier backup no longer verifies"

check "the earlier image restores byte for byte"
umbra restore "$image" --volume restored >/dev/null
assert_eq "$(checksum "$(nbd_uri restored)")" "$(checksum "$tmp/small.img")" "the restored volume"
stop_daemon
