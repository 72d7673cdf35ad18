#!/usr/bin/python3
"""Issue 4's benchmark: how long a shadow copy set takes, and how long it holds writes.

Starts `umbra serve` on a temporary data directory with two volumes, connects two writers (one per
volume, answering every event at once, written with Scripts/umbra_writer.py), keeps a libnbd client
per volume doing 4 KiB random writes, and takes SETS sets of both volumes through the control
socket, deleting each after it. For every set it records the time from the request to the answer
and the longest write latency seen by the clients among writes that overlapped the set. Prints
p50/p99/max of both, and the writes' latency outside sets for comparison.

    Scripts/bench/set-latency.py [--umbra .build/release/umbra] [--sets 100] [--flush-every N] [--json]

With --flush-every N each client sends a FLUSH after every N writes (0, the default: never), as a
file system or database on the volume would; without flushes a set has to flush all the dirty data
the clients left, and the writes after it must not wait for that.

Needs Debian's python3 with the libnbd module (python3-libnbd), hence /usr/bin/python3.
"""

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import umbra_writer  # noqa: E402


class PromptWriter(umbra_writer.Writer):
    """Answers every event at once."""


class Requester:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buffer = b""
        self.next_id = 0
        self.call("hello", {"version": 1, "role": "requester", "client": "set-latency"})

    def call(self, method, params):
        self.next_id += 1
        self.sock.sendall((json.dumps({"id": self.next_id, "method": method, "params": params}) + "\n").encode())
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("the daemon closed the control connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError("%s failed: %s" % (method, answer["error"]["message"]))
        return answer["result"]


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--umbra", default=".build/release/umbra")
    parser.add_argument("--sets", type=int, default=100)
    parser.add_argument("--flush-every", type=int, default=0, help="FLUSH after every N writes (0: never)")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="umbra-set-latency-")
    nbd_socket = os.path.join(directory, "nbd.sock")
    control = os.path.join(directory, "control.sock")
    daemon = subprocess.Popen(
        [arguments.umbra, "serve", "--data", os.path.join(directory, "data"), "--listen", "unix:" + nbd_socket,
         "--control", control, "--volume", "a:256M", "--volume", "b:256M", "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True)
    stop = threading.Event()
    latencies = []  # (start, end) per write, appended by the load threads
    lock = threading.Lock()
    try:
        if not daemon.stdout.readline().startswith("ready"):
            raise RuntimeError("the daemon did not start")
        writers = [PromptWriter(control, "writer-" + volume, [volume]) for volume in ("a", "b")]
        for writer in writers:
            writer.connect()
            threading.Thread(target=writer.run, daemon=True).start()
        requester = Requester(control)
        while len(requester.call("writer.list", {})["writers"]) < 2:
            time.sleep(0.001)

        def load(volume, seed):
            handle = nbd.NBD()
            handle.connect_uri("nbd+unix:///%s?socket=%s" % (volume, nbd_socket))
            rng = random.Random(seed)
            block = bytes(rng.getrandbits(8) for _ in range(4096))
            count = 0
            while not stop.is_set():
                offset = rng.randrange(0, (256 << 20) // 4096) * 4096
                start = time.perf_counter()
                handle.pwrite(block, offset)
                end = time.perf_counter()
                with lock:
                    latencies.append((start, end))
                count += 1
                if arguments.flush_every and count % arguments.flush_every == 0:
                    handle.flush()
            handle.shutdown()

        loaders = [threading.Thread(target=load, args=(volume, seed)) for seed, volume in enumerate(("a", "b"))]
        for loader in loaders:
            loader.start()
        time.sleep(0.5)  # let the load settle before the first set

        set_seconds = []
        holds = []
        windows = []
        for _ in range(arguments.sets):
            start = time.perf_counter()
            result = requester.call("snapshot.create", {"volumes": ["a", "b"]})
            end = time.perf_counter()
            if result["crashConsistent"] or len(result["writers"]) != 2:
                raise RuntimeError("both writers should take part in every set")
            windows.append((start, end))
            set_seconds.append(end - start)
            requester.call("snapshot.delete", {"ids": [result["set"]]})
            time.sleep(0.01)
        stop.set()
        for loader in loaders:
            loader.join()

        with lock:
            writes = list(latencies)
        outside = []
        for start, end in windows:
            overlapping = [w_end - w_start for w_start, w_end in writes if w_start < end and w_end > start]
            holds.append(max(overlapping) if overlapping else 0.0)
        for w_start, w_end in writes:
            if not any(w_start < end and w_end > start for start, end in windows):
                outside.append(w_end - w_start)

        def summary(values):
            return {"p50": percentile(values, 0.5) * 1000, "p99": percentile(values, 0.99) * 1000,
                    "max": max(values) * 1000}

        report = {
            "sets": arguments.sets,
            "flushEvery": arguments.flush_every,
            "setMilliseconds": summary(set_seconds),
            "longestWriteDuringSetMilliseconds": summary(holds),
            "writeOutsideSetsMilliseconds": summary(outside),
            "writes": len(writes),
        }
        if arguments.json:
            print(json.dumps(report))
        else:
            print("%d sets of 2 volumes with 2 writers, %d 4 KiB writes in the background, %s" % (
                arguments.sets, len(writes),
                "a FLUSH every %d" % arguments.flush_every if arguments.flush_every else "never flushed"))
            print("%-44s %8s %8s %8s" % ("", "p50 ms", "p99 ms", "max ms"))
            for label, key in (("snapshot create, request to answer", "setMilliseconds"),
                               ("longest 4 KiB write overlapping a set", "longestWriteDuringSetMilliseconds"),
                               ("4 KiB write outside sets", "writeOutsideSetsMilliseconds")):
                values = report[key]
                print("%-44s %8.2f %8.2f %8.2f" % (label, values["p50"], values["p99"], values["max"]))
    finally:
        stop.set()
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
