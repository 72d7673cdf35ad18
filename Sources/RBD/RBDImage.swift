// An open RBD image (or one of its snapshots, read-only). Reads, writes, flushes, discards and
// zeroing are librbd's asynchronous calls: the calling task suspends, librbd's completion thread
// resumes it, and no thread waits per request. Snapshot and diff calls block their thread.

import CRBD
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// An open image handle. librbd's handles may be used from many threads at once.
public final class RBDImage: Sendable {
    nonisolated(unsafe) let handle: rbd_image_t
    public let pool: RBDPool
    public let name: String
    /// The snapshot it reads, or nil for the image itself.
    public let snapshot: String?
    private let closed = Mutex(false)

    init(handle: rbd_image_t, pool: RBDPool, name: String, snapshot: String?) {
        self.handle = handle
        self.pool = pool
        self.name = name
        self.snapshot = snapshot
    }

    deinit { close() }

    /// `POOL/IMAGE`, or `POOL/IMAGE@SNAPSHOT`.
    public var path: String { "\(pool.name)/\(name)" + (snapshot.map { "@\($0)" } ?? "") }

    /// Closes the handle (releasing the image's exclusive lock); later calls must not be made.
    public func close() {
        let wasClosed = closed.withLock { closed in
            defer { closed = true }
            return closed
        }
        if !wasClosed { rbd_close(handle) }
    }

    public func size() throws(RBDError) -> UInt64 {
        var size: UInt64 = 0
        try RBDError.check(rbd_get_size(handle, &size), "reading the size of \(path)")
        return size
    }

    /// The size of the image's objects (the unit RBD's diff works in).
    public func objectSize() throws(RBDError) -> UInt64 {
        var info = rbd_image_info_t()
        try RBDError.check(rbd_stat(handle, &info, MemoryLayout<rbd_image_info_t>.size), "reading \(path)")
        return info.obj_size
    }

    // MARK: Asynchronous I/O

    /// Reads `target.count` bytes at `offset` into `target`, which must stay valid and untouched
    /// until this returns (the caller owns it for the whole call).
    public func read(at offset: UInt64, into target: UnsafeMutableRawBufferPointer) async throws(RBDError) {
        let result = await Self.completing { completion in
            rbd_aio_read(
                handle, offset, target.count, target.baseAddress?.assumingMemoryBound(to: CChar.self), completion)
        }
        try RBDError.check(Int32(clamping: result), "reading \(target.count) bytes at \(offset) of \(path)")
        if result < target.count {
            // librbd reads zeroes past what objects hold, so a short read is a fault.
            throw RBDError("reading \(target.count) bytes at \(offset) of \(path) (short: \(result))", errno: EIO)
        }
    }

    /// Writes the pieces, one after another from `offset`, as one request. They must stay valid
    /// until this returns.
    public func write(at offset: UInt64, _ pieces: [UnsafeRawBufferPointer]) async throws(RBDError) {
        let total = pieces.reduce(0) { $0 + $1.count }
        let result: Int
        if pieces.count == 1 {
            let piece = pieces[0]
            result = await Self.completing { completion in
                rbd_aio_write(
                    handle, offset, piece.count, piece.baseAddress?.assumingMemoryBound(to: CChar.self), completion)
            }
        } else {
            let vector = pieces.map {
                iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)
            }
            result = await Self.completing { completion in
                // librbd reads the vector when the call starts; the bytes it points to stay ours.
                vector.withUnsafeBufferPointer {
                    rbd_aio_writev(handle, $0.baseAddress, Int32($0.count), offset, completion)
                }
            }
        }
        try RBDError.check(Int32(clamping: result), "writing \(total) bytes at \(offset) of \(path)")
    }

    /// Makes every completed write durable.
    public func flush() async throws(RBDError) {
        let result = await Self.completing { completion in rbd_aio_flush(handle, completion) }
        try RBDError.check(Int32(clamping: result), "flushing \(path)")
    }

    /// Deallocates the range where RBD can (a hint: partial objects may keep their data, as
    /// `rbd_skip_partial_discard` decides).
    public func discard(at offset: UInt64, count: UInt64) async throws(RBDError) {
        let result = await Self.completing { completion in rbd_aio_discard(handle, offset, count, completion) }
        try RBDError.check(Int32(clamping: result), "discarding \(count) bytes at \(offset) of \(path)")
    }

    /// Makes the range read as zeroes.
    public func writeZeroes(at offset: UInt64, count: UInt64) async throws(RBDError) {
        let result = await Self.completing { completion in
            rbd_aio_write_zeroes(handle, offset, Int(count), completion, 0, 0)
        }
        try RBDError.check(Int32(clamping: result), "zeroing \(count) bytes at \(offset) of \(path)")
    }

    /// The box a completion carries back to the suspended task.
    private final class Waiter {
        let continuation: CheckedContinuation<Int, Never>
        init(_ continuation: CheckedContinuation<Int, Never>) { self.continuation = continuation }
    }

    /// Starts an asynchronous librbd call and suspends until it completes; returns its return value
    /// (negative errno on failure). `start` gets the completion to pass on.
    private static func completing(_ start: (rbd_completion_t) -> Int32) async -> Int {
        await withCheckedContinuation { continuation in
            let waiter = Unmanaged.passRetained(Waiter(continuation))
            var completion: rbd_completion_t?
            let created = rbd_aio_create_completion(
                waiter.toOpaque(),
                { completion, argument in
                    let waiter = Unmanaged<Waiter>.fromOpaque(argument!).takeRetainedValue()
                    let result = rbd_aio_get_return_value(completion)
                    rbd_aio_release(completion)
                    waiter.continuation.resume(returning: result)
                }, &completion)
            guard created == 0, let completion else {
                waiter.release()
                continuation.resume(returning: Int(created < 0 ? created : -ENOMEM))
                return
            }
            let started = start(completion)
            if started < 0 {
                // Never queued: the callback will not run.
                rbd_aio_release(completion)
                waiter.release()
                continuation.resume(returning: Int(started))
            }
        }
    }

    // MARK: Snapshots and diffs (blocking)

    public func createSnapshot(_ name: String) throws(RBDError) {
        try RBDError.check(rbd_snap_create(handle, name), "creating snapshot \(name) of \(path)")
    }

    public func removeSnapshot(_ name: String) throws(RBDError) {
        try RBDError.check(rbd_snap_remove(handle, name), "removing snapshot \(name) of \(path)")
    }

    /// The names of the image's user snapshots.
    public func snapshotNames() throws(RBDError) -> [String] {
        var capacity: Int32 = 16
        while true {
            var snapshots = [rbd_snap_info_t](repeating: rbd_snap_info_t(), count: Int(capacity) + 1)
            var count = capacity
            let result = rbd_snap_list(handle, &snapshots, &count)
            if result == -ERANGE {
                capacity = max(count, capacity * 2)
                continue
            }
            try RBDError.check(result, "listing the snapshots of \(path)")
            let names = snapshots[0..<Int(result)].map { String(cString: $0.name) }
            rbd_snap_list_end(&snapshots)
            return names
        }
    }

    /// The ranges within `offset ..< offset + count` that differ between snapshot `since` and what
    /// this handle reads (the image, or its snapshot), exact to the byte as RBD tracks them, sorted
    /// and merged.
    public func changedRanges(since: String, offset: UInt64, count: UInt64) throws(RBDError) -> [(
        offset: UInt64, count: UInt64
    )] {
        final class Collector { var ranges: [(offset: UInt64, count: UInt64)] = [] }
        let collector = Collector()
        let result = withExtendedLifetime(collector) {
            rbd_diff_iterate2(
                handle, since, offset, count, 0, 0,
                { offset, length, _, argument in
                    let collector = Unmanaged<Collector>.fromOpaque(argument!).takeUnretainedValue()
                    if let last = collector.ranges.last, last.offset + last.count == offset {
                        collector.ranges[collector.ranges.count - 1].count += UInt64(length)
                    } else {
                        collector.ranges.append((offset, UInt64(length)))
                    }
                    return 0
                }, Unmanaged.passUnretained(collector).toOpaque())
        }
        try RBDError.check(result, "comparing \(path) with snapshot \(since)")
        return collector.ranges
    }
}
