// Memory that I/O reads from or fills in place, owned by the caller. The engine never keeps a
// pointer to it past a closure: it reaches the bytes only inside `withUnsafeBytes` or
// `withUnsafeMutableBytes`, on whichever thread does the I/O, and a buffer to fill travels to that
// thread and back inside an `IOBufferHandoff`, one holder at a time, so its owner's storage is never
// shared (a copy-on-write buffer such as NIO's `ByteBuffer` stays in place) and never outlived.

/// Bytes an I/O reads from (the data of a write).
public protocol IOBytes: Sendable {
    var count: Int { get }
    func withUnsafeBytes<Result>(_ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result
}

/// Memory an I/O fills (the target of a read): `count` bytes at one address while one party holds it.
public protocol IOBuffer: Sendable {
    var count: Int { get }
    mutating func withUnsafeMutableBytes<Result>(_ body: (UnsafeMutableRawBufferPointer) throws -> Result) rethrows
        -> Result
}

extension Array: IOBytes where Element == UInt8 {}
extension Array: IOBuffer where Element == UInt8 {}

/// A buffer on its way to the threads that fill it and back: whoever has the handoff has the buffer,
/// and only one closure uses it at a time (the caller awaits each I/O before the next).
public final class IOBufferHandoff<Buffer: IOBuffer>: @unchecked Sendable {
    private var buffer: Buffer?

    public init(_ buffer: consuming Buffer) {
        self.buffer = buffer
    }

    public var count: Int { buffer?.count ?? 0 }

    /// Runs `body` with the buffer's bytes; the pointer is valid only inside.
    public func withUnsafeMutableBytes<Result>(_ body: (UnsafeMutableRawBufferPointer) throws -> Result) rethrows
        -> Result
    {
        precondition(buffer != nil, "a handed-off buffer was used after it was taken back")
        return try buffer!.withUnsafeMutableBytes(body)
    }

    /// Gives the buffer back to its owner; the handoff is empty afterwards.
    public func take() -> Buffer {
        // Moved out, not copied: a copy would leave the storage shared until the handoff is freed.
        guard let taken = buffer.take() else { preconditionFailure("a handed-off buffer was taken back twice") }
        return taken
    }
}

/// Runs `body` with pointers to every piece's bytes at once (for one vectored write); they are valid
/// only inside.
public func withUnsafeBytes<Bytes: IOBytes, Result>(
    of pieces: [Bytes], _ body: ([UnsafeRawBufferPointer]) throws -> Result
) rethrows -> Result {
    var pointers: [UnsafeRawBufferPointer] = []
    pointers.reserveCapacity(pieces.count)
    func gather(_ index: Int) throws -> Result {
        guard index < pieces.count else { return try body(pointers) }
        return try pieces[index].withUnsafeBytes { bytes in
            pointers.append(bytes)
            return try gather(index + 1)
        }
    }
    return try gather(0)
}
