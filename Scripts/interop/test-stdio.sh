#!/usr/bin/env bash
# `umbra serve --stdio EXPORT` spawned by its clients: nbdinfo and nbdcopy with `[ CMD ]` (systemd
# socket activation), nbdsh with h.connect_command (stdin/stdout). A file copied in comes back out
# with the same SHA-256 from a fresh process; a snapshot served this way is read-only; an unknown
# export fails at once with one sentence and nothing on stdout.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires nbdinfo nbdcopy nbdsh sha256sum

data=$tmp/data
stdio() { printf '%s\n' "$UMBRA" serve --data "$data" --log-level warning "$@" --stdio; }
# Zero runs under 32 MiB: nbdcopy zeroes a run in one request, refused past the maximum block size.
random_file "$tmp/in.raw" $((24 * MiB)) 0:$((3 * MiB)) $((9 * MiB + 4 * KiB)):$((2 * MiB + 100)) \
    $((23 * MiB)):$((1 * MiB))
in_sum=$(checksum "$tmp/in.raw")

check "nbdinfo [ umbra serve --stdio disk ] creates the volume and describes it"
mapfile -t cmd < <(stdio --volume disk:24M)
info=$(nbdinfo --json -- [ "${cmd[@]}" disk ])
assert_eq "$(json <(echo "$info") 'd["exports"][0]["export-size"]')" $((24 * MiB)) "export size"
assert_eq "$(json <(echo "$info") 'd["exports"][0]["is_read_only"]')" false "read-only flag"

check "nbdcopy file -> [ --stdio disk ], then [ --stdio disk ] -> file: same SHA-256"
mapfile -t cmd < <(stdio)
nbdcopy --flush "$tmp/in.raw" -- [ "${cmd[@]}" disk ]
nbdcopy -- [ "${cmd[@]}" disk ] "$tmp/out.raw"
assert_eq "$(checksum "$tmp/out.raw")" "$in_sum" "SHA-256 of the copy out"

check "nbdsh h.connect_command: the default export is the one served; a write persists"
# nbdsh takes no arguments for its script: the command comes in the environment, one word a line.
export STDIO_COMMAND
STDIO_COMMAND=$(printf '%s\n' "${cmd[@]}" disk)
nbdsh -c "
import os
h.set_full_info(True)
h.connect_command(os.environ['STDIO_COMMAND'].split('\n'))
assert h.get_canonical_export_name() == 'disk', h.get_canonical_export_name()
h.pwrite(b'stdio!' * 1000, 5 * 1024 * 1024 + 7)
h.flush()
h.shutdown()
"
assert_eq "$(nbdsh -c "
import os
h.connect_command(os.environ['STDIO_COMMAND'].split('\n'))
print(h.pread(6, 5 * 1024 * 1024 + 7 + 6 * 999).decode())
h.shutdown()
")" "stdio!" "bytes written by the previous process"

check "a snapshot over stdio is read-only and holds the volume as it was"
nbdcopy -- [ "${cmd[@]}" disk ] "$tmp/live.raw"
start_daemon --log-level warning
# start_daemon used $tmp/data as well: the same store, now with a control socket.
snap=$(snapshot_create disk)
stop_daemon
assert_eq "$(nbdinfo --is read-only -- [ "${cmd[@]}" "disk@$snap" ] && echo yes)" yes "read-only"
nbdcopy -- [ "${cmd[@]}" "disk@$snap" ] "$tmp/snap.raw"
assert_eq "$(checksum "$tmp/snap.raw")" "$(checksum "$tmp/live.raw")" "SHA-256 of the snapshot"
STDIO_COMMAND=$(printf '%s\n' "${cmd[@]}" "disk@$snap")
nbdsh -c "
import os
h.connect_command(os.environ['STDIO_COMMAND'].split('\n'))
b = h.pread(6, 5 * 1024 * 1024 + 7)
try:
    h.pwrite(b'x', 0)
    raise SystemExit('a write to the snapshot succeeded')
except nbd.Error as e:
    assert e.errno == 'EPERM', e.errno
"

check "an unknown export: non-zero exit, one sentence on stderr, nothing on stdout"
status=0
"${cmd[@]}" nope </dev/null >"$tmp/stdout" 2>"$tmp/stderr" || status=$?
[ "$status" -ne 0 ] || fail "umbra serve --stdio nope exited 0"
assert_match "$(cat "$tmp/stderr")" 'no volume or snapshot named "nope"' "the error"
[ ! -s "$tmp/stdout" ] || fail "umbra serve --stdio wrote to stdout: $(head -c 200 "$tmp/stdout")"
say "passed"
