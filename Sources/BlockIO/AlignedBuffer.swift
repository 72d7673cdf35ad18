// Page-aligned memory for the engine's own I/O (copy-on-write copies), and a pool that keeps a few
// for reuse: a fresh megabyte per write costs a page fault per page. The memory is reached only
// inside `withUnsafeBytes`/`withUnsafeMutableBytes`; one holder uses a buffer at a time (the pool
// hands each out to one taker, who gives it back when done).

import Synchronization

public final class AlignedBuffer: @unchecked Sendable {
    public let count: Int
    private let memory: UnsafeMutableRawBufferPointer

    public init(count: Int, alignment: Int = 4096) {
        self.count = count
        memory = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: alignment)
    }

    deinit { memory.deallocate() }

    /// Runs `body` with the bytes `range`; the pointer is valid only inside.
    public func withUnsafeMutableBytes<Result>(
        _ range: Range<Int>? = nil, _ body: (UnsafeMutableRawBufferPointer) throws -> Result
    ) rethrows -> Result {
        try body(range.map { UnsafeMutableRawBufferPointer(rebasing: memory[$0]) } ?? memory)
    }

    /// Runs `body` with the bytes `range`; the pointer is valid only inside.
    public func withUnsafeBytes<Result>(_ range: Range<Int>? = nil, _ body: (UnsafeRawBufferPointer) throws -> Result)
        rethrows -> Result
    {
        try body(UnsafeRawBufferPointer(range.map { UnsafeMutableRawBufferPointer(rebasing: memory[$0]) } ?? memory))
    }
}

/// A few aligned buffers kept for reuse, by size.
public final class AlignedBufferPool: Sendable {
    /// The most buffers kept; more are freed when given back.
    public static let maximumKept = 16

    private let kept = Mutex<[AlignedBuffer]>([])

    public init() {}

    public func take(count: Int) -> AlignedBuffer {
        kept.withLock { kept -> AlignedBuffer? in
            guard let index = kept.firstIndex(where: { $0.count == count }) else { return nil }
            return kept.remove(at: index)
        } ?? AlignedBuffer(count: count)
    }

    public func give(_ buffer: AlignedBuffer) {
        kept.withLock { kept in
            kept.append(buffer)
            if kept.count > Self.maximumKept { kept.removeFirst() }
        }
    }
}
