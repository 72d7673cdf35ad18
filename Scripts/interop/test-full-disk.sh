#!/usr/bin/env bash
# A full disk for real: the data directory on a small ext4 file system (a loop device), with a volume
# whose copies cannot all fit. The daemon stays up; a write that cannot be preserved gets ENOSPC,
# never a hang; every write acknowledged and flushed is intact; the snapshot reads exactly what it
# held; freeing space (a file removed, the snapshot deleted) makes writes work again without a
# restart. A second volume with --diff-limit and delete-oldest meets the same full file system:
# its policy deletes its snapshot and the write goes through. Space runs out once: the log says so
# once, not per write.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires mkfs.ext4 mount umount df fallocate nbdcopy python3 timeout
requires_loop

check "a 160 MiB ext4 file system on a loop device holds the data directory"
truncate -s 160M "$tmp/fs.img"
mkfs.ext4 -q -F -E nodiscard "$tmp/fs.img"
attach_loop device "$tmp/fs.img"
mount_fs "$device" "$tmp/fs"
UMBRA_DATA=$tmp/fs/data
start_daemon --volume disk:48M
umbra volume create pol --size 8M --diff-limit 64M --when-full delete-oldest >/dev/null
disk=$(nbd_uri disk)
pol=$(nbd_uri pol)

random_file "$tmp/old.img" $((48 * MiB)) 0:$((48 * MiB))
random_file "$tmp/new.img" $((48 * MiB)) 0:$((48 * MiB))
random_file "$tmp/pol.img" $((8 * MiB)) 0:$((8 * MiB))
nbdcopy --flush "$tmp/old.img" "$disk"
nbdcopy --flush "$tmp/pol.img" "$pol"
set_id=$(umbra snapshot create disk pol --no-writers --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["set"])')
umbra snapshot list --json >"$tmp/list.json"
snap=$(json "$tmp/list.json" '[s["id"] for s in d["snapshots"] if s["volume"] == "disk"][0]')
pol_snap=$(json "$tmp/list.json" '[s["id"] for s in d["snapshots"] if s["volume"] == "pol"][0]')
old_sum=$(checksum "$tmp/old.img")

# Leave room for about 16 MiB of copies: the other 32 MiB of the overwrite cannot be preserved.
avail=$(df --output=avail -B1M "$tmp/fs" | tail -1)
fallocate -l $(((avail - 16) * MiB)) "$tmp/fs/ballast"
say "free space for copies: $(df --output=avail -B1M "$tmp/fs" | tail -1) MiB"

# write_mib URI FILE FIRST COUNT: writes MiB FIRST… of FILE, each followed by a flush, until one
# fails; prints "WRITTEN ERRNO" (ERRNO is libnbd's name for it, such as ENOSPC; 0 when all went through).
write_mib() {
    timeout 120 /usr/bin/python3 - "$@" <<'EOF'
import errno, nbd, sys
uri, path, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
mib = 1 << 20
h = nbd.NBD()
h.connect_uri(uri)
data = open(path, "rb").read()
written, failure = 0, 0
for i in range(first, first + count):
    try:
        h.pwrite(data[i * mib:(i + 1) * mib], i * mib)
        h.flush()
    except nbd.Error as e:
        failure = e.errno or -1
        break
    written += 1
print(written, failure)
EOF
}

check "overwriting the volume: writes go through while copies fit, then fail with ENOSPC"
read -r written failure < <(write_mib "$disk" "$tmp/new.img" 0 48)
say "$written MiB written before the file system was full (errno $failure)"
assert_eq "$failure" ENOSPC "the error of the write that did not fit"
[ "$written" -ge 4 ] && [ "$written" -lt 48 ] || fail "expected the disk to fill part way, got $written MiB"

check "the daemon is up, the snapshot is listed ready and reads exactly what it held"
kill -0 "$UMBRA_PID" || fail "the daemon died"
umbra snapshot list disk --json >"$tmp/list.json"
assert_eq "$(json "$tmp/list.json" '[s["state"] for s in d["snapshots"]]')" '["ready"]' "snapshot state"
assert_eq "$(checksum "$(nbd_uri "disk@$snap")")" "$old_sum" "snapshot content on a full disk"

check "the live volume holds every acknowledged and flushed write, and the old data after them"
nbdcopy "$disk" "$tmp/live.img"
cmp -n $((written * MiB)) "$tmp/live.img" "$tmp/new.img" || fail "acknowledged writes are not intact"
cmp -i $((written * MiB)) "$tmp/live.img" "$tmp/old.img" || fail "data after the failed write changed"

check "delete-oldest on a full file system deletes that volume's snapshot and the write goes through"
read -r pol_written pol_failure < <(write_mib "$pol" "$tmp/new.img" 0 8)
assert_eq "$pol_written $pol_failure" "8 0" "writes to the volume with a diff limit"
umbra snapshot list --json >"$tmp/list.json"
assert_eq "$(json "$tmp/list.json" '[s["id"] for s in d["snapshots"]]')" "[\"$snap\"]" "snapshots left"
assert_eq "$(checksum "$(nbd_uri "disk@$snap")")" "$old_sum" "the other volume's snapshot"

check "space freed by removing a file: copies work again, without a restart"
rm "$tmp/fs/ballast"
read -r more failure < <(write_mib "$disk" "$tmp/new.img" "$written" 4)
assert_eq "$more $failure" "4 0" "writes after space was freed"
written=$((written + more))
assert_eq "$(checksum "$(nbd_uri "disk@$snap")")" "$old_sum" "snapshot content after more copies"

check "deleting the snapshot frees its copies; the rest of the overwrite goes through"
umbra snapshot delete "$set_id" >/dev/null
read -r more failure < <(write_mib "$disk" "$tmp/new.img" "$written" $((48 - written)))
assert_eq "$more $failure" "$((48 - written)) 0" "the rest of the overwrite"
assert_eq "$(checksum "$disk")" "$(checksum "$tmp/new.img")" "the live volume"
snap=$(snapshot_create disk)
nbdsh -u "$disk" -c "h.pwrite(b'x' * (1 << 20), 0); h.flush()"
assert_eq "$(checksum "$(nbd_uri "disk@$snap")")" "$(checksum "$tmp/new.img")" "a new snapshot after the disk was full"

check "running out of space was logged once, as a warning"
warnings=$(grep -c "no space left for the diff store" "$tmp/daemon.log" || true)
[ "$warnings" -ge 1 ] && [ "$warnings" -le 2 ] || fail "expected one or two warnings, found $warnings"
stop_daemon
