#!/usr/bin/env bash
# Runs a benchmark with its working files (base image, server files, nbdkit's overlay, the durable-write
# limit's file) on a fresh XFS file system with reflink, made on a loop device over a sparse image and
# removed afterwards. There Umbra's copy-on-write clones chunks instead of writing them.
#
#   Scripts/bench/on-xfs-reflink.sh [--size 8G] COMMAND [ARGS...]
#   e.g. Scripts/bench/on-xfs-reflink.sh /usr/bin/python3 Scripts/bench/cow-first-write.py -r 3
#
# Needs root (losetup, mount) and mkfs.xfs (xfsprogs; Scripts/install-dependencies.sh installs it).
# The benchmark scripts read the directory from UMBRA_BENCH_DIR.
set -euo pipefail
size=8G
if [ "${1:-}" = "--size" ]; then size=$2; shift 2; fi
[ $# -gt 0 ] || { echo "usage: Scripts/bench/on-xfs-reflink.sh [--size 8G] COMMAND [ARGS...]" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "on-xfs-reflink: needs root (losetup and mount)" >&2; exit 1; }
command -v mkfs.xfs >/dev/null || { echo "on-xfs-reflink: mkfs.xfs is missing (Scripts/install-dependencies.sh)" >&2; exit 1; }

base=$(mktemp -d "${TMPDIR:-/tmp}/umbra-bench-xfs-XXXXXX")
loop=""
cleanup() {
    mountpoint -q "$base/mnt" && umount "$base/mnt"
    [ -n "$loop" ] && losetup --detach "$loop"
    rm -rf "$base"
}
trap cleanup EXIT
truncate -s "$size" "$base/xfs.img"
mkfs.xfs -q -m reflink=1 "$base/xfs.img"
# Direct I/O to the image: a flush of the loop device then syncs only what XFS wrote, not every dirty
# page of the image in the page cache.
loop=$(losetup --find --show --direct-io=on "$base/xfs.img")
mkdir "$base/mnt"
mount "$loop" "$base/mnt"
echo "on-xfs-reflink: XFS with reflink on $loop ($size, backed by $base/xfs.img), mounted at $base/mnt" >&2
UMBRA_BENCH_DIR=$base/mnt "$@"
