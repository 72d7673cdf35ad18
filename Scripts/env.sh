# Sourced by the scripts. Debian's /usr/bin goes first so that nbdsh finds the python3 that has the
# libnbd module (a pyenv python earlier on PATH lacks it); the Swift toolchain is added if missing.
export PATH=/usr/bin:$PATH
if ! command -v swift >/dev/null 2>&1 && [ -x /opt/swift/usr/bin/swift ]; then
    export PATH=/opt/swift/usr/bin:$PATH
fi
