#!/usr/bin/env bash
# A real ext4 filesystem on the live export (nbdfuse + losetup + mkfs.ext4 + mount): files written
# and checksummed, the filesystem frozen while a snapshot is taken, then files changed, deleted and
# added on the live filesystem. The snapshot export, attached read-only (nbdfuse --readonly,
# losetup -r, mount -o ro,noload), holds exactly the old files and passes fsck -n; the live one
# holds the new files and passes fsck -n after unmounting.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires nbdfuse losetup mkfs.ext4 fsck.ext4 mount umount fsfreeze sha256sum
requires_fuse
requires_loop

start_daemon --volume disk:64M
live_device='' snap_device=''

check "mkfs.ext4 and mount on the live export through nbdfuse and a loop device"
mkdir "$tmp/live-file" "$tmp/snap-file"
mount_nbdfuse "$tmp/live-file/disk" "$(nbd_uri disk)"
attach_loop live_device "$tmp/live-file/disk"
mkfs.ext4 -q -F -L umbra-interop "$live_device"
mount_fs "$live_device" "$tmp/live"
say "live filesystem: $live_device on $tmp/live"

check "files written on the live filesystem"
mkdir -p "$tmp/live/dir/nested"
head -c $((3 * MiB)) /dev/urandom >"$tmp/live/big.bin"
head -c 100 /dev/urandom >"$tmp/live/small.bin"
for i in $(seq 1 20); do head -c $((i * 1000)) /dev/urandom >"$tmp/live/dir/file-$i"; done
echo "kept as it was" >"$tmp/live/dir/nested/note.txt"
head -c $((1 * MiB)) /dev/urandom >"$tmp/live/to-delete.bin"
ln -s dir/nested/note.txt "$tmp/live/link"
(cd "$tmp/live" && find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 sha256sum) \
    >"$tmp/before.sha256"
(cd "$tmp/live" && find . -path ./lost+found -prune -o -print | sort) >"$tmp/before.list"
sync

check "snapshot of the frozen filesystem"
# Freezing flushes the journal to its home locations, so the snapshot needs no journal replay.
fsfreeze -f "$tmp/live"
snap=$(snapshot_create disk) || {
    fsfreeze -u "$tmp/live"
    fail "umbra snapshot create failed"
}
fsfreeze -u "$tmp/live"
say "snapshot $snap"

check "files changed, deleted and added on the live filesystem"
head -c $((2 * MiB)) /dev/urandom >"$tmp/live/big.bin"
echo "changed" >>"$tmp/live/dir/nested/note.txt"
rm "$tmp/live/to-delete.bin" "$tmp/live/dir/file-7"
head -c $((5 * MiB)) /dev/urandom >"$tmp/live/new.bin"
(cd "$tmp/live" && find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 sha256sum) \
    >"$tmp/after.sha256"
sync

check "the snapshot export attached read-only: nbdfuse --readonly, losetup -r, fsck -n, mount -o ro,noload"
mount_nbdfuse -r "$tmp/snap-file/disk" "$(nbd_uri "disk@$snap")"
attach_loop snap_device "$tmp/snap-file/disk" -r
fsck.ext4 -n -f "$snap_device" >"$tmp/fsck.out" 2>&1 || fail "fsck -n on the snapshot: $(cat "$tmp/fsck.out")"
say "fsck: $(tail -n1 "$tmp/fsck.out")"
mount_fs "$snap_device" "$tmp/snap" -o ro,noload

check "the snapshot holds exactly the old files"
(cd "$tmp/snap" && sha256sum --quiet -c "$tmp/before.sha256") || fail "a file in the snapshot differs"
(cd "$tmp/snap" && find . -path ./lost+found -prune -o -print | sort) >"$tmp/snap.list"
diff "$tmp/before.list" "$tmp/snap.list" || fail "the snapshot's file list differs from the one before"
[ ! -e "$tmp/snap/new.bin" ] || fail "the snapshot has a file created after it"
assert_eq "$(readlink "$tmp/snap/link")" dir/nested/note.txt "symbolic link in the snapshot"

check "the snapshot filesystem is read-only"
if touch "$tmp/snap/new-file" 2>/dev/null; then fail "could write to the snapshot's filesystem"; fi
if dd if=/dev/zero of="$snap_device" bs=4k count=1 conv=notrunc status=none 2>/dev/null; then
    fail "could write to the snapshot's loop device"
fi

check "the live filesystem holds the new files, and passes fsck -n once unmounted"
(cd "$tmp/live" && sha256sum --quiet -c "$tmp/after.sha256") || fail "a live file differs"
[ ! -e "$tmp/live/to-delete.bin" ] || fail "a deleted file is back on the live filesystem"
umount "$tmp/snap"
umount "$tmp/live"
fsck.ext4 -n -f "$live_device" >"$tmp/fsck.out" 2>&1 || fail "fsck -n on the live volume: $(cat "$tmp/fsck.out")"

check "detach and unmount cleanly"
losetup -d "$snap_device" "$live_device"
unmount_nbdfuse "$tmp/snap-file"
unmount_nbdfuse "$tmp/live-file"
stop_daemon
say "passed"
