// What an export hands the engine: a pooled ByteBuffer filled in place by a read (ReadTarget), a
// received WRITE payload as the source of a write (PayloadBytes), and an engine error on its way to
// the client (ExportError). The engine takes them as owned buffers (BlockIO's IOBuffer and IOBytes)
// and reaches their bytes only inside closures, so no pointer outlives the call that lent it.

import BlockIO
import Logging
import NBDProtocol
import NBDServer
import NIOCore
import SnapshotEngine
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A pooled ByteBuffer as the target of an engine read: its first `count` writable bytes, filled in
/// place (the buffer is owned by one party at a time, so its storage is never copied).
struct ReadTarget: IOBuffer {
    var buffer: ByteBuffer
    let count: Int

    init(length: UInt32, buffers: NBDBufferPool) {
        buffer = buffers.buffer(capacity: Int(length))
        count = Int(length)
    }

    mutating func withUnsafeMutableBytes<Result>(_ body: (UnsafeMutableRawBufferPointer) throws -> Result) rethrows
        -> Result
    {
        let count = self.count
        return try buffer.withUnsafeMutableWritableBytes {
            try body(UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]))
        }
    }

    /// The buffer, holding the bytes read.
    consuming func filled() -> ByteBuffer {
        buffer.moveWriterIndex(forwardBy: count)
        return buffer
    }
}

/// A received WRITE payload buffer as the source of an engine write.
struct PayloadBytes: IOBytes {
    let buffer: ByteBuffer
    var count: Int { buffer.readableBytes }

    func withUnsafeBytes<Result>(_ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result {
        try buffer.withUnsafeReadableBytes(body)
    }
}

/// An engine error on its way to an NBD client, with the errno the engine's one table gives it.
struct ExportError: NBDErrorConvertible {
    let underlying: any Error
    var nbdErrno: NBDErrno {
        guard let engine = underlying as? EngineError else { return .eio }
        return NBDError.errno(forSystemErrno: engine.errno.rawValue)
    }
    var description: String { "\(underlying)" }

    static func wrapping<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch {
            throw ExportError(underlying: error)
        }
    }
}
