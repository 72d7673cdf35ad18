#!/usr/bin/env bash
# An RBD volume through Umbra against librbd itself: `rbd bench` on an image, fio's own librbd
# engine on it (the same client without the NBD hop), and fio's nbd engine on the same image served
# as an Umbra volume over a Unix socket, in turn rep by rep on a
# single-node cluster this script starts (Scripts/ceph-cluster.sh) and stops. Prints each workload's
# medians and Umbra's ratios to each.
#
#   Scripts/bench/rbd-compare.sh [-r REPS] [BINARY]
#
# Workloads: 4 KiB random reads and writes at QD32, 1 MiB sequential reads and writes at QD8. With no
# binary, builds this checkout's release build. Needs fio and the Ceph packages
# (Scripts/install-dependencies.sh). Scratch files go under ${TMPDIR:-/tmp}.
set -euo pipefail
cd "$(dirname "$0")/../.."
reps=3
while getopts "r:" option; do
    case $option in
    r) reps=$OPTARG ;;
    *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
umbra=${1:-}
if [ -z "$umbra" ]; then
    source Scripts/env.sh
    swift build -c release --product umbra >&2
    umbra=$PWD/.build/release/umbra
fi
for tool in fio rbd ceph-mon; do
    command -v "$tool" >/dev/null || { echo "rbd-compare: $tool is missing (Scripts/install-dependencies.sh)" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/umbra-rbd-bench.XXXXXX")
server=
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    Scripts/ceph-cluster.sh stop "$work/ceph" || true
    rm -rf "$work"
}
trap cleanup EXIT
conf=$(Scripts/ceph-cluster.sh start "$work/ceph" --memstore-size 6G)
rbd() { command rbd -c "$conf" "$@"; }
size=1G
rbd create --size "$size" rbd/bench
# Every object written once, so that reads read data on both sides.
rbd bench --io-type write --io-size 4M --io-threads 8 --io-total "$size" --io-pattern seq rbd/bench >/dev/null

"$umbra" serve --data "$work/data" --listen "unix:$work/nbd.sock" --ceph-conf "$conf" --log-level warning \
    >"$work/ready" &
server=$!
for _ in $(seq 300); do grep -q '^ready' "$work/ready" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready' "$work/ready" || { echo "rbd-compare: umbra serve did not start" >&2; exit 1; }
"$umbra" volume create bench --rbd rbd/bench --control "$work/data/control.sock" >/dev/null

# name  rbd-bench-type  pattern  size  threads  total  fio-rw
workloads=(
    "randread-4k read rand 4K 32 256M randread"
    "randwrite-4k write rand 4K 32 128M randwrite"
    "seqread-1m read seq 1M 8 2G read"
    "seqwrite-1m write seq 1M 8 1G write"
)

rbd_bench() { # type pattern size threads total -> bytes/s (from ops/sec: bytes/sec is printed with units)
    local bytes
    bytes=$(numfmt --from=iec "$3")
    rbd bench --io-type "$1" --io-pattern "$2" --io-size "$3" --io-threads "$4" --io-total "$5" rbd/bench |
        awk -v bytes="$bytes" '/^elapsed:/ { for (i = 1; i <= NF; i++) if ($i == "ops/sec:") print $(i + 1) * bytes }'
}

fio_nbd() { # rw size depth total -> bytes/s
    fio --name=umbra --ioengine=nbd --uri="nbd+unix:///bench?socket=$work/nbd.sock" --rw="$1" --bs="$2" \
        --iodepth="$3" --io_size="$4" --size="$size" --randrepeat=0 --output-format=json |
        sed -n '/^{/,$p' | /usr/bin/python3 -c 'import json, sys; job = json.load(sys.stdin)["jobs"][0]; print(job["read"]["bw_bytes"] + job["write"]["bw_bytes"])'
}

fio_rbd() { # the same fio, through its own librbd engine: what the NBD hop costs
    CEPH_CONF=$conf fio --name=librbd --ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench --rw="$1" --bs="$2" \
        --iodepth="$3" --io_size="$4" --size="$size" --randrepeat=0 --output-format=json |
        sed -n '/^{/,$p' | /usr/bin/python3 -c 'import json, sys; job = json.load(sys.stdin)["jobs"][0]; print(job["read"]["bw_bytes"] + job["write"]["bw_bytes"])'
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf "%-14s %14s %14s %14s %9s %9s\n" workload "rbd bench MB/s" "fio-rbd MB/s" "umbra MB/s" "/rbd bench" "/fio-rbd"
for line in "${workloads[@]}"; do
    read -r name type pattern bs threads total rw <<<"$line"
    : >"$work/rbd.txt"
    : >"$work/umbra.txt"
    : >"$work/fio-rbd.txt"
    for _ in $(seq "$reps"); do
        rbd_bench "$type" "$pattern" "$bs" "$threads" "$total" >>"$work/rbd.txt"
        fio_rbd "$rw" "$bs" "$threads" "$total" >>"$work/fio-rbd.txt"
        fio_nbd "$rw" "$bs" "$threads" "$total" >>"$work/umbra.txt"
    done
    librbd=$(median <"$work/rbd.txt")
    fiorbd=$(median <"$work/fio-rbd.txt")
    ours=$(median <"$work/umbra.txt")
    awk -v n="$name" -v a="$librbd" -v f="$fiorbd" -v b="$ours" \
        'BEGIN { printf "%-14s %14.0f %14.0f %14.0f %9.2f %9.2f\n", n, a / 1e6, f / 1e6, b / 1e6, b / a, b / f }'
done
