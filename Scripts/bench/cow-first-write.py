#!/usr/bin/env python3
"""First writes after a snapshot: Umbra against nbdkit's cow filter and against the disk's durable-write
limit, interleaved rep by rep in one run (issue 9's targets 1 and 2).

Workloads (fio's nbd engine over a Unix socket, one connection, every write a first write):
  seq   1 MiB writes at queue depth 8 over the first 512 MiB of a 1 GiB volume: every chunk copied.
  rand  4 KiB writes at random chunk-aligned offsets one chunk (64 KiB) apart, queue depth 32, each
        chunk once (fio --blockalign=64k with its random map): every write copies a chunk.
Servers:
  limit       (seq only) the same bytes written to a new file on the same file system with pwrite,
              fdatasync'ed every 8 writes (the batch a queue depth of 8 gives): what the disk can make
              durable. Umbra's first write must make as many bytes durable (the copies).
  nbdkit-cow  nbdkit --filter=cow file BASE (an overlay in memory/temp, never synced).
  umbra       umbra serve --volume-file disk:IMG, then `umbra snapshot create disk --no-writers`.
  umbra-nosnap  the same without a snapshot (rand only): the cost of a copy per write.
Several --umbra binaries are measured side by side (NAME=PATH), for before/after comparisons.

Usage: Scripts/bench/cow-first-write.py [-r REPS] [-w "seq rand"] [--umbra NAME=PATH ...] [--json FILE]
Needs fio (with the nbd engine) and nbdkit (Scripts/install-dependencies.sh installs both).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

CHUNK = 64 << 10


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine():
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    with open("/proc/meminfo") as f:
        memory = f.readline().split()[1]
    return {
        "cpus": os.cpu_count(), "cpu": models[0] if models else "", "memoryKiB": int(memory),
        "kernel": platform.release(), "fio": subprocess.run(["fio", "--version"], capture_output=True,
                                                            text=True).stdout.strip(),
        "nbdkit": subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip(),
    }


def fio(args, output):
    result = subprocess.run(["fio", "--output-format=json", f"--output={output}", "--name=job"] + args,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"fio failed: {result.stderr.strip()}")
    with open(output) as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    write = job["write"]
    return {"MiBps": write["bw"] / 1024.0, "iops": write["iops"],
            "p99ms": write.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1e6}


def workload_args(name):
    if name == "seq":
        return ["--rw=write", "--bs=1M", "--iodepth=8", "--offset=0", "--size=512M"]
    # One 4 KiB write per 64 KiB chunk, at random, each chunk once.
    return ["--rw=randwrite", "--bs=4k", f"--blockalign={CHUNK}", "--iodepth=32", "--offset=0", "--size=1G",
            "--randrepeat=0"]


def wait_for(path, process, seconds=30):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no socket at {path}")
        time.sleep(0.02)


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_server(kind, binary, workload, base, scratch):
    """Starts one server, runs the workload against it, stops it; returns fio's figures."""
    os.makedirs(scratch)
    sock = os.path.join(scratch, "nbd.sock")
    output = os.path.join(scratch, "fio.json")
    if kind == "limit":
        target = os.path.join(scratch, "limit.img")
        return fio(["--ioengine=psync", "--rw=write", "--bs=1M", "--size=512M", "--fdatasync=8",
                    "--end_fsync=1", f"--filename={target}"], output)
    if kind == "nbdkit-cow":
        command = ["nbdkit", "-f", "-U", sock, "--filter=cow", "file", base]
        export = ""
        environment = dict(os.environ, TMPDIR=scratch)
    else:
        image = os.path.join(scratch, "disk.img")
        shutil.copyfile(base, image)
        subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)
        control = os.path.join(scratch, "control.sock")
        command = [binary, "serve", "--data", os.path.join(scratch, "data"), "--control", control,
                   "--listen", f"unix:{sock}", "--volume-file", f"disk:{image}", "--log-level", "warning"]
        export = "disk"
        environment = None
    with open(os.path.join(scratch, "server.log"), "w") as server_log:
        process = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, env=environment)
        try:
            wait_for(sock, process)
            if kind == "umbra":
                subprocess.run([binary, "snapshot", "create", "disk", "--no-writers", "--control", control],
                               check=True, capture_output=True)
            return fio(["--ioengine=nbd", f"--uri=nbd+unix:///{export}?socket={sock}"] + workload_args(workload),
                       output)
        finally:
            stop(process)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--reps", type=int, default=3)
    parser.add_argument("-w", "--workloads", default="seq rand")
    parser.add_argument("--umbra", action="append", default=[], help="NAME=PATH (default umbra=.build/release/umbra)")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before each server (default 3)")
    parser.add_argument("--json", help="where to write the raw results (default Benchmarks/results/cow-first-write-TIME.json)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "umbra-bench"))
    options = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    umbras = [tuple(entry.split("=", 1)) for entry in options.umbra] or [("umbra", os.path.join(root, ".build/release/umbra"))]
    for name, path in umbras:
        if not os.access(path, os.X_OK):
            sys.exit(f"cow-first-write: no umbra binary at {path} (swift build -c release --product umbra)")
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"cow-first-write: {tool} is missing (Scripts/install-dependencies.sh installs it)")
    os.makedirs(options.work, exist_ok=True)
    base = os.path.join(options.work, "base.img")
    if not os.path.exists(base) or os.path.getsize(base) != 1 << 30:
        log(f"creating {base}")
        with open("/dev/urandom", "rb") as source, open(base, "wb") as target:
            for _ in range(1024):
                target.write(source.read(1 << 20))
    subprocess.run(["cat", base], stdout=subprocess.DEVNULL, check=True)

    servers = {"seq": ["limit", "nbdkit-cow"] + [n for n, _ in umbras],
               "rand": ["nbdkit-cow"] + [n for n, _ in umbras] + [f"{n}-nosnap" for n, _ in umbras]}
    binaries = dict(umbras)
    results = []
    for rep in range(options.reps):
        for workload in options.workloads.split():
            for server in servers[workload]:
                time.sleep(options.settle)
                kind = server
                binary = None
                if server.endswith("-nosnap"):
                    kind, binary = "umbra-nosnap", binaries[server[:-len("-nosnap")]]
                elif server in binaries:
                    kind, binary = "umbra", binaries[server]
                scratch = tempfile.mkdtemp(prefix=f"{server}-", dir=options.work)
                try:
                    figures = run_server(kind, binary, workload, base, os.path.join(scratch, "s"))
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                results.append({"rep": rep, "workload": workload, "server": server, **figures})
                log(f"rep {rep} {workload} {server}: {figures['MiBps']:.0f} MiB/s {figures['iops']:.0f} IOPS")

    def median(workload, server, key):
        values = [r[key] for r in results if r["workload"] == workload and r["server"] == server]
        return statistics.median(values) if values else None

    print(f"{'workload':8} {'server':18} {'MiB/s':>8} {'IOPS':>8} {'p99 ms':>8}   (medians of {options.reps})")
    for workload in options.workloads.split():
        for server in servers[workload]:
            print(f"{workload:8} {server:18} {median(workload, server, 'MiBps'):8.0f} "
                  f"{median(workload, server, 'iops'):8.0f} {median(workload, server, 'p99ms'):8.2f}")
    print("ratios (medians):")
    for name, _ in umbras:
        if "seq" in options.workloads.split():
            ours = median("seq", name, "MiBps")
            print(f"  seq   {name} / nbdkit-cow = {ours / median('seq', 'nbdkit-cow', 'MiBps'):.2f}"
                  f"   {name} / limit = {ours / median('seq', 'limit', 'MiBps'):.2f}")
        if "rand" in options.workloads.split():
            ours = median("rand", name, "iops")
            print(f"  rand  {name} / nbdkit-cow = {ours / median('rand', 'nbdkit-cow', 'iops'):.2f}"
                  f"   {name} / {name}-nosnap = {ours / median('rand', name + '-nosnap', 'iops'):.2f}")
    destination = options.json or os.path.join(root, "Benchmarks", "results",
                                               f"cow-first-write-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    with open(destination, "w") as f:
        json.dump({"benchmark": "cow-first-write", "command": " ".join(sys.argv), "machine": machine(),
                   "reps": options.reps, "results": results}, f, indent=1)
    log(f"raw results: {destination}")


if __name__ == "__main__":
    main()
