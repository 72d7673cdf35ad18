// The data directory as the engine sees it: files by relative name, directory operations made
// durable as they happen (the real one fsyncs the parent directory after each), an exclusive lock,
// and a way to open a volume's file or block device given by absolute path. The simulator
// implements the same protocol in memory.

import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

public enum StorageOpenMode: Sendable {
    /// Open an existing file or device.
    case existing
    /// Create the file; fail if it exists.
    case createNew
    /// Open it, creating it if missing.
    case createIfMissing
    /// Open an existing file for reading only (writes fail).
    case readOnly
}

/// Held while a process owns a data directory; released by `release()` or when dropped.
public protocol DirectoryLock: AnyObject, Sendable {
    func release()
}

public protocol StorageDirectory: Sendable {
    /// Where the directory is, for messages.
    var path: String { get }

    /// Opens `name` (a path relative to the directory, `/`-separated).
    func openFile(_ name: String, mode: StorageOpenMode) throws(BlockIOError) -> any BlockStorage

    /// Opens an existing file or block device by absolute path, for volumes that live outside.
    func openExternal(_ path: String) throws(BlockIOError) -> any BlockStorage

    func fileExists(_ name: String) -> Bool
    func removeFile(_ name: String) throws(BlockIOError)
    func makeDirectory(_ name: String) throws(BlockIOError)
    func removeDirectory(_ name: String) throws(BlockIOError)
    /// Atomically replaces `destination` with `source`.
    func rename(_ source: String, to destination: String) throws(BlockIOError)
    /// The names in directory `name` ("" for the top), sorted.
    func list(_ name: String) throws(BlockIOError) -> [String]

    /// Takes the directory's exclusive lock, or returns nil if another owner holds it.
    func lockExclusively() throws(BlockIOError) -> (any DirectoryLock)?
}
