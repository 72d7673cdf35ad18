#!/usr/bin/env bash
# Every test: installs what the tests need, checks the formatting (swift format lint --strict with
# the checked-in .swift-format), builds, runs the Swift test suite (unit, simulation,
# protocol, libnbd and process tests), then the interoperability scripts against a real daemon.
#   Scripts/test.sh              the default run (what CI runs)
#   UMBRA_SIMULATION_SEEDS=20000 Scripts/test.sh    a longer crash simulation
# The RBD tests (RBDTests) run after the others, each against a Ceph cluster of its own
# (Scripts/ceph-cluster.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source Scripts/env.sh

Scripts/install-dependencies.sh
# Formatting first: it takes seconds, and a build takes minutes.
swift format lint --strict --recursive Sources Tests Benchmarks Fuzz/Sources Package.swift
swift build --build-tests
# The RBD tests start a Ceph monitor and OSD each; on 2 cores that load would starve the timing
# of the deadline tests beside them, so they run on their own, after the rest.
swift test --skip-build --skip RBDTests
swift test --skip-build --filter RBDTests
if [ -x Scripts/interop/run-all.sh ]; then
    Scripts/interop/run-all.sh
fi
