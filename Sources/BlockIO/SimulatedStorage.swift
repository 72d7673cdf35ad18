// A file on a SimulatedDisk, as the engine's BlockStorage: every operation goes through the disk,
// so it is recorded for a crash and fails once the disk has crashed.

import Synchronization

/// A file on a `SimulatedDisk`.
public final class SimulatedStorage: BlockStorage {
    public let path: String
    let inode: Int
    let disk: SimulatedDisk

    init(disk: SimulatedDisk, inode: Int, name: String) {
        self.disk = disk
        self.inode = inode
        self.path = "sim:/" + name
    }

    /// Runs `body` on the file as one disk operation. A write or sync (`faultKind`) may instead meet
    /// an injected fault: `onFault` runs and the operation fails with its errno.
    private func withFile<T>(
        _ operation: String, onCrash: ((inout SimulatedDisk.File) -> Void)? = nil,
        faultKind: FaultKind? = nil, onFault: ((inout SimulatedDisk.File) -> Void)? = nil,
        _ body: (inout SimulatedDisk.File) throws(BlockIOError) -> T
    ) throws(BlockIOError) -> T {
        let inode = self.inode
        let path = self.path
        return try disk.perform(
            operation, path: path,
            onCrash: { state in
                if let onCrash, var file = state.files[inode] {
                    onCrash(&file)
                    state.files[inode] = file
                }
            }
        ) { (state: inout SimulatedDisk.State) throws(BlockIOError) -> T in
            guard state.files[inode] != nil else {
                throw BlockIOError(.system(.badFileDescriptor), operation: operation, path: path)
            }
            if let faultKind, let errno = disk.takeFault(isSync: faultKind == .sync, in: &state) {
                onFault?(&state.files[inode]!)
                throw BlockIOError(.system(errno), operation: operation, path: path)
            }
            // Mutate in place: copying a file image out and back would copy it on every call.
            return try body(&state.files[inode]!)
        }
    }

    public func size() throws(BlockIOError) -> ByteCount {
        try withFile("fstat") { ByteCount($0.current.count) }
    }

    public func read(fromAbsoluteOffset offset: ByteOffset, into buffer: UnsafeMutableRawBufferPointer)
        throws(BlockIOError)
    {
        try withFile("pread") { file in
            let start = Int(offset.rawValue)
            let available = max(0, min(buffer.count, file.current.count - start))
            if available > 0 {
                file.current.withUnsafeBytes { source in
                    buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[start..<(start + available)]))
                }
            }
            if available < buffer.count {
                UnsafeMutableRawBufferPointer(rebasing: buffer[available...]).initializeMemory(
                    as: UInt8.self, repeating: 0)
            }
        }
    }

    public func readIfCached(
        fromAbsoluteOffset offset: ByteOffset, into buffer: UnsafeMutableRawBufferPointer
    ) throws(BlockIOError) -> Bool {
        try read(fromAbsoluteOffset: offset, into: buffer)
        return true
    }

    public func write(toAbsoluteOffset offset: ByteOffset, _ bytes: UnsafeRawBufferPointer) throws(BlockIOError) {
        let operation = SimulatedDisk.PendingOperation.write(offset: Int(offset.rawValue), bytes: Array(bytes))
        try withFile("pwrite", onCrash: { $0.pending.append(operation) }, faultKind: .write) { $0.apply(operation) }
    }

    public func synchronize() throws(BlockIOError) {
        try withFile("fdatasync", faultKind: .sync, onFault: { $0.failSynchronize() }) { $0.synchronize() }
    }

    public func resize(to size: ByteCount) throws(BlockIOError) {
        try withFile("ftruncate", faultKind: .write) { $0.apply(.resize(size: Int(size.rawValue))) }
    }

    public func discard(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) {
        try writeZeroes(at: offset, count: count)
    }

    public func writeZeroes(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) {
        try withFile("fallocate", faultKind: .write) { file in
            let start = Int(offset.rawValue)
            // Zeroing past the end does not extend the file (KEEP_SIZE).
            let end = min(start + Int(count.rawValue), file.current.count)
            guard start < end else { return }
            file.apply(.write(offset: start, bytes: Array(repeating: 0, count: end - start)))
        }
    }

    /// A hint the simulator does not take: it counts as an operation (so a crash can land on it) but
    /// reserves nothing, sparing a megabyte-sized image per catalog.
    public func preallocate(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) {
        try withFile("fallocate", faultKind: .write) { _ in }
    }

    public func zeroQuickly(at offset: ByteOffset, count: ByteCount, mayDiscard: Bool) throws(BlockIOError) -> Bool {
        try writeZeroes(at: offset, count: count)
        return true
    }

    public func mayZeroQuickly(mayDiscard: Bool) -> Bool { true }

    /// Counts as a write that can fail (with ENOSPC, as on a full disk); the simulated disk never runs
    /// out of space by itself, so it reserves nothing.
    public func reserve(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) -> Bool {
        try withFile("fallocate", faultKind: .write) { _ in }
        return true
    }

    public func canClone(from source: any BlockStorage) -> Bool {
        (source as? SimulatedStorage)?.disk === disk && disk.sharesBlocks
    }

    /// A clone on a disk that shares blocks: the source's bytes read, then written here as one
    /// pending write (a crash keeps it or not, like any write not yet synced).
    public func clone(
        from source: any BlockStorage, at sourceOffset: ByteOffset, count: ByteCount, to offset: ByteOffset
    ) throws(BlockIOError) -> Bool {
        guard canClone(from: source) else { return false }
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(count.rawValue), alignment: 8)
        defer { bytes.deallocate() }
        try source.read(fromAbsoluteOffset: sourceOffset, into: bytes)
        let operation = SimulatedDisk.PendingOperation.write(offset: Int(offset.rawValue), bytes: Array(bytes))
        try withFile("ioctl(FICLONERANGE)", onCrash: { $0.pending.append(operation) }, faultKind: .write) {
            $0.apply(operation)
        }
        disk.noteClone()
        return true
    }

    public func nextData(from offset: ByteOffset) throws(BlockIOError) -> ByteOffset? {
        try withFile("lseek") { offset.rawValue < UInt64($0.current.count) ? offset : nil }
    }

    public func nextHole(from offset: ByteOffset) throws(BlockIOError) -> ByteOffset {
        try withFile("lseek") { ByteOffset(max(UInt64($0.current.count), offset.rawValue)) }
    }
}

enum FaultKind {
    case write
    case sync
}
