// The data directory on the real file system: directory operations fsync the parent, and the lock
// is an flock(2) held for the life of the process.

import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A directory on the real file system.
public struct FileSystemDirectory: StorageDirectory {
    public let path: String
    static let lockFileName = "lock"

    /// Uses `path`, creating it (and its missing parents) if needed. Each directory created is made
    /// durable by syncing its parent: otherwise a power cut could take the new data directory, and
    /// with it the whole store, even after its own files were synced. Parents of directories that
    /// already exist are synced too, as far as this user may (a crash between an earlier start's
    /// mkdir and its sync would otherwise leave the name undurable for good); it is cheap once synced.
    public init(path: String) throws(BlockIOError) {
        var normalized = path
        while normalized.count > 1 && normalized.hasSuffix("/") { normalized.removeLast() }
        var prefix = normalized.hasPrefix("/") ? "" : "."
        for component in normalized.split(separator: "/") {
            let parent = prefix.isEmpty ? "/" : prefix
            prefix += "/" + component
            if try Syscall.makeDirectory(prefix) {
                try Syscall.syncDirectory(parent)
            } else {
                try? Syscall.syncDirectory(parent)
            }
        }
        self.path = normalized
    }

    private func absolute(_ name: String) -> String {
        name.isEmpty ? path : path + "/" + name
    }

    private func parent(of name: String) -> String {
        guard let slash = name.lastIndex(of: "/") else { return path }
        return absolute(String(name[..<slash]))
    }

    public func openFile(_ name: String, mode: StorageOpenMode) throws(BlockIOError) -> any BlockStorage {
        let storage = try FileStorage(path: absolute(name), mode: mode)
        if mode != .existing { try Syscall.syncDirectory(parent(of: name)) }
        return storage
    }

    public func openExternal(_ path: String) throws(BlockIOError) -> any BlockStorage {
        try FileStorage(path: path, mode: .existing)
    }

    public func fileExists(_ name: String) -> Bool { Syscall.exists(absolute(name)) }

    public func removeFile(_ name: String) throws(BlockIOError) {
        try Syscall.unlink(absolute(name))
        try Syscall.syncDirectory(parent(of: name))
    }

    public func makeDirectory(_ name: String) throws(BlockIOError) {
        try Syscall.makeDirectory(absolute(name))
        try Syscall.syncDirectory(parent(of: name))
    }

    public func removeDirectory(_ name: String) throws(BlockIOError) {
        try Syscall.removeDirectory(absolute(name))
        try Syscall.syncDirectory(parent(of: name))
    }

    public func rename(_ source: String, to destination: String) throws(BlockIOError) {
        try Syscall.rename(absolute(source), absolute(destination))
        try Syscall.syncDirectory(parent(of: destination))
    }

    public func list(_ name: String) throws(BlockIOError) -> [String] {
        try Syscall.listDirectory(absolute(name))
    }

    public func lockExclusively() throws(BlockIOError) -> (any DirectoryLock)? {
        let lockPath = absolute(Self.lockFileName)
        let fd = try Syscall.open(lockPath, flags: O_RDWR | O_CREAT)
        do {
            // A lock released a moment ago can still be held for a moment by a child this process
            // is spawning: between fork and exec it holds a copy of every descriptor, the lock's
            // too (close-on-exec closes it only at the exec). So a refusal is believed only after
            // a second of asking again; another process that holds the lock holds it for longer.
            var attempts = 0
            while try !Syscall.lockExclusive(fd, path: lockPath) {
                attempts += 1
                if attempts == 100 {
                    Syscall.close(fd)
                    return nil
                }
                usleep(10_000)
            }
        } catch {
            Syscall.close(fd)
            throw error
        }
        return FileLock(descriptor: fd)
    }
}

/// An flock(2) held on the directory's lock file; closing the descriptor releases it.
final class FileLock: DirectoryLock {
    private let descriptor: Mutex<Int32?>
    init(descriptor: Int32) { self.descriptor = Mutex(descriptor) }
    deinit { release() }

    func release() {
        if let fd = descriptor.withLock({ descriptor in
            defer { descriptor = nil }
            return descriptor
        }) {
            Syscall.close(fd)
        }
    }
}
