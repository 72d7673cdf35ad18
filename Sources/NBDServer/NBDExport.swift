import BlockIO
import NBDProtocol
import NIOCore

/// A block device the server exports. The `umbra` executable implements it over the snapshot
/// engine (live volumes read-write, snapshots read-only); tests implement it in memory.
///
/// The properties are read when a client looks the export up (LIST, INFO, GO) and are assumed
/// constant while a client uses them. The methods are called concurrently, for pipelined requests
/// from one or many connections, always with requests the server has already validated: in range,
/// aligned to `blockSize.minimum`, at most `blockSize.maximum` long (except `trim`, `blockStatus` and
/// fast `writeZeroes`), never a write to a read-only export, never zero-length. They run on the
/// connection's event loop until they first suspend, so anything that blocks (disk I/O) must be
/// handed to other threads. A thrown error reaches the client as an NBD errno: see `NBDError`.
///
/// `flush()` must make every write that has completed on any connection durable: the server
/// advertises `NBD_FLAG_CAN_MULTI_CONN` for every export.
public protocol NBDExport: Sendable {
    /// The export name clients ask for; unique in a registry, not empty, at most 4096 bytes.
    var name: String { get }
    /// Shown to people by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    var description: String { get }
    var size: UInt64 { get }
    /// Writes, trims and zeroes are refused with `EPERM` without reaching the export.
    var isReadOnly: Bool { get }
    var blockSize: NBDBlockSize { get }
    /// Whether `writeZeroes(fast: true)` can be done faster than writing zeroes; if not, such
    /// requests get `ENOTSUP` without reaching the export.
    var supportsFastZero: Bool { get }
    /// Metadata contexts besides `base:allocation`, e.g. `qemu:dirty-bitmap:GUID`.
    var metaContexts: [String] { get }
    /// The group its requests are counted under in metrics (the `volume` label): exports that come
    /// and go in numbers (snapshots) should share their volume's, to keep the series bounded.
    var metricsName: String { get }

    /// Reads `length` bytes at `offset`. Data buffers should come from `buffers` (which recycles
    /// big ones once they have been sent).
    func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult
    /// The same, for a connection that can send file ranges only when `allowsFileSegments` (a TLS
    /// session or a pipe cannot use `sendfile`). The default calls `read(offset:length:buffers:)`;
    /// file segments returned anyway where they are not allowed are copied into memory by the server.
    func read(
        offset: UInt64, length: UInt32, buffers: NBDBufferPool, allowsFileSegments: Bool
    ) async throws -> NBDReadResult
    /// Writes `data` at `offset`; with `fua`, returns only once the data is durable. Big payloads
    /// come in the pieces they were received in (write them with one `pwritev`); the buffers may
    /// be kept after returning (the server does not reuse them).
    func write(offset: UInt64, data: NBDWritePayload, fua: Bool) async throws
    /// Makes every completed write durable.
    func flush() async throws
    /// May discard the range (a hint; contents afterwards are unspecified).
    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws
    /// Makes the range read as zeroes. `mayTrim`: it may be deallocated (no `NO_HOLE` flag).
    /// `fast`: fail with `ENOTSUP` rather than be slower than a write (`FAST_ZERO`).
    func writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fast: Bool, fua: Bool) async throws
    /// A hint that the range will be read soon.
    func cache(offset: UInt64, length: UInt32) async throws
    /// Consecutive extents from `offset` for `context` (`base:allocation` or one of
    /// `metaContexts`). They may cover less than `length` (at least one byte) or run past it; the
    /// server clips and merges them. Flags are `NBDAllocationFlags` for `base:allocation` and
    /// `NBDDirtyBitmapFlags.dirty` for `qemu:dirty-bitmap:` contexts.
    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws -> [NBDExtent]
}

extension NBDExport {
    public var description: String { "" }
    public var blockSize: NBDBlockSize { .default }
    public var supportsFastZero: Bool { false }
    public var metaContexts: [String] { [] }
    public var metricsName: String { name }

    public func read(
        offset: UInt64, length: UInt32, buffers: NBDBufferPool, allowsFileSegments: Bool
    ) async throws -> NBDReadResult {
        try await read(offset: offset, length: length, buffers: buffers)
    }

    public func trim(offset: UInt64, length: UInt32, fua: Bool) async throws {}

    public func cache(offset: UInt64, length: UInt32) async throws {}

    /// Reports everything as allocated data, which the spec says is always safe.
    public func blockStatus(context: String, offset: UInt64, length: UInt32) async throws -> [NBDExtent] {
        [NBDExtent(length: length, flags: 0)]
    }
}

/// What a read produced.
public enum NBDReadResult: Sendable {
    /// All the requested bytes, in one buffer.
    case data(ByteBuffer)
    /// The whole range reads as zeroes; sent as `OFFSET_HOLE` when structured replies allow, so no
    /// zeroes cross the wire.
    case zeroes
    /// All the requested bytes, sent straight from a file (`sendfile`).
    case file(NBDFileSegment)
    /// Consecutive pieces that together cover the requested range, in order.
    case segments([NBDReadSegment])
}

/// A piece of a read.
public enum NBDReadSegment: Sendable {
    case data(ByteBuffer)
    case zeroes(length: UInt32)
    /// Bytes sent straight from a file (`sendfile`), never copied through user space.
    case file(NBDFileSegment)

    public var length: Int {
        switch self {
        case .data(let buffer): buffer.readableBytes
        case .zeroes(let length): Int(length)
        case .file(let file): Int(file.length)
        }
    }
}

/// A range of an open file to be sent as read data with `sendfile`, never copied through user
/// space. The export keeps `descriptor` open, and the range's contents as they were when the read
/// completed, until `release` is called: once the bytes have been handed to the kernel, or the
/// connection failed first. The server never closes the descriptor and may send from it on several
/// connections at once (each send uses its own offset, not the file position).
///
/// `sendfile` runs on the event loop, so the range should be in the page cache (a miss would stall
/// every connection on that loop while the disk is read), and it pays off for big reads: measured
/// here, 1 MiB reads cost about a third of the server CPU of pread-into-buffer, while 4 KiB reads
/// cost more (a separate syscall after the header instead of one vectored write).
public struct NBDFileSegment: Sendable {
    public var descriptor: CInt
    public var offset: UInt64
    public var length: UInt32
    public var release: (@Sendable () -> Void)?

    public init(descriptor: CInt, offset: UInt64, length: UInt32, release: (@Sendable () -> Void)? = nil) {
        self.descriptor = descriptor
        self.offset = offset
        self.length = length
        self.release = release
    }
}

extension NBDReadResult {
    /// The same bytes with every file segment read into memory, for a connection that cannot send
    /// file regions and an export that returned them anyway.
    func copyingFileSegments(buffers: NBDBufferPool) throws(NBDError) -> NBDReadResult {
        switch self {
        case .data, .zeroes:
            return self
        case .file(let file):
            return .data(try file.copied(buffers: buffers))
        case .segments(let segments):
            var copied: [NBDReadSegment] = []
            copied.reserveCapacity(segments.count)
            for (index, segment) in segments.enumerated() {
                guard case .file(let file) = segment else {
                    copied.append(segment)
                    continue
                }
                do {
                    copied.append(.data(try file.copied(buffers: buffers)))
                } catch {
                    for case .file(let rest) in segments[(index + 1)...] { rest.release?() }
                    throw error
                }
            }
            return .segments(copied)
        }
    }
}

extension NBDFileSegment {
    /// Reads the range into a buffer and releases the segment.
    fileprivate func copied(buffers: NBDBufferPool) throws(NBDError) -> ByteBuffer {
        defer { release?() }
        var buffer = buffers.buffer(capacity: Int(length))
        let total = Int(length)
        do {
            try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: total) { target in
                try LocalSystem.read(
                    descriptor, fromAbsoluteOffset: offset,
                    into: UnsafeMutableRawBufferPointer(rebasing: target[0..<total]))
                return total
            }
        } catch {
            throw NBDError(.eio, "reading \(total) bytes at \(offset) for a read reply failed: \(error)")
        }
        return buffer
    }
}
