#!/usr/bin/env bash
# Regenerates every current figure in docs/performance.md in one run, on this machine, and keeps the
# raw results (JSON, with the machine's description) and each script's table under
# Benchmarks/results/RUN-TIME/. Each step is also a command of its own; the page names them.
#
#   Scripts/bench/run-all.sh [-r REPS] [--no-engine]
#
#   1. nbd-compare.py      Umbra against nbdkit: 1 MiB and 4 KiB, one and two connections, with
#                          server CPU per GiB; also --offload-writes and --io-threads 16 (why the defaults)
#   2. cow-first-write.py  first writes after a snapshot against nbdkit's cow filter and the durable limit
#   3. the same on XFS with reflink (on-xfs-reflink.sh), where Umbra's copies are clones
#   4. set-latency.py      write latency around shadow copy sets, clients never flushing and flushing every 16
#   5. snapshot-reads.sh   reads of a snapshot whose every chunk was copied
#   6. server-cpu.sh       server CPU per 4 KiB request, with and without --metrics
#   7. backup.py           full and incremental backups against nbdcopy
#   8. rbd-compare.sh      an RBD volume through Umbra against rbd bench and fio's librbd engine
#   9. fua-latency.py      FUA writes while another connection writes
#  10. swift package benchmark (Benchmarks/): the engine without NBD (skipped with --no-engine)
#
# Takes about 40 minutes with 3 reps (the engine suite builds in release first). Run it on a quiet
# machine; every figure is a ratio measured within the run. Needs what Scripts/install-dependencies.sh
# installs (fio, nbdkit, libnbd, python3-libnbd, xfsprogs, Ceph), and root for the loop device of step 3.
set -euo pipefail
cd "$(dirname "$0")/../.."
source Scripts/env.sh
reps=3
engine=1
while [ $# -gt 0 ]; do
    case $1 in
    -r) reps=$2; shift 2 ;;
    --no-engine) engine=0; shift ;;
    *) echo "usage: Scripts/bench/run-all.sh [-r REPS] [--no-engine]" >&2; exit 2 ;;
    esac
done
swift build -c release --product umbra >&2
umbra=$PWD/.build/release/umbra
out=Benchmarks/results/run-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
step() { echo "=== $* ($(date +%H:%M:%S))" >&2; }

/usr/bin/python3 -c 'import json, sys; sys.path.insert(0, "Scripts/bench"); import benchlib; print(json.dumps(benchlib.machine(), indent=1))' >"$out/machine.json"

step "1/10 nbd-compare"
/usr/bin/python3 Scripts/bench/nbd-compare.py -r "$reps" --umbra "umbra=$umbra" \
    --umbra "offload-writes=$umbra --offload-writes" --umbra "io-threads-16=$umbra --io-threads 16" \
    --json "$out/nbd-compare.json" | tee "$out/nbd-compare.txt"

step "2/10 cow-first-write"
/usr/bin/python3 Scripts/bench/cow-first-write.py -r "$reps" --umbra "umbra=$umbra" \
    --json "$out/cow-first-write.json" | tee "$out/cow-first-write.txt"

step "3/10 cow-first-write on XFS with reflink"
Scripts/bench/on-xfs-reflink.sh /usr/bin/python3 Scripts/bench/cow-first-write.py -r "$reps" --umbra "umbra=$umbra" \
    --json "$out/cow-first-write-xfs-reflink.json" | tee "$out/cow-first-write-xfs-reflink.txt"

step "4/10 set-latency"
for flush in 0 16; do
    /usr/bin/python3 Scripts/bench/set-latency.py --umbra "$umbra" --sets 200 --flush-every $flush --json \
        | tee "$out/set-latency-flush-$flush.json"
done

step "5/10 snapshot-reads"
Scripts/bench/snapshot-reads.sh -r "$reps" "$umbra" | tee "$out/snapshot-reads.txt"

step "6/10 server-cpu"
Scripts/bench/server-cpu.sh -n 6 "$umbra" "$umbra --metrics tcp://127.0.0.1:0" | tee "$out/server-cpu.txt"

step "7/10 backup"
/usr/bin/python3 Scripts/bench/backup.py -r "$reps" --umbra "$umbra" --json "$out/backup.json" \
    | tee "$out/backup.txt"

step "8/10 rbd-compare"
Scripts/bench/rbd-compare.sh -r "$reps" "$umbra" | tee "$out/rbd-compare.txt"

step "9/10 fua-latency"
/usr/bin/python3 Scripts/bench/fua-latency.py -r "$reps" --umbra "umbra=$umbra" --json "$out/fua-latency.json" \
    | tee "$out/fua-latency.txt"

if [ $engine = 1 ]; then
    step "10/10 engine (swift package benchmark)"
    (cd Benchmarks && swift package benchmark --no-progress) | tee "$out/engine.txt"  # engine and metrics
else
    step "10/10 engine: skipped (--no-engine)"
fi
echo "results: $out" >&2
