// A Unix socket file is a server's front door, so before binding one (the NBD sockets and the
// control socket alike) its directory must belong to this user (or to root, like /run or /tmp) and
// not be writable by everyone unless sticky, and whatever is at the path is looked at without
// following a symbolic link: a link, a file that is not a socket, or a socket another user owns is
// refused, never replaced; a socket nobody accepts on (connect says ECONNREFUSED) is stale and
// removed; one that accepts (or whose backlog is full) is in use. After binding, the file is made
// owner-only and checked to be the socket this process bound, so a file swapped in meanwhile is
// noticed rather than trusted. At shutdown it is removed only if it is still that socket.

import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Why a socket path cannot be bound; each reads as one sentence.
public enum SocketFileError: Error, Equatable, Sendable, CustomStringConvertible {
    case unusableDirectory(String, Errno)
    case directoryIsNotADirectory(String)
    case directoryOfAnotherUser(String, owner: UInt32, user: UInt32)
    case directoryWritableByEveryone(String)
    case unreadable(String, Errno)
    case symbolicLink(String)
    case notASocket(String)
    case socketOfAnotherUser(String, owner: UInt32, user: UInt32)
    case inUse(String)
    case cannotCheck(String, Errno)
    case cannotRemove(String, Errno)
    case cannotRestrict(String, Errno)
    case changedWhileBinding(String)

    public var description: String {
        switch self {
        case .unusableDirectory(let path, let errno): "cannot use '\(path)' for a socket: \(errno.description)"
        case .directoryIsNotADirectory(let path): "'\(path)' is not a directory"
        case .directoryOfAnotherUser(let path, let owner, let user):
            "'\(path)' belongs to uid \(owner), not to this user (uid \(user)); put the socket in a directory you own"
        case .directoryWritableByEveryone(let path):
            "'\(path)' is writable by everyone without the sticky bit; anyone could replace the socket there"
        case .unreadable(let path, let errno): "cannot inspect '\(path)': \(errno.description)"
        case .symbolicLink(let path): "'\(path)' is a symbolic link; a socket path is never followed; remove it"
        case .notASocket(let path): "'\(path)' exists and is not a socket; remove it or choose another path"
        case .socketOfAnotherUser(let path, let owner, let user):
            "'\(path)' is a socket of uid \(owner), not of this user (uid \(user)); refusing to replace it"
        case .inUse(let path): "another server is already listening on '\(path)'"
        case .cannotCheck(let path, let errno): "cannot check whether '\(path)' is in use: \(errno.description)"
        case .cannotRemove(let path, let errno): "cannot remove the stale socket '\(path)': \(errno.description)"
        case .cannotRestrict(let path, let errno): "cannot make the socket '\(path)' private: \(errno.description)"
        case .changedWhileBinding(let path): "the socket '\(path)' changed under this process while binding it"
        }
    }
}

public enum SocketFile {
    /// The file a socket was bound as, to remove only that one.
    public struct Identity: Hashable, Sendable {
        var device: UInt64
        var inode: UInt64
    }

    /// Checks `path` and its directory, and removes a stale socket of this user, so `bind` can go.
    public static func prepare(path: String) throws(SocketFileError) {
        let directory = parentDirectory(of: path)
        var status = stat()
        guard stat(directory, &status) == 0 else { throw .unusableDirectory(directory, lastErrno()) }
        guard status.st_mode & S_IFMT == S_IFDIR else { throw .directoryIsNotADirectory(directory) }
        let user = geteuid()
        guard status.st_uid == user || status.st_uid == 0 else {
            throw .directoryOfAnotherUser(directory, owner: status.st_uid, user: user)
        }
        guard status.st_mode & S_IWOTH == 0 || status.st_mode & S_ISVTX != 0 else {
            throw .directoryWritableByEveryone(directory)
        }
        guard lstat(path, &status) == 0 else {
            if Glibc.errno == ENOENT { return }
            throw .unreadable(path, lastErrno())
        }
        switch status.st_mode & S_IFMT {
        case S_IFSOCK: break
        case S_IFLNK: throw .symbolicLink(path)
        default: throw .notASocket(path)
        }
        guard status.st_uid == user else { throw .socketOfAnotherUser(path, owner: status.st_uid, user: user) }
        guard try !isAccepting(path) else { throw .inUse(path) }
        guard Glibc.unlink(path) == 0 || Glibc.errno == ENOENT else { throw .cannotRemove(path, lastErrno()) }
    }

    /// Makes the socket just bound at `path` owner-only, checks it is still a socket of this user,
    /// and returns its identity.
    @discardableResult
    public static func restrict(path: String) throws(SocketFileError) -> Identity {
        guard chmod(path, 0o600) == 0 else { throw .cannotRestrict(path, lastErrno()) }
        var status = stat()
        guard lstat(path, &status) == 0, status.st_mode & S_IFMT == S_IFSOCK, status.st_uid == geteuid(),
            status.st_mode & 0o077 == 0
        else { throw .changedWhileBinding(path) }
        return Identity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino))
    }

    /// The identity of the socket file at `path`, if there is one.
    public static func identity(of path: String) -> Identity? {
        var status = stat()
        guard lstat(path, &status) == 0 else { return nil }
        return Identity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino))
    }

    /// Removes `path` if it is still the socket file identified by `identity`.
    public static func remove(path: String, ifStill identity: Identity) {
        guard Self.identity(of: path) == identity else { return }
        _ = Glibc.unlink(path)
    }

    public static func parentDirectory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// Whether something accepts connections on the socket at `path` (a full backlog counts).
    private static func isAccepting(_ path: String) throws(SocketFileError) -> Bool {
        let descriptor = socket(
            AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw .cannotCheck(path, lastErrno()) }
        defer { Syscall.close(descriptor) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { target in
            target.copyBytes(from: Array(path.utf8.prefix(target.count - 1)))
        }
        let result = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        let code = Glibc.errno
        if result == 0 || code == EAGAIN || code == EINPROGRESS { return true }
        guard code == ECONNREFUSED else { throw .cannotCheck(path, Errno(rawValue: code)) }
        return false
    }

    private static func lastErrno() -> Errno { Errno(rawValue: Glibc.errno) }
}
