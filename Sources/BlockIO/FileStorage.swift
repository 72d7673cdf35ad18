// A file or block device opened for buffered I/O. The descriptor is closed only when the last
// reference goes away, never while another thread may still be using it: a closed-and-reused
// descriptor number would send a read to the wrong file.

import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

public final class FileStorage: BlockStorage {
    public let path: String
    public let isBlockDevice: Bool
    private let descriptor: Int32
    private let closed = Atomic<Bool>(false)
    /// Set once punching holes failed with EOPNOTSUPP, so later discards write zeros directly.
    private let cannotPunchHoles = Atomic<Bool>(false)
    private let cannotZeroRanges = Atomic<Bool>(false)
    /// Set once a clone failed because these files cannot share blocks, so later copies write at once.
    private let cannotClone = Atomic<Bool>(false)
    /// A second descriptor of the same file, opened with O_DSYNC on first use (-1 until then, -2 if
    /// that failed); closed in deinit. Its lock is held across each durable write.
    private let durableDescriptor = Mutex<Int32>(-1)
    private let writable: Bool

    public init(path: String, mode: StorageOpenMode) throws(BlockIOError) {
        var flags = O_RDWR
        switch mode {
        case .existing: break
        case .createNew: flags |= O_CREAT | O_EXCL
        case .createIfMissing: flags |= O_CREAT
        case .readOnly: flags = O_RDONLY
        }
        let fd = try Syscall.open(path, flags: flags)
        let status: Syscall.FileStatus
        do {
            status = try Syscall.status(fd, path: path)
        } catch {
            Syscall.close(fd)
            throw error
        }
        guard status.isRegularFile || status.isBlockDevice else {
            Syscall.close(fd)
            throw BlockIOError(.system(.invalidArgument), operation: "open (not a file or block device)", path: path)
        }
        self.path = path
        self.descriptor = fd
        self.isBlockDevice = status.isBlockDevice
        self.writable = mode != .readOnly
    }

    deinit {
        Syscall.close(descriptor)
        let durable = durableDescriptor.withLock { $0 }
        if durable >= 0 { Syscall.close(durable) }
    }

    /// Refuses further I/O. The descriptor itself closes when the last reference is dropped.
    public func close() {
        closed.store(true, ordering: .releasing)
    }

    @inline(__always)
    private func checkOpen(_ operation: String) throws(BlockIOError) {
        if closed.load(ordering: .acquiring) { throw BlockIOError(.closed, operation: operation, path: path) }
    }

    public func size() throws(BlockIOError) -> ByteCount {
        try checkOpen("fstat")
        return ByteCount(try Syscall.status(descriptor, path: path).size)
    }

    public func read(fromAbsoluteOffset offset: ByteOffset, into buffer: UnsafeMutableRawBufferPointer)
        throws(BlockIOError)
    {
        try checkOpen("pread")
        try Syscall.read(descriptor, fromAbsoluteOffset: offset.rawValue, into: buffer, path: path)
    }

    public func readIfCached(
        fromAbsoluteOffset offset: ByteOffset, into buffer: UnsafeMutableRawBufferPointer
    ) throws(BlockIOError) -> Bool {
        try checkOpen("preadv2")
        guard
            let count = try Syscall.readIfCached(
                descriptor, fromAbsoluteOffset: offset.rawValue, into: buffer, path: path)
        else { return false }
        if count == buffer.count { return true }
        // A short read is either the end of the file (the rest reads as zero) or a partly cached
        // range; let the blocking read settle which.
        return false
    }

    public func write(toAbsoluteOffset offset: ByteOffset, _ bytes: UnsafeRawBufferPointer) throws(BlockIOError) {
        try checkOpen("pwrite")
        try Syscall.write(descriptor, toAbsoluteOffset: offset.rawValue, bytes, path: path)
    }

    public func write(toAbsoluteOffset offset: ByteOffset, gathering pieces: [UnsafeRawBufferPointer])
        throws(BlockIOError)
    {
        try checkOpen("pwritev")
        if pieces.count == 1 {
            try Syscall.write(descriptor, toAbsoluteOffset: offset.rawValue, pieces[0], path: path)
        } else {
            try Syscall.write(descriptor, toAbsoluteOffset: offset.rawValue, gathering: pieces, path: path)
        }
    }

    /// Opens the O_DSYNC descriptor on first use; false (for good) where that fails, as without
    /// /proc, so callers write and sync instead.
    public var writesDurably: Bool {
        writable && durableDescriptor.withLock { Self.opened(&$0, from: descriptor) }
    }

    public func writeDurably(toAbsoluteOffset offset: ByteOffset, gathering pieces: [UnsafeRawBufferPointer])
        throws(BlockIOError)
    {
        try checkOpen("pwritev (O_DSYNC)")
        // Under the lock, one at a time: Linux reports a writeback error once per open file
        // description, so of two overlapping syncs through this descriptor one could take the error
        // that belongs to the other's pages, and that one would be answered as durable.
        try durableDescriptor.withLock { (fd: inout Int32) throws(BlockIOError) in
            guard writable, Self.opened(&fd, from: descriptor) else {
                throw BlockIOError(.system(.notSupported), operation: "pwritev (O_DSYNC)", path: path)
            }
            if pieces.count == 1 {
                try Syscall.write(fd, toAbsoluteOffset: offset.rawValue, pieces[0], path: path)
            } else {
                try Syscall.write(fd, toAbsoluteOffset: offset.rawValue, gathering: pieces, path: path)
            }
        }
    }

    /// Opens `durable` (-1: not yet; -2: failed before) as the same open file again through /proc
    /// (so a rename since does not matter), with O_DSYNC: a new open file description, with its own
    /// cursor of writeback errors. Whether it is open.
    private static func opened(_ durable: inout Int32, from descriptor: Int32) -> Bool {
        if durable == -1 {
            durable = (try? Syscall.open("/proc/self/fd/\(descriptor)", flags: O_RDWR | O_DSYNC)) ?? -2
        }
        return durable >= 0
    }

    /// Valid for as long as this object lives (it closes the descriptor only in deinit).
    public var fileDescriptor: Int32? { closed.load(ordering: .relaxed) ? nil : descriptor }

    public func synchronize() throws(BlockIOError) {
        try checkOpen("fdatasync")
        try Syscall.dataSync(descriptor, path: path)
    }

    /// fsync(2), which also makes the size and other metadata durable.
    public func synchronizeAll() throws(BlockIOError) {
        try checkOpen("fsync")
        try Syscall.sync(descriptor, path: path)
    }

    public func resize(to size: ByteCount) throws(BlockIOError) {
        try checkOpen("ftruncate")
        try Syscall.truncate(descriptor, size: size.rawValue, path: path)
    }

    /// Punches a hole over the whole blocks (the unaligned edges are written with zeros); where the
    /// file system cannot, writes zeros.
    public func discard(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) {
        if try !zeroQuickly(at: offset, count: count, mayDiscard: true) { try writeZeroes(at: offset, count: count) }
    }

    public func zeroQuickly(at offset: ByteOffset, count: ByteCount, mayDiscard: Bool) throws(BlockIOError) -> Bool {
        try checkOpen("write zeroes")
        guard count.rawValue > 0 else { return true }
        let block: UInt64 = 4096
        let start = offset.rawValue
        let end = start + count.rawValue
        let alignedStart = (start + block - 1) / block * block
        let alignedEnd = end / block * block
        // Less than a block: writing it costs no more than any write.
        guard alignedStart < alignedEnd else {
            try writeZeroesByWriting(at: offset, count: count)
            return true
        }
        let length = alignedEnd - alignedStart
        var zeroed = false
        if mayDiscard, !cannotPunchHoles.load(ordering: .relaxed) {
            zeroed = try Syscall.punchHole(descriptor, offset: alignedStart, length: length, path: path)
            if !zeroed { cannotPunchHoles.store(true, ordering: .relaxed) }
        }
        // On a block device ZERO_RANGE may write zeros in the kernel: only a punch (which never
        // falls back to writing) counts there.
        if !zeroed, !isBlockDevice, alignedEnd <= (try size()).rawValue {
            zeroed = try Syscall.zeroRange(descriptor, offset: alignedStart, length: length, path: path)
            if !zeroed { cannotZeroRanges.store(true, ordering: .relaxed) }
        }
        guard zeroed else { return false }
        if start < alignedStart { try writeZeroesByWriting(at: offset, count: ByteCount(alignedStart - start)) }
        if alignedEnd < end { try writeZeroesByWriting(at: ByteOffset(alignedEnd), count: ByteCount(end - alignedEnd)) }
        return true
    }

    public func mayZeroQuickly(mayDiscard: Bool) -> Bool {
        let canPunch = mayDiscard && !cannotPunchHoles.load(ordering: .relaxed)
        return canPunch || (!isBlockDevice && !cannotZeroRanges.load(ordering: .relaxed))
    }

    public func writeZeroes(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) {
        try checkOpen("write zeroes")
        guard count.rawValue > 0 else { return }
        // ZERO_RANGE keeps the size; past the end of a regular file, plain writes extend it.
        if !isBlockDevice, offset.rawValue + count.rawValue > (try size()).rawValue {
            try writeZeroesByWriting(at: offset, count: count)
            return
        }
        if try Syscall.zeroRange(descriptor, offset: offset.rawValue, length: count.rawValue, path: path) { return }
        try writeZeroesByWriting(at: offset, count: count)
    }

    /// Writes zeros over the range. Not fallocate: on ext4 that leaves "unwritten" extents, and the
    /// first write into each costs a journal commit at the next fdatasync; blocks written once cost
    /// only the data flush, which is what an append-only log wants.
    public func preallocate(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) {
        try checkOpen("preallocate")
        guard count.rawValue > 0, !isBlockDevice else { return }
        try writeZeroesByWriting(at: offset, count: count)
    }

    /// fallocate (a block device has its space already).
    public func reserve(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) -> Bool {
        try checkOpen("fallocate")
        guard count.rawValue > 0, !isBlockDevice else { return true }
        return try Syscall.allocate(descriptor, offset: offset.rawValue, length: count.rawValue, path: path)
    }

    public func canClone(from source: any BlockStorage) -> Bool {
        guard !cannotClone.load(ordering: .relaxed), let source = source as? FileStorage,
            !closed.load(ordering: .acquiring), !source.closed.load(ordering: .acquiring),
            let end = try? Syscall.status(source.descriptor, path: source.path).size
        else { return false }
        // A clone from the end of the source to its end clones nothing, after every check that
        // matters here (one file system, shared extents, regular files).
        let cloned =
            (try? Syscall.cloneRange(descriptor, from: source.descriptor, at: end, length: 0, to: 0, path: path))
        if cloned != true { cannotClone.store(true, ordering: .relaxed) }
        return cloned == true
    }

    public func clone(
        from source: any BlockStorage, at sourceOffset: ByteOffset, count: ByteCount, to offset: ByteOffset
    ) throws(BlockIOError) -> Bool {
        try checkOpen("ioctl(FICLONERANGE)")
        guard count.rawValue > 0 else { return true }
        guard !cannotClone.load(ordering: .relaxed), let source = source as? FileStorage else { return false }
        try source.checkOpen("ioctl(FICLONERANGE)")
        let cloned = try Syscall.cloneRange(
            descriptor, from: source.descriptor, at: sourceOffset.rawValue, length: count.rawValue, to: offset.rawValue,
            path: path)
        if !cloned { cannotClone.store(true, ordering: .relaxed) }
        return cloned
    }

    public func nextData(from offset: ByteOffset) throws(BlockIOError) -> ByteOffset? {
        try checkOpen("lseek")
        if isBlockDevice { return offset }
        return try Syscall.nextData(descriptor, from: offset.rawValue, path: path).map(ByteOffset.init(rawValue:))
    }

    public func nextHole(from offset: ByteOffset) throws(BlockIOError) -> ByteOffset {
        try checkOpen("lseek")
        if isBlockDevice { return ByteOffset(try Syscall.status(descriptor, path: path).size) }
        return ByteOffset(try Syscall.nextHole(descriptor, from: offset.rawValue, path: path))
    }
}
