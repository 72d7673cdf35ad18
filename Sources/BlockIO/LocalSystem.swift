// The few calls about the process and its files that are not file I/O: the umask, who owns a path,
// the descriptor limit, and reading a range of a descriptor someone else owns. Here so that, as for
// file I/O, no other module calls the C library itself.

import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

public enum LocalSystem {
    /// What `status(of:)` tells about a path (symbolic links followed).
    public struct PathStatus: Sendable, Equatable {
        public var isDirectory: Bool
        /// The owner's uid.
        public var owner: UInt32
        /// The permission bits (`0o777`).
        public var permissions: UInt32
    }

    /// Makes everything this process creates from now on owner-only (umask 077).
    public static func restrictNewFiles() {
        umask(0o077)
    }

    /// This process's effective user id.
    public static var effectiveUser: UInt32 { geteuid() }

    /// The status of `path`, or nil if nothing is there.
    public static func status(of path: String) throws(BlockIOError) -> PathStatus? {
        var status = stat()
        guard stat(path, &status) == 0 else {
            if Glibc.errno == ENOENT { return nil }
            throw Syscall.lastError("stat", path)
        }
        return PathStatus(
            isDirectory: status.st_mode & S_IFMT == S_IFDIR, owner: status.st_uid,
            permissions: UInt32(status.st_mode & 0o777))
    }

    /// Raises the soft limit on open descriptors to the hard limit; returns the soft limit now in
    /// force, or nil when there is none.
    public static func raiseOpenFileLimit() -> UInt64? {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
        if limit.rlim_cur < limit.rlim_max {
            let previous = limit.rlim_cur
            limit.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) != 0 { limit.rlim_cur = previous }
        }
        return limit.rlim_cur == rlim_t.max ? nil : UInt64(limit.rlim_cur)
    }

    /// Reads exactly `buffer.count` bytes at `offset` from a descriptor the caller owns (bytes past
    /// the end of the file read as zero). pread(2)
    public static func read(
        _ descriptor: Int32, fromAbsoluteOffset offset: UInt64, into buffer: UnsafeMutableRawBufferPointer
    ) throws(BlockIOError) {
        try Syscall.read(descriptor, fromAbsoluteOffset: offset, into: buffer, path: "descriptor \(descriptor)")
    }
}
