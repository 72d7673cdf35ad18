// What the daemon creates holds whole disks and the keys to them, so it is for its owner alone:
// the daemon runs with umask 077 (data files, the catalog, sockets: nobody else may read or
// connect), and refuses a data directory that belongs to another user, whose owner could read or
// replace everything in it behind the daemon's back.

import Logging

#if canImport(Glibc)
    import Glibc
#endif

enum DaemonFiles {
    /// Everything created from now on is owner-only.
    static func restrictNewFiles() {
        umask(0o077)
    }

    /// Refuses an existing data directory (after symbolic links) that is not a directory of this user;
    /// warns if others may read it.
    static func checkDataDirectory(_ path: String, logger: Logger) throws(DaemonFileError) {
        var status = stat()
        guard stat(path, &status) == 0 else {
            if errno == ENOENT { return }
            throw DaemonFileError("Cannot use the data directory '\(path)': \(String(cString: strerror(errno))).")
        }
        guard status.st_mode & S_IFMT == S_IFDIR else {
            throw DaemonFileError("The data directory '\(path)' is not a directory.")
        }
        guard status.st_uid == geteuid() else {
            throw DaemonFileError(
                "The data directory '\(path)' belongs to uid \(status.st_uid), not to this user (uid \(geteuid())); "
                    + "refusing to serve it.")
        }
        if status.st_mode & 0o077 != 0 {
            logger.warning(
                "the data directory is open to other users; consider chmod 700",
                metadata: ["data": "\(path)", "mode": "\(String(status.st_mode & 0o777, radix: 8))"])
        }
    }
}

struct DaemonFileError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
