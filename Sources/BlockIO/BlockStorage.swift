// The storage under a volume, a diff store or the catalog: a random-access byte array with explicit
// durability. `FileStorage` is a file or block device; `SimulatedStorage` is memory that forgets
// unsynced writes when its simulated machine crashes. Calls block; the engine runs them through an
// `IOExecutor` so they never stall an event loop or the cooperative pool.

/// A byte-addressable file or device. Implementations are safe to call from several threads at once
/// for disjoint ranges; overlapping concurrent writes land in some order, as with pwrite(2).
public protocol BlockStorage: AnyObject, Sendable {
    /// Where this storage lives, for messages.
    var path: String { get }

    /// The current size in bytes.
    func size() throws(BlockIOError) -> ByteCount

    /// Fills `buffer` with the bytes at `offset`; bytes past the end read as zero.
    func read(fromAbsoluteOffset offset: ByteOffset, into buffer: UnsafeMutableRawBufferPointer) throws(BlockIOError)

    /// Like `read`, but only if the bytes can be had without waiting for the device (they are cached).
    /// Returns false, having read nothing useful, when they cannot.
    func readIfCached(
        fromAbsoluteOffset offset: ByteOffset, into buffer: UnsafeMutableRawBufferPointer
    ) throws(BlockIOError) -> Bool

    /// Writes all of `bytes` at `offset`, extending the file if needed.
    func write(toAbsoluteOffset offset: ByteOffset, _ bytes: UnsafeRawBufferPointer) throws(BlockIOError)

    /// Writes `pieces` back to back at `offset` (pwritev), extending the file if needed.
    func write(toAbsoluteOffset offset: ByteOffset, gathering pieces: [UnsafeRawBufferPointer]) throws(BlockIOError)

    /// Whether `writeDurably` works here.
    var writesDurably: Bool { get }

    /// Writes `pieces` back to back at `offset` and returns once they are durable (FUA): through a
    /// descriptor of its own opened with O_DSYNC, so only these bytes (and what the file system needs
    /// to find them) are synced, not every dirty page of the file, and a writeback error it reports
    /// is still reported to the next `synchronize` as well (Linux reports an error once per open file).
    /// Storage that cannot (`writesDurably` false) throws ENOTSUP, having written nothing.
    func writeDurably(toAbsoluteOffset offset: ByteOffset, gathering pieces: [UnsafeRawBufferPointer])
        throws(BlockIOError)

    /// The open file descriptor, for callers that send straight from the file (sendfile); nil for
    /// storage that has none.
    var fileDescriptor: Int32? { get }

    /// Makes every completed write durable (fdatasync).
    func synchronize() throws(BlockIOError)

    /// Sets the size (ftruncate); new bytes read as zero.
    func resize(to size: ByteCount) throws(BlockIOError)

    /// Makes the range read as zero and gives its space back where the file system can (punch hole).
    func discard(at offset: ByteOffset, count: ByteCount) throws(BlockIOError)

    /// Makes the range read as zero, keeping it allocated.
    func writeZeroes(at offset: ByteOffset, count: ByteCount) throws(BlockIOError)

    /// Reserves space for the range (writing zeros where that is what makes later overwrites cheap),
    /// extending the size if it lies past the end. A hint: storage that cannot preallocate does nothing.
    func preallocate(at offset: ByteOffset, count: ByteCount) throws(BlockIOError)

    /// Makes the range read as zeros without writing them (a hole punched, with `mayDiscard`, or
    /// fallocate's ZERO_RANGE; at most a block at either unaligned edge is written). Returns false,
    /// having changed nothing, where the storage cannot (what NBD's FAST_ZERO asks to know).
    func zeroQuickly(at offset: ByteOffset, count: ByteCount, mayDiscard: Bool) throws(BlockIOError) -> Bool

    /// False once `zeroQuickly` found it cannot (so a caller can refuse before doing other work);
    /// true while that is not known.
    func mayZeroQuickly(mayDiscard: Bool) -> Bool

    /// Allocates space for the range now, so that writes into it later cannot fail for want of space
    /// (ENOSPC comes from here instead), extending the size if it lies past the end; the contents
    /// stay as they are. Returns false if the storage cannot (a file system without fallocate).
    func reserve(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) -> Bool

    /// Whether `clone` can work from `source`: both are regular files on one file system whose files
    /// can share blocks (XFS with reflink, Btrfs). Asks the file system with a clone of nothing.
    func canClone(from source: any BlockStorage) -> Bool

    /// Makes the `count` bytes at `offset` the bytes of `source` at `sourceOffset`, by sharing the
    /// file system's blocks instead of writing data (FICLONERANGE): a copy that costs metadata only.
    /// Like a write, it is durable only after `synchronize`, and later writes to either file leave the
    /// other unchanged. Both ranges must be whole file-system blocks. Returns false, having changed
    /// nothing, where the storage cannot; the caller then copies by reading and writing.
    func clone(
        from source: any BlockStorage, at sourceOffset: ByteOffset, count: ByteCount, to offset: ByteOffset
    ) throws(BlockIOError) -> Bool

    /// The start of the next allocated data at or after `offset`, or nil if only holes follow
    /// (SEEK_DATA). Storage that cannot tell reports everything as data.
    func nextData(from offset: ByteOffset) throws(BlockIOError) -> ByteOffset?

    /// The start of the next hole at or after `offset`; the end of the storage counts as a hole
    /// (SEEK_HOLE).
    func nextHole(from offset: ByteOffset) throws(BlockIOError) -> ByteOffset
}

/// One megabyte of zeros, shared, for writing zeros where the file system cannot zero a range itself.
nonisolated(unsafe) let zeroBlock: UnsafeRawBufferPointer = {
    let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
    block.initializeMemory(as: UInt8.self, repeating: 0)
    return UnsafeRawBufferPointer(block)
}()

extension BlockStorage {
    /// Writes the pieces one after another (storage without a vectored write).
    public func write(toAbsoluteOffset offset: ByteOffset, gathering pieces: [UnsafeRawBufferPointer])
        throws(BlockIOError)
    {
        var position = offset
        for piece in pieces {
            try write(toAbsoluteOffset: position, piece)
            position += ByteCount(piece.count)
        }
    }

    public var fileDescriptor: Int32? { nil }

    public var writesDurably: Bool { false }

    public func writeDurably(toAbsoluteOffset offset: ByteOffset, gathering pieces: [UnsafeRawBufferPointer])
        throws(BlockIOError)
    {
        throw BlockIOError(.system(.notSupported), operation: "write with O_DSYNC", path: path)
    }

    /// Storage that cannot share blocks.
    public func canClone(from source: any BlockStorage) -> Bool { false }

    public func clone(
        from source: any BlockStorage, at sourceOffset: ByteOffset, count: ByteCount, to offset: ByteOffset
    ) throws(BlockIOError) -> Bool { false }

    /// Writes zeros with plain writes, a megabyte at a time.
    func writeZeroesByWriting(at offset: ByteOffset, count: ByteCount) throws(BlockIOError) {
        var position = offset.rawValue
        let end = offset.rawValue + count.rawValue
        while position < end {
            let step = min(UInt64(zeroBlock.count), end - position)
            try write(
                toAbsoluteOffset: ByteOffset(position), UnsafeRawBufferPointer(rebasing: zeroBlock[0..<Int(step)]))
            position += step
        }
    }
}
