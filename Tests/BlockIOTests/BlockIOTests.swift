import Foundation
import Testing
import UmbraTestSupport

@testable import BlockIO

@Suite struct FileStorageTests {
    /// A durable write (through the file's O_DSYNC descriptor) lands where a plain write would, is read
    /// back through the main descriptor, extends the file, and is refused on read-only storage.
    @Test func writesDurably() throws {
        let directory = try TemporaryDirectory("umbra-blockio")
        defer { directory.remove() }
        let storage = try FileStorage(path: directory.path + "/file", mode: .createNew)
        #expect(storage.writesDurably)
        let first = [UInt8](repeating: 3, count: 4096)
        let second = [UInt8](repeating: 4, count: 100)
        try first.withUnsafeBytes { a in
            try second.withUnsafeBytes { b in
                try storage.writeDurably(toAbsoluteOffset: ByteOffset(8192), gathering: [a, b])
            }
        }
        #expect(try storage.size() == ByteCount(8192 + 4196))
        var read = [UInt8](repeating: 0, count: 4196)
        try read.withUnsafeMutableBytes { try storage.read(fromAbsoluteOffset: ByteOffset(8192), into: $0) }
        #expect(read == first + second)
        let readOnly = try FileStorage(path: directory.path + "/file", mode: .readOnly)
        #expect(!readOnly.writesDurably)
        #expect(throws: BlockIOError.self) {
            try first.withUnsafeBytes { try readOnly.writeDurably(toAbsoluteOffset: .zero, gathering: [$0]) }
        }
    }

    /// Reads past the end of a file come back as zeros; writes extend it; discard makes ranges read as zeros.
    @Test func readsWritesAndDiscards() throws {
        let directory = try TemporaryDirectory("umbra-blockio")
        defer { directory.remove() }
        let storage = try FileStorage(path: directory.path + "/file", mode: .createNew)
        let data = [UInt8](repeating: 7, count: 10000)
        try data.withUnsafeBytes { try storage.write(toAbsoluteOffset: ByteOffset(100), $0) }
        #expect(try storage.size() == ByteCount(10100))
        var buffer = [UInt8](repeating: 1, count: 20000)
        try buffer.withUnsafeMutableBytes { try storage.read(fromAbsoluteOffset: .zero, into: $0) }
        #expect(buffer[0..<100].allSatisfy { $0 == 0 } && buffer[100..<10100].allSatisfy { $0 == 7 })
        #expect(buffer[10100...].allSatisfy { $0 == 0 })
        try storage.discard(at: ByteOffset(50), count: ByteCount(9000))
        try buffer.withUnsafeMutableBytes { try storage.read(fromAbsoluteOffset: .zero, into: $0) }
        #expect(buffer[0..<9050].allSatisfy { $0 == 0 } && buffer[9050..<10100].allSatisfy { $0 == 7 })
        try storage.synchronize()
    }

    /// Errors name the call and the path instead of crashing.
    @Test func reportsErrorsWithContext() throws {
        #expect(throws: BlockIOError.self) { try FileStorage(path: "/nonexistent/dir/file", mode: .existing) }
        do {
            _ = try FileStorage(path: "/nonexistent/dir/file", mode: .existing)
        } catch {
            #expect(error.description.contains("open on /nonexistent/dir/file failed"))
            #expect(error.errno == .noSuchFileOrDirectory)
        }
    }

    /// A directory's lock is exclusive until released.
    @Test func lockIsExclusive() throws {
        let directory = try TemporaryDirectory("umbra-blockio")
        defer { directory.remove() }
        let root = try FileSystemDirectory(path: directory.path)
        let lock = try #require(try root.lockExclusively())
        #expect(try root.lockExclusively() == nil)
        lock.release()
        #expect(try root.lockExclusively() != nil)
    }
}

@Suite struct SimulatedDiskTests {
    /// Synced data survives a crash; unsynced data may or may not, per page; a crashed disk refuses everything.
    @Test func crashKeepsSyncedData() throws {
        let disk = SimulatedDisk()
        let directory = disk.directory()
        let file = try directory.openFile("f", mode: .createNew)
        try [UInt8](repeating: 1, count: 8192).withUnsafeBytes { try file.write(toAbsoluteOffset: .zero, $0) }
        try file.synchronize()
        try [UInt8](repeating: 2, count: 8192).withUnsafeBytes { try file.write(toAbsoluteOffset: .zero, $0) }
        disk.crashNow()
        #expect(throws: BlockIOError.self) { try file.synchronize() }
        var sawOld = false
        var sawNew = false
        for seed in 0..<64 {
            var random = SeededRandom(seed: UInt64(seed))
            let contents = try #require(disk.recovered(using: &random).contents(of: "f"))
            #expect(contents.count == 8192)
            #expect(contents.allSatisfy { $0 == 1 || $0 == 2 })
            sawOld = sawOld || contents.contains(1)
            sawNew = sawNew || contents.contains(2)
        }
        #expect(sawOld && sawNew)
    }

    /// An open file follows its inode across a rename, as on a real file system.
    @Test func openFileFollowsRename() throws {
        let disk = SimulatedDisk()
        let directory = disk.directory()
        let file = try directory.openFile("a", mode: .createNew)
        try directory.rename("a", to: "b")
        try [UInt8](repeating: 3, count: 10).withUnsafeBytes { try file.write(toAbsoluteOffset: .zero, $0) }
        #expect(disk.contents(of: "b") == [UInt8](repeating: 3, count: 10))
        #expect(!directory.fileExists("a"))
    }

    /// The n-th operation from now crashes the disk.
    @Test func crashesAtTheScheduledOperation() throws {
        let disk = SimulatedDisk()
        let file = try disk.directory().openFile("f", mode: .createNew)
        disk.crash(afterOperations: 2)
        try file.synchronize()
        #expect(throws: BlockIOError(.simulatedCrash, operation: "fdatasync", path: "sim:/f")) {
            try file.synchronize()
        }
        #expect(disk.hasCrashed)
    }
}

@Suite struct ThreadPoolTests {
    /// The pool runs work off the caller's thread and returns results and errors.
    @Test func runsWork() async throws {
        let pool = IOThreadPool(threadCount: 2)
        defer { pool.shutdown() }
        let results = try await withThrowingTaskGroup(of: Int.self) { group in
            for value in 0..<100 { group.addTask { try await pool.run { value * 2 } } }
            return try await group.reduce(0, +)
        }
        #expect(results == 9900)
        await #expect(throws: BlockIOError.self) {
            try await pool.run { throw BlockIOError(.closed, operation: "test", path: "x") }
        }
    }
}

/// The manual clock wakes a sleeper only once time passes its deadline.
@Test func manualClockWakesSleeperAtDeadline() async throws {
    let clock = ManualClock()
    async let slept: Void = clock.sleep(until: clock.now.advanced(by: .seconds(5)))
    await clock.waitForSleepers(count: 1)
    clock.advance(by: .seconds(4))
    #expect(clock.sleeperCount == 1)
    clock.advance(by: .seconds(1))
    try await slept
    #expect(clock.sleeperCount == 0)
}

/// Clones (FICLONERANGE) on a real XFS file system with reflink, and refusals where files cannot share
/// blocks.
@Suite struct CloneTests {
    @Test(.enabled(if: ReflinkFileSystem.unavailableReason == nil, "needs root, xfsprogs and a loop device"))
    func clonesShareBlocksUntilEitherSideIsWritten() async throws {
        try await ReflinkFileSystem.with { fileSystem in
            let source = try FileStorage(path: fileSystem.path + "/source", mode: .createNew)
            let target = try FileStorage(path: fileSystem.path + "/target", mode: .createNew)
            var random = SeededRandom(seed: 9)
            var original = [UInt8](repeating: 0, count: 64 << 10)
            original.withUnsafeMutableBytes { random.fill($0) }
            try original.withUnsafeBytes { try source.write(toAbsoluteOffset: .zero, $0) }
            try source.synchronize()
            #expect(target.canClone(from: source))

            // Three blocks from 4 KiB into the target at 8 KiB, past its end.
            #expect(
                try target.clone(from: source, at: ByteOffset(4096), count: ByteCount(3 * 4096), to: ByteOffset(8192)))
            try target.synchronize()
            #expect(try target.size() == ByteCount(5 * 4096))
            #expect(try ReflinkFileSystem.hasSharedExtents(fileSystem.path + "/target"))
            var read = [UInt8](repeating: 1, count: 3 * 4096)
            try read.withUnsafeMutableBytes { try target.read(fromAbsoluteOffset: ByteOffset(8192), into: $0) }
            #expect(read == Array(original[4096..<(4 * 4096)]))

            // A write to the source leaves the clone as it was.
            try [UInt8](repeating: 0xEE, count: 3 * 4096).withUnsafeBytes {
                try source.write(toAbsoluteOffset: ByteOffset(4096), $0)
            }
            try source.synchronize()
            try read.withUnsafeMutableBytes { try target.read(fromAbsoluteOffset: ByteOffset(8192), into: $0) }
            #expect(read == Array(original[4096..<(4 * 4096)]))

            // Files on two file systems cannot share blocks: refused, nothing changed.
            let elsewhere = try TemporaryDirectory("umbra-blockio")
            defer { elsewhere.remove() }
            let other = try FileStorage(path: elsewhere.path + "/other", mode: .createNew)
            try original.withUnsafeBytes { try other.write(toAbsoluteOffset: .zero, $0) }
            // The clone first: `canClone` remembers a refusal, which would answer for it.
            #expect(try !target.clone(from: other, at: .zero, count: ByteCount(4096), to: .zero))
            #expect(!target.canClone(from: other))
            try read.withUnsafeMutableBytes { try target.read(fromAbsoluteOffset: ByteOffset(0), into: $0) }
            #expect(read[..<8192].allSatisfy { $0 == 0 })
            #expect(try target.size() == ByteCount(5 * 4096))
        }
    }

    /// Storage of another kind never clones: the caller copies.
    @Test func simulatedDisksCloneOnlyWhenTheyShareBlocks() throws {
        let disk = SimulatedDisk()
        let directory = disk.directory()
        let source = try directory.openFile("source", mode: .createNew)
        let target = try directory.openFile("target", mode: .createNew)
        try [UInt8](repeating: 5, count: 8192).withUnsafeBytes { try source.write(toAbsoluteOffset: .zero, $0) }
        #expect(!target.canClone(from: source))
        #expect(try !target.clone(from: source, at: .zero, count: ByteCount(4096), to: .zero))
        disk.shareBlocks()
        #expect(target.canClone(from: source))
        #expect(try target.clone(from: source, at: ByteOffset(4096), count: ByteCount(4096), to: .zero))
        var read = [UInt8](repeating: 0, count: 4096)
        try read.withUnsafeMutableBytes { try target.read(fromAbsoluteOffset: .zero, into: $0) }
        #expect(read.allSatisfy { $0 == 5 })
    }
}
