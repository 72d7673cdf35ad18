#!/usr/bin/env python3
"""Umbra's live export against nbdkit (file plugin) and, on request, qemu-nbd: fio's nbd
engine over a Unix socket, every server serving its own copy of the same 1 GiB random image, servers
interleaved rep by rep. Reports throughput and the server's own CPU time per GiB moved (user + system
of the server process, from /proc, over the fio run), medians over the reps, and Umbra's ratios to
nbdkit.

Workloads (time-based, --runtime seconds each, no ramp so that CPU and bytes cover the same span):
  sr1m  sequential read 1 MiB, QD8      sw1m  sequential write 1 MiB, QD8
  rr4k  random read 4 KiB, QD32         rw4k  random write 4 KiB, QD32
  NAME_j2  the same on two connections (sequential ones split the image in halves)

Usage:
  Scripts/bench/nbd-compare.py [-r REPS] [-w "sr1m sw1m rr4k rw4k"] [--peers "nbdkit qemu-nbd"]
                               [--umbra NAME=PATH[ SERVE-ARGS...]]... [--reference NAME] [--json FILE]
Several --umbra entries compare builds or settings, e.g. --umbra "offload=.build/release/umbra --offload-writes";
--reference NAME gives the ratios to one of them instead of nbdkit (e.g. the cost of --metrics:
  --peers "" -w "rr4k rw4k" --umbra off=PATH --umbra "metrics=PATH --metrics tcp://127.0.0.1:0" --reference off).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import benchlib

WORKLOADS = {
    "sr1m": ["--rw=read", "--bs=1M", "--iodepth=8"],
    "sw1m": ["--rw=write", "--bs=1M", "--iodepth=8"],
    "rr4k": ["--rw=randread", "--bs=4k", "--iodepth=32", "--norandommap", "--randrepeat=0"],
    "rw4k": ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--norandommap", "--randrepeat=0"],
}


def workload_args(name):
    base, _, jobs = name.partition("_j")
    args = list(WORKLOADS[base])
    if jobs:
        args.append(f"--numjobs={int(jobs)}")
        if base.startswith("s"):
            share = (1 << 30) // int(jobs)
            args += [f"--size={share}", f"--offset_increment={share}"]
    return args


def peer_command(name, sock, image):
    """(command, export name) of a built-in peer."""
    if name == "nbdkit":
        return ["nbdkit", "-f", "-U", sock, "file", image], ""
    if name == "qemu-nbd":
        return ["qemu-nbd", "-f", "raw", "--cache=writeback", "-t", "-e", "8", "-k", sock, image], ""
    sys.exit(f"unknown peer {name} (nbdkit, qemu-nbd)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--reps", type=int, default=3)
    parser.add_argument("-w", "--workloads", default="sr1m sw1m rr4k rw4k sr1m_j2 sw1m_j2 rr4k_j2 rw4k_j2")
    parser.add_argument("--peers", default="nbdkit")
    parser.add_argument("--umbra", action="append", help="NAME=PATH[ SERVE-ARGS...] (default: the release build)")
    parser.add_argument("--runtime", type=int, default=4)
    parser.add_argument("--settle", type=float, default=2.0, help="idle seconds before each server (default 2)")
    parser.add_argument("--reference", default="nbdkit",
                        help="the server the ratios are to: a peer or an --umbra NAME (default nbdkit)")
    parser.add_argument("--json", help="raw results file (default Benchmarks/results/nbd-compare-TIME.json)")
    options = parser.parse_args()
    peers = options.peers.split()
    umbras = benchlib.parse_umbras(options.umbra)
    benchlib.require("fio", *peers)
    workloads = options.workloads.split()
    for workload in workloads:
        if workload.partition("_j")[0] not in WORKLOADS:
            sys.exit(f"unknown workload {workload}")
    base = benchlib.base_image()
    servers = peers + [name for name, _, _ in umbras]
    results = []
    for rep in range(options.reps):
        for server in servers:
            time.sleep(options.settle)
            scratch = tempfile.mkdtemp(prefix=f"{server}-", dir=benchlib.WORK)
            try:
                sock = os.path.join(scratch, "nbd.sock")
                image = benchlib.fresh_copy(base, scratch)
                if server in peers:
                    command, export = peer_command(server, sock, image)
                else:
                    _, binary, extra = next(u for u in umbras if u[0] == server)
                    command, export = benchlib.umbra_command(binary, scratch, sock, image, extra), "disk"
                process = benchlib.Server(command, sock, scratch)
                try:
                    for workload in workloads:
                        before = process.cpu()
                        figures = benchlib.fio(
                            ["--ioengine=nbd", f"--uri={benchlib.nbd_uri(sock, export)}", "--time_based",
                             f"--runtime={options.runtime}", "--group_reporting"] + workload_args(workload), scratch,
                            workload)
                        spent = process.cpu() - before
                        figures["cpuSecondsPerGiB"] = spent / (figures["bytes"] / (1 << 30)) if figures["bytes"] else None
                        results.append({"rep": rep, "workload": workload, "server": server, **figures})
                        benchlib.log(f"rep {rep} {server} {workload}: {figures['MiBps']:.0f} MiB/s "
                                     f"{figures['iops']:.0f} IOPS, {figures['cpuSecondsPerGiB'] or 0:.2f} CPU s/GiB")
                finally:
                    process.stop()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    def med(workload, server, key):
        return benchlib.median([r[key] for r in results if r["workload"] == workload and r["server"] == server])

    print(f"{'workload':10} {'server':16} {'MiB/s':>8} {'IOPS':>9} {'CPU s/GiB':>10}   (medians of {options.reps})")
    for workload in workloads:
        for server in servers:
            print(f"{workload:10} {server:16} {med(workload, server, 'MiBps'):8.0f} {med(workload, server, 'iops'):9.0f} "
                  f"{med(workload, server, 'cpuSecondsPerGiB') or 0:10.2f}")
    reference_name = options.reference
    if reference_name in servers:
        print(f"Each / {reference_name} (throughput; server CPU per GiB):")
        others = [name for name, _, _ in umbras] if reference_name in peers else servers
        for workload in workloads:
            reference = med(workload, reference_name, "MiBps")
            reference_cpu = med(workload, reference_name, "cpuSecondsPerGiB")
            for name in others:
                if name == reference_name:
                    continue
                ours, cpu = med(workload, name, "MiBps"), med(workload, name, "cpuSecondsPerGiB")
                cpu_ratio = f"{cpu / reference_cpu:.2f}" if cpu and reference_cpu else "-"
                print(f"  {workload:10} {name:16} {ours / reference:5.2f}   cpu {cpu_ratio}")
    benchlib.write_results("nbd-compare", " ".join(sys.argv),
                           {"reps": options.reps, "runtimeSeconds": options.runtime, "servers": servers,
                            "umbra": [{"name": n, "path": p, "args": a} for n, p, a in umbras], "results": results},
                           options.json)


if __name__ == "__main__":
    main()
