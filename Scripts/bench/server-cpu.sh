#!/usr/bin/env bash
# Server CPU per request: what one 4 KiB request costs `umbra serve`, in microseconds of its own CPU
# time (user + system, from /proc), over a fixed number of requests driven by fio's nbd engine at
# QD32 over a Unix socket. On a shared 2-core machine this is far steadier than throughput, so it is
# the figure to compare two builds by (throughput moves with whatever else runs).
#
#   Scripts/bench/server-cpu.sh [-n ROUNDS] [-w "randread randwrite"] ["BINARY [SERVE-ARGS…]" …]
#
# With no binary, builds and measures this checkout's release build. Several binaries are measured
# in turn, round after round (interleaved, so drift hits them alike); each line names the binary.
# An entry may carry arguments for `serve`, e.g. the cost of metrics:
#   Scripts/bench/server-cpu.sh -n 8 .build/release/umbra ".build/release/umbra --metrics tcp://127.0.0.1:0"
# Needs fio (Scripts/install-dependencies.sh installs it). Each round writes a 1 GiB sparse image
# under ${TMPDIR:-/tmp}.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=3
workloads="randread randwrite"
while getopts "n:w:" option; do
    case $option in
    n) rounds=$OPTARG ;;
    w) workloads=$OPTARG ;;
    *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
command -v fio > /dev/null || { echo "server-cpu: fio is missing (Scripts/install-dependencies.sh)" >&2; exit 1; }
binaries=("$@")
if [ ${#binaries[@]} -eq 0 ]; then
    source Scripts/env.sh
    swift build -c release --product umbra >&2
    binaries=("$PWD/.build/release/umbra")
fi
requests=262144
work=$(mktemp -d "${TMPDIR:-/tmp}/umbra-server-cpu.XXXXXX")
server=
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2> /dev/null || true; wait "$server" 2> /dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

measure() {
    local binary=$1 workload=$2 dir="$work/run" command
    read -ra command <<< "$binary"
    rm -rf "$dir"
    mkdir -p "$dir"
    truncate -s 1G "$dir/image"
    "${command[0]}" serve --data "$dir/data" --control "$dir/control.sock" --log-level warning \
        --listen "unix:$dir/nbd.sock" --volume-file "disk:$dir/image" "${command[@]:1}" > "$dir/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 100); do [ -S "$dir/nbd.sock" ] && break; sleep 0.1; done
    local uri="nbd+unix:///disk?socket=$dir/nbd.sock"
    local fio_args=(--name=cpu --ioengine=nbd --uri="$uri" --rw="$workload" --bs=4k --iodepth=32
        --norandommap --randrepeat=0)
    # A warm-up pass, so both builds meet the same page cache.
    fio "${fio_args[@]}" --io_size=256M > /dev/null 2>&1
    local before after
    before=$(cpu_ticks "$server")
    fio "${fio_args[@]}" --io_size=$((requests * 4))k --output-format=terse > "$dir/fio.txt" 2> /dev/null
    after=$(cpu_ticks "$server")
    kill "$server"
    wait "$server" 2> /dev/null || true
    server=
    local hz
    hz=$(getconf CLK_TCK)
    awk -v t=$((after - before)) -v hz="$hz" -v n=$requests -v b="$binary" -v w="$workload" \
        'BEGIN { printf "%-10s %8.2f us/request  %s\n", w, t / hz * 1e6 / n, b }'
}

echo "server CPU per 4 KiB request, QD32, $requests requests per measurement, $rounds rounds"
for round in $(seq "$rounds"); do
    for workload in $workloads; do
        for binary in "${binaries[@]}"; do measure "$binary" "$workload"; done
    done
done
