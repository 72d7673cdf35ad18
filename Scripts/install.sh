#!/usr/bin/env bash
# Installs Umbra: the release binary, a manual page for every command (swift-argument-parser's
# generate-manual), bash, zsh and fish completions, and the systemd unit.
#   Scripts/install.sh                    into /usr/local (the unit into /etc/systemd/system)
#   Scripts/install.sh --prefix DIR       into DIR (the unit into DIR/lib/systemd/system)
#   Scripts/install.sh --debug ...        the debug build instead (quicker; what the tests install)
# Then, as root: systemctl daemon-reload && systemctl enable --now umbra.
# There is no umbra.socket: the daemon does not take its listening sockets from systemd (only
# `umbra serve --stdio` accepts socket activation, for NBD clients that start their own server).
set -euo pipefail
script=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")

prefix=/usr/local
units=
configuration=release
while [ $# -gt 0 ]; do
    case $1 in
    --debug)
        configuration=debug
        shift
        ;;
    --prefix)
        prefix=${2:?--prefix needs a directory}
        shift 2
        ;;
    -h | --help)
        sed -n '2,10p' "$script" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "install: unknown argument '$1' (see --help)" >&2
        exit 2
        ;;
    esac
done
case $prefix in
*[[:space:]]*)
    echo "install: the prefix '$prefix' has white space, which a systemd ExecStart line cannot hold" >&2
    exit 2
    ;;
esac
# Relative to where the script was called from.
prefix=$(mkdir -p "$prefix" && cd "$prefix" && pwd)
[ "$prefix" = /usr/local ] && units=/etc/systemd/system || units=$prefix/lib/systemd/system
cd "$(dirname "$script")/.."
source Scripts/env.sh

Scripts/install-dependencies.sh --build
echo "install: building umbra ($configuration)" >&2
swift build -c "$configuration" --product umbra >&2
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
echo "install: generating manual pages" >&2
mkdir -p "$staging/man"
swift package --allow-writing-to-package-directory generate-manual --configuration "$configuration" --multi-page \
    --output-directory "$staging/man" >&2
binary=.build/$configuration/umbra

install -d "$prefix/bin" "$prefix/share/man/man1" "$prefix/share/bash-completion/completions" \
    "$prefix/share/zsh/site-functions" "$prefix/share/fish/vendor_completions.d" "$units"
install -m 0755 "$binary" "$prefix/bin/umbra"
pages=$(find "$staging/man" -name '*.1' | wc -l)
find "$staging/man" -name '*.1' -exec install -m 0644 {} "$prefix/share/man/man1/" \;
"$binary" --generate-completion-script bash >"$prefix/share/bash-completion/completions/umbra"
"$binary" --generate-completion-script zsh >"$prefix/share/zsh/site-functions/_umbra"
"$binary" --generate-completion-script fish >"$prefix/share/fish/vendor_completions.d/umbra.fish"
template=$(<Scripts/systemd/umbra.service.in)
printf '%s\n' "${template//@BINDIR@/$prefix/bin}" >"$units/umbra.service"
chmod 0644 "$units/umbra.service"
echo "install: umbra in $prefix/bin, $pages manual pages, completions for bash, zsh and fish," \
    "and $units/umbra.service" >&2
case $units in
/etc/systemd/system | /usr/lib/systemd/system | /lib/systemd/system) ;;
*) echo "install: systemd does not look in $units: link the unit into /etc/systemd/system to use it" >&2 ;;
esac
echo "install: the binary uses the Swift runtime of the toolchain that built it ($(dirname "$(dirname "$(command -v swift)")"))" >&2
