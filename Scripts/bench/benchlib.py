"""What the benchmark scripts share: a 1 GiB base image, starting and stopping an NBD server on a
Unix socket, its CPU time, fio's nbd engine, medians, the machine's description and the JSON results
under Benchmarks/results/. Nothing here needs anything outside this repository but fio and the
peers being measured (Scripts/install-dependencies.sh installs fio, nbdkit, nbd-server and qemu-utils).
"""

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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Where the benchmarks keep their files; UMBRA_BENCH_DIR puts them on another file system
# (Scripts/bench/on-xfs-reflink.sh).
WORK = os.environ.get("UMBRA_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "umbra-bench")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def base_image(size=1 << 30):
    """A file of random bytes (made once and kept under WORK), read into the page cache."""
    os.makedirs(WORK, exist_ok=True)
    path = os.path.join(WORK, "base.img")
    if not os.path.exists(path) or os.path.getsize(path) != size:
        log(f"creating {path}")
        with open("/dev/urandom", "rb") as source, open(path + ".new", "wb") as target:
            for _ in range(size >> 20):
                target.write(source.read(1 << 20))
        os.rename(path + ".new", path)
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    return path


def fresh_copy(base, directory):
    """A private writable copy of the base image with blocks of its own (never a reflink), in the page
    cache like the base."""
    image = os.path.join(directory, "disk.img")
    subprocess.run(["cp", "--reflink=never", base, image], check=True)
    subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)
    return image


def cpu_seconds(pid):
    """User plus system CPU time of a process and all its threads (and waited-for children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command: state is fields[0]; utime, stime, cutime, cstime are fields 11..14.
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


class Server:
    """An NBD server started with `command` (it must stay in the foreground) that listens on `sock`."""

    def __init__(self, command, sock, directory, environment=None):
        self.sock = sock
        self.log_path = os.path.join(directory, "server.log")
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        env=environment, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {self.process.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{command[0]} made no socket at {sock}")
            time.sleep(0.02)

    def tail(self):
        self.log_file.flush()
        with open(self.log_path) as f:
            return f.read()[-2000:]

    def cpu(self):
        return cpu_seconds(self.process.pid)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


def fio(args, directory, name="job"):
    """Runs fio (JSON output) and returns read+write MiB/s, IOPS, bytes moved and p99 latency (ms)."""
    output = os.path.join(directory, f"fio-{name}.json")
    result = subprocess.run(["fio", "--output-format=json", f"--output={output}", f"--name={name}"] + args,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"fio failed: {result.stderr.strip()[-2000:]}")
    with open(output) as f:
        text = f.read()
    jobs = json.loads(text[text.index("{"):])["jobs"]
    figures = {"MiBps": 0.0, "iops": 0.0, "bytes": 0, "p99ms": 0.0}
    for job in jobs:
        if job.get("error"):
            raise RuntimeError(f"fio job error {job['error']}")
        for direction in ("read", "write"):
            part = job[direction]
            figures["MiBps"] += part["bw"] / 1024.0
            figures["iops"] += part["iops"]
            figures["bytes"] += part["io_bytes"]
            percentiles = part.get("clat_ns", {}).get("percentile", {})
            if part["io_bytes"] and percentiles:
                figures["p99ms"] = max(figures["p99ms"], percentiles.get("99.000000", 0) / 1e6)
    return figures


def built_tool(name):
    """Scripts/bench/NAME.c compiled (with libnbd) into WORK, rebuilt when the source is newer."""
    source = os.path.join(ROOT, "Scripts", "bench", name + ".c")
    binary = os.path.join(WORK, name)
    os.makedirs(WORK, exist_ok=True)
    if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(source):
        subprocess.run(["cc", "-O2", "-Wall", "-o", binary, source, "-lnbd"], check=True)
    return binary


def nbd_uri(sock, export):
    return f"nbd+unix:///{export}?socket={sock}"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def machine():
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    with open("/proc/meminfo") as f:
        memory = int(f.readline().split()[1])

    def version(command):
        try:
            result = subprocess.run(command, capture_output=True, text=True)
            return (result.stdout or result.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return None

    filesystem = subprocess.run(["df", "-T", WORK], capture_output=True, text=True).stdout.splitlines()[-1].split()
    return {
        "cpus": os.cpu_count(), "cpu": models[0] if models else "", "memoryKiB": memory,
        "kernel": platform.release(), "workFileSystem": filesystem[1] if len(filesystem) > 1 else None,
        "fio": version(["fio", "--version"]), "nbdkit": version(["nbdkit", "--version"]),
        "qemu-nbd": version(["qemu-nbd", "--version"]), "nbd-server": version(["nbd-server", "-V"]),
        "umbra": version([os.path.join(ROOT, ".build/release/umbra"), "--version"]),
        "commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
    }


def write_results(name, command, payload, destination=None):
    """Writes the raw results with the machine's description; returns the path."""
    destination = destination or os.path.join(ROOT, "Benchmarks", "results",
                                              f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
    with open(destination, "w") as f:
        json.dump({"benchmark": name, "command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "machine": machine(), **payload}, f, indent=1)
    log(f"raw results: {destination}")
    return destination


def umbra_command(binary, scratch, sock, image, extra=()):
    return [binary, "serve", "--data", os.path.join(scratch, "data"), "--control",
            os.path.join(scratch, "control.sock"), "--listen", f"unix:{sock}", "--volume-file",
            f"disk:{image}", "--log-level", "warning", *extra]


def parse_umbras(entries, default_name="umbra"):
    """NAME=PATH[ ARGS...] entries (default: this checkout's release build) -> [(name, path, args)]."""
    result = []
    for entry in entries or [f"{default_name}={os.path.join(ROOT, '.build/release/umbra')}"]:
        name, _, rest = entry.partition("=")
        words = rest.split()
        if not words or not os.access(words[0], os.X_OK):
            sys.exit(f"no umbra binary at {words[0] if words else rest!r} "
                     "(swift build -c release --product umbra)")
        result.append((name, words[0], words[1:]))
    return result


def require(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (Scripts/install-dependencies.sh installs it)")
