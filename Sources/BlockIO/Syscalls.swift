// Every system call Umbra makes on files sits behind one of these wrappers (swift-system's habit):
// each retries EINTR, loops over short transfers where the call can return them, and turns errno
// into a `BlockIOError` naming the call and the path. Nothing outside BlockIO calls these.

import CBlockIO
import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

enum Syscall {
    @inline(__always)
    static func lastError(_ operation: String, _ path: String) -> BlockIOError {
        BlockIOError(.system(Errno(rawValue: Glibc.errno)), operation: operation, path: path)
    }

    /// Runs `body` until it stops failing with EINTR.
    @inline(__always)
    static func retryingInterrupts<T: BinaryInteger>(_ body: () -> T) -> T {
        while true {
            let result = body()
            if result == -1 && Glibc.errno == EINTR { continue }
            return result
        }
    }

    /// open(2).
    static func open(_ path: String, flags: Int32, mode: mode_t = 0o644) throws(BlockIOError) -> Int32 {
        let fd = retryingInterrupts { Glibc.open(path, flags | O_CLOEXEC, mode) }
        if fd < 0 { throw lastError("open", path) }
        return fd
    }

    /// close(2). EINTR is not retried: Linux has already released the descriptor.
    static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }

    /// Reads exactly `buffer.count` bytes at `offset`; bytes past the end of the file read as zero.
    /// pread(2)
    static func read(
        _ fd: Int32, fromAbsoluteOffset offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, path: String
    ) throws(BlockIOError) {
        var done = 0
        while done < buffer.count {
            let result = retryingInterrupts {
                Glibc.pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if result < 0 { throw lastError("pread", path) }
            if result == 0 {
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
            done += result
        }
    }

    /// Reads what the page cache holds without blocking on the device; returns nil when it would block.
    /// preadv2(2) with RWF_NOWAIT
    static func readIfCached(
        _ fd: Int32, fromAbsoluteOffset offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, path: String
    ) throws(BlockIOError) -> Int? {
        let result = retryingInterrupts {
            umbra_pread_nowait(fd, buffer.baseAddress, buffer.count, Int64(offset))
        }
        if result < 0 {
            let error = Glibc.errno
            if error == EAGAIN || error == EOPNOTSUPP || error == ENOSYS || error == EINVAL { return nil }
            throw lastError("preadv2", path)
        }
        return result
    }

    /// Writes all of `bytes` at `offset`.
    /// pwrite(2)
    static func write(
        _ fd: Int32, toAbsoluteOffset offset: UInt64, _ bytes: UnsafeRawBufferPointer, path: String
    ) throws(BlockIOError) {
        var done = 0
        while done < bytes.count {
            let result = retryingInterrupts {
                Glibc.pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            }
            if result < 0 { throw lastError("pwrite", path) }
            if result == 0 { throw BlockIOError(.system(.noSpace), operation: "pwrite", path: path) }
            done += result
        }
    }

    /// Writes all of `pieces`, back to back, at `offset`.
    /// pwritev(2)
    static func write(
        _ fd: Int32, toAbsoluteOffset offset: UInt64, gathering pieces: [UnsafeRawBufferPointer], path: String
    ) throws(BlockIOError) {
        var vectors = pieces.filter { $0.count > 0 }.map {
            iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)
        }
        var position = offset
        var first = 0
        while first < vectors.count {
            let count = Int32(min(vectors.count - first, 1024))  // IOV_MAX on Linux
            let written = vectors.withUnsafeBufferPointer { buffer in
                retryingInterrupts { Glibc.pwritev(fd, buffer.baseAddress! + first, count, off_t(position)) }
            }
            if written < 0 { throw lastError("pwritev", path) }
            if written == 0 { throw BlockIOError(.system(.noSpace), operation: "pwritev", path: path) }
            position += UInt64(written)
            // Skip what was written; a short write leaves part of one vector to go again.
            var remaining = written
            while first < vectors.count && remaining >= vectors[first].iov_len {
                remaining -= vectors[first].iov_len
                first += 1
            }
            if remaining > 0 {
                vectors[first].iov_base = vectors[first].iov_base! + remaining
                vectors[first].iov_len -= remaining
            }
        }
    }

    /// fdatasync(2)
    static func dataSync(_ fd: Int32, path: String) throws(BlockIOError) {
        if retryingInterrupts({ Glibc.fdatasync(fd) }) != 0 { throw lastError("fdatasync", path) }
    }

    /// fsync(2)
    static func sync(_ fd: Int32, path: String) throws(BlockIOError) {
        if retryingInterrupts({ Glibc.fsync(fd) }) != 0 { throw lastError("fsync", path) }
    }

    /// ftruncate(2)
    static func truncate(_ fd: Int32, size: UInt64, path: String) throws(BlockIOError) {
        if retryingInterrupts({ Glibc.ftruncate(fd, off_t(size)) }) != 0 { throw lastError("ftruncate", path) }
    }

    /// fallocate(2) with PUNCH_HOLE | KEEP_SIZE. Returns false when the file system cannot punch holes.
    static func punchHole(_ fd: Int32, offset: UInt64, length: UInt64, path: String) throws(BlockIOError) -> Bool {
        if retryingInterrupts({ umbra_punch_hole(fd, Int64(offset), Int64(length)) }) == 0 { return true }
        if Glibc.errno == EOPNOTSUPP || Glibc.errno == ENOSYS { return false }
        throw lastError("fallocate(PUNCH_HOLE)", path)
    }

    /// fallocate(2) with mode 0 (allocate, extending the size). Returns false when the file system
    /// cannot do it.
    static func allocate(_ fd: Int32, offset: UInt64, length: UInt64, path: String) throws(BlockIOError) -> Bool {
        if retryingInterrupts({ umbra_allocate(fd, Int64(offset), Int64(length)) }) == 0 { return true }
        if Glibc.errno == EOPNOTSUPP || Glibc.errno == ENOSYS || Glibc.errno == ENODEV { return false }
        throw lastError("fallocate", path)
    }

    /// fallocate(2) with ZERO_RANGE | KEEP_SIZE. Returns false when the file system cannot do it.
    static func zeroRange(_ fd: Int32, offset: UInt64, length: UInt64, path: String) throws(BlockIOError) -> Bool {
        if retryingInterrupts({ umbra_zero_range(fd, Int64(offset), Int64(length)) }) == 0 { return true }
        if Glibc.errno == EOPNOTSUPP || Glibc.errno == ENOSYS || Glibc.errno == ENODEV { return false }
        throw lastError("fallocate(ZERO_RANGE)", path)
    }

    /// ioctl(FICLONERANGE) from `source` into `fd` (a length of 0 clones to the end of `source`).
    /// Returns false when these two files cannot share blocks: a file system without shared extents
    /// (EOPNOTSUPP), two file systems (EXDEV), something other than two regular files or ranges the
    /// file system cannot share (EINVAL), or no such ioctl (ENOTTY).
    static func cloneRange(
        _ fd: Int32, from source: Int32, at sourceOffset: UInt64, length: UInt64, to offset: UInt64, path: String
    ) throws(BlockIOError) -> Bool {
        if retryingInterrupts({ umbra_clone_range(fd, source, sourceOffset, length, offset) }) == 0 { return true }
        switch Glibc.errno {
        case EOPNOTSUPP, EXDEV, EINVAL, ENOTTY, ENOSYS: return false
        default: throw lastError("ioctl(FICLONERANGE)", path)
        }
    }

    struct FileStatus {
        var size: UInt64
        var isBlockDevice: Bool
        var isRegularFile: Bool
    }

    /// fstat(2), with ioctl(BLKGETSIZE64) for the size of a block device.
    static func status(_ fd: Int32, path: String) throws(BlockIOError) -> FileStatus {
        var info = stat()
        if Glibc.fstat(fd, &info) != 0 { throw lastError("fstat", path) }
        let type = info.st_mode & S_IFMT
        if type == S_IFBLK {
            var size: UInt64 = 0
            if umbra_block_device_size(fd, &size) != 0 { throw lastError("ioctl(BLKGETSIZE64)", path) }
            return FileStatus(size: size, isBlockDevice: true, isRegularFile: false)
        }
        return FileStatus(size: UInt64(info.st_size), isBlockDevice: false, isRegularFile: type == S_IFREG)
    }

    /// lseek(2) with SEEK_DATA: the next data at or after `offset`, or nil when only a hole follows.
    static func nextData(_ fd: Int32, from offset: UInt64, path: String) throws(BlockIOError) -> UInt64? {
        let result = umbra_seek_data(fd, Int64(offset))
        if result < 0 {
            if Glibc.errno == ENXIO { return nil }
            throw lastError("lseek(SEEK_DATA)", path)
        }
        return UInt64(result)
    }

    /// lseek(2) with SEEK_HOLE: the next hole at or after `offset` (the end of the file counts as one).
    static func nextHole(_ fd: Int32, from offset: UInt64, path: String) throws(BlockIOError) -> UInt64 {
        let result = umbra_seek_hole(fd, Int64(offset))
        if result < 0 { throw lastError("lseek(SEEK_HOLE)", path) }
        return UInt64(result)
    }

    /// flock(2) with LOCK_EX | LOCK_NB. Returns false when another open file description holds it.
    static func lockExclusive(_ fd: Int32, path: String) throws(BlockIOError) -> Bool {
        if retryingInterrupts({ umbra_lock_exclusive(fd) }) == 0 { return true }
        if Glibc.errno == EWOULDBLOCK { return false }
        throw lastError("flock", path)
    }

    /// rename(2)
    static func rename(_ from: String, _ to: String) throws(BlockIOError) {
        if Glibc.rename(from, to) != 0 { throw lastError("rename to \(to)", from) }
    }

    /// unlink(2); a missing file is not an error.
    static func unlink(_ path: String) throws(BlockIOError) {
        if Glibc.unlink(path) != 0 && Glibc.errno != ENOENT { throw lastError("unlink", path) }
    }

    /// mkdir(2); an existing directory is not an error. Returns whether it was created.
    @discardableResult
    static func makeDirectory(_ path: String) throws(BlockIOError) -> Bool {
        if Glibc.mkdir(path, 0o755) == 0 { return true }
        if Glibc.errno != EEXIST { throw lastError("mkdir", path) }
        return false
    }

    /// rmdir(2); a missing directory is not an error.
    static func removeDirectory(_ path: String) throws(BlockIOError) {
        if Glibc.rmdir(path) != 0 && Glibc.errno != ENOENT { throw lastError("rmdir", path) }
    }

    /// stat(2): whether anything exists at `path`.
    static func exists(_ path: String) -> Bool {
        umbra_path_exists(path) != 0
    }

    /// opendir(3)/readdir(3): the names in a directory, without `.` and `..`.
    static func listDirectory(_ path: String) throws(BlockIOError) -> [String] {
        guard let directory = Glibc.opendir(path) else { throw lastError("opendir", path) }
        defer { Glibc.closedir(directory) }
        var names: [String] = []
        while let entry = Glibc.readdir(directory) {
            let name = withUnsafePointer(to: entry.pointee.d_name) { pointer in
                pointer.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    /// fsync(2) on a directory, so that names created, renamed or removed in it are durable.
    static func syncDirectory(_ path: String) throws(BlockIOError) {
        let fd = try open(path, flags: O_RDONLY | O_DIRECTORY)
        defer { close(fd) }
        try sync(fd, path: path)
    }
}
