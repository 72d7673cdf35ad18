#!/usr/bin/python3
"""A FUSE file system that loses, at a power cut, everything that was never synced.

    powercutfs.py BACKING MOUNTPOINT [--ignore-fsync]

BACKING is the platter: it holds only what was made durable. A write or truncate waits in memory,
per file, until fsync or fdatasync of that file writes it to BACKING (and syncs it there);
reads see it meanwhile. A write through a descriptor opened with O_DSYNC or O_SYNC syncs its file
before it returns, as POSIX promises (the kernel leaves that to a direct_io file system). A directory change (create, mkdir, rename, unlink, rmdir) is applied to
BACKING at once but journaled, and undone at a power cut unless fsyncdir of its directory came after
it. The kernel's page cache is bypassed (direct_io) and attributes are not cached, so what a process
reads after a power cut is what the platter holds.

The line "cut" on standard input cuts the power: pending data is dropped and journaled directory
changes are undone, newest first; the file system stays mounted and answers "power-cut" on standard
output when done. (Cut the power only once the processes using the files are gone: their
descriptors would outlive it.)

--ignore-fsync makes fsync, fdatasync and fsyncdir do nothing, as on a disk that lies: a test that
checks durability must then fail. It prints "mounted" once the file system answers. Unmount with
`fusermount -u MOUNTPOINT`. Needs Debian's python3-fusepy and /dev/fuse.
"""

import argparse
import os
import shutil
import sys
import threading
import time

from fusepy import FUSE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faultfs import Passthrough  # noqa: E402 (the pass-through of everything this file leaves alone)

PAGE = 4096


class PendingFile:
    """What was written to one file since its last sync: whole pages, and the size if it changed."""

    def __init__(self):
        self.pages = {}
        self.size = None


class PowerCut(Passthrough):
    def __init__(self, backing, ignore_fsync):
        super().__init__(backing, 0.0, None)
        self.backing = self.source
        self.ignore_fsync = ignore_fsync
        self.mutex = threading.RLock()
        self.pending = {}  # backing inode -> PendingFile
        self.synchronous = set()  # descriptors opened with O_DSYNC or O_SYNC
        self.journal = []  # (directory, undo) for directory changes not yet synced, oldest first
        self.stash = os.path.join(self.backing, ".powercut-stash")
        os.makedirs(self.stash, exist_ok=True)
        self.stashed = 0

    @staticmethod
    def _parent(path):
        return os.path.dirname(path.rstrip("/")) or "/"

    def __call__(self, operation, *arguments):
        with self.mutex:
            return super().__call__(operation, *arguments)

    # MARK: - Data, pending until synced

    def _inode(self, fh):
        return os.fstat(fh).st_ino

    def _size(self, fh, inode):
        pending = self.pending.get(inode)
        return pending.size if pending is not None and pending.size is not None else os.fstat(fh).st_size

    def _page(self, fh, inode, index):
        pending = self.pending.setdefault(inode, PendingFile())
        page = pending.pages.get(index)
        if page is None:
            page = bytearray(os.pread(fh, PAGE, index * PAGE).ljust(PAGE, b"\0"))
            # Bytes past the visible size read as zeros, whatever the platter still holds there.
            visible = self._size(fh, inode) - index * PAGE
            if visible < PAGE:
                page[max(0, visible):] = bytes(PAGE - max(0, visible))
            pending.pages[index] = page
        return page

    def read(self, path, size, offset, fh):
        inode = self._inode(fh)
        end = min(offset + size, self._size(fh, inode))
        if end <= offset:
            return b""
        pending = self.pending.get(inode)
        if pending is None or not pending.pages:
            return os.pread(fh, end - offset, offset).ljust(end - offset, b"\0")
        out = bytearray()
        position = offset
        while position < end:
            index, within = divmod(position, PAGE)
            take = min(PAGE - within, end - position)
            page = pending.pages.get(index)
            if page is None:
                out += os.pread(fh, take, position).ljust(take, b"\0")
            else:
                out += page[within:within + take]
            position += take
        return bytes(out)

    def write(self, path, data, offset, fh):
        written = self._write(fh, data, offset)
        if fh in self.synchronous:
            self._sync(fh)
        return written

    def _write(self, fh, data, offset):
        inode = self._inode(fh)
        position = offset
        view = memoryview(data)
        while view:
            index, within = divmod(position, PAGE)
            take = min(PAGE - within, len(view))
            self._page(fh, inode, index)[within:within + take] = view[:take]
            view = view[take:]
            position += take
        pending = self.pending[inode]
        pending.size = max(self._size(fh, inode), offset + len(data))
        return len(data)

    def _resize(self, fh, inode, length):
        pending = self.pending.setdefault(inode, PendingFile())
        old = self._size(fh, inode)
        if length < old:
            last = length // PAGE
            for index in [i for i in pending.pages if i > last or (i == last and length % PAGE == 0)]:
                del pending.pages[index]
            if length % PAGE:
                page = self._page(fh, inode, last)
                page[length % PAGE:] = bytes(PAGE - length % PAGE)
        else:
            # Growing: the old tail page must read zeros past the old end.
            if old % PAGE:
                page = self._page(fh, inode, old // PAGE)
                page[old % PAGE:] = bytes(PAGE - old % PAGE)
            for index in [i for i in pending.pages if i * PAGE >= old]:
                pending.pages[index][:] = bytes(PAGE)
        pending.size = length

    def truncate(self, path, length, fh=None):
        descriptor = fh if fh is not None else os.open(self._path(path), os.O_RDWR)
        try:
            self._resize(descriptor, self._inode(descriptor), length)
        finally:
            if fh is None:
                os.close(descriptor)

    def _sync(self, fh):
        if self.ignore_fsync:
            return 0
        inode = self._inode(fh)
        pending = self.pending.pop(inode, None)
        if pending is not None:
            if pending.size is not None:
                os.ftruncate(fh, pending.size)
            size = pending.size if pending.size is not None else os.fstat(fh).st_size
            for index, page in sorted(pending.pages.items()):
                start = index * PAGE
                if start < size:
                    os.pwrite(fh, bytes(page[:min(PAGE, size - start)]), start)
        os.fsync(fh)
        return 0

    def fsync(self, path, datasync, fh):
        return self._sync(fh)

    def fsyncdir(self, path, datasync, fh):
        if not self.ignore_fsync:
            self.journal = [(directory, undo) for directory, undo in self.journal if directory != path]
        return 0

    # MARK: - Attributes

    def getattr(self, path, fh=None):
        attributes = super().getattr(path, fh)
        pending = self.pending.get(attributes["st_ino"])
        if pending is not None and pending.size is not None:
            attributes["st_size"] = pending.size
        return attributes


    def readdir(self, path, fh):
        names = os.listdir(self._path(path))
        if path == "/":
            names = [name for name in names if name != ".powercut-stash"]
        return [".", ".."] + names





    def open(self, path, flags):
        # Pages are read through the descriptor, so a writable one is opened read-write; truncation
        # comes as its own (pending) operation.
        writable = flags & (os.O_WRONLY | os.O_RDWR)
        kept = flags & ~(os.O_DIRECT | os.O_TRUNC | os.O_APPEND | os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_EXCL)
        descriptor = os.open(self._path(path), kept | (os.O_RDWR if writable else os.O_RDONLY))
        if flags & (os.O_DSYNC | os.O_SYNC):
            self.synchronous.add(descriptor)
        return descriptor



    # MARK: - Directory changes, undone at a power cut unless their directory was synced

    def _stash(self, real):
        self.stashed += 1
        kept = os.path.join(self.stash, str(self.stashed))
        os.link(real, kept)
        return kept

    def release(self, path, fh):
        self.synchronous.discard(fh)
        return super().release(path, fh)

    def create(self, path, mode, fi=None):
        real = self._path(path)
        existed = os.path.exists(real)
        descriptor = os.open(real, os.O_RDWR | os.O_CREAT, mode)
        if not existed:
            self.journal.append((self._parent(path), lambda: self._forget(real)))
        return descriptor

    def _forget(self, real):
        try:
            self.pending.pop(os.lstat(real).st_ino, None)
            os.unlink(real)
        except FileNotFoundError:
            pass

    def mkdir(self, path, mode):
        real = self._path(path)
        os.mkdir(real, mode)
        self.journal.append((self._parent(path), lambda: shutil.rmtree(real, ignore_errors=True)))

    def rmdir(self, path):
        real = self._path(path)
        mode = os.stat(real).st_mode
        os.rmdir(real)
        self.journal.append((self._parent(path), lambda: os.mkdir(real, mode)))

    def unlink(self, path):
        real = self._path(path)
        kept = self._stash(real)
        os.unlink(real)
        self.journal.append((self._parent(path), lambda: os.link(kept, real)))

    def rename(self, old, new):
        source, target = self._path(old), self._path(new)
        kept = self._stash(target) if os.path.exists(target) and not os.path.isdir(target) else None
        os.rename(source, target)

        def undo():
            os.rename(target, source)
            if kept is not None:
                os.link(kept, target)
        self.journal.append((self._parent(new), undo))

    # MARK: - The power cut

    def power_cut(self):
        with self.mutex:
            self.pending.clear()
            for _, undo in reversed(self.journal):
                try:
                    undo()
                except OSError as error:
                    print("powercutfs: could not undo a directory change: %s" % error, file=sys.stderr)
            self.journal.clear()
            print("power-cut", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--ignore-fsync", action="store_true", help="syncs do nothing (a disk that lies)")
    arguments = parser.parse_args()
    operations = PowerCut(arguments.backing, arguments.ignore_fsync)

    def commands():
        for line in sys.stdin:
            if line.strip() == "cut":
                operations.power_cut()

    threading.Thread(target=commands, daemon=True).start()

    def announce():
        while not os.path.ismount(arguments.mountpoint):
            time.sleep(0.01)
        print("mounted", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    FUSE(operations, arguments.mountpoint, foreground=True, nothreads=False, allow_other=False, direct_io=True,
         attr_timeout=0, entry_timeout=0, negative_timeout=0)


if __name__ == "__main__":
    main()
