#!/usr/bin/env bash
# Installs what the build needs (Debian's libisal-dev, librbd-dev, librados-dev; root or sudo), builds Umbra (release) and runs
# the daemon with a 1 GiB volume named `disk` in ./umbra-data, serving NBD on tcp://127.0.0.1:10809.
# Extra arguments go to `umbra serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
source Scripts/env.sh
Scripts/install-dependencies.sh --build
swift build -c release --product umbra
exec .build/release/umbra serve --volume disk:1G "$@"
