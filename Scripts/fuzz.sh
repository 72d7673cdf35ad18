#!/usr/bin/env bash
# Fuzzes the server side of the NBD protocol (decoder, handshake and transmission state machines,
# reply encoders) with libFuzzer for MINUTES minutes (default 5), then prints one summary line.
#   Scripts/fuzz.sh [MINUTES]
# Inputs are raw client sessions (see Sources/NBDFuzzing). The fuzzer starts from the committed seed
# corpus (Fuzz/Corpus, captured from real clients by Scripts/fuzz/record-sessions.sh) and the kept
# crashers (Fuzz/Crashers); what it learns goes to Fuzz/.work/corpus (not committed), so later runs
# pick up where earlier ones stopped. A crash or broken invariant stops the run and leaves the input in
# Fuzz/Crashers/crash-*: keep it there (NBDProtocolTests replays every file in it) and fix the bug.
#
# The build is release (-O) with assertions kept (-assert-config Debug): the protocol code's
# assert/assertionFailure calls are invariant checks the fuzzer should trip, and -Onone would run
# several times slower. AddressSanitizer is on as well. SwiftPM links executables with their own
# `main`, which gold cannot reconcile with libFuzzer's; lld can, hence -use-ld=lld.
set -euo pipefail
cd "$(dirname "$0")/.."
source Scripts/env.sh

minutes=${1:-5}
[[ $minutes =~ ^[0-9]+$ ]] && [ "$minutes" -gt 0 ] || {
    echo "usage: Scripts/fuzz.sh [MINUTES]" >&2
    exit 2
}
work=Fuzz/.work
mkdir -p "$work/corpus" Fuzz/Corpus Fuzz/Crashers

swift build --package-path Fuzz -c release --product NBDFuzzTarget \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -assert-config -Xswiftc Debug -Xswiftc -use-ld=lld
fuzzer=Fuzz/.build/release/NBDFuzzTarget

log=$work/last-run.log
crashers() { find Fuzz/Crashers -type f -name '[a-z]*-*' | wc -l; }
before=$(crashers)
started=$SECONDS
status=0
# One job: the machine is shared. New inputs go to the first directory only.
"$fuzzer" -max_total_time=$((minutes * 60)) -max_len=81920 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix=Fuzz/Crashers/ -print_final_stats=1 \
    "$work/corpus" Fuzz/Corpus Fuzz/Crashers >"$log" 2>&1 || status=$?

executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
coverage=$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/\1 edges, \2 features, corpus \3 inputs/p' <<<"$last")
crashes=$(($(crashers) - before))
echo "fuzz: $((SECONDS - started)) s, ${executions:-?} executions, ${coverage:-coverage unknown}, $crashes new crasher(s) (log: $log)"
if [ "$status" -ne 0 ]; then
    grep -E 'ERROR|Fatal error|NBD fuzz finding|Test unit written' "$log" | head -5 >&2 || true
    exit "$status"
fi
