#!/usr/bin/env bash
# NBD over TLS against a real daemon, with certificates made here by openssl: nbdinfo (nbds:// with
# tls-certificates=DIR, and TLS-PSK with tls-psk-file), qemu-img info (tls-creds-x509) and
# nbd-client -l (-certfile/-keyfile/-cacertfile). With --tls require a plain client gets nothing
# (not even the list); with --tls optional both work. With --tls-ca a client certificate from
# another CA, or none, is refused; a wrong pre-shared key is refused. Data written over TLS reads
# back byte-exact in big reads (the path that is sendfile in plain text). Access rules (--access):
# each client lists and opens only its volumes, read-only access refuses writes with EPERM at the
# server, a snapshot is never writable, and the default export does not leak a forbidden volume.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
requires openssl nbdinfo nbdsh nbdcopy qemu-img nbd-client sha256sum

# MARK: - Certificates and keys

pki=$tmp/pki
mkdir -p "$pki"

# make_ca NAME: a self-signed CA, NAME-cert.pem and NAME-key.pem.
make_ca() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=$1" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$pki/$1-key.pem" -out "$pki/$1-cert.pem" 2>"$pki/openssl.log" ||
        fail "openssl could not make the CA $1: $(cat "$pki/openssl.log")"
}

# make_cert NAME CA CN EXTENSION...: NAME-cert.pem and NAME-key.pem, signed by CA.
make_cert() {
    local name=$1 ca=$2 cn=$3
    shift 3
    printf '%s\n' "$@" >"$pki/$name.ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$cn" \
        -keyout "$pki/$name-key.pem" -out "$pki/$name.csr" 2>"$pki/openssl.log" &&
        openssl x509 -req -in "$pki/$name.csr" -CA "$pki/$ca-cert.pem" -CAkey "$pki/$ca-key.pem" \
            -CAcreateserial -days 2 -extfile "$pki/$name.ext" -out "$pki/$name-cert.pem" 2>>"$pki/openssl.log" ||
        fail "openssl could not make the certificate $name: $(cat "$pki/openssl.log")"
}

# client_dir NAME [CA]: the directory libnbd and qemu read (ca-cert.pem, client-cert.pem,
# client-key.pem) for client certificate NAME; without NAME (""), the CA only.
client_dir() {
    local name=$1 ca=${2:-ca} dir=$pki/dir-${1:-none}
    mkdir -p "$dir"
    cp "$pki/$ca-cert.pem" "$dir/ca-cert.pem"
    if [ -n "$name" ]; then
        cp "$pki/$name-cert.pem" "$dir/client-cert.pem"
        cp "$pki/$name-key.pem" "$dir/client-key.pem"
    fi
    printf '%s' "$dir"
}

make_ca ca
make_ca otherca
make_cert server ca localhost "subjectAltName=DNS:localhost,IP:127.0.0.1" "extendedKeyUsage=serverAuth"
make_cert alice ca alice "extendedKeyUsage=clientAuth"
# The same name as a trusted client, from a CA the server does not trust.
make_cert impostor otherca alice "extendedKeyUsage=clientAuth"
alice=$(client_dir alice)
impostor=$(client_dir impostor)
anonymous=$(client_dir "")
# psktool's format: IDENTITY:HEXKEY.
psk_key() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
printf 'bob:%s\ncarol:%s\n' "$(psk_key)" "$(psk_key)" >"$pki/keys.psk"
grep '^bob:' "$pki/keys.psk" >"$pki/bob.psk"
grep '^carol:' "$pki/keys.psk" >"$pki/carol.psk"
printf 'bob:%s\n' "$(psk_key)" >"$pki/wrong.psk"
printf 'mallory:%s\n' "$(psk_key)" >"$pki/mallory.psk"
tls_server=(--tls-cert "$pki/server-cert.pem" --tls-key "$pki/server-key.pem")

# URIs on the daemon's TCP port.
tls_uri() { printf 'nbds://localhost:%s/%s?tls-certificates=%s' "$UMBRA_TCP_PORT" "$1" "$2"; }
# psk_uri EXPORT KEYS: with the identity and key in $pki/KEYS.psk.
psk_uri() {
    printf 'nbds://%s@localhost:%s/%s?tls-psk-file=%s' "$(cut -d: -f1 "$pki/$2.psk")" "$UMBRA_TCP_PORT" "$1" \
        "$pki/$2.psk"
}
plain_uri() { printf 'nbd://localhost:%s/%s' "$UMBRA_TCP_PORT" "$1"; }

# listed URI: the export names nbdinfo --list shows, sorted, on one line.
listed() {
    nbdinfo --list --json "$1" >"$tmp/list.json" 2>"$tmp/list.err" || fail "nbdinfo --list $1: $(cat "$tmp/list.err")"
    json "$tmp/list.json" '" ".join(sorted(e["export-name"] for e in d["exports"]))'
}

# refused WHAT COMMAND...: the command must fail.
refused() {
    local what=$1
    shift
    if "$@" >"$tmp/refused.out" 2>&1; then fail "$what was not refused: $(cat "$tmp/refused.out")"; fi
}

# write_errno URI: writes 512 bytes at 0 with libnbd's client-side checks off, so the request
# reaches the server; prints "ok" or the errno name the server answered.
write_errno() {
    URI=$1 nbdsh -c '
import errno, os
h.set_uri_allow_local_file(True)  # tls-certificates=DIR, tls-psk-file=FILE
h.connect_uri(os.environ["URI"])
h.set_strict_mode(0)
try:
    h.pwrite(b"\x01" * 512, 0)
    print("ok")
except nbd.Error as e:
    print(errno.errorcode.get(e.errno, e.errno))'
}

# MARK: - TLS required, mutual TLS, pre-shared keys

start_daemon --listen tcp://127.0.0.1:0 --volume disk:64M --volume other:16M "${tls_server[@]}" \
    --tls-ca "$pki/ca-cert.pem" --tls-psk-file "$pki/keys.psk"

check "nbdinfo nbds:// with a client certificate lists and opens the exports"
assert_eq "$(listed "$(tls_uri "" "$alice")")" "disk other" "exports listed over TLS"
nbdinfo --json "$(tls_uri disk "$alice")" >"$tmp/disk.json" 2>"$tmp/err" || fail "nbdinfo over TLS: $(cat "$tmp/err")"
assert_eq "$(json "$tmp/disk.json" 'd["exports"][0]["export-size"]')" $((64 * MiB)) "size over TLS"
assert_eq "$(json "$tmp/disk.json" 'd["protocol"]')" "newstyle-fixed" "protocol"
assert_eq "$(json "$tmp/disk.json" 'd["TLS"]')" true "TLS negotiated"

check "qemu-img info with tls-creds-x509"
qemu-img info --output=json --object "tls-creds-x509,id=tls0,dir=$alice,endpoint=client" \
    --image-opts "driver=nbd,host=localhost,port=$UMBRA_TCP_PORT,export=disk,tls-creds=tls0" >"$tmp/qemu.json" \
    2>"$tmp/err" || fail "qemu-img info over TLS: $(cat "$tmp/err")"
assert_eq "$(json "$tmp/qemu.json" 'd["virtual-size"]')" $((64 * MiB)) "size seen by qemu-img"

check "nbd-client -l with -certfile/-keyfile/-cacertfile"
nbd-client -l localhost "$UMBRA_TCP_PORT" -certfile "$pki/alice-cert.pem" -keyfile "$pki/alice-key.pem" \
    -cacertfile "$pki/ca-cert.pem" >"$tmp/nbd-client.out" 2>&1 || fail "nbd-client -l over TLS: $(cat "$tmp/nbd-client.out")"
assert_eq "$(grep -v '^Negotiation:' "$tmp/nbd-client.out" | sed '/^$/d; s/: .*//' | sort | tr '\n' ' ')" \
    "disk other " "exports listed by nbd-client"

check "--tls require: a plain client can neither open nor list (ERR_TLS_REQD)"
refused "a plain nbdinfo" nbdinfo "$(plain_uri disk)"
refused "a plain nbdinfo --list" nbdinfo --list "$(plain_uri "")"
assert_match "$(cat "$tmp/refused.out")" "error to list request" "nbdinfo --list's complaint"
! grep -q '^export=' "$tmp/refused.out" || fail "a plain client was shown exports: $(cat "$tmp/refused.out")"
refused "a plain nbd-client -l" nbd-client -l localhost "$UMBRA_TCP_PORT"
assert_match "$(cat "$tmp/refused.out")" "requires TLS" "nbd-client's complaint"
refused "a plain nbdinfo on the Unix socket" nbdinfo "$(nbd_uri disk)"

check "--tls-ca: a certificate from another CA (same name), or none, is refused"
refused "a certificate from another CA" nbdinfo "$(tls_uri disk "$impostor")"
refused "TLS without a client certificate" nbdinfo "$(tls_uri disk "$anonymous")"
refused "qemu-img with a certificate from another CA" qemu-img info \
    --object "tls-creds-x509,id=tls0,dir=$impostor,endpoint=client" \
    --image-opts "driver=nbd,host=localhost,port=$UMBRA_TCP_PORT,export=disk,tls-creds=tls0"

check "TLS-PSK: the right key works, a wrong key or an unknown identity is refused"
assert_eq "$(nbdinfo --size "$(psk_uri disk bob)" 2>&1)" $((64 * MiB)) "size over TLS-PSK"
refused "a wrong pre-shared key" nbdinfo "$(psk_uri disk wrong)"
refused "an unknown PSK identity" nbdinfo "$(psk_uri disk mallory)"

check "data written over TLS reads back byte-exact (big reads: the plain-text sendfile path)"
# (holes under 32 MiB: nbdcopy zeroes a whole hole in one request, and longer ones are refused)
random_file "$tmp/source.img" $((64 * MiB)) 0:$((3 * MiB)) $((30 * MiB)):$((5 * MiB + 4 * KiB)) $((60 * MiB)):$((1 * MiB))
nbdcopy --flush "$tmp/source.img" "$(tls_uri disk "$alice")" || fail "nbdcopy to the export over TLS"
expected=$(checksum "$tmp/source.img")
assert_eq "$(nbdcopy --request-size=$((2 * MiB)) -- "$(tls_uri disk "$alice")" - | sha256sum | cut -d' ' -f1)" \
    "$expected" "checksum read back with a certificate (2 MiB reads)"
assert_eq "$(nbdcopy --request-size=$((128 * KiB)) -- "$(psk_uri disk bob)" - | sha256sum | cut -d' ' -f1)" \
    "$expected" "checksum read back with a pre-shared key (128 KiB reads)"
stop_daemon

# MARK: - TLS optional, access rules

cat >"$tmp/access.json" <<'EOF'
{
  "rules": [
    { "client": "alice", "volumes": ["disk"], "access": "read-write" },
    { "client": "bob", "volumes": ["disk", "other"], "access": "read-only" },
    { "client": "carol", "volumes": ["other"], "access": "read-write" },
    { "unauthenticated": true, "volumes": ["public"], "access": "read-only" }
  ]
}
EOF
start_daemon --listen tcp://127.0.0.1:0 --volume public:8M "${tls_server[@]}" --tls optional \
    --tls-ca "$pki/ca-cert.pem" --tls-psk-file "$pki/keys.psk" --access "$tmp/access.json"
snap=$(snapshot_create disk)

check "--tls optional: plain text and TLS both work"
assert_eq "$(nbdinfo --size "$(plain_uri public)")" $((8 * MiB)) "size of public in plain text"
assert_eq "$(nbdinfo --size "$(tls_uri disk "$alice")")" $((64 * MiB)) "size of disk over TLS"

check "access rules: each client lists only its volumes (and their snapshots)"
assert_eq "$(listed "$(plain_uri "")")" "public" "exports listed to a plain-text client"
assert_eq "$(listed "$(tls_uri "" "$alice")")" "disk disk@$snap" "exports listed to alice"
assert_eq "$(listed "$(psk_uri "" bob)")" "disk disk@$snap other" "exports listed to bob"
assert_eq "$(listed "$(psk_uri "" carol)")" "other" "exports listed to carol"

check "access rules: a volume not granted cannot be opened, not even as the default export"
refused "alice opening other" nbdinfo "$(tls_uri other "$alice")"
refused "a plain client opening disk" nbdinfo "$(plain_uri disk)"
refused "carol opening a snapshot of disk" nbdinfo "$(psk_uri "disk@$snap" carol)"
# The default export ("") is disk, which carol may not see.
refused "carol opening the default export" nbdinfo "$(psk_uri "" carol)"
assert_eq "$(nbdinfo --size "$(psk_uri "" bob)")" $((64 * MiB)) "the default export for bob (disk)"

check "access rules: read-only access is read-only, and the server refuses writes with EPERM"
assert_eq "$(nbdinfo --json "$(psk_uri other bob)" | json /dev/stdin 'd["exports"][0]["is_read_only"]')" true \
    "other is read-only for bob"
assert_eq "$(write_errno "$(psk_uri other bob)")" EPERM "bob writing other"
assert_eq "$(write_errno "$(plain_uri public)")" EPERM "a plain client writing public"
assert_eq "$(write_errno "$(psk_uri other carol)")" ok "carol writing other"
assert_eq "$(write_errno "$(tls_uri disk "$alice")")" ok "alice writing disk"

check "a snapshot is never writable, even with read-write access to its volume"
assert_eq "$(nbdinfo --json "$(tls_uri "disk@$snap" "$alice")" | json /dev/stdin 'd["exports"][0]["is_read_only"]')" \
    true "the snapshot is read-only for alice"
assert_eq "$(write_errno "$(tls_uri "disk@$snap" "$alice")")" EPERM "alice writing the snapshot"
assert_eq "$(nbdcopy -- "$(tls_uri "disk@$snap" "$alice")" - | sha256sum | cut -d' ' -f1)" "$expected" \
    "the snapshot holds what was written before it"
stop_daemon

check "bad TLS and access configurations stop the daemon with one sentence"
bad_start() {
    local expected=$1
    shift
    if "$UMBRA" serve --data "$tmp/data" --listen tcp://127.0.0.1:0 --control "$tmp/bad.sock" "$@" \
        >"$tmp/bad.out" 2>&1; then
        fail "umbra serve $* started"
    fi
    assert_match "$(cat "$tmp/bad.out")" "$expected" "umbra serve $*"
}
bad_start "--tls-key needs --tls-cert" --tls-key "$pki/server-key.pem"
bad_start "--tls-cert needs --tls-key" --tls-cert "$pki/server-cert.pem"
bad_start "not a readable PEM certificate" --tls-cert "$tmp/access.json" --tls-key "$pki/server-key.pem"
bad_start "do not work together" --tls-cert "$pki/server-cert.pem" --tls-key "$pki/alice-key.pem"
echo 'bob:xyz' >"$tmp/bad.psk"
bad_start "Line 1 of the PSK file .* is not IDENTITY:HEXKEY" --tls-psk-file "$tmp/bad.psk"
echo '{"rules": [{"client": "alice", "volumes": ["disk"], "access": "write"}]}' >"$tmp/bad.json"
bad_start "Access rule 1 in .* needs \"access\"" --access "$tmp/bad.json"
echo '{"rules": [' >"$tmp/bad.json"
bad_start "is not valid JSON" --access "$tmp/bad.json"
say "passed"
