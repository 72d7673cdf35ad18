#!/usr/bin/env bash
# Reads of a snapshot whose every chunk was copied to the diff store, with fio's nbd engine over a
# Unix socket: sequential 1 MiB QD8 and random 4 KiB QD32, 5 s each after 1 s of ramp. Each binary
# given (default: this repository's release build) serves a fresh 256 MiB random image through
# --volume-file; a snapshot is taken and the whole image overwritten, then the snapshot is read. The
# binaries alternate within each repetition, so their figures can be compared as ratios.
#   Scripts/bench/snapshot-reads.sh [-r REPS] [UMBRA-BINARY...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source Scripts/env.sh
reps=3
if [ "${1:-}" = -r ]; then
    reps=$2
    shift 2
fi
binaries=("$@")
if [ ${#binaries[@]} -eq 0 ]; then
    swift build -c release --product umbra >&2
    binaries=("$PWD/.build/release/umbra")
fi
work=$(mktemp -d /tmp/umbra-snapread.XXXXXX)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
head -c 256M /dev/urandom >"$work/base.img"

# fio_figure JOB-ARGUMENTS...: runs fio and prints the read bandwidth (MiB/s) and IOPS.
fio_figure() {
    fio --name=read --ioengine=nbd --output-format=json "$@" 2>/dev/null | sed -n '/^{/,$p' |
        python3 -c 'import json,sys; r=json.load(sys.stdin)["jobs"][0]["read"]; print("%.0f MiB/s %.0f IOPS" % (r["bw"]/1024, r["iops"]))'
}

for rep in $(seq "$reps"); do
    for umbra in "${binaries[@]}"; do
        dir=$work/run
        rm -rf "$dir"
        mkdir -p "$dir"
        cp "$work/base.img" "$dir/img.raw"
        "$umbra" serve --data "$dir/data" --control "$dir/control.sock" --log-level warning \
            --listen "unix:$dir/nbd.sock" --volume-file "disk:$dir/img.raw" >"$dir/ready" 2>"$dir/log" &
        pid=$!
        until grep -q '^ready' "$dir/ready" 2>/dev/null; do sleep 0.1; done
        snap=$("$umbra" snapshot create disk --no-writers --json --control "$dir/control.sock" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshots"][0]["id"])')
        fio --name=overwrite --ioengine=nbd --uri="nbd+unix:///disk?socket=$dir/nbd.sock" --rw=write --bs=1M \
            --iodepth=8 --size=256M >/dev/null 2>&1
        uri="nbd+unix:///disk@$snap?socket=$dir/nbd.sock"
        sequential=$(fio_figure --uri="$uri" --rw=read --bs=1M --iodepth=8 --time_based --runtime=5 --ramp_time=1)
        random=$(fio_figure --uri="$uri" --rw=randread --bs=4k --iodepth=32 --norandommap --randrepeat=0 \
            --time_based --runtime=5 --ramp_time=1)
        echo "rep $rep  $umbra  sequential 1 MiB: $sequential  random 4 KiB: $random"
        kill "$pid"
        wait "$pid" || true
        pid=
    done
done
