// An in-memory disk that can crash at any operation and then comes back the way a real one might.
//
// Every file keeps two images: what reads see now (the page cache) and what survived the last
// `synchronize()` (the platter), plus the operations in between. `crash(afterOperations:)` makes the
// n-th operation from now fail and every later one too; `recovered(using:)` then builds the disk a
// reboot would find: for each 4 KiB page touched since its last sync, the content after a random
// prefix of the operations that touched it (write-back reaches pages in any order, but a page carries
// everything written to it up to the moment it went out), and now and then a page torn at 512-byte
// sectors between two of those versions. Sizes follow the kept data. Directory entries (a file's
// creation, a rename, a removal, a new directory) are durable only once their directory is synced:
// `SimulatedDirectory` syncs the parent after each operation, as `FileSystemDirectory` does, as a
// separate operation that a crash can come before. A reboot finds the names as of each directory's
// last sync.

import Synchronization
import SystemPackage

public final class SimulatedDisk: Sendable {
    static let pageSize = 4096
    static let sectorSize = 512

    enum PendingOperation {
        case write(offset: Int, bytes: [UInt8])
        case resize(size: Int)
    }

    struct File {
        var current: [UInt8] = []
        var durable: [UInt8] = []
        var pending: [PendingOperation] = []
        /// A sync failed: writes from before it are in `current` but will never reach `durable`, so
        /// a sync applies `pending` to `durable` instead of copying `current`.
        var lostWrites = false

        /// fdatasync: what was written since the last sync reaches the platter. After a failed sync,
        /// only what was written since that failure does (Linux marks the failed pages clean).
        mutating func synchronize() {
            if lostWrites {
                for operation in pending { Self.apply(operation, to: &durable) }
            } else {
                durable = current
            }
            pending.removeAll()
        }

        /// A failed fdatasync: the pages it was writing are dropped on the way to the platter, while
        /// reads still see them.
        mutating func failSynchronize() {
            pending.removeAll()
            lostWrites = true
        }

        mutating func apply(_ operation: PendingOperation) {
            Self.apply(operation, to: &current)
            pending.append(operation)
        }

        static func apply(_ operation: PendingOperation, to image: inout [UInt8]) {
            switch operation {
            case .write(let offset, let bytes):
                if image.count < offset + bytes.count { resize(&image, to: offset + bytes.count) }
                image.withUnsafeMutableBytes { target in
                    bytes.withUnsafeBytes { source in
                        (target.baseAddress! + offset).copyMemory(from: source.baseAddress!, byteCount: source.count)
                    }
                }
            case .resize(let size):
                resize(&image, to: size)
            }
        }

        /// Grows (with zeros) or shrinks an image, by whole-buffer copies rather than per element.
        static func resize(_ image: inout [UInt8], to size: Int) {
            guard size != image.count else { return }
            let old = image
            image = [UInt8](unsafeUninitializedCapacity: size) { buffer, count in
                let kept = min(size, old.count)
                old.withUnsafeBytes { source in
                    if kept > 0 {
                        UnsafeMutableRawPointer(buffer.baseAddress!).copyMemory(
                            from: source.baseAddress!, byteCount: kept)
                    }
                }
                if size > kept { (buffer.baseAddress! + kept).initialize(repeating: 0, count: size - kept) }
                count = size
            }
        }
    }

    struct State {
        /// Files by inode; a name points at an inode, and an open file keeps its inode across renames.
        var files: [Int: File] = [:]
        var names: [String: Int] = [:]
        var nextInode = 1
        var directories: Set<String> = [""]
        /// The names and directories as of each directory's last sync: what a reboot finds.
        var durableNames: [String: Int] = [:]
        var durableDirectories: Set<String> = [""]
        /// Teeth (tests only): directory syncs do nothing, as if the directory never fsynced its parent.
        var skipsDirectorySync = false
        /// Whether its files can share blocks (`SimulatedStorage.clone`), like XFS with reflink.
        var sharesBlocks = false
        /// Clones taken on this disk and the disks it was recovered from.
        var cloneCount = 0
        var locked = false
        var operationCount = 0
        var crashAtOperation: Int?
        var crashed = false
        /// Told, once, the moment a crash set by `crash(afterOperations:)` happens.
        var crashObserver: (@Sendable () -> Void)?
        /// An I/O error to return, once, from the first write or sync at or after an operation.
        var fault: Fault?
        var faulted = false
    }

    let state: Mutex<State>

    public init() {
        state = Mutex(State())
    }

    /// Teeth (tests only): from now on directory syncs do nothing, on this disk and the disks
    /// recovered from it; the simulation must then notice files and renames lost at a crash.
    public func skipDirectorySyncs() {
        state.withLock { $0.skipsDirectorySync = true }
    }

    /// From now on files on this disk, and on the disks recovered from it, can share blocks: a
    /// clone copies the bytes as a write would, volatile until a sync (what FICLONERANGE promises).
    public func shareBlocks() {
        state.withLock { $0.sharesBlocks = true }
    }

    public var sharesBlocks: Bool { state.withLock { $0.sharesBlocks } }

    /// How many clones files on this disk (and the disks it was recovered from) took.
    public var cloneCount: Int { state.withLock { $0.cloneCount } }

    func noteClone() {
        state.withLock { $0.cloneCount += 1 }
    }

    init(state: State) {
        self.state = Mutex(state)
    }

    /// The disk's root directory.
    public func directory() -> SimulatedDirectory { SimulatedDirectory(disk: self) }

    /// How many operations the disk has performed (reads, writes, syncs, directory changes …).
    public var operationCount: Int { state.withLock { $0.operationCount } }

    public var hasCrashed: Bool { state.withLock { $0.crashed } }

    /// Makes the `count`-th operation from now fail, and every operation after it.
    public func crash(afterOperations count: Int) {
        state.withLock { $0.crashAtOperation = $0.operationCount + max(1, count) }
    }

    /// Calls `observer` the moment the crash set by `crash(afterOperations:)` happens, inside the
    /// operation that crashes (so it sees what the program was doing). It must not use the disk.
    public func observeCrash(_ observer: @escaping @Sendable () -> Void) {
        state.withLock { $0.crashObserver = observer }
    }

    /// An injected I/O error: EIO or ENOSPC from the first write (pwrite, fallocate, ftruncate) or
    /// sync, or with `syncsOnly` the first sync, at or after operation `atOperation`.
    public struct Fault: Sendable {
        public var atOperation: Int
        public var errno: Errno
        public var syncsOnly: Bool
    }

    /// Fails one later write or sync with `errno`, without crashing: a failed write changes nothing;
    /// a failed sync drops the pages it was writing (see `File.failSynchronize`).
    public func injectFault(afterOperations count: Int, errno: Errno, syncsOnly: Bool) {
        state.withLock {
            $0.fault = Fault(atOperation: $0.operationCount + max(1, count), errno: errno, syncsOnly: syncsOnly)
        }
    }

    /// Whether an injected fault has happened on this disk.
    public var hasFaulted: Bool { state.withLock { $0.faulted } }

    /// Takes the pending fault if it is due for an operation of this kind.
    func takeFault(isSync: Bool, in state: inout State) -> Errno? {
        guard let fault = state.fault, state.operationCount >= fault.atOperation, isSync || !fault.syncsOnly else {
            return nil
        }
        state.fault = nil
        state.faulted = true
        return fault.errno
    }

    /// Crashes now: every later operation fails.
    public func crashNow() {
        state.withLock { $0.crashed = true }
    }

    /// What a reboot after the crash would find (see the note atop this file). The lock is free.
    public func recovered(using random: inout some RandomNumberGenerator) -> SimulatedDisk {
        let snapshot = state.withLock { $0 }
        var recovered = State(
            directories: snapshot.durableDirectories, durableDirectories: snapshot.durableDirectories,
            skipsDirectorySync: snapshot.skipsDirectorySync, sharesBlocks: snapshot.sharesBlocks,
            cloneCount: snapshot.cloneCount)
        recovered.nextInode = snapshot.nextInode
        // Only files named in a synced directory survive a reboot (an unlinked file that was still
        // open is gone, and so is a new name whose directory was not synced).
        for (name, inode) in snapshot.durableNames.sorted(by: { $0.key < $1.key }) {
            let image = Self.recoveredImage(of: snapshot.files[inode]!, using: &random)
            recovered.files[inode] = File(current: image, durable: image, pending: [])
            recovered.names[name] = inode
        }
        recovered.durableNames = recovered.names
        return SimulatedDisk(state: recovered)
    }

    /// The bytes a file holds now (as reads see them), for tests.
    public func contents(of name: String) -> [UInt8]? {
        state.withLock { state in state.names[name].flatMap { state.files[$0]?.current } }
    }

    private static func recoveredImage(of file: File, using random: inout some RandomNumberGenerator) -> [UInt8] {
        guard !file.pending.isEmpty else { return file.durable }
        // Each version of the file after 0, 1, … n pending operations, computed lazily per page.
        var versions: [[UInt8]] = [file.durable]
        var image = file.durable
        for operation in file.pending {
            File.apply(operation, to: &image)
            versions.append(image)
        }
        let maxCount = versions.map(\.count).max() ?? 0
        // The size: that of a random prefix of the operations, then stretched to cover kept pages.
        var result = versions[Int.random(in: 0..<versions.count, using: &random)]
        let pageCount = (maxCount + pageSize - 1) / pageSize
        for page in 0..<pageCount {
            let range = (page * pageSize)..<min((page + 1) * pageSize, maxCount)
            // The operations that touched this page, as indexes into `versions`.
            var touching: [Int] = [0]
            for (index, operation) in file.pending.enumerated() where touches(operation, range) {
                touching.append(index + 1)
            }
            guard touching.count > 1 else { continue }
            let chosen = Int.random(in: 0..<touching.count, using: &random)
            let newer = versions[touching[chosen]]
            let older = chosen > 0 && Int.random(in: 0..<4, using: &random) == 0 ? versions[touching[chosen - 1]] : nil
            for sectorStart in stride(from: range.lowerBound, to: range.upperBound, by: sectorSize) {
                let sector = sectorStart..<min(sectorStart + sectorSize, range.upperBound)
                let source = older != nil && Bool.random(using: &random) ? older! : newer
                // Past the end of the chosen version the sector reads as zeros; the result only grows
                // to hold data that is actually there.
                let available = max(0, min(sector.upperBound, source.count) - sector.lowerBound)
                if available > 0 && result.count < sector.lowerBound + available {
                    File.resize(&result, to: sector.lowerBound + available)
                }
                result.withUnsafeMutableBytes { target in
                    source.withUnsafeBytes { from in
                        if available > 0 {
                            (target.baseAddress! + sector.lowerBound).copyMemory(
                                from: from.baseAddress! + sector.lowerBound, byteCount: available)
                        }
                        let zeroEnd = min(sector.upperBound, target.count)
                        let zeroStart = sector.lowerBound + available
                        if zeroEnd > zeroStart {
                            (target.baseAddress! + zeroStart).initializeMemory(
                                as: UInt8.self, repeating: 0, count: zeroEnd - zeroStart)
                        }
                    }
                }
            }
        }
        return result
    }

    private static func touches(_ operation: PendingOperation, _ range: Range<Int>) -> Bool {
        switch operation {
        case .write(let offset, let bytes): offset < range.upperBound && offset + bytes.count > range.lowerBound
        case .resize(let size): size < range.upperBound
        }
    }

    /// Counts one operation, failing it if the disk has crashed or crashes now. `onCrash` runs for the
    /// operation that crashes (a write may be half done).
    func perform<T>(
        _ operation: String, path: String, onCrash: ((inout State) -> Void)? = nil,
        _ body: (inout State) throws(BlockIOError) -> T
    ) throws(BlockIOError) -> T {
        try state.withLock { (state: inout State) throws(BlockIOError) -> T in
            if state.crashed { throw BlockIOError(.simulatedCrash, operation: operation, path: path) }
            state.operationCount += 1
            if let crashAt = state.crashAtOperation, state.operationCount >= crashAt {
                state.crashed = true
                onCrash?(&state)
                state.crashObserver?()
                state.crashObserver = nil
                throw BlockIOError(.simulatedCrash, operation: operation, path: path)
            }
            return try body(&state)
        }
    }
}
