#!/usr/bin/python3
"""How long a FUA write takes while other writes are in flight on the same volume.

Each --umbra server serves a fresh copy of a 1 GiB random image; a snapshot is taken, then one libnbd
connection keeps writing 1 MiB at queue depth 8 over the first 512 MiB without FUA (first writes, so
each is answered once its copies are claimed and the copies go on in the background), while a second
connection sends WRITES 4 KiB FUA writes, one at a time, at random 4 KiB-aligned offsets in the last
256 MiB. Prints the FUA writes' latency (p50, p99, max) and the background writer's throughput over
the same time, per server, medians over reps.

    /usr/bin/python3 Scripts/bench/fua-latency.py [-r REPS] [--writes 400] [--umbra NAME=PATH [ARGS]] [--json FILE]

A FUA write needs its own data durable. It must not wait for the background writer's copies, which
a FLUSH would. Needs Debian's python3 with the libnbd module (python3-libnbd).
"""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import nbd

import benchlib


def measure(binary, extra, base, writes, seed):
    scratch = tempfile.mkdtemp(prefix="fua-", dir=benchlib.WORK)
    sock = os.path.join(scratch, "nbd.sock")
    try:
        image = benchlib.fresh_copy(base, scratch)
        server = benchlib.Server(benchlib.umbra_command(binary, scratch, sock, image, extra), sock, scratch)
        try:
            subprocess.run([binary, "snapshot", "create", "disk", "--no-writers", "--control",
                            os.path.join(scratch, "control.sock")], check=True, capture_output=True)
            uri = benchlib.nbd_uri(sock, "disk")
            stop = threading.Event()
            written = [0]

            def background():
                handle = nbd.NBD()
                handle.connect_uri(uri)
                buffer = nbd.Buffer.from_bytearray(bytearray(os.urandom(1 << 20)))
                offset = 0
                in_flight = []
                while not stop.is_set():
                    while handle.aio_in_flight() < 8:
                        in_flight.append(handle.aio_pwrite(buffer, offset))
                        offset = (offset + (1 << 20)) % (512 << 20)
                    handle.poll(-1)
                    for cookie in [c for c in in_flight if handle.aio_command_completed(c)]:
                        in_flight.remove(cookie)
                        written[0] += 1 << 20
                while handle.aio_in_flight() > 0:
                    handle.poll(-1)
                handle.shutdown()

            thread = threading.Thread(target=background)
            thread.start()
            foreground = nbd.NBD()
            foreground.connect_uri(uri)
            generator = random.Random(seed)
            payload = os.urandom(4096)
            latencies = []
            time.sleep(0.5)  # the background writer is under way
            started = time.monotonic()
            for _ in range(writes):
                offset = (768 << 20) + generator.randrange(0, 256 << 20, 4096)
                before = time.monotonic()
                foreground.pwrite(payload, offset, nbd.CMD_FLAG_FUA)
                latencies.append((time.monotonic() - before) * 1000)
            elapsed = time.monotonic() - started
            background_written = written[0]
            stop.set()
            thread.join()
            foreground.shutdown()
        finally:
            server.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    latencies.sort()
    return {"p50ms": latencies[len(latencies) // 2], "p99ms": latencies[int(len(latencies) * 0.99)],
            "maxms": latencies[-1], "backgroundMiBps": background_written / elapsed / (1 << 20)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--reps", type=int, default=3)
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--umbra", action="append", help="NAME=PATH [SERVE-ARGS] (default: this checkout's release build)")
    parser.add_argument("--json", help="raw results file (default Benchmarks/results/fua-latency-TIME.json)")
    options = parser.parse_args()
    umbras = benchlib.parse_umbras(options.umbra)
    base = benchlib.base_image()
    results = []
    for rep in range(options.reps):
        for name, binary, extra in umbras:
            time.sleep(3)
            figures = measure(binary, extra, base, options.writes, seed=rep)
            results.append({"rep": rep, "server": name, **figures})
            benchlib.log(f"rep {rep} {name}: FUA p50 {figures['p50ms']:.2f} ms, p99 {figures['p99ms']:.2f} ms, "
                         f"max {figures['maxms']:.1f} ms; background {figures['backgroundMiBps']:.0f} MiB/s")
    print(f"{'server':16} {'FUA p50 ms':>11} {'p99 ms':>8} {'max ms':>8} {'background MiB/s':>17}"
          f"   (medians of {options.reps})")
    for name, _, _ in umbras:
        mine = [r for r in results if r["server"] == name]
        print(f"{name:16} {benchlib.median([r['p50ms'] for r in mine]):11.2f} "
              f"{benchlib.median([r['p99ms'] for r in mine]):8.2f} {benchlib.median([r['maxms'] for r in mine]):8.1f} "
              f"{benchlib.median([r['backgroundMiBps'] for r in mine]):17.0f}")
    benchlib.write_results("fua-latency", " ".join(sys.argv), {"reps": options.reps, "results": results}, options.json)


if __name__ == "__main__":
    main()
