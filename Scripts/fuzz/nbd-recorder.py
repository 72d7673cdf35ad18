#!/usr/bin/env python3
"""A recording NBD proxy for the fuzz corpus: listens on TCP 127.0.0.1 (a free port, printed as
`port N` once listening), forwards every connection to an NBD server's Unix socket, and when a
connection ends writes what the client sent, byte for byte, to OUTDIR/LABEL-N (LABEL is read from
OUTDIR/label when the connection is accepted, so one proxy records many tools).

Before writing, the capture is made small and portable: WRITE payloads are cut (512 bytes, one
per session 64.5 KiB so the decoder's big-payload path stays covered) with the request length
changed to match, and GUIDs are replaced (--rename OLD=NEW) so the files name the exports of the
fuzz driver's catalog (Sources/NBDFuzzing).

    nbd-recorder.py UPSTREAM_SOCKET OUTDIR [--rename OLD=NEW]...
"""
import os
import signal
import socket
import struct
import sys
import threading

OPTION_MAGIC = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
OPT_EXPORT_NAME, OPT_GO = 1, 7
CMD_WRITE = 1
SMALL_WRITE, BIG_WRITE = 512, 64 * 1024 + 512


def shrink(data):
    """Cuts WRITE payloads; leaves anything it cannot parse as it is from there on."""
    out, pos, big_left = bytearray(data[:4]), 4, 1
    # Options until GO or EXPORT_NAME (real clients only send requests after a successful one).
    while pos + 16 <= len(data):
        magic, option, length = struct.unpack_from(">QII", data, pos)
        if magic != OPTION_MAGIC:
            return bytes(out + data[pos:])
        out += data[pos:pos + 16 + length]
        pos += 16 + length
        if option in (OPT_EXPORT_NAME, OPT_GO):
            break
    while pos + 28 <= len(data):
        magic, flags, command, handle, offset, length = struct.unpack_from(">IHHQQI", data, pos)
        if magic != REQUEST_MAGIC:
            return bytes(out + data[pos:])
        if command != CMD_WRITE:
            out += data[pos:pos + 28]
            pos += 28
            continue
        keep = min(length, BIG_WRITE if big_left and length >= 64 * 1024 else SMALL_WRITE)
        if keep > SMALL_WRITE:
            big_left = 0
        out += struct.pack(">IHHQQI", magic, flags, command, handle, offset, keep)
        out += data[pos + 28:pos + 28 + keep]
        pos += 28 + length
    return bytes(out + data[pos:])


def pump(source, sink, record):
    try:
        while True:
            chunk = source.recv(65536)
            if not chunk:
                break
            if record is not None:
                record.append(chunk)
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for how in (lambda: sink.shutdown(socket.SHUT_WR),):
            try:
                how()
            except OSError:
                pass


def serve(client, upstream_path, outdir, renames, number):
    with open(os.path.join(outdir, "label")) as f:
        label = f.read().strip()
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.connect(upstream_path)
    record = []
    back = threading.Thread(target=pump, args=(upstream, client, None))
    back.start()
    pump(client, upstream, record)
    back.join()
    client.close()
    upstream.close()
    data = b"".join(record)
    for old, new in renames:
        data = data.replace(old, new)
    with open(os.path.join(outdir, "%s-%d" % (label, number)), "wb") as f:
        f.write(shrink(data))


def main():
    upstream_path, outdir = sys.argv[1], sys.argv[2]
    renames = []
    args = sys.argv[3:]
    while args:
        assert args[0] == "--rename", "usage: nbd-recorder.py UPSTREAM OUTDIR [--rename OLD=NEW]..."
        old, new = args[1].split("=", 1)
        assert len(old) == len(new), "a renamed GUID keeps its length, so lengths in the stream stay right"
        renames.append((old.encode(), new.encode()))
        args = args[2:]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    # SIGTERM ends the accept loop; Python then waits for the sessions still being written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("port %d" % listener.getsockname()[1], flush=True)
    number = 0
    while True:
        client, _ = listener.accept()
        number += 1
        threading.Thread(target=serve, args=(client, upstream_path, outdir, renames, number)).start()


if __name__ == "__main__":
    main()
