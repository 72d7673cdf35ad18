// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md), fixed newstyle only.
//
// Codes the client chooses (options, commands, info types) are open structs rather than enums:
// a client may send any 16/32-bit value, and an unknown value must be representable so it can be
// answered (ERR_UNSUP, EINVAL) instead of failing to decode.

/// The magic numbers that frame every message.
public enum NBDMagic {
    /// `NBDMAGIC`, the first 8 bytes the server sends.
    public static let initialPassword: UInt64 = 0x4e42_444d_4147_4943
    /// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before every option.
    public static let option: UInt64 = 0x4948_4156_454f_5054
    /// Prefix of every fixed-newstyle option reply.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    /// Prefix of every transmission request.
    public static let request: UInt32 = 0x2560_9513
    /// Prefix of a simple reply.
    public static let simpleReply: UInt32 = 0x6744_6698
    /// Prefix of a structured reply chunk.
    public static let structuredReply: UInt32 = 0x668e_33ef
}

/// Flags the server sends right after the magic numbers.
public struct NBDHandshakeFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDHandshakeFlags(rawValue: 1 << 1)
}

/// Flags the client answers the handshake flags with.
public struct NBDClientFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let fixedNewstyle = NBDClientFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDClientFlags(rawValue: 1 << 1)
}

/// Per-export flags sent when transmission starts (`NBD_INFO_EXPORT` or the `EXPORT_NAME` reply).
public struct NBDTransmissionFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = NBDTransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
}

/// An option code sent during option haggling.
public struct NBDOption: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let exportName = NBDOption(rawValue: 1)
    public static let abort = NBDOption(rawValue: 2)
    public static let list = NBDOption(rawValue: 3)
    public static let peekExport = NBDOption(rawValue: 4)
    public static let startTLS = NBDOption(rawValue: 5)
    public static let info = NBDOption(rawValue: 6)
    public static let go = NBDOption(rawValue: 7)
    public static let structuredReply = NBDOption(rawValue: 8)
    public static let listMetaContext = NBDOption(rawValue: 9)
    public static let setMetaContext = NBDOption(rawValue: 10)

    public var description: String {
        switch self {
        case .exportName: "EXPORT_NAME"
        case .abort: "ABORT"
        case .list: "LIST"
        case .peekExport: "PEEK_EXPORT"
        case .startTLS: "STARTTLS"
        case .info: "INFO"
        case .go: "GO"
        case .structuredReply: "STRUCTURED_REPLY"
        case .listMetaContext: "LIST_META_CONTEXT"
        case .setMetaContext: "SET_META_CONTEXT"
        default: "option(\(rawValue))"
        }
    }
}

/// The type of a fixed-newstyle option reply; error types have bit 31 set.
public struct NBDOptionReplyType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let ack = NBDOptionReplyType(rawValue: 1)
    public static let server = NBDOptionReplyType(rawValue: 2)
    public static let info = NBDOptionReplyType(rawValue: 3)
    public static let metaContext = NBDOptionReplyType(rawValue: 4)
    public static let errUnsupported = NBDOptionReplyType(rawValue: 1 << 31 | 1)
    public static let errPolicy = NBDOptionReplyType(rawValue: 1 << 31 | 2)
    public static let errInvalid = NBDOptionReplyType(rawValue: 1 << 31 | 3)
    public static let errPlatform = NBDOptionReplyType(rawValue: 1 << 31 | 4)
    public static let errTLSRequired = NBDOptionReplyType(rawValue: 1 << 31 | 5)
    public static let errUnknown = NBDOptionReplyType(rawValue: 1 << 31 | 6)
    public static let errShutdown = NBDOptionReplyType(rawValue: 1 << 31 | 7)
    public static let errBlockSizeRequired = NBDOptionReplyType(rawValue: 1 << 31 | 8)
    public static let errTooBig = NBDOptionReplyType(rawValue: 1 << 31 | 9)

    public var isError: Bool { rawValue & (1 << 31) != 0 }

    public var description: String {
        switch self {
        case .ack: "ACK"
        case .server: "SERVER"
        case .info: "INFO"
        case .metaContext: "META_CONTEXT"
        case .errUnsupported: "ERR_UNSUP"
        case .errPolicy: "ERR_POLICY"
        case .errInvalid: "ERR_INVALID"
        case .errPlatform: "ERR_PLATFORM"
        case .errTLSRequired: "ERR_TLS_REQD"
        case .errUnknown: "ERR_UNKNOWN"
        case .errShutdown: "ERR_SHUTDOWN"
        case .errBlockSizeRequired: "ERR_BLOCK_SIZE_REQD"
        case .errTooBig: "ERR_TOO_BIG"
        default: "reply(\(rawValue))"
        }
    }
}

/// An information item a client asks for with `NBD_OPT_INFO`/`NBD_OPT_GO`.
public struct NBDInfoType: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let export = NBDInfoType(rawValue: 0)
    public static let name = NBDInfoType(rawValue: 1)
    public static let description = NBDInfoType(rawValue: 2)
    public static let blockSize = NBDInfoType(rawValue: 3)
}

/// A transmission command.
public struct NBDCommand: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let read = NBDCommand(rawValue: 0)
    public static let write = NBDCommand(rawValue: 1)
    public static let disconnect = NBDCommand(rawValue: 2)
    public static let flush = NBDCommand(rawValue: 3)
    public static let trim = NBDCommand(rawValue: 4)
    public static let cache = NBDCommand(rawValue: 5)
    public static let writeZeroes = NBDCommand(rawValue: 6)
    public static let blockStatus = NBDCommand(rawValue: 7)

    public var description: String {
        switch self {
        case .read: "READ"
        case .write: "WRITE"
        case .disconnect: "DISC"
        case .flush: "FLUSH"
        case .trim: "TRIM"
        case .cache: "CACHE"
        case .writeZeroes: "WRITE_ZEROES"
        case .blockStatus: "BLOCK_STATUS"
        default: "command(\(rawValue))"
        }
    }
}

/// Flags a client sets on a transmission request.
public struct NBDCommandFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    public static let dontFragment = NBDCommandFlags(rawValue: 1 << 2)
    public static let requestOne = NBDCommandFlags(rawValue: 1 << 3)
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
}

/// Flags of a structured reply chunk.
public struct NBDReplyFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let done = NBDReplyFlags(rawValue: 1 << 0)
}

/// The type of a structured reply chunk; error types have bit 15 set.
public struct NBDStructuredReplyType: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let none = NBDStructuredReplyType(rawValue: 0)
    public static let offsetData = NBDStructuredReplyType(rawValue: 1)
    public static let offsetHole = NBDStructuredReplyType(rawValue: 2)
    public static let blockStatus = NBDStructuredReplyType(rawValue: 5)
    public static let error = NBDStructuredReplyType(rawValue: 1 << 15 | 1)
    public static let errorOffset = NBDStructuredReplyType(rawValue: 1 << 15 | 2)
}

/// An error value carried in a reply. Only the values the protocol defines may be sent.
public struct NBDErrno: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let eperm = NBDErrno(rawValue: 1)
    public static let eio = NBDErrno(rawValue: 5)
    public static let enomem = NBDErrno(rawValue: 12)
    public static let einval = NBDErrno(rawValue: 22)
    public static let enospc = NBDErrno(rawValue: 28)
    public static let eoverflow = NBDErrno(rawValue: 75)
    public static let enotsup = NBDErrno(rawValue: 95)
    public static let eshutdown = NBDErrno(rawValue: 108)

    public var description: String {
        switch self {
        case .eperm: "EPERM"
        case .eio: "EIO"
        case .enomem: "ENOMEM"
        case .einval: "EINVAL"
        case .enospc: "ENOSPC"
        case .eoverflow: "EOVERFLOW"
        case .enotsup: "ENOTSUP"
        case .eshutdown: "ESHUTDOWN"
        default: "errno(\(rawValue))"
        }
    }
}

/// Status flags of the `base:allocation` context.
public struct NBDAllocationFlags: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// The extent is not allocated in the backing storage.
    public static let hole = NBDAllocationFlags(rawValue: 1 << 0)
    /// The extent reads as zeroes.
    public static let zero = NBDAllocationFlags(rawValue: 1 << 1)
}

/// Status flag of a `qemu:dirty-bitmap:NAME` context.
public enum NBDDirtyBitmapFlags {
    /// The extent may have changed since the bitmap's reference point.
    public static let dirty: UInt32 = 1 << 0
}

/// Names of the metadata contexts the server knows by itself.
public enum NBDMetaContextName {
    public static let baseAllocation = "base:allocation"
    /// Prefix of QEMU's changed-block contexts, `qemu:dirty-bitmap:NAME`.
    public static let qemuDirtyBitmapPrefix = "qemu:dirty-bitmap:"
}
