#!/usr/bin/env python3
"""Backups against nbdcopy: a full `umbra backup` of a 1 GiB volume of random bytes, and `nbdcopy`
from the same snapshot's NBD export to a raw file (both flushed to disk at the end), then an
incremental backup after 1 % of the volume changed (160 writes of 64 KiB at seeded random offsets).
Each copy starts with the page cache dropped and the two tools loaded again.
Rep by rep, interleaved; reports medians and the ratios the issue asks for:
  full backup speed / nbdcopy speed       (target: at least 0.9)
  incremental time / full backup time     (target: under 0.1)

Usage:
  /usr/bin/python3 Scripts/bench/backup.py [-r REPS] [--umbra PATH] [--json FILE]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import benchlib


def umbra(binary, control, *arguments):
    result = subprocess.run([binary, *arguments, "--control", control], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"umbra {' '.join(arguments)}: {result.stderr.strip()}")
    return result.stdout


def timed(command):
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {result.stderr.strip()[-2000:]}")
    return time.monotonic() - started, result.stdout


def drop_caches(*tools):
    """Start every copy from the same cold cache (root only; otherwise warm for both), with the data
    cold but the tools themselves loaded: the figure is of copying, not of reading a binary."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass
    for tool in tools:
        subprocess.run([tool, "--version"], capture_output=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--reps", type=int, default=3)
    parser.add_argument("--umbra", default=os.path.join(benchlib.ROOT, ".build/release/umbra"))
    parser.add_argument("--json", help="raw results file (default Benchmarks/results/backup-TIME.json)")
    options = parser.parse_args()
    benchlib.require("nbdcopy")
    if not os.access(options.umbra, os.X_OK):
        sys.exit(f"no umbra binary at {options.umbra} (swift build -c release --product umbra)")
    base = benchlib.base_image()
    results = []
    for rep in range(options.reps):
        scratch = tempfile.mkdtemp(prefix="backup-", dir=benchlib.WORK)
        try:
            sock = os.path.join(scratch, "nbd.sock")
            control = os.path.join(scratch, "control.sock")
            image = benchlib.fresh_copy(base, scratch)
            server = benchlib.Server(benchlib.umbra_command(options.umbra, scratch, sock, image), sock, scratch)
            try:
                snapshot = json.loads(umbra(options.umbra, control, "snapshot", "create", "disk", "--json"))
                export = snapshot["snapshots"][0]["export"]
                raw = os.path.join(scratch, "copy.raw")
                drop_caches("nbdcopy", options.umbra)
                nbdcopy, _ = timed(["nbdcopy", "--flush", benchlib.nbd_uri(sock, export), raw])
                os.remove(raw)
                backups = os.path.join(scratch, "backups")
                drop_caches("nbdcopy", options.umbra)
                full, output = timed([options.umbra, "backup", "disk", "--to", backups, "--json", "--control", control])
                full_copied = json.loads(output)["backups"][0]["copiedBytes"]
                # 1 % of the volume changes: 160 writes of 64 KiB at seeded random offsets.
                rng = random.Random(rep)
                offsets = rng.sample(range((1 << 30) >> 16), 160)
                script = "".join(f"h.pwrite(b'\\x5a' * 65536, {offset << 16})\n" for offset in offsets) + "h.flush()\n"
                subprocess.run(["/usr/bin/python3", "-m", "nbd", "-u", benchlib.nbd_uri(sock, "disk"), "-c", script],
                               check=True)
                drop_caches("nbdcopy", options.umbra)
                incremental, output = timed(
                    [options.umbra, "backup", "disk", "--to", backups, "--json", "--control", control])
                summary = json.loads(output)["backups"][0]
                results.append({"rep": rep, "nbdcopySeconds": nbdcopy, "fullSeconds": full,
                                "fullCopiedBytes": full_copied, "incrementalSeconds": incremental,
                                "incrementalKind": summary["kind"], "incrementalCopiedBytes": summary["copiedBytes"]})
                benchlib.log(f"rep {rep}: nbdcopy {nbdcopy:.2f} s, full backup {full:.2f} s, "
                             f"incremental {incremental:.2f} s ({summary['copiedBytes'] >> 10} KiB)")
            finally:
                server.stop()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    nbdcopy = benchlib.median([r["nbdcopySeconds"] for r in results])
    full = benchlib.median([r["fullSeconds"] for r in results])
    incremental = benchlib.median([r["incrementalSeconds"] for r in results])
    gib = 1.0
    print(f"1 GiB of random data, medians of {options.reps} (whole commands, flushed to disk):")
    print(f"  nbdcopy snapshot export -> raw file   {nbdcopy:6.2f} s  {gib / nbdcopy * 1024:7.0f} MiB/s")
    print(f"  umbra backup, full                    {full:6.2f} s  {gib / full * 1024:7.0f} MiB/s")
    print(f"  umbra backup, incremental after 1 %   {incremental:6.2f} s")
    print(f"full backup speed / nbdcopy speed: {nbdcopy / full:.2f}")
    print(f"incremental time / full time:      {incremental / full:.3f}")
    benchlib.write_results("backup", " ".join(sys.argv), {"reps": options.reps, "results": results}, options.json)


if __name__ == "__main__":
    main()
