#if canImport(Glibc)
    import Glibc
#endif

// A Unix socket file left behind by a server that died must not stop the next one from starting,
// but a live server's socket must never be taken over, and a file that is not a socket must never
// be deleted. So before binding: a socket nobody accepts on (connect gives ECONNREFUSED) is
// removed; one that accepts (or whose backlog is full) means "in use"; anything else is refused.
// At shutdown the file is removed only if it is still the one this server bound.

enum UnixSocketFile {
    struct Identity: Hashable, Sendable {
        var device: UInt64
        var inode: UInt64
    }

    /// Makes `path` free for `bind`, removing a stale socket file.
    static func prepare(path: String) throws(NBDError) {
        var status = stat()
        guard lstat(path, &status) == 0 else {
            if errno == ENOENT { return }
            throw NBDError(.eio, "cannot inspect \(path): \(describeErrno())")
        }
        guard status.st_mode & S_IFMT == S_IFSOCK else {
            throw NBDError(.einval, "\(path) exists and is not a socket")
        }
        let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard descriptor >= 0 else { throw NBDError(.eio, "cannot create a socket: \(describeErrno())") }
        defer { close(descriptor) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { target in
            let bytes = Array(path.utf8.prefix(target.count - 1))
            target.copyBytes(from: bytes)
        }
        let result = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        let connectErrno = errno
        if result == 0 || connectErrno == EAGAIN || connectErrno == EINPROGRESS {
            throw NBDError(.einval, "\(path) is in use by a running server")
        }
        guard connectErrno == ECONNREFUSED else {
            throw NBDError(.eio, "cannot check whether \(path) is in use: \(describeErrno(connectErrno))")
        }
        if unlink(path) != 0 && errno != ENOENT {
            throw NBDError(.eio, "cannot remove the stale socket \(path): \(describeErrno())")
        }
    }

    static func identity(of path: String) -> Identity? {
        var status = stat()
        guard lstat(path, &status) == 0 else { return nil }
        return Identity(device: UInt64(status.st_dev), inode: UInt64(status.st_ino))
    }

    /// Removes `path` if it is still the socket file identified by `identity`.
    static func remove(path: String, ifStill identity: Identity) {
        guard Self.identity(of: path) == identity else { return }
        unlink(path)
    }

    private static func describeErrno(_ code: Int32 = errno) -> String {
        String(cString: strerror(code))
    }
}
