// The root directory of a SimulatedDisk, as the engine's StorageDirectory, and its in-memory lock.

import Synchronization

/// The root directory of a `SimulatedDisk`.
public struct SimulatedDirectory: StorageDirectory {
    public let disk: SimulatedDisk
    public var path: String { "sim:" }

    public init(disk: SimulatedDisk) { self.disk = disk }

    private func parentExists(_ name: String, in state: SimulatedDisk.State) -> Bool {
        state.directories.contains(Self.parent(of: name))
    }

    static func parent(of name: String) -> String {
        guard let slash = name.lastIndex(of: "/") else { return "" }
        return String(name[..<slash])
    }

    /// fsync of a directory: its entries as they are now become what a reboot finds. One operation of
    /// its own, as in `FileSystemDirectory`, so a crash can come between a change and its sync.
    private func syncDirectory(of name: String) throws(BlockIOError) {
        let directory = Self.parent(of: name)
        try disk.perform("fsync", path: "sim:/" + directory) { state in
            guard !state.skipsDirectorySync else { return }
            let inDirectory = { (entry: String) in entry != "" && Self.parent(of: entry) == directory }
            state.durableNames = state.durableNames.filter { !inDirectory($0.key) }
            for (entry, inode) in state.names where inDirectory(entry) { state.durableNames[entry] = inode }
            state.durableDirectories = state.durableDirectories.filter { !inDirectory($0) }
            state.durableDirectories.formUnion(state.directories.filter(inDirectory))
        }
    }

    public func openFile(_ name: String, mode: StorageOpenMode) throws(BlockIOError) -> any BlockStorage {
        let path = "sim:/" + name
        let inode = try disk.perform("open", path: path) {
            (state: inout SimulatedDisk.State) throws(BlockIOError) -> Int in
            if let inode = state.names[name] {
                guard mode != .createNew else {
                    throw BlockIOError(.system(.fileExists), operation: "open", path: path)
                }
                return inode
            }
            guard mode != .existing, parentExists(name, in: state) else {
                throw BlockIOError(.system(.noSuchFileOrDirectory), operation: "open", path: path)
            }
            let inode = state.nextInode
            state.nextInode += 1
            state.files[inode] = SimulatedDisk.File()
            state.names[name] = inode
            return inode
        }
        if mode != .existing { try syncDirectory(of: name) }
        return SimulatedStorage(disk: disk, inode: inode, name: name)
    }

    /// External volumes on a simulated disk are files named by their absolute path.
    public func openExternal(_ path: String) throws(BlockIOError) -> any BlockStorage {
        try openFile("external" + path, mode: .existing)
    }

    public func fileExists(_ name: String) -> Bool {
        disk.state.withLock { $0.names[name] != nil || $0.directories.contains(name) }
    }

    public func removeFile(_ name: String) throws(BlockIOError) {
        try disk.perform("unlink", path: "sim:/" + name) { $0.names[name] = nil }
        try syncDirectory(of: name)
    }

    public func makeDirectory(_ name: String) throws(BlockIOError) {
        try disk.perform("mkdir", path: "sim:/" + name) { (state: inout SimulatedDisk.State) throws(BlockIOError) in
            guard parentExists(name, in: state) else {
                throw BlockIOError(.system(.noSuchFileOrDirectory), operation: "mkdir", path: "sim:/" + name)
            }
            state.directories.insert(name)
        }
        try syncDirectory(of: name)
    }

    public func removeDirectory(_ name: String) throws(BlockIOError) {
        try disk.perform("rmdir", path: "sim:/" + name) { (state: inout SimulatedDisk.State) throws(BlockIOError) in
            let prefix = name + "/"
            if state.names.keys.contains(where: { $0.hasPrefix(prefix) })
                || state.directories.contains(where: { $0.hasPrefix(prefix) })
            {
                throw BlockIOError(.system(.directoryNotEmpty), operation: "rmdir", path: "sim:/" + name)
            }
            state.directories.remove(name)
        }
        try syncDirectory(of: name)
    }

    public func rename(_ source: String, to destination: String) throws(BlockIOError) {
        try disk.perform("rename", path: "sim:/" + source) { (state: inout SimulatedDisk.State) throws(BlockIOError) in
            guard let inode = state.names.removeValue(forKey: source) else {
                throw BlockIOError(.system(.noSuchFileOrDirectory), operation: "rename", path: "sim:/" + source)
            }
            state.names[destination] = inode
        }
        try syncDirectory(of: destination)
    }

    public func list(_ name: String) throws(BlockIOError) -> [String] {
        try disk.perform("readdir", path: "sim:/" + name) { state in
            let prefix = name.isEmpty ? "" : name + "/"
            var names = Set<String>()
            for entry in Array(state.names.keys) + Array(state.directories) where entry.hasPrefix(prefix) {
                let rest = entry.dropFirst(prefix.count)
                guard !rest.isEmpty else { continue }
                names.insert(String(rest.split(separator: "/", maxSplits: 1)[0]))
            }
            return names.sorted()
        }
    }

    public func lockExclusively() throws(BlockIOError) -> (any DirectoryLock)? {
        let acquired = try disk.perform("flock", path: "sim:/lock") { state -> Bool in
            if state.locked { return false }
            state.locked = true
            return true
        }
        return acquired ? SimulatedLock(disk: disk) : nil
    }
}

final class SimulatedLock: DirectoryLock {
    let disk: SimulatedDisk
    private let held = Atomic<Bool>(true)
    init(disk: SimulatedDisk) { self.disk = disk }
    deinit { release() }

    func release() {
        if held.exchange(false, ordering: .relaxed) { disk.state.withLock { $0.locked = false } }
    }
}
