// What the daemon creates holds whole disks and the keys to them, so it is for its owner alone:
// the daemon runs with umask 077 (data files, the catalog, sockets: nobody else may read or
// connect), and refuses a data directory that belongs to another user, whose owner could read or
// replace everything in it behind the daemon's back.

import BlockIO
import Logging

enum DaemonFiles {
    /// Replaces `name` in `directory` whole with `bytes`: written beside, synced, renamed over it
    /// (the rename synced with its directory), so a crash leaves the old file or the new one.
    static func replace(_ name: String, in directory: String, with bytes: [UInt8]) throws {
        let folder = try FileSystemDirectory(path: directory)
        let temporary = name + ".new"
        if folder.fileExists(temporary) { try folder.removeFile(temporary) }
        let storage = try folder.openFile(temporary, mode: .createNew)
        try bytes.withUnsafeBytes { try storage.write(toAbsoluteOffset: .zero, $0) }
        try storage.synchronize()
        try folder.rename(temporary, to: name)
    }

    /// Everything created from now on is owner-only.
    static func restrictNewFiles() {
        LocalSystem.restrictNewFiles()
    }

    /// Refuses an existing data directory (after symbolic links) that is not a directory of this user;
    /// warns if others may read it.
    static func checkDataDirectory(_ path: String, logger: Logger) throws(DaemonFileError) {
        let status: LocalSystem.PathStatus
        do {
            guard let found = try LocalSystem.status(of: path) else { return }
            status = found
        } catch {
            throw DaemonFileError("Cannot use the data directory '\(path)': \(error.errno).")
        }
        guard status.isDirectory else {
            throw DaemonFileError("The data directory '\(path)' is not a directory.")
        }
        let user = LocalSystem.effectiveUser
        guard status.owner == user else {
            throw DaemonFileError(
                "The data directory '\(path)' belongs to uid \(status.owner), not to this user (uid \(user)); "
                    + "refusing to serve it.")
        }
        if status.permissions & 0o077 != 0 {
            logger.warning(
                "the data directory is open to other users; consider chmod 700",
                metadata: ["data": "\(path)", "mode": "\(String(status.permissions, radix: 8))"])
        }
    }
}

struct DaemonFileError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
