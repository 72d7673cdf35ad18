#!/usr/bin/python3
"""The soak run behind Scripts/soak.sh: one data directory, hours of mixed load, and every snapshot
checked block by block at the end.

Load, all at once:
  - NBD clients (threads, libnbd) writing 4 KiB blocks at random to two volumes, flushing now and
    then, reconnecting whenever the daemon goes away;
  - shadow copy sets of both volumes, taken with and without writers;
  - a writer (Scripts/umbra_writer.py) that vetoes one freeze in eight and hangs past the freeze
    window in another eight;
  - deletions of old snapshots;
  - daemon restarts: SIGTERM (which must exit 0) and kill -9.

Every block a client writes describes itself: volume, block number and version in a header, and
bytes derived from them after it. So a snapshot can be checked without knowing what it should hold
byte for byte: each block must be intact, and its version must lie in the window the set's instant
allows (at least the newest version acknowledged before the request, at most the newest started
before the answer).

At the end the daemon is stopped, started again, and every snapshot whose set was taken and not
deleted must be listed and check out. Prints the counts; exits 1 on the first problem.
"""

import bisect
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import nbd

BLOCK = 4096
VOLUME_BYTES = 32 << 20
BLOCKS = VOLUME_BYTES // BLOCK
VOLUMES = ("a", "b")
WRITERS_PER_VOLUME = 2
MAGIC = b"SOAKBLK1"


def block_bytes(volume, block, version):
    header = MAGIC + struct.pack("<cQQ", volume.encode(), block, version)
    seed = hashlib.blake2b(header, digest_size=64).digest()
    body = seed * ((BLOCK - len(header)) // len(seed) + 1)
    return header + body[: BLOCK - len(header)]


def parse_block(volume, block, data):
    """The version a block holds, 0 for zeros; None if it is damaged or someone else's."""
    if data == bytes(BLOCK):
        return 0
    if not data.startswith(MAGIC):
        return None
    vol, number, version = struct.unpack_from("<cQQ", data, len(MAGIC))
    if vol != volume.encode() or number != block or data != block_bytes(volume, block, version):
        return None
    return version


class Failure(Exception):
    pass


class Soak:
    def __init__(self, umbra, minutes, work, seed):
        self.umbra = umbra
        self.deadline = time.monotonic() + minutes * 60
        self.work = work
        self.random = random.Random(seed)
        self.data = os.path.join(work, "data")
        self.socket = os.path.join(work, "nbd.sock")
        self.control = os.path.join(work, "control.sock")
        self.lock = threading.Lock()
        # Per volume and block: versions with (start, acknowledged) monotonic times.
        self.history = {v: [[] for _ in range(BLOCKS)] for v in VOLUMES}
        self.snapshots = {}  # id -> (volume, t_request, t_answer)
        self.timelines = {}
        # Snapshots whose deletion got no answer (the daemon went away): it may or may not have happened.
        self.maybe_deleted = {}
        self.daemon = None
        self.daemon_up = threading.Event()
        # Bumped at every stop: a request that spans a restart is not held against the daemon.
        self.generation = 0
        # Held by deletions and by the listing check, so the two never cross.
        self.delete_lock = threading.Lock()
        self.stop = threading.Event()
        self.counts = dict.fromkeys(
            ["writes", "flushes", "write errors (daemon away)", "sets", "sets with writers", "vetoed or timed out",
             "sets failed (daemon away)", "snapshots deleted", "restarts after SIGTERM", "restarts after kill -9",
             "sets rolled back at restart", "bytes verified", "snapshots checked", "blocks checked"], 0)
        self.problem = None

    def count(self, name, n=1):
        with self.lock:
            self.counts[name] += n

    def fail(self, message):
        with self.lock:
            if self.problem is None:
                self.problem = message
        self.stop.set()

    # MARK: - The daemon

    def start_daemon(self):
        log = open(os.path.join(self.work, "daemon.log"), "ab")
        self.daemon = subprocess.Popen(
            [self.umbra, "serve", "--data", self.data, "--listen", "unix:" + self.socket, "--control", self.control,
             "--log-level", "warning"] + sum((["--volume", v + ":32M"] for v in VOLUMES), []),
            stdout=subprocess.PIPE, stderr=log)
        line = self.daemon.stdout.readline().decode()
        if not line.startswith("ready "):
            raise Failure("the daemon did not start: %r (see %s/daemon.log)" % (line, self.work))
        self.daemon_up.set()

    def stop_daemon(self, kill):
        self.daemon_up.clear()
        with self.lock:
            self.generation += 1
        if kill:
            self.daemon.kill()
            self.daemon.wait()
            self.count("restarts after kill -9")
        else:
            self.daemon.terminate()
            status = self.daemon.wait(timeout=120)
            if status != 0:
                raise Failure("umbra serve exited %d after SIGTERM" % status)
            self.count("restarts after SIGTERM")

    def cli(self, *arguments, timeout=120):
        result = subprocess.run([self.umbra, *arguments, "--control", self.control], capture_output=True,
                                timeout=timeout)
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    # MARK: - Load

    def client(self, volume, index):
        blocks = [b for b in range(BLOCKS) if b % WRITERS_PER_VOLUME == index]
        rng = random.Random(self.random.random())
        handle = None
        while not self.stop.is_set():
            if handle is None:
                if not self.daemon_up.wait(timeout=1):
                    continue
                try:
                    handle = nbd.NBD()
                    handle.connect_uri("nbd+unix:///%s?socket=%s" % (volume, self.socket))
                except nbd.Error:
                    handle = None
                    time.sleep(0.05)
                    continue
            block = rng.choice(blocks)
            with self.lock:
                versions = self.history[volume][block]
                version = len(versions) + 1
                versions.append([time.monotonic(), None])
            try:
                handle.pwrite(block_bytes(volume, block, version), block * BLOCK)
                with self.lock:
                    self.history[volume][block][version - 1][1] = time.monotonic()
                self.count("writes")
                if rng.random() < 1 / 16:
                    handle.flush()
                    self.count("flushes")
            except nbd.Error:
                self.count("write errors (daemon away)")
                handle = None

    def sets(self):
        while not self.stop.is_set():
            time.sleep(self.random.uniform(0.05, 0.5))
            with_writers = self.random.random() < 0.5
            arguments = ["snapshot", "create", *VOLUMES, "--json", "--freeze-timeout", "2"]
            if not with_writers:
                arguments.append("--no-writers")
            with self.lock:
                generation = self.generation
            up = self.daemon_up.is_set()
            requested = time.monotonic()
            try:
                status, out, err = self.cli(*arguments)
            except subprocess.TimeoutExpired:
                self.fail("snapshot create did not answer within 120 s")
                return
            answered = time.monotonic()
            if status != 0:
                with self.lock:
                    restarted = generation != self.generation
                if restarted or not up or not self.daemon_up.is_set():
                    self.count("sets failed (daemon away)")
                elif with_writers:
                    self.count("vetoed or timed out")
                else:
                    self.fail("a set without writers failed while the daemon was up: " + err.strip())
                    return
                continue
            result = json.loads(out)
            with self.lock:
                for snapshot in result["snapshots"]:
                    self.snapshots[snapshot["id"]] = (snapshot["volume"], requested, answered)
            self.count("sets")
            if with_writers and not result.get("crashConsistent", True):
                self.count("sets with writers")

    def deleter(self):
        while not self.stop.is_set():
            time.sleep(self.random.uniform(0.5, 3))
            self.retry_unanswered_deletion()
            with self.lock:
                ids = sorted(self.snapshots, key=lambda sid: self.snapshots[sid][1])
            if len(ids) <= 8:
                continue
            # Keep the newest few; delete at random among the rest, down to about 24.
            candidates = ids[:-4]
            victims = self.random.sample(candidates, max(1, min(len(candidates), len(ids) - 24)))
            with self.delete_lock:
                try:
                    status, _, _ = self.cli("snapshot", "delete", *victims)
                except subprocess.TimeoutExpired:
                    self.fail("snapshot delete did not answer within 120 s")
                    return
                with self.lock:
                    for victim in victims:
                        entry = self.snapshots.pop(victim)
                        if status != 0:
                            self.maybe_deleted[victim] = entry
                if status == 0:
                    self.count("snapshots deleted", len(victims))

    def retry_unanswered_deletion(self):
        """Deletes, alone, one snapshot whose earlier deletion got no answer: gone either way after."""
        with self.lock:
            if not self.maybe_deleted:
                return
            victim = next(iter(self.maybe_deleted))
        with self.delete_lock:
            status, _, err = self.cli("snapshot", "delete", victim)
            if status == 0 or "no snapshot" in err.lower():
                with self.lock:
                    self.maybe_deleted.pop(victim, None)
                if status == 0:
                    self.count("snapshots deleted")

    # MARK: - Checks

    def check_listed(self):
        """Every snapshot whose set was answered (before the listing) and not deleted is listed ready."""
        with self.delete_lock:
            asked = time.monotonic()
            status, out, err = self.cli("snapshot", "list", "--json")
            if status != 0:
                raise Failure("snapshot list failed: " + err)
            listed = {s["id"]: s for s in json.loads(out)["snapshots"]}
            with self.lock:
                expected = {sid: entry for sid, entry in self.snapshots.items() if entry[2] < asked}
        for sid, (volume, _, _) in expected.items():
            if sid not in listed:
                raise Failure("snapshot %s of %s was taken but is no longer listed" % (sid, volume))
            if listed[sid]["state"] not in ("ready",):
                raise Failure("snapshot %s is %s" % (sid, listed[sid]["state"]))

    def timeline(self, volume, block):
        """For the final check (the load has stopped): each version's start time, in order, and the
        (acknowledged time, version) of every acknowledged one, in order; built once per block."""
        key = (volume, block)
        cached = self.timelines.get(key)
        if cached is None:
            versions = self.history[volume][block]
            cached = ([start for start, _ in versions],
                      [(ack, number) for number, (_, ack) in enumerate(versions, 1) if ack is not None])
            self.timelines[key] = cached
        return cached

    def check_snapshot(self, sid, volume, requested, answered):
        handle = nbd.NBD()
        handle.connect_uri("nbd+unix:///%s@%s?socket=%s" % (volume, sid, self.socket))
        for start in range(0, BLOCKS, 256):
            try:
                data = handle.pread(256 * BLOCK, start * BLOCK)
            except nbd.Error as error:
                raise Failure("snapshot %s of %s: reading blocks %d… failed: %s" % (sid, volume, start, error))
            for offset in range(256):
                block = start + offset
                version = parse_block(volume, block, data[offset * BLOCK:(offset + 1) * BLOCK])
                if version is None:
                    raise Failure("snapshot %s of %s: block %d is damaged" % (sid, volume, block))
                starts, acked = self.timeline(volume, block)
                # One writer per block writes its versions in turn, so both lists are sorted by time.
                newest_started = bisect.bisect_left(starts, answered)
                position = bisect.bisect_left(acked, (requested,))
                newest_acked = acked[position - 1][1] if position > 0 else 0
                if not newest_acked <= version <= newest_started:
                    raise Failure("snapshot %s of %s: block %d holds version %d, outside [%d, %d]"
                                  % (sid, volume, block, version, newest_acked, newest_started))
        handle.shutdown()
        self.count("snapshots checked")
        self.count("blocks checked", BLOCKS)

    # MARK: - The run

    def guarded(self, target, *arguments):
        """Runs a load thread's body; any exception fails the run (a thread must not die unseen)."""
        try:
            target(*arguments)
        except Exception as error:  # noqa: BLE001 (reported, and fails the run)
            self.fail("%s stopped: %s: %s" % (target.__name__, type(error).__name__, error))

    def run(self):
        os.makedirs(self.work, exist_ok=True)
        # A copy of its own: a rebuild of the repository's binary during the run must not touch it.
        copy = os.path.join(self.work, "umbra")
        shutil.copy2(self.umbra, copy)
        self.umbra = copy
        self.start_daemon()
        writer = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(__file__), "..", "umbra_writer.py"), "--socket",
             self.control, "--name", "soak", "--volume", "a", "--reconnect", "0.2", "--on-freeze",
             "case $(( $(od -An -N1 -tu1 /dev/urandom) % 8 )) in 0) echo soak veto; exit 1;; 1) sleep 5;; esac"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, "writer.log"), "ab"))
        threads = [threading.Thread(target=self.guarded, args=(self.client, v, i), daemon=True)
                   for v in VOLUMES for i in range(WRITERS_PER_VOLUME)]
        threads += [threading.Thread(target=self.guarded, args=(body,), daemon=True)
                    for body in (self.sets, self.deleter)]
        for thread in threads:
            thread.start()
        try:
            while time.monotonic() < self.deadline and not self.stop.is_set():
                time.sleep(self.random.uniform(5, 20))
                kill = self.random.random() < 0.5
                self.stop_daemon(kill)
                # Sets whose answer never came may have been rolled back: forget nothing that was answered.
                self.start_daemon()
                self.check_listed()
                self.print_counts(final=False)
        except Failure as failure:
            self.fail(str(failure))
        self.stop.set()
        for thread in threads:
            thread.join(timeout=150)
        writer.terminate()
        writer.wait()
        if self.problem:
            self.print_counts(final=True)
            raise Failure(self.problem)
        self.stop_daemon(kill=False)
        if os.environ.get("SOAK_DAMAGE") == "1":
            # The check's own teeth: a flipped byte in every chunk of the diff stores must fail the run.
            for number in ("1", "2"):
                with open(os.path.join(self.data, "volumes", number, "diff"), "r+b") as diff:
                    size = os.fstat(diff.fileno()).st_size
                    for offset in range(17, size, 64 << 10):
                        diff.seek(offset)
                        byte = diff.read(1)
                        diff.seek(offset)
                        diff.write(bytes([byte[0] ^ 1]))
        self.start_daemon()
        self.check_listed()
        # Every preserved chunk against its checksum, before the block-by-block check.
        status, out, err = self.cli("verify", "--json", timeout=600)
        if status != 0:
            raise Failure("umbra verify failed (exit %d): %s %s" % (status, out.strip()[:400], err.strip()))
        self.count("bytes verified", sum(v["bytesChecked"] for v in json.loads(out)["volumes"]))
        with self.lock:
            snapshots = dict(self.snapshots)
        # Deletions that got no answer: those that did not happen are checked like the others.
        status, out, err = self.cli("snapshot", "list", "--json")
        listed = {s["id"] for s in json.loads(out)["snapshots"]} if status == 0 else set()
        snapshots.update({sid: entry for sid, entry in self.maybe_deleted.items() if sid in listed})
        for sid, (volume, requested, answered) in sorted(snapshots.items(), key=lambda item: item[1][1]):
            self.check_snapshot(sid, volume, requested, answered)
        self.stop_daemon(kill=False)
        with open(os.path.join(self.work, "daemon.log"), errors="replace") as log:
            self.count("sets rolled back at restart", sum("rolled back an unfinished snapshot set" in line for line in log))
        self.print_counts(final=True)

    def print_counts(self, final):
        with self.lock:
            counts = dict(self.counts)
        prefix = "soak: final counts" if final else "soak: so far"
        print(prefix + ": " + ", ".join("%s %d" % (k, v) for k, v in counts.items()), flush=True)


def main():
    if len(sys.argv) != 5:
        sys.exit("usage: soak.py UMBRA MINUTES WORKDIR SEED")
    soak = Soak(sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    try:
        soak.run()
    except Failure as failure:
        if soak.daemon and soak.daemon.poll() is None:
            soak.daemon.kill()
        print("soak: FAIL: %s (work directory %s kept)" % (failure, sys.argv[3]), file=sys.stderr)
        sys.exit(1)
    print("soak: passed")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
