#!/usr/bin/env bash
# A single-node Ceph cluster for trying Umbra's RBD volumes and for its tests: one monitor and one
# OSD on 127.0.0.1, no systemd, no manager, every file (state, sockets, logs) in one directory.
#
#   Scripts/ceph-cluster.sh start DIR [--memstore-size SIZE]   start it; prints the ceph.conf path
#   Scripts/ceph-cluster.sh stop DIR                           stop its daemons (the directory stays)
#   Scripts/ceph-cluster.sh pause DIR | resume DIR             SIGSTOP/SIGCONT both daemons: the
#                                                              cluster "goes away" and comes back
#
# Then: umbra serve --ceph-conf DIR/ceph.conf, and `volume create NAME --rbd rbd/IMAGE --size 1G`.
# The OSD keeps its data in memory (memstore), so a stopped cluster starts empty. It needs the
# packages ceph-mon ceph-osd ceph-common (Scripts/install-dependencies.sh installs them).
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 2 ] || usage
command=$1
dir=$(realpath -m "$2")
shift 2
memstore_size=$((4 * 1024 * 1024 * 1024))

pids() { cat "$dir"/run/*.pid 2>/dev/null || true; }

case "$command" in
stop)
    for pid in $(pids); do kill "$pid" 2>/dev/null || true; done
    for pid in $(pids); do
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -f "$dir"/run/*.pid
    exit 0
    ;;
pause | resume)
    signal=STOP; [ "$command" = resume ] && signal=CONT
    for pid in $(pids); do kill -s "$signal" "$pid"; done
    exit 0
    ;;
start) ;;
*) usage ;;
esac

while [ $# -gt 0 ]; do
    case "$1" in
    --memstore-size) memstore_size=$(numfmt --from=iec "$2"); shift 2 ;;
    *) usage ;;
    esac
done

for tool in ceph-mon ceph-osd ceph ceph-authtool monmaptool; do
    command -v "$tool" >/dev/null || {
        echo "ceph-cluster: $tool is missing; run Scripts/install-dependencies.sh" >&2
        exit 1
    }
done
if [ -n "$(pids)" ]; then
    echo "ceph-cluster: a cluster already runs from $dir; stop it first" >&2
    exit 1
fi

# The daemons outlive this script: they must not hold descriptors it inherited (a caller reading
# our output until end of file would wait for them forever).
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null || true
done

# A free port for the monitor (msgr2 only).
port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fsid=$(cat /proc/sys/kernel/random/uuid)
rm -rf "$dir"
mkdir -p "$dir"/{mon,osd,run,log}
conf=$dir/ceph.conf
cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
mon initial members = a
public network = 127.0.0.1/32
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
ms bind msgr1 = false
ms bind ipv6 = false
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon cluster log file = $dir/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.05
paxos min wait = 0.01
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
osd pool default pg autoscale mode = off
# A client killed with -9 keeps an image's exclusive lock until its watch times out (30 s by
# default); a test cluster lets the next client take it over sooner.
osd client watch timeout = 5
rbd default features = layering,exclusive-lock,object-map,fast-diff,deep-flatten

[mon]
mon data = $dir/mon/\$name
keyring = $dir/mon/keyring

[osd]
osd data = $dir/osd/\$name
osd objectstore = memstore
memstore device bytes = $memstore_size
memstore page set = true
osd max object name len = 256
osd max object namespace len = 64
keyring = $dir/osd/keyring

[client]
admin socket =
log file = $dir/log/client.log
keyring = $dir/client.keyring
EOF

ceph-authtool --create-keyring "$dir/mon/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$dir/client.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$dir/mon/keyring" --import-keyring "$dir/client.keyring" >/dev/null
monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/mon/monmap" >/dev/null
ceph-mon -c "$conf" --id a --mkfs --monmap "$dir/mon/monmap" --keyring "$dir/mon/keyring" >/dev/null 2>&1
ceph-mon -c "$conf" --id a </dev/null >/dev/null 2>&1

ceph() { timeout 60 "$(type -P ceph)" -c "$conf" "$@"; }
osd_id=$(ceph osd create)
mkdir -p "$dir/osd/osd.$osd_id"
ceph auth get-or-create "osd.$osd_id" mon 'allow profile osd' osd 'allow *' mgr 'allow profile osd' 2>/dev/null \
    >"$dir/osd/keyring"
ceph-osd -c "$conf" --id "$osd_id" --mkfs --keyring "$dir/osd/keyring" >/dev/null 2>&1
ceph auth del "osd.$osd_id" >/dev/null 2>&1 || true
ceph auth add "osd.$osd_id" mon 'allow profile osd' osd 'allow *' mgr 'allow profile osd' 2>/dev/null \
    -i "$dir/osd/keyring" >/dev/null
ceph osd crush add "osd.$osd_id" 1.0 host=localhost root=default >/dev/null 2>&1 || true
ceph-osd -c "$conf" --id "$osd_id" </dev/null >/dev/null 2>&1

ceph osd pool create rbd 8 >/dev/null 2>&1
ceph osd pool application enable rbd rbd >/dev/null 2>&1
for _ in $(seq 600); do
    # Without a manager nothing reports placement groups; an answered listing means they serve.
    if timeout 5 rbd -c "$conf" -p rbd ls >/dev/null 2>&1; then
        echo "$conf"
        exit 0
    fi
    sleep 0.1
done
echo "ceph-cluster: the cluster in $dir did not become ready in 60 s; see $dir/log" >&2
exit 1
