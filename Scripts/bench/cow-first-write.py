#!/usr/bin/env python3
"""First writes after a snapshot: Umbra against nbdkit's cow filter and against the disk's durable-write
limit, interleaved rep by rep in one run (issue 9's targets 1 and 2).

Workloads (fio's nbd engine over a Unix socket, one connection, every write a first write):
  seq   1 MiB writes at queue depth 8 over the first 512 MiB of a 1 GiB volume: every chunk copied.
  rand  4 KiB writes at chunk-aligned offsets one chunk (64 KiB) apart over the whole 1 GiB, each
        chunk once in a random order, queue depth 32 (Scripts/bench/chunk-writes.c, libnbd; fio cannot:
        its blockalign turns its random map off): every write copies a chunk.
Servers:
  limit       (seq only) the same bytes written to a new file on the same file system with pwrite,
              fdatasync'ed every 8 writes (the batch a queue depth of 8 gives): what the disk can make
              durable. Umbra's first write must make as many bytes durable (the copies).
  nbdkit-cow  nbdkit --filter=cow file BASE (an overlay in memory/temp, never synced).
  umbra       umbra serve --volume-file disk:IMG, then `umbra snapshot create disk --no-writers`.
  umbra-nosnap  the same without a snapshot (rand only): the cost of a copy per write.
Several --umbra binaries are measured side by side (NAME=PATH [SERVE-ARGS]), for before/after comparisons
or options (e.g. --umbra "write=PATH --write-copies").

Usage: Scripts/bench/cow-first-write.py [-r REPS] [-w "seq rand"] [--umbra NAME=PATH ...] [--json FILE]
Every file lives under UMBRA_BENCH_DIR (default $TMPDIR/umbra-bench); Scripts/bench/on-xfs-reflink.sh
runs it on XFS with reflink, where Umbra's copies are clones (the table says which copy method ran).
Needs fio (with the nbd engine), nbdkit, a C compiler and libnbd-dev (Scripts/install-dependencies.sh
installs them).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import benchlib

CHUNK = 64 << 10


def run_workload(workload, sock, export, scratch):
    if workload == "seq":
        return benchlib.fio(["--ioengine=nbd", f"--uri={benchlib.nbd_uri(sock, export)}", "--rw=write", "--bs=1M",
                             "--iodepth=8", "--offset=0", "--size=512M"], scratch)
    # One 4 KiB write into every 64 KiB chunk of the image, in a random order.
    result = subprocess.run([benchlib.built_tool("chunk-writes"), benchlib.nbd_uri(sock, export), "0", str(1 << 30),
                             str(CHUNK), "4096", "32", "20261129"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"chunk-writes failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def run_server(kind, binary, workload, base, scratch, extra=()):
    """Starts one server, runs the workload against it, stops it; returns {workload: figures}: for
    seq on a server, also "seq-rewrite", the same writes again (every chunk already copied)."""
    sock = os.path.join(scratch, "nbd.sock")
    if kind == "limit":
        target = os.path.join(scratch, "limit.img")
        return {workload: benchlib.fio(["--ioengine=psync", "--rw=write", "--bs=1M", "--size=512M", "--fdatasync=8",
                                        "--end_fsync=1", f"--filename={target}"], scratch)}
    if kind == "nbdkit-cow":
        server = benchlib.Server(["nbdkit", "-f", "-U", sock, "--filter=cow", "file", base], sock, scratch,
                                 dict(os.environ, TMPDIR=scratch))
        export = ""
    else:
        image = benchlib.fresh_copy(base, scratch)
        server = benchlib.Server(benchlib.umbra_command(binary, scratch, sock, image, extra), sock, scratch)
        export = "disk"
    try:
        copy_method = None
        if kind.startswith("umbra"):
            control = ["--control", os.path.join(scratch, "control.sock")]
            status = subprocess.run([binary, "status", "--json", *control], check=True, capture_output=True, text=True)
            copy_method = json.loads(status.stdout)["volumes"][0].get("copyMethod")
        if kind == "umbra":
            subprocess.run([binary, "snapshot", "create", "disk", "--no-writers", *control], check=True,
                           capture_output=True)
        figures = {workload: run_workload(workload, sock, export, scratch)}
        if workload == "seq":
            figures["seq-rewrite"] = run_workload(workload, sock, export, scratch)
        if copy_method:
            for measured in figures.values():
                measured["copyMethod"] = copy_method
        return figures
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--reps", type=int, default=3)
    parser.add_argument("-w", "--workloads", default="seq rand")
    parser.add_argument("--umbra", action="append", help="NAME=PATH (default umbra=.build/release/umbra)")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before each server (default 3)")
    parser.add_argument("--json", help="raw results file (default Benchmarks/results/cow-first-write-TIME.json)")
    options = parser.parse_args()
    umbras = [(name, (path, args)) for name, path, args in benchlib.parse_umbras(options.umbra)]
    benchlib.require("fio", "nbdkit")
    base = benchlib.base_image()

    servers = {"seq": ["limit", "nbdkit-cow"] + [n for n, _ in umbras],
               "rand": ["nbdkit-cow"] + [n for n, _ in umbras] + [f"{n}-nosnap" for n, _ in umbras]}
    binaries = dict(umbras)
    results = []
    for rep in range(options.reps):
        for workload in options.workloads.split():
            for server in servers[workload]:
                time.sleep(options.settle)
                kind = server
                binary, extra = None, ()
                if server.endswith("-nosnap"):
                    kind, (binary, extra) = "umbra-nosnap", binaries[server[:-len("-nosnap")]]
                elif server in binaries:
                    kind, (binary, extra) = "umbra", binaries[server]
                scratch = tempfile.mkdtemp(prefix=f"{server}-", dir=benchlib.WORK)
                try:
                    measured = run_server(kind, binary, workload, base, scratch, extra)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                for name, figures in measured.items():
                    results.append({"rep": rep, "workload": name, "server": server, **figures})
                    benchlib.log(f"rep {rep} {name} {server}: {figures['MiBps']:.0f} MiB/s {figures['iops']:.0f} IOPS")

    def median(workload, server, key):
        return benchlib.median([r[key] for r in results if r["workload"] == workload and r["server"] == server])

    methods = sorted({r["copyMethod"] for r in results if "copyMethod" in r})
    print(f"files on {benchlib.machine()['workFileSystem']} ({benchlib.WORK}); Umbra's copies: {', '.join(methods)}")
    print(f"{'workload':12} {'server':18} {'MiB/s':>8} {'IOPS':>8} {'p99 ms':>8}   (medians of {options.reps})")
    shown = [(w, s) for w in options.workloads.split() for s in servers[w]]
    if "seq" in options.workloads.split():
        shown += [("seq-rewrite", s) for s in servers["seq"] if s != "limit"]
    for workload, server in shown:
        print(f"{workload:12} {server:18} {median(workload, server, 'MiBps'):8.0f} "
              f"{median(workload, server, 'iops'):8.0f} {median(workload, server, 'p99ms'):8.2f}")
    print("ratios (medians):")
    for name, _ in umbras:
        if "seq" in options.workloads.split():
            ours = median("seq", name, "MiBps")
            print(f"  seq   {name} / nbdkit-cow = {ours / median('seq', 'nbdkit-cow', 'MiBps'):.2f}"
                  f"   {name} / limit = {ours / median('seq', 'limit', 'MiBps'):.2f}")
            rewrite = median("seq-rewrite", name, "MiBps")
            print(f"  seq-rewrite {name} / nbdkit-cow = {rewrite / median('seq-rewrite', 'nbdkit-cow', 'MiBps'):.2f}")
        if "rand" in options.workloads.split():
            ours = median("rand", name, "iops")
            print(f"  rand  {name} / nbdkit-cow = {ours / median('rand', 'nbdkit-cow', 'iops'):.2f}"
                  f"   {name} / {name}-nosnap = {ours / median('rand', name + '-nosnap', 'iops'):.2f}")
    benchlib.write_results("cow-first-write", " ".join(sys.argv),
                           {"reps": options.reps, "results": results}, options.json)


if __name__ == "__main__":
    main()
