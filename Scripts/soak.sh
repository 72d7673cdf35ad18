#!/usr/bin/env bash
# The soak run (not part of Scripts/test.sh): MINUTES of NBD clients, shadow copy sets with and
# without writers, a writer that vetoes or hangs now and then, snapshot deletions, and daemon
# restarts (SIGTERM and kill -9) against one data directory; then every snapshot is checked block by
# block. Prints the counts. See Scripts/testing/soak.py for what is checked.
#   Scripts/soak.sh 30            thirty minutes, a random seed (printed)
#   Scripts/soak.sh 30 SEED       replay a seed (the load is seeded; timing is not)
set -euo pipefail
cd "$(dirname "$0")/.."
source Scripts/env.sh
minutes=${1:?usage: Scripts/soak.sh MINUTES [SEED]}
seed=${2:-$RANDOM$RANDOM}
Scripts/install-dependencies.sh
swift build -c release --product umbra >&2
work=$(mktemp -d /tmp/umbra-soak.XXXXXX)
echo "soak: $minutes min, seed $seed, work directory $work" >&2
if /usr/bin/python3 Scripts/testing/soak.py "$PWD/.build/release/umbra" "$minutes" "$work" "$seed"; then
    rm -rf "$work"
else
    exit 1
fi
