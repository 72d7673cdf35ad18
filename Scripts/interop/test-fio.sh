#!/usr/bin/env bash
# fio's nbd engine against a real daemon on the Unix socket, with crc32c verification: a sequential
# and a random write job over 64 MiB of the live export, each read back and verified; then a
# snapshot, the live volume overwritten, and the snapshot export verified (--verify_only) to still
# hold what the random job wrote, while the same verification fails on the live volume.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires fio

start_daemon --volume disk:64M
disk=$(nbd_uri disk)

# run_fio NAME URI FIO-OPTION...: fails the test with fio's output if fio fails.
run_fio() {
    local name=$1 uri=$2
    shift 2
    fio --name="$name" --ioengine=nbd --uri="$uri" --size=64M --verify=crc32c --verify_fatal=1 \
        --verify_state_save=0 --output="$tmp/$name.out" "$@" || fail "fio $name: $(cat "$tmp/$name.out")"
    grep -q "err= 0" "$tmp/$name.out" || fail "fio $name reported an error: $(cat "$tmp/$name.out")"
}

check "fio sequential write, 1 MiB blocks, queue depth 8, verified with crc32c"
run_fio sequential "$disk" --rw=write --bs=1M --iodepth=8

check "fio random write, 4 KiB blocks, queue depth 32, verified with crc32c"
run_fio random "$disk" --rw=randwrite --bs=4k --iodepth=32 --randseed=42

check "a snapshot; fio overwrites the live volume; the snapshot still verifies"
snap=$(snapshot_create disk)
run_fio overwrite "$disk" --rw=write --bs=256k --iodepth=4 --verify_pattern=0x5a5a5a5a --verify=pattern
run_fio random-snapshot "$(nbd_uri "disk@$snap")" --rw=randwrite --bs=4k --iodepth=32 --randseed=42 \
    --verify_only

check "the same verification fails on the overwritten live volume (the check has teeth)"
if fio --name=negative --ioengine=nbd --uri="$disk" --size=64M --rw=randwrite --bs=4k --iodepth=32 --randseed=42 \
    --verify=crc32c --verify_only --verify_fatal=1 --verify_state_save=0 --output="$tmp/negative.out" \
    2>/dev/null; then
    fail "fio verified the snapshot's data on the overwritten live volume: $(cat "$tmp/negative.out")"
fi

for job in sequential random overwrite random-snapshot; do
    say "fio $job: $(grep -E '^ +(READ|WRITE):' "$tmp/$job.out" | sed 's/^ *\([A-Z]*\): bw=\([^ ]*\).*/\1 \2/' |
        tr '\n' ' ')"
done
stop_daemon
say "passed"
