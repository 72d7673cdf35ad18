#!/usr/bin/env bash
# nbdcopy both ways against a real daemon, checked with SHA-256: a file into the live export, the
# live export out to a file, a snapshot export out to a file (and to a pipe) after the live volume
# changed; multi-connection (nbdcopy's default) and single-connection copies; a copy into a
# snapshot export is refused.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires nbdcopy nbdinfo sha256sum

start_daemon --volume disk:48M
disk=$(nbd_uri disk)

random_file "$tmp/first.raw" $((48 * MiB)) 0:$((5 * MiB)) $((12 * MiB + 4 * KiB)):$((3 * MiB + 100)) \
    $((47 * MiB)):$((1 * MiB))
random_file "$tmp/second.raw" $((48 * MiB)) $((2 * MiB)):$((20 * MiB)) $((40 * MiB)):$((512 * KiB))
first_sum=$(checksum "$tmp/first.raw")
second_sum=$(checksum "$tmp/second.raw")

check "nbdcopy file -> live export, then live export -> file: same SHA-256"
nbdcopy --flush "$tmp/first.raw" "$disk"
nbdcopy "$disk" "$tmp/out.raw"
assert_eq "$(checksum "$tmp/out.raw")" "$first_sum" "SHA-256 of the copy out"
assert_eq "$(nbdinfo --size "$disk")" $((48 * MiB)) "size after the copy"

check "a snapshot; the live volume is overwritten with another file (one connection)"
snap=$(snapshot_create disk)
nbdcopy --connections=1 --flush "$tmp/second.raw" "$disk"

check "nbdcopy snapshot export -> file holds the first file; live export -> pipe holds the second"
nbdcopy "$(nbd_uri "disk@$snap")" "$tmp/snap.raw"
assert_eq "$(checksum "$tmp/snap.raw")" "$first_sum" "SHA-256 of the snapshot copied out"
assert_eq "$(nbdcopy "$disk" - | sha256sum | cut -d' ' -f1)" "$second_sum" "SHA-256 of the live volume"

check "nbdcopy snapshot export -> pipe with several requests in flight"
assert_eq "$(nbdcopy --requests=16 --request-size=$((256 * KiB)) "$(nbd_uri "disk@$snap")" - |
    sha256sum | cut -d' ' -f1)" "$first_sum" "SHA-256 of the snapshot through a pipe"

check "nbdcopy snapshot export -> live export restores the live volume"
nbdcopy --flush "$(nbd_uri "disk@$snap")" "$disk"
assert_eq "$(checksum "$disk")" "$first_sum" "SHA-256 of the restored volume"

check "nbdcopy into a snapshot export is refused"
if nbdcopy "$tmp/second.raw" "$(nbd_uri "disk@$snap")" 2>"$tmp/err"; then fail "nbdcopy wrote into a snapshot"; fi
say "refused: $(head -n1 "$tmp/err")"
assert_eq "$(checksum "$(nbd_uri "disk@$snap")")" "$first_sum" "SHA-256 of the snapshot after the refused copy"

stop_daemon
say "passed"
