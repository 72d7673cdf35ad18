import NBDProtocol
import NIOCore

#if canImport(Glibc)
    import Glibc
#endif

/// An error an export (or anything else) can throw to choose the errno a client sees.
public protocol NBDErrorConvertible: Error {
    var nbdErrno: NBDErrno { get }
}

/// The NBDServer module's error: what exports throw to answer a request with a specific errno, and
/// what the server's own API throws (bad listen address, socket in use...).
public struct NBDError: NBDErrorConvertible, Hashable, CustomStringConvertible {
    public var errno: NBDErrno
    public var message: String
    /// Where inside the request the failure happened; sent as `NBD_REPLY_TYPE_ERROR_OFFSET` when
    /// it lies within the request and structured replies are in use.
    public var offset: UInt64?

    public init(_ errno: NBDErrno, _ message: String, offset: UInt64? = nil) {
        self.errno = errno
        self.message = message
        self.offset = offset
    }

    public var nbdErrno: NBDErrno { errno }
    public var description: String { "\(message) (\(errno))" }

    /// The errno a client is sent for `error`: the one it carries if it is `NBDErrorConvertible`,
    /// a translation of system errors, `ESHUTDOWN` for cancellation, `EIO` for anything else.
    /// When the error answers `request`, the two errnos the spec reserves for one case each become
    /// `EINVAL` elsewhere: `ENOTSUP` is only for WRITE_ZEROES with `FAST_ZERO`, `EOVERFLOW` only
    /// for READ with `DF`. This is the only place errors become errnos.
    public static func errno(for error: any Error, answering request: NBDRequest? = nil) -> NBDErrno {
        let errno = carriedErrno(of: error)
        guard let request else { return errno }
        switch errno {
        case .enotsup where !(request.command == .writeZeroes && request.flags.contains(.fastZero)):
            return .einval
        case .eoverflow where !(request.command == .read && request.flags.contains(.dontFragment)):
            return .einval
        default:
            return errno
        }
    }

    private static func carriedErrno(of error: any Error) -> NBDErrno {
        let errno: NBDErrno
        switch error {
        case let error as any NBDErrorConvertible:
            errno = error.nbdErrno
        case let error as NBDProtocolError:
            errno = error.errno
        case let error as IOError:
            errno = Self.errno(forSystemErrno: error.errnoCode)
        case is CancellationError:
            errno = .eshutdown
        default:
            errno = .eio
        }
        return definedErrnos.contains(errno) ? errno : .eio
    }

    /// The message sent with a structured error reply.
    static func message(for error: any Error) -> String {
        switch error {
        case let error as NBDError: error.message
        default: String(describing: error)
        }
    }

    private static let definedErrnos: Set<NBDErrno> = [
        .eperm, .eio, .enomem, .einval, .enospc, .eoverflow, .enotsup, .eshutdown,
    ]

    /// The NBD errno for a system errno: the eight NBD defines, the nearest of them for a few
    /// others, EIO for the rest.
    public static func errno(forSystemErrno systemErrno: CInt) -> NBDErrno {
        switch systemErrno {
        case EPERM, EACCES, EROFS: .eperm
        case ENOMEM: .enomem
        case EINVAL: .einval
        case ENOSPC, EDQUOT, EFBIG: .enospc
        case EOVERFLOW: .eoverflow
        case ENOTSUP: .enotsup
        case ESHUTDOWN: .eshutdown
        default: .eio
        }
    }
}
