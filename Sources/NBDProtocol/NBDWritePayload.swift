import NIOCore

/// The data of a WRITE. A big payload arrives over several socket reads and is kept as the
/// consecutive pieces it arrived in, so it is never copied to be made contiguous (it can be
/// written with one `pwritev`); a small one is a single buffer.
public struct NBDWritePayload: Hashable, Sendable {
    private enum Storage: Hashable, Sendable {
        case single(ByteBuffer)
        case pieces([ByteBuffer])
    }

    private var storage: Storage
    /// Total bytes.
    public let readableBytes: Int

    public init(_ buffer: ByteBuffer) {
        storage = .single(buffer)
        readableBytes = buffer.readableBytes
    }

    /// `pieces` in order; empty pieces are dropped.
    public init(pieces: [ByteBuffer]) {
        let nonEmpty = pieces.filter { $0.readableBytes > 0 }
        storage = nonEmpty.count == 1 ? .single(nonEmpty[0]) : .pieces(nonEmpty)
        readableBytes = nonEmpty.reduce(0) { $0 + $1.readableBytes }
    }

    /// The pieces, in order (one for a payload that arrived in one piece).
    public var buffers: [ByteBuffer] {
        switch storage {
        case .single(let buffer): [buffer]
        case .pieces(let pieces): pieces
        }
    }

    /// Calls `body` with each piece's bytes in order, without copying.
    public func forEachPiece(_ body: (UnsafeRawBufferPointer) throws -> Void) rethrows {
        switch storage {
        case .single(let buffer):
            try buffer.withUnsafeReadableBytes(body)
        case .pieces(let pieces):
            for piece in pieces { try piece.withUnsafeReadableBytes(body) }
        }
    }

    /// Payloads are equal when their bytes are, however they are split.
    public static func == (lhs: NBDWritePayload, rhs: NBDWritePayload) -> Bool {
        lhs.readableBytes == rhs.readableBytes && lhs.contiguous() == rhs.contiguous()
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(contiguous())
    }

    /// All the bytes in one buffer: the payload itself if it is one piece, else a copy.
    public func contiguous(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> ByteBuffer {
        switch storage {
        case .single(let buffer):
            return buffer
        case .pieces(let pieces):
            var joined = allocator.buffer(capacity: readableBytes)
            for piece in pieces { joined.writeImmutableBuffer(piece) }
            return joined
        }
    }
}
