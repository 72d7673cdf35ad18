#!/usr/bin/python3
"""A FUSE file system that passes everything through to a directory, with a slow disk's syncs.

    faultfs.py SOURCE MOUNTPOINT [--fsync-delay SECONDS] [--delay-file FILE]

Every fsync and fdatasync (of a file or a directory) waits SECONDS before it is done, as on a disk
that is slow to flush; reads and writes go straight through. With --delay-file, the delay is read
from FILE (a number of seconds) at each sync instead, so a test can slow the disk down and speed it
up while it runs. On standard output it prints "mounted"
once the file system answers, then "fsync-begin PATH" and "fsync-end PATH" around each sync, so a
test can tell when a sync is under way. Unmount with `fusermount -u MOUNTPOINT`; the process then
exits.

The tests use it to run the real daemon on a disk that takes its time (docs/control-protocol.md,
"Deadlines"). It needs Debian's python3-fusepy (and /dev/fuse).
"""

import argparse
import errno
import os
import sys
import threading
import time

from fusepy import FUSE, FuseOSError, Operations


class Passthrough(Operations):
    def __init__(self, source, fsync_delay, delay_file):
        self.source = os.path.realpath(source)
        self.fsync_delay = fsync_delay
        self.delay_file = delay_file
        self.output = threading.Lock()

    def _path(self, path):
        return os.path.join(self.source, path.lstrip("/"))

    def _say(self, line):
        with self.output:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def __call__(self, operation, *arguments):
        try:
            return super().__call__(operation, *arguments)
        except OSError as error:
            raise FuseOSError(error.errno or errno.EIO)

    # Files and directories, passed through.

    def access(self, path, mode):
        if not os.access(self._path(path), mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path)) if fh is None else os.fstat(fh)
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid",
                "st_blocks", "st_blksize", "st_ino")
        return {key: getattr(st, key) for key in keys}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def readlink(self, path):
        return os.readlink(self._path(path))

    def mknod(self, path, mode, dev):
        os.mknod(self._path(path), mode, dev)

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        os.rmdir(self._path(path))

    def unlink(self, path):
        os.unlink(self._path(path))

    def symlink(self, target, source):
        os.symlink(source, self._path(target))

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))

    def link(self, target, source):
        os.link(self._path(source), self._path(target))

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._path(path), times)

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                "f_frsize", "f_namemax")
        return {key: getattr(st, key) for key in keys}

    def truncate(self, path, length, fh=None):
        if fh is None:
            os.truncate(self._path(path), length)
        else:
            os.ftruncate(fh, length)

    def open(self, path, flags):
        return os.open(self._path(path), flags & ~os.O_DIRECT)

    def create(self, path, mode, fi=None):
        # fusepy does not pass the open flags here; read-write serves whatever the caller asked for
        # (a write-only descriptor would fail the caller's reads with EBADF).
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    # Syncs, slowly.

    def _delay(self):
        if self.delay_file is None:
            return self.fsync_delay
        try:
            with open(self.delay_file) as file:
                return float(file.read().strip() or 0)
        except (OSError, ValueError):
            return self.fsync_delay

    def _slow_sync(self, path, sync):
        self._say("fsync-begin " + path)
        time.sleep(self._delay())
        sync()
        self._say("fsync-end " + path)
        return 0

    def fsync(self, path, datasync, fh):
        return self._slow_sync(path, lambda: os.fdatasync(fh) if datasync else os.fsync(fh))

    def fsyncdir(self, path, datasync, fh):
        def sync():
            descriptor = os.open(self._path(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        return self._slow_sync(path, sync)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--fsync-delay", type=float, default=0.0, help="seconds each sync takes (default 0)")
    parser.add_argument("--delay-file", help="read the delay from this file at each sync")
    arguments = parser.parse_args()
    operations = Passthrough(arguments.source, arguments.fsync_delay, arguments.delay_file)

    def announce():
        while not os.path.ismount(arguments.mountpoint):
            time.sleep(0.01)
        operations._say("mounted")

    threading.Thread(target=announce, daemon=True).start()
    FUSE(operations, arguments.mountpoint, foreground=True, nothreads=False, allow_other=False)


if __name__ == "__main__":
    main()
