import NIOCore

// Transmission phase: the request header a client sends and the reply headers the server sends.
// Reply payloads (read data) are never written here: they travel as their own buffers behind the
// header, so read data is not copied into a header buffer.

/// A transmission request header (the WRITE payload, if any, follows it separately).
public struct NBDRequest: Hashable, Sendable, CustomStringConvertible {
    public var flags: NBDCommandFlags
    public var command: NBDCommand
    /// The client's opaque handle (a "cookie"), echoed in every reply.
    public var handle: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: NBDCommandFlags = [], command: NBDCommand, handle: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.command = command
        self.handle = handle
        self.offset = offset
        self.length = length
    }

    public var description: String {
        "\(command) handle \(handle) offset \(offset) length \(length) flags 0x\(String(flags.rawValue, radix: 16))"
    }
}

extension NBDRequest {
    /// Bytes of a request header.
    public static let headerBytes = 28
}

extension ByteBuffer {
    /// Bytes of a simple reply header.
    public static let nbdSimpleReplyBytes = 16
    /// Bytes of a structured reply chunk header.
    public static let nbdStructuredReplyHeaderBytes = 20
    /// Bytes of an `OFFSET_DATA` chunk before its data (header and offset).
    public static let nbdOffsetDataHeaderBytes = 28

    /// Reads a request header, or nil if fewer than 28 bytes are readable. The magic number is
    /// checked; nothing else is (validation is the transmission state machine's job).
    public mutating func readNBDRequest() throws(NBDProtocolError) -> NBDRequest? {
        guard
            let (magic, flags, command, handle, offset, length) = readMultipleIntegers(
                as: (UInt32, UInt16, UInt16, UInt64, UInt64, UInt32).self
            )
        else { return nil }
        guard magic == NBDMagic.request else {
            throw NBDProtocolError(.badRequestMagic, "bad request magic 0x\(String(magic, radix: 16))")
        }
        return NBDRequest(
            flags: NBDCommandFlags(rawValue: flags),
            command: NBDCommand(rawValue: command),
            handle: handle,
            offset: offset,
            length: length
        )
    }

    /// Writes a request header (used by tests and clients).
    @discardableResult
    public mutating func writeNBDRequest(_ request: NBDRequest) -> Int {
        writeMultipleIntegers(
            NBDMagic.request,
            request.flags.rawValue,
            request.command.rawValue,
            request.handle,
            request.offset,
            request.length
        )
    }

    /// Writes a simple reply header; read data, if any, follows as its own buffer.
    @discardableResult
    public mutating func writeNBDSimpleReply(handle: UInt64, error: NBDErrno?) -> Int {
        writeMultipleIntegers(NBDMagic.simpleReply, error?.rawValue ?? 0, handle)
    }

    /// Writes a structured reply chunk header announcing `payloadLength` bytes of payload.
    @discardableResult
    public mutating func writeNBDChunkHeader(
        handle: UInt64,
        type: NBDStructuredReplyType,
        flags: NBDReplyFlags,
        payloadLength: UInt32
    ) -> Int {
        writeMultipleIntegers(NBDMagic.structuredReply, flags.rawValue, type.rawValue, handle, payloadLength)
    }

    /// Writes the header of an `OFFSET_DATA` chunk; `dataLength` bytes of data follow separately.
    @discardableResult
    public mutating func writeNBDOffsetDataHeader(
        handle: UInt64,
        flags: NBDReplyFlags,
        offset: UInt64,
        dataLength: UInt32
    ) -> Int {
        writeMultipleIntegers(
            NBDMagic.structuredReply,
            flags.rawValue,
            NBDStructuredReplyType.offsetData.rawValue,
            handle,
            dataLength + 8,
            offset
        )
    }

    /// Writes a complete `OFFSET_HOLE` chunk.
    @discardableResult
    public mutating func writeNBDOffsetHole(handle: UInt64, flags: NBDReplyFlags, offset: UInt64, length: UInt32) -> Int
    {
        writeMultipleIntegers(
            NBDMagic.structuredReply,
            flags.rawValue,
            NBDStructuredReplyType.offsetHole.rawValue,
            handle,
            UInt32(12),
            offset,
            length
        )
    }

    /// Writes a `NONE` chunk with `DONE` set: the end of a successful structured reply.
    @discardableResult
    public mutating func writeNBDStructuredDone(handle: UInt64) -> Int {
        writeNBDChunkHeader(handle: handle, type: .none, flags: .done, payloadLength: 0)
    }

    /// Writes a complete `ERROR` chunk, or an `ERROR_OFFSET` chunk when `offset` is given.
    @discardableResult
    public mutating func writeNBDStructuredError(
        handle: UInt64,
        flags: NBDReplyFlags,
        error: NBDErrno,
        message: String,
        offset: UInt64? = nil
    ) -> Int {
        let message = Self.nbdWireString(message)
        let messageLength = message.utf8.count
        let type: NBDStructuredReplyType = offset == nil ? .error : .errorOffset
        let payloadLength = 6 + messageLength + (offset == nil ? 0 : 8)
        var written = writeNBDChunkHeader(
            handle: handle, type: type, flags: flags, payloadLength: UInt32(payloadLength))
        written += writeMultipleIntegers(error.rawValue, UInt16(messageLength))
        written += writeString(message)
        if let offset { written += writeInteger(offset) }
        return written
    }

    /// Writes a complete `BLOCK_STATUS` chunk for one context. `extents` must not be empty.
    @discardableResult
    public mutating func writeNBDBlockStatus(
        handle: UInt64,
        flags: NBDReplyFlags,
        contextID: UInt32,
        extents: some Collection<NBDExtent>
    ) -> Int {
        assert(!extents.isEmpty, "a block status chunk needs at least one extent")
        let payloadLength = UInt32(4 + 8 * extents.count)
        var written = writeNBDChunkHeader(
            handle: handle, type: .blockStatus, flags: flags, payloadLength: payloadLength)
        written += writeInteger(contextID)
        for extent in extents { written += writeMultipleIntegers(extent.length, extent.flags) }
        return written
    }
}
