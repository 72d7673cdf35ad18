#!/usr/bin/env bash
# How late Abort reaches a frozen writer when a set overruns its freeze window because the disk is
# slow, on a loaded machine. Runs the DeadlineTests process test (the daemon on Scripts/testing/
# faultfs.py, a set stuck behind a copy-on-write sync of 8 s with a 1 s window)
# ROUNDS times while LOAD busy loops and a writer of dirty pages keep both cores and the disk busy,
# and prints each round's slack (Abort received minus the window) and the load average.
#   Scripts/bench/freeze-deadline.sh [ROUNDS] [LOAD]      defaults: 5 rounds, 16 busy loops
set -euo pipefail
cd "$(dirname "$0")/../.."
source Scripts/env.sh
rounds=${1:-5}
load=${2:-16}
swift build --build-tests >/dev/null
scratch=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT
for _ in $(seq "$load"); do
    (while :; do :; done) &
    pids+=($!)
done
(while :; do dd if=/dev/zero of="$scratch/dirty" bs=1M count=256 conv=fdatasync status=none; done) &
pids+=($!)
sleep 5
echo "load: $load busy loops and a 256 MiB fdatasync'ed writer; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$rounds"); do
    line=$(swift test --skip-build --filter DeadlineTests 2>&1 | grep -o 'aborted .* slack .*' || echo "no result (the test failed)")
    echo "round $round: $line; load average $(cut -d' ' -f1 /proc/loadavg)"
done
