#!/usr/bin/env bash
# Installs the Debian packages Umbra needs, as root or through sudo. Does nothing when they are all
# there already.
#   Scripts/install-dependencies.sh           what building and every test need (NBD clients and
#                                             servers, QEMU's tools, fio, FUSE, a Ceph monitor and OSD)
#   Scripts/install-dependencies.sh --build   only what building `umbra` needs (Scripts/serve.sh)
set -euo pipefail

build_packages=(
    libisal-dev                                    # ISA-L's CRC-32C: checksums of catalog batches and copies
    librbd-dev librados-dev                        # Ceph RBD volumes (umbra links librbd and librados)
)
packages=(
    "${build_packages[@]}"
    libnbd-dev libnbd-bin python3-libnbd nbdfuse   # libnbd: the Swift test client, nbdinfo, nbdcopy, nbdsh, nbdfuse
    nbdkit nbd-server nbd-client                   # peer servers (benchmarks) and nbd-client -l
    qemu-utils fio gcc                             # qemu-img, qemu-io, fio --ioengine=nbd; Scripts/bench/chunk-writes.c
    prometheus                                     # promtool: the metrics endpoint's text is checked with it
    e2fsprogs fuse3 util-linux                     # mkfs.ext4, fsck, filefrag, fusermount3, losetup
    xfsprogs                                       # mkfs.xfs: XFS with reflink, where copies are clones (tests, benchmarks)
    python3 python3-fusepy                         # the Python writer and nbdsh; Scripts/testing/faultfs.py
    openssl                                        # certificates made at test time (test-tls.sh)
    ceph-mon ceph-osd ceph-common                  # the single-node Ceph cluster of Scripts/ceph-cluster.sh (RBD tests)
    man-db systemd                                 # man and systemd-analyze (test-install.sh, the unit test)
)

if [ "${1:-}" = "--build" ]; then
    packages=("${build_packages[@]}")
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-dependencies: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
fi
echo "install-dependencies: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
