// The control socket lets whoever can connect create and delete snapshots, so its file is the
// daemon's front door. Before binding: the directory it goes in must belong to this user (or to
// root, like /run or /tmp) and not be writable by everyone unless sticky, and whatever is at the path is looked at without following a symbolic
// link: a link, a file that is not a socket, or a socket another user owns is refused, never
// replaced; a stale socket of this user (nobody accepts on it) is removed. After binding the file is
// made owner-only (0600; the daemon also runs with umask 077, so it never starts out wider) and
// checked again to be the socket this process just bound, so a file
// swapped in between is noticed rather than trusted.

#if canImport(Glibc)
    import Glibc
#endif

enum ControlSocketFile {
    /// Checks `path` and its directory and removes a stale socket of this user. `isLive` says whether
    /// something accepts connections on an existing socket.
    static func prepare(path: String, isLive: (String) async -> Bool) async throws(ShadowCopyError) {
        let directory = parentDirectory(of: path)
        var status = stat()
        guard stat(directory, &status) == 0 else {
            throw ShadowCopyError(.invalidArgument, "Cannot use '\(directory)' for the control socket: \(errnoText()).")
        }
        guard status.st_mode & S_IFMT == S_IFDIR else {
            throw ShadowCopyError(.invalidArgument, "'\(directory)' is not a directory; choose another --control path.")
        }
        guard status.st_uid == geteuid() || status.st_uid == 0 else {
            throw ShadowCopyError(
                .invalidArgument,
                "'\(directory)' belongs to uid \(status.st_uid), not to this user (uid \(geteuid())); "
                    + "put the control socket in a directory you own.")
        }
        guard status.st_mode & S_IWOTH == 0 || status.st_mode & S_ISVTX != 0 else {
            throw ShadowCopyError(
                .invalidArgument,
                "'\(directory)' is writable by everyone without the sticky bit; anyone could replace the "
                    + "control socket there. Choose another --control path.")
        }

        guard lstat(path, &status) == 0 else {
            if errno == ENOENT { return }
            throw ShadowCopyError(.invalidArgument, "Cannot inspect '\(path)': \(errnoText()).")
        }
        switch status.st_mode & S_IFMT {
        case S_IFSOCK:
            break
        case S_IFLNK:
            throw ShadowCopyError(
                .alreadyExists, "'\(path)' is a symbolic link; the control socket never follows one. Remove it.")
        default:
            throw ShadowCopyError(
                .alreadyExists, "'\(path)' exists and is not a socket; remove it or choose another --control path.")
        }
        guard status.st_uid == geteuid() else {
            throw ShadowCopyError(
                .alreadyExists,
                "'\(path)' is a socket of uid \(status.st_uid), not of this user (uid \(geteuid())); refusing to replace it.")
        }
        if await isLive(path) {
            throw ShadowCopyError(.alreadyExists, "Another daemon is already listening on '\(path)'.")
        }
        guard unlink(path) == 0 || errno == ENOENT else {
            throw ShadowCopyError(.internal, "Cannot remove the stale socket '\(path)': \(errnoText()).")
        }
    }

    /// Makes the socket just bound at `path` owner-only and checks it is a socket of this user.
    static func restrict(path: String) throws(ShadowCopyError) {
        guard chmod(path, 0o600) == 0 else {
            throw ShadowCopyError(.internal, "Cannot make the control socket '\(path)' private: \(errnoText()).")
        }
        var status = stat()
        guard lstat(path, &status) == 0, status.st_mode & S_IFMT == S_IFSOCK, status.st_uid == geteuid(),
            status.st_mode & 0o077 == 0
        else {
            throw ShadowCopyError(.internal, "The control socket '\(path)' changed under the daemon while binding it.")
        }
    }

    static func parentDirectory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    private static func errnoText(_ code: Int32 = errno) -> String {
        String(cString: strerror(code))
    }
}
