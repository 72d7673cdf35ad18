#!/usr/bin/env bash
# Runs every interoperability test (test-*.sh here) against a real `umbra serve`, one after another,
# and fails if any fails. A skipped test (exit 77: the machine lacks FUSE, loop devices or the nbd
# module) does not fail the run, but is reported at the end together with its reason.
#   Scripts/interop/run-all.sh                  build the debug daemon if needed, run every test
#   Scripts/interop/run-all.sh test-fio.sh ...  only these
#   UMBRA=/path/to/umbra Scripts/interop/run-all.sh    test that binary (no build)
# Each test has UMBRA_INTEROP_TIMEOUT seconds (default 300) before it is stopped and failed.
set -euo pipefail
cd "$(dirname "$0")"
source ../env.sh

if [ -z "${UMBRA:-}" ]; then
    (cd ../.. && swift build --product umbra) || {
        echo "run-all: could not build umbra" >&2
        exit 1
    }
    UMBRA=$(cd ../.. && pwd)/.build/debug/umbra
fi
export UMBRA

tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(test-*.sh)
UMBRA_INTEROP_NOTES=$(mktemp /tmp/umbra-interop-notes.XXXXXX)
export UMBRA_INTEROP_NOTES
trap 'rm -f "$UMBRA_INTEROP_NOTES"' EXIT

passed=() failed=() skipped=()
run_start=$SECONDS
for test in "${tests[@]}"; do
    test=$(basename "$test")
    echo "=== $test"
    start=$SECONDS
    status=0
    # --foreground: the signal goes to the test alone, whose trap then unmounts, detaches and stops
    # its daemon in order (killing nbdfuse or the daemon first would leave loop devices behind).
    timeout --foreground --kill-after=30 "${UMBRA_INTEROP_TIMEOUT:-300}" "./$test" </dev/null 2>&1 || status=$?
    took=$((SECONDS - start))
    case $status in
    0) result=passed passed+=("$test (${took} s)") ;;
    77) result=SKIPPED skipped+=("$test") ;;
    124) result=FAILED failed+=("$test (timed out after ${took} s)") ;;
    *) result=FAILED failed+=("$test (exit status $status, ${took} s)") ;;
    esac
    echo "=== $test: $result in ${took} s"
done

echo
echo "interop: ran ${#tests[@]} tests in $((SECONDS - run_start)) s"
for test in "${passed[@]}"; do echo "  passed   $test"; done
for test in "${failed[@]}"; do echo "  FAILED   $test"; done
if [ ${#skipped[@]} -gt 0 ] || [ -s "$UMBRA_INTEROP_NOTES" ]; then
    echo
    echo "!!! NOT EVERYTHING RAN CLEANLY: skipped (this machine cannot provide what they need) or known issues:"
    sed 's/^/!!!   /' "$UMBRA_INTEROP_NOTES"
fi
echo "interop: ${#passed[@]} passed, ${#failed[@]} failed, ${#skipped[@]} skipped"
[ ${#failed[@]} -eq 0 ]
