#!/usr/bin/env python3
"""An Umbra shadow copy writer in Python's standard library, written from docs/control-protocol.md.

As a module: subclass `Writer`, override the `on_*` methods you need (raise `Veto` to veto), and call
`run()`. Or use `CommandWriter`, which runs a shell command per event.

As a program (a generic writer for services that have quiesce commands):

    umbra_writer.py --name pg --volume db --on-freeze 'psql -c "CHECKPOINT"; pg_ctl pause' \
                    --on-thaw 'pg_ctl resume'

A command's non-zero exit vetoes the set (exit 75, EX_TEMPFAIL, as retryable; anything else as
non-retryable); its output becomes the veto message. A command still running when the daemon's
answer time is up is killed and vetoes as a timeout. An abort after a successful freeze runs the thaw
command, so the service is never left frozen; so does losing the connection while frozen, or the
freeze window passing without a thaw.
"""

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import time

PROTOCOL_VERSION = 1
LINE_BYTES_MAX = 16 * 1024 * 1024  # the longest line the daemon may send
OUTPUT_BYTES_MAX = 4096  # how much of a command's output goes into a veto message
RETRYABLE_EXIT_STATUS = 75  # EX_TEMPFAIL

EVENTS = (
    "identify",
    "prepare-for-backup",
    "prepare-for-snapshot",
    "freeze",
    "thaw",
    "post-snapshot",
    "backup-complete",
    "abort",
)


class Veto(Exception):
    """Raise from an `on_*` method to veto the set. `failure`: retryable, non-retryable or timeout."""

    def __init__(self, failure, message):
        super().__init__(message)
        self.failure = failure
        self.message = message


class ProtocolError(Exception):
    """The daemon refused us or broke the protocol; `code` is the daemon's error code, if any."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class Event:
    """One event: `name` (e.g. "freeze") and the daemon's params as attributes."""

    def __init__(self, name, params):
        self.name = name
        self.params = params
        self.set = params.get("set")
        self.volumes = params.get("volumes", [])
        self.timeout_ms = params.get("timeoutMs")
        self.freeze_window_ms = params.get("freezeWindowMs")
        self.snapshots = params.get("snapshots", [])
        self.reason = params.get("reason")


class Writer:
    """A writer: connect, say hello, answer events one at a time until the daemon hangs up."""

    def __init__(self, socket_path, name, volumes, instance=None, log=None):
        self.socket_path = socket_path
        self.name = name
        self.volumes = list(volumes)
        self.instance = instance
        self.log = log or (lambda message: None)
        self._sock = None
        self._buffer = b""
        self._early = []  # events that arrived before hello's answer (the daemon does not do this; be safe)
        self._frozen_set = None
        self._freeze_deadline = None

    # Override these. Each gets an Event; raise Veto to veto. on_identify may return metadata.
    def on_identify(self, event):
        return None

    def on_prepare_for_backup(self, event):
        pass

    def on_prepare_for_snapshot(self, event):
        pass

    def on_freeze(self, event):
        pass

    def on_thaw(self, event):
        pass

    def on_post_snapshot(self, event):
        pass

    def on_backup_complete(self, event):
        pass

    def on_abort(self, event):
        pass

    # The protocol.
    def connect(self):
        """Connects and registers; returns the instance GUID the daemon confirmed."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(self.socket_path)
        params = {"version": PROTOCOL_VERSION, "role": "writer", "client": "umbra_writer.py",
                  "name": self.name, "volumes": self.volumes}
        if self.instance:
            params["instance"] = self.instance
        self._send({"id": 1, "method": "hello", "params": params})
        while True:
            message = self._receive(None)
            if message is None:
                raise ProtocolError("the daemon closed the connection during hello")
            if "method" in message:
                self._early.append(message)
                continue
            if message.get("id") != 1:
                continue
            if "error" in message:
                error = message["error"]
                raise ProtocolError(error.get("message", "hello was refused"), error.get("code"))
            self.instance = message["result"].get("instance", self.instance)
            self.log("registered as %s (instance %s)" % (self.name, self.instance))
            unknown = message["result"].get("unknownVolumes") or []
            if unknown:
                self.log("warning: the daemon has no volume named %s; this writer is told of sets of it once it exists"
                         % ", ".join("'%s'" % name for name in unknown))
            return self.instance

    def run(self):
        """Connects (unless connected) and answers events until the daemon closes the connection."""
        if self._sock is None:
            self.connect()
        try:
            while True:
                timeout = None
                if self._freeze_deadline is not None:
                    timeout = max(0.0, self._freeze_deadline - time.monotonic())
                message = self._early.pop(0) if self._early else self._receive(timeout)
                if message is False:  # the freeze window passed with no thaw or abort
                    self._self_thaw("the freeze window passed with no thaw")
                    continue
                if message is None:
                    break
                if "method" not in message:
                    continue  # we send no requests after hello; ignore stray answers
                self._send(self._handle(message))
        finally:
            if self._frozen_set is not None:
                self._self_thaw("the connection to the daemon was lost while frozen")
            self.close()

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _handle(self, message):
        request_id = message.get("id")
        name = message["method"]
        if name not in EVENTS:
            return {"id": request_id, "result": {}}  # events added later in this version
        event = Event(name, message.get("params") or {})
        self.log("event %s for set %s" % (name, event.set))
        try:
            result = {}
            if name == "identify":
                metadata = self.on_identify(event)
                if metadata is not None:
                    result = {"metadata": metadata}
            elif name == "prepare-for-backup":
                self.on_prepare_for_backup(event)
            elif name == "prepare-for-snapshot":
                self.on_prepare_for_snapshot(event)
            elif name == "freeze":
                self.on_freeze(event)
                self._frozen_set = event.set
                if event.freeze_window_ms:
                    self._freeze_deadline = time.monotonic() + event.freeze_window_ms / 1000.0
            elif name == "thaw":
                if self._frozen_set != event.set:
                    raise Veto("timeout", "the freeze window passed before thaw; the writer thawed by itself")
                self._unfreeze()
                self.on_thaw(event)
            elif name == "post-snapshot":
                self.on_post_snapshot(event)
            elif name == "backup-complete":
                self.on_backup_complete(event)
            elif name == "abort":
                if self._frozen_set == event.set:
                    self._unfreeze()
                self.on_abort(event)
            return {"id": request_id, "result": result}
        except Veto as veto:
            self.log("veto at %s: %s" % (name, veto.message))
            return {"id": request_id, "error": {"code": "veto", "failure": veto.failure, "message": veto.message}}
        except Exception as error:  # any other failure is a non-retryable veto
            return {"id": request_id, "error": {"code": "veto", "failure": "non-retryable", "message": str(error)}}

    def _unfreeze(self):
        self._frozen_set = None
        self._freeze_deadline = None

    def _self_thaw(self, reason):
        event = Event("abort", {"set": self._frozen_set, "reason": reason})
        self._unfreeze()
        self.log("aborting on my own: " + reason)
        try:
            self.on_abort(event)
        except Exception as error:
            self.log("abort failed: %s" % error)

    def _send(self, message):
        line = json.dumps(message, separators=(",", ":")) + "\n"
        self._sock.sendall(line.encode("utf-8"))

    def _receive(self, timeout):
        """The next message; None when the connection closed; False when `timeout` seconds passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if len(self._buffer) > LINE_BYTES_MAX:
                raise ProtocolError("the daemon sent a line longer than the protocol allows")
            if deadline is not None:
                remaining = max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([self._sock], [], [], remaining)
                if not ready:
                    return False
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        line = line.rstrip(b"\r")
        try:
            message = json.loads(line.decode("utf-8"))
        except ValueError:
            raise ProtocolError("the daemon sent a line that is not JSON")
        if not isinstance(message, dict):
            raise ProtocolError("the daemon sent a line that is not a JSON object")
        return message


class CommandWriter(Writer):
    """A writer that runs `/bin/sh -c COMMAND` for the events given in `commands` (event name → command).

    The command sees UMBRA_EVENT, UMBRA_SET, UMBRA_VOLUMES (space-separated), UMBRA_SNAPSHOTS (export
    names, space-separated) and UMBRA_REASON in its environment.
    """

    def __init__(self, socket_path, name, volumes, commands, instance=None, log=None):
        super().__init__(socket_path, name, volumes, instance=instance, log=log)
        self.commands = dict(commands)
        self._last_freeze = None

    def _run(self, name, event):
        command = self.commands.get(name)
        if not command:
            return
        env = dict(os.environ)
        env.update({
            "UMBRA_EVENT": name,
            "UMBRA_SET": event.set or "",
            "UMBRA_VOLUMES": " ".join(event.volumes),
            "UMBRA_SNAPSHOTS": " ".join(s.get("export", "") for s in event.snapshots),
            "UMBRA_REASON": event.reason or "",
        })
        timeout = event.timeout_ms / 1000.0 if event.timeout_ms else None
        try:
            completed = subprocess.run(["/bin/sh", "-c", command], env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            output = _tail(expired.output)
            raise Veto("timeout", _describe(command, "was still running after %.0f s and was stopped" % timeout,
                                            output))
        except OSError as error:
            raise Veto("non-retryable", "'%s' could not be started: %s" % (command, error))
        output = _tail(completed.stdout)
        status = completed.returncode
        if status == 0:
            return
        if status == RETRYABLE_EXIT_STATUS:
            raise Veto("retryable", _describe(command, "exited with status 75", output))
        if status < 0:
            raise Veto("non-retryable", _describe(command, "was killed by signal %d" % -status, output))
        raise Veto("non-retryable", _describe(command, "exited with status %d" % status, output))

    def on_identify(self, event):
        self._run("identify", event)
        return None

    def on_prepare_for_backup(self, event):
        self._run("prepare-for-backup", event)

    def on_prepare_for_snapshot(self, event):
        self._run("prepare-for-snapshot", event)

    def on_freeze(self, event):
        self._run("freeze", event)
        self._last_freeze = event

    def on_thaw(self, event):
        self._last_freeze = None
        self._run("thaw", event)

    def on_post_snapshot(self, event):
        self._run("post-snapshot", event)

    def on_backup_complete(self, event):
        self._run("backup-complete", event)

    def on_abort(self, event):
        # Writer.run/_handle call this with the service still frozen only if freeze succeeded and
        # no thaw came: thaw it first, then run the abort command.
        if self._last_freeze is not None:
            self._last_freeze = None
            try:
                self._run("thaw", event)
            except Veto as veto:
                self.log("thaw during abort failed: " + veto.message)
        try:
            self._run("abort", event)
        except Veto as veto:
            self.log("abort command failed: " + veto.message)


def _tail(data):
    if not data:
        return ""
    return data[-OUTPUT_BYTES_MAX:].decode("utf-8", "replace").strip()


def _describe(command, what, output):
    return "'%s' %s: %s" % (command, what, output) if output else "'%s' %s." % (command, what)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run shell commands as an Umbra shadow copy writer.")
    parser.add_argument("--socket", default=os.environ.get("UMBRA_CONTROL", "umbra-data/control.sock"),
                        help="the daemon's control socket (default: $UMBRA_CONTROL or umbra-data/control.sock)")
    parser.add_argument("--name", required=True, help="the writer's name")
    parser.add_argument("--volume", action="append", required=True,
                        help="a volume the service writes to (repeat; '*' for all)")
    parser.add_argument("--instance", help="a GUID to keep across restarts")
    for name in EVENTS:
        parser.add_argument("--on-" + name, metavar="CMD", help="shell command to run at " + name)
    parser.add_argument("--reconnect", type=float, metavar="SECONDS",
                        help="reconnect after this pause when the daemon goes away (default: exit)")
    parser.add_argument("--verbose", action="store_true", help="log events to stderr")
    args = parser.parse_args(argv)

    commands = {name: getattr(args, "on_" + name.replace("-", "_")) for name in EVENTS}
    commands = {name: command for name, command in commands.items() if command}
    log = (lambda message: print("umbra_writer: " + message, file=sys.stderr, flush=True)) if args.verbose else None
    instance = args.instance
    while True:
        writer = CommandWriter(args.socket, args.name, args.volume, commands, instance=instance, log=log)
        try:
            instance = writer.connect()
            writer.run()
        except ProtocolError as error:
            print("umbra_writer: %s" % error, file=sys.stderr)
            return 1
        except OSError as error:
            if args.reconnect is None:
                print("umbra_writer: cannot reach the daemon at %s: %s" % (args.socket, error), file=sys.stderr)
                return 1
        if args.reconnect is None:
            return 0
        time.sleep(args.reconnect)


if __name__ == "__main__":
    sys.exit(main())
