#!/usr/bin/env bash
# Scripts/install.sh into a scratch prefix: the binary runs, every command (and subcommand) has a
# manual page that man renders, the completions are there, and the installed systemd unit passes
# `systemd-analyze verify` with the manual pages it names found (any warning fails). It installs
# the debug build; building the manual generator makes it the slowest interop test.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires man systemd-analyze

check "Scripts/install.sh --prefix installs the binary, manual pages, completions and the unit"
# A relative prefix, as a user would type it: it is taken from where the script was called.
prefix=$tmp/prefix
# The debug build (which the test run has already made): a release build from scratch would take
# minutes more, and install.sh does the same with either.
(cd "$tmp" && "$repo_root/Scripts/install.sh" --debug --prefix prefix) 2>"$tmp/install.log" ||
    { cat "$tmp/install.log" >&2; fail "Scripts/install.sh failed"; }
installed=$prefix/bin/umbra
"$installed" --version >/dev/null || fail "the installed umbra does not run"
grep -q "^ExecStart=$prefix/bin/umbra serve" "$prefix/lib/systemd/system/umbra.service" ||
    fail "the unit does not start $prefix/bin/umbra"
for file in share/bash-completion/completions/umbra share/zsh/site-functions/_umbra \
    share/fish/vendor_completions.d/umbra.fish lib/systemd/system/umbra.service; do
    [ -s "$prefix/$file" ] || fail "$file is missing or empty"
done

# subcommands COMMAND...: the subcommands `umbra COMMAND... --help` lists, one a line.
subcommands() {
    "$installed" "$@" --help | sed -n '/^SUBCOMMANDS:/,/^$/p' | sed -n 's/^  \([a-z][a-z-]*\) .*/\1/p; s/^  \([a-z][a-z-]*\)$/\1/p' |
        grep -v '^help$' || true
}

check "a manual page that man renders for every command"
commands=("")
pages=0
while [ ${#commands[@]} -gt 0 ]; do
    command=${commands[0]}
    commands=("${commands[@]:1}")
    read -ra words <<<"$command"
    page="$prefix/share/man/man1/$(printf '%s' "umbra ${command}" | sed 's/ *$//; s/ /./g').1"
    [ -s "$page" ] || fail "no manual page for 'umbra $command' ($page)"
    MANPAGER=cat MANWIDTH=100 man -l "$page" 2>"$tmp/man.err" | grep -q "^NAME" ||
        fail "man cannot render $page: $(cat "$tmp/man.err")"
    pages=$((pages + 1))
    for sub in $(subcommands "${words[@]}"); do commands+=("${command:+$command }$sub"); done
done
say "$pages manual pages render"
[ "$pages" -ge 15 ] || fail "only $pages commands found: the help parsing is off"

check "the installed unit passes systemd-analyze verify, its manual pages found"
output=$(MANPATH=$prefix/share/man systemd-analyze verify "$prefix/lib/systemd/system/umbra.service" 2>&1) ||
    fail "systemd-analyze verify failed: $output"
[ -z "$output" ] || fail "systemd-analyze verify warned: $output"
