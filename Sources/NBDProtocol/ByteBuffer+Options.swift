import NIOCore

// Option haggling: the payloads a client sends with options and the replies the server sends back.

/// An information item of an `NBD_REP_INFO` reply.
public enum NBDInfo: Hashable, Sendable {
    case export(size: UInt64, flags: NBDTransmissionFlags)
    case name(String)
    case description(String)
    case blockSize(NBDBlockSize)
}

/// A fixed-newstyle option reply.
public struct NBDOptionReply: Hashable, Sendable {
    public enum Body: Hashable, Sendable {
        case ack
        case server(NBDExportListing)
        case info(NBDInfo)
        case metaContext(NBDMetaContext)
        case error(NBDOptionReplyType, message: String)
    }

    public var option: NBDOption
    public var body: Body

    public init(option: NBDOption, body: Body) {
        self.option = option
        self.body = body
    }

    public static func ack(_ option: NBDOption) -> NBDOptionReply { NBDOptionReply(option: option, body: .ack) }

    public static func error(_ option: NBDOption, _ type: NBDOptionReplyType, _ message: String) -> NBDOptionReply {
        NBDOptionReply(option: option, body: .error(type, message: message))
    }

    public var type: NBDOptionReplyType {
        switch body {
        case .ack: .ack
        case .server: .server
        case .info: .info
        case .metaContext: .metaContext
        case .error(let type, _): type
        }
    }
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
public struct NBDExportInfoRequest: Hashable, Sendable {
    public var exportName: String
    public var infoTypes: [NBDInfoType]

    public init(exportName: String, infoTypes: [NBDInfoType]) {
        self.exportName = exportName
        self.infoTypes = infoTypes
    }
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
public struct NBDMetaContextRequest: Hashable, Sendable {
    public var exportName: String
    public var queries: [String]

    public init(exportName: String, queries: [String]) {
        self.exportName = exportName
        self.queries = queries
    }
}

extension ByteBuffer {
    /// Bytes of the header before every option reply's data: magic, option, type, length.
    public static let nbdOptionReplyHeaderBytes = 20

    /// Writes an option reply, header and data.
    @discardableResult
    public mutating func writeNBDOptionReply(_ reply: NBDOptionReply) -> Int {
        let start = writerIndex
        writeMultipleIntegers(NBDMagic.optionReply, reply.option.rawValue, reply.type.rawValue, UInt32(0))
        let dataStart = writerIndex
        switch reply.body {
        case .ack:
            break
        case .server(let listing):
            let name = Self.nbdWireString(listing.name)
            writeInteger(UInt32(name.utf8.count))
            writeString(name)
            writeString(Self.nbdWireString(listing.description))
        case .info(.export(let size, let flags)):
            writeMultipleIntegers(NBDInfoType.export.rawValue, size, flags.rawValue)
        case .info(.name(let name)):
            writeInteger(NBDInfoType.name.rawValue)
            writeString(Self.nbdWireString(name))
        case .info(.description(let description)):
            writeInteger(NBDInfoType.description.rawValue)
            writeString(Self.nbdWireString(description))
        case .info(.blockSize(let size)):
            writeMultipleIntegers(NBDInfoType.blockSize.rawValue, size.minimum, size.preferred, size.maximum)
        case .metaContext(let context):
            writeInteger(context.id)
            writeString(Self.nbdWireString(context.name))
        case .error(_, let message):
            writeString(Self.nbdWireString(message))
        }
        setInteger(UInt32(writerIndex - dataStart), at: dataStart - 4)
        return writerIndex - start
    }

    /// Writes an option as a client sends it: `IHAVEOPT`, option, length, payload.
    @discardableResult
    public mutating func writeNBDOption(_ option: NBDOption, payload: ByteBuffer = ByteBuffer()) -> Int {
        writeMultipleIntegers(NBDMagic.option, option.rawValue, UInt32(payload.readableBytes))
            + writeImmutableBuffer(payload)
    }

    /// Writes the payload of `NBD_OPT_INFO`/`NBD_OPT_GO` as a client sends it.
    @discardableResult
    public mutating func writeNBDExportInfoRequest(_ request: NBDExportInfoRequest) -> Int {
        var written = writeInteger(UInt32(request.exportName.utf8.count)) + writeString(request.exportName)
        written += writeInteger(UInt16(request.infoTypes.count))
        for info in request.infoTypes { written += writeInteger(info.rawValue) }
        return written
    }

    /// Writes the payload of `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT` as a client sends it.
    @discardableResult
    public mutating func writeNBDMetaContextRequest(_ request: NBDMetaContextRequest) -> Int {
        var written = writeInteger(UInt32(request.exportName.utf8.count)) + writeString(request.exportName)
        written += writeInteger(UInt32(request.queries.count))
        for query in request.queries {
            written += writeInteger(UInt32(query.utf8.count)) + writeString(query)
        }
        return written
    }

    /// Reads the payload of `NBD_OPT_INFO`/`NBD_OPT_GO`, which must be consumed exactly.
    public mutating func readNBDExportInfoRequest() throws(NBDProtocolError) -> NBDExportInfoRequest {
        let name = try readNBDLengthPrefixedString(what: "export name")
        guard let count = readInteger(as: UInt16.self) else {
            throw NBDProtocolError(.invalidOptionPayload, "information request count missing")
        }
        guard readableBytes == Int(count) * 2 else {
            throw NBDProtocolError(.invalidOptionPayload, "information request list has the wrong length")
        }
        var infoTypes: [NBDInfoType] = []
        infoTypes.reserveCapacity(Int(count))
        while let raw = readInteger(as: UInt16.self) { infoTypes.append(NBDInfoType(rawValue: raw)) }
        return NBDExportInfoRequest(exportName: name, infoTypes: infoTypes)
    }

    /// Reads the payload of `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`, which must be
    /// consumed exactly. The query count is checked against the bytes present before anything is
    /// reserved for it.
    public mutating func readNBDMetaContextRequest() throws(NBDProtocolError) -> NBDMetaContextRequest {
        let name = try readNBDLengthPrefixedString(what: "export name")
        guard let count = readInteger(as: UInt32.self) else {
            throw NBDProtocolError(.invalidOptionPayload, "query count missing")
        }
        guard UInt64(count) * 4 <= UInt64(readableBytes) else {
            throw NBDProtocolError(.invalidOptionPayload, "more queries announced than the payload holds")
        }
        var queries: [String] = []
        queries.reserveCapacity(Int(count))
        for _ in 0..<count {
            queries.append(try readNBDLengthPrefixedString(what: "query"))
        }
        guard readableBytes == 0 else {
            throw NBDProtocolError(.invalidOptionPayload, "trailing bytes after the last query")
        }
        return NBDMetaContextRequest(exportName: name, queries: queries)
    }

    /// Reads a string with a 32-bit length prefix, checking the length against the bytes present
    /// and the 4096-byte limit before reading.
    public mutating func readNBDLengthPrefixedString(what: String) throws(NBDProtocolError) -> String {
        guard let length = readInteger(as: UInt32.self) else {
            throw NBDProtocolError(.invalidOptionPayload, "\(what) length missing")
        }
        guard Int64(length) <= Int64(readableBytes) else {
            throw NBDProtocolError(.invalidOptionPayload, "\(what) length exceeds the option length")
        }
        return try readNBDString(length: Int(length), what: what)
    }

    /// Reads `length` bytes as a protocol string: valid UTF-8, no NUL, at most 4096 bytes.
    public mutating func readNBDString(length: Int, what: String) throws(NBDProtocolError) -> String {
        guard length <= NBDLimits.maximumStringBytes else {
            throw NBDProtocolError(.invalidOptionPayload, "\(what) is longer than 4096 bytes")
        }
        guard length <= readableBytes else {
            throw NBDProtocolError(.invalidOptionPayload, "\(what) is truncated")
        }
        let string = withUnsafeReadableBytes { bytes -> String? in
            let bytes = UnsafeRawBufferPointer(rebasing: bytes[..<length])
            if bytes.contains(0) { return nil }
            return String(validating: bytes, as: UTF8.self)
        }
        guard let string else {
            throw NBDProtocolError(.invalidOptionPayload, "\(what) is not UTF-8 without NUL")
        }
        moveReaderIndex(forwardBy: length)
        return string
    }

    /// `string` cut to the protocol's 4096-byte limit at a character boundary.
    static func nbdWireString(_ string: String) -> String {
        guard string.utf8.count > NBDLimits.maximumStringBytes else { return string }
        var result = ""
        for character in string {
            if result.utf8.count + character.utf8.count > NBDLimits.maximumStringBytes { break }
            result.append(character)
        }
        return result
    }
}
