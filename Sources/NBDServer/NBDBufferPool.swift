import NIOCore
import Synchronization

// Design note. Large buffers are recycled because fresh ones are expensive: glibc's malloc serves
// allocations of 128 KiB and up with new pages (mmap, or a heap it trims back on free), so every
// 1 MiB read would pay ~256 page faults and the zeroing of 1 MiB (measured: ~600 us of server CPU
// per 1 MiB read with fresh buffers, ~430 with recycled ones). Exports get this pool for READ data
// and the server gives a buffer back once the socket is done with it. A buffer still referenced
// elsewhere when reused is simply copied on write by ByteBuffer, so recycling is always safe; it
// only saves work when the buffer came back unshared, which is the normal case.

/// A thread-safe pool of large byte buffers.
public final class NBDBufferPool: Sendable {
    /// Buffers smaller than this are not worth pooling: malloc serves them from its free lists.
    public static let minimumPooledBytes = 64 * 1024

    private struct State {
        var buffers: [ByteBuffer] = []
        var pooledBytes = 0
    }

    private let allocator: ByteBufferAllocator
    private let maximumPooledBytes: Int
    private let state = Mutex(State())

    /// - Parameter maximumPooledBytes: bytes of idle buffers kept; more are freed.
    public init(allocator: ByteBufferAllocator = ByteBufferAllocator(), maximumPooledBytes: Int = 64 * 1024 * 1024) {
        self.allocator = allocator
        self.maximumPooledBytes = maximumPooledBytes
    }

    /// An empty buffer with room for at least `capacity` bytes, recycled when one is idle.
    public func buffer(capacity: Int) -> ByteBuffer {
        if capacity >= Self.minimumPooledBytes {
            let recycled = state.withLock { state -> ByteBuffer? in
                guard let index = state.buffers.lastIndex(where: { $0.capacity >= capacity }) else { return nil }
                let buffer = state.buffers.remove(at: index)
                state.pooledBytes -= buffer.capacity
                return buffer
            }
            if var recycled {
                recycled.clear()
                return recycled
            }
        }
        return allocator.buffer(capacity: capacity)
    }

    /// Gives a buffer back for reuse (ignored if it is small or the pool is full).
    public func recycle(_ buffer: ByteBuffer) {
        let capacity = buffer.capacity
        guard capacity >= Self.minimumPooledBytes else { return }
        state.withLock { state in
            guard state.pooledBytes + capacity <= maximumPooledBytes else { return }
            state.buffers.append(buffer)
            state.pooledBytes += capacity
        }
    }
}
