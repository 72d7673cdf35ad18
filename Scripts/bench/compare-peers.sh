#!/usr/bin/env bash
# Side-by-side NBD figures: Umbra next to nbdkit, nbd-server and qemu-nbd, measured with fio (and
# nbdcopy) in one interleaved run by the workplace harness peers.sh (../shared/bench/peers.sh, or
# $UMBRA_PEERS). Umbra serves the same image as the peers through --volume-file.
#
#   Scripts/bench/compare-peers.sh plain [peers.sh options]   # read/write, 1 and 2 connections
#   Scripts/bench/compare-peers.sh cow   [peers.sh options]   # first write and rewrite after a snapshot
#
# Options before the mode's servers go to peers.sh, e.g. -r 3 -w "sr1m sw1m rr4k rw4k".
set -euo pipefail
cd "$(dirname "$0")/../.."
source Scripts/env.sh
peers=${UMBRA_PEERS:-../shared/bench/peers.sh}
[ -x "$peers" ] || { echo "compare-peers: no peers.sh at $peers (set UMBRA_PEERS)" >&2; exit 1; }
mode=${1:-plain}
shift || true
swift build -c release --product umbra >&2
umbra=$PWD/.build/release/umbra
serve="exec $umbra serve --data {DIR}/data --control {DIR}/control.sock --log-level warning"
case $mode in
plain)
    exec "$peers" -m plain "$@" \
        umbra@disk "$serve --listen unix:{SOCK} --volume-file disk:{IMG}" \
        umbra-tcp@disk "$serve --listen tcp://127.0.0.1:{PORT} --volume-file disk:{IMG}"
    ;;
cow)
    exec "$peers" -m cow -P "$umbra snapshot create disk --no-writers --control {DIR}/control.sock >/dev/null" "$@" \
        umbra@disk "$serve --listen unix:{SOCK} --volume-file disk:{IMG}"
    ;;
*)
    echo "compare-peers: mode is plain or cow, not '$mode'" >&2
    exit 2
    ;;
esac
