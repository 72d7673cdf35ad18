// Reverting a live volume to a snapshot: exact, every snapshot kept, cost proportional to what
// changed, refused without room, and atomic across crashes: the disk crashes at every operation of a
// revert in turn (and again while the reopened store completes it), comes back with a seeded subset
// of its unsynced writes, and the reopened store's live volume reads either as before the revert or
// as the snapshot, never in between. Teeth: with either of the revert's orderings broken, the crash
// cases find a volume in between.

import BlockIO
import Foundation
import Synchronization
import Testing
import UmbraTestSupport

@testable import SnapshotEngine

@Suite struct RevertTests {
    static let chunk = 4096
    static let size = 64 * 1024

    /// A volume "disk" with three generations: `first` (snapshot), `second` (snapshot), and the live
    /// data written after that, flushed. Returns the snapshots and what each generation holds.
    struct Generations {
        var first: UUID
        var second: UUID
        var firstContents: [UInt8]
        var secondContents: [UInt8]
        var liveContents: [UInt8]
    }

    static func makeGenerations(_ store: SnapshotStore, diffLimit: ByteCount? = nil) async throws -> Generations {
        try await store.createVolume(
            VolumeSpec(
                name: "disk", size: ByteCount(UInt64(size)), chunkSize: ByteCount(UInt64(chunk)), diffLimit: diffLimit))
        let volume = try store.volume(named: "disk")
        try await volume.write(at: 0, Fixture.pattern(31, count: size / 2))
        let first = try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id
        let firstContents = try await store.snapshot(id: first).read(at: 0, count: size)
        // Chunks 2…5 change, and chunk 12 (zeros before) gets data.
        try await volume.write(at: ByteOffset(2 * chunk), Fixture.pattern(32, count: 4 * chunk))
        try await volume.write(at: ByteOffset(12 * chunk), Fixture.pattern(33, count: chunk))
        let second = try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id
        let secondContents = try await store.snapshot(id: second).read(at: 0, count: size)
        // Chunks 4…7 change again, and chunk 0 is zeroed.
        try await volume.write(at: ByteOffset(4 * chunk), Fixture.pattern(34, count: 4 * chunk))
        try await volume.writeZeroes(at: 0, count: ByteCount(UInt64(chunk)))
        try await volume.flush()
        let liveContents = try await volume.read(at: 0, count: size)
        return Generations(
            first: first, second: second, firstContents: firstContents, secondContents: secondContents,
            liveContents: liveContents)
    }

    @Test func revertsExactlyAndKeepsEverySnapshot() async throws {
        try await Fixture.withStore { store, _ in
            let generations = try await Self.makeGenerations(store)
            let volume = try store.volume(named: "disk")
            let progress = ProgressLog()
            let result = try await store.revert(volume: "disk", to: generations.first) { progress.note($0, $1) }
            #expect(try await volume.read(at: 0, count: Self.size) == generations.firstContents)
            #expect(
                try await store.snapshot(id: generations.first).read(at: 0, count: Self.size)
                    == generations.firstContents)
            #expect(
                try await store.snapshot(id: generations.second).read(at: 0, count: Self.size)
                    == generations.secondContents)
            #expect(try store.snapshots().map(\.id) == [generations.first, generations.second])
            // What changed since the first snapshot: chunks 0, 2…7 and 12, and nothing else.
            #expect(result.changedBytes == ByteCount(UInt64(8 * Self.chunk)))
            #expect(progress.last.map { [$0.0, $0.1] } == [UInt64(8 * Self.chunk), UInt64(8 * Self.chunk)])
            #expect(!volume.isReverting)
            // The live volume keeps working, and changes since the newest snapshot are tracked.
            try await volume.write(at: ByteOffset(14 * Self.chunk), Fixture.pattern(35, count: Self.chunk))
            try await volume.flush()
            let changed = try store.changes(volume: "disk", since: generations.second).extents
            #expect(changed.contains { $0.offset == ByteOffset(UInt64(14 * Self.chunk)) })
            #expect(store.consistencyProblems().isEmpty)

            // Back to the newest snapshot: no copy is needed for it.
            let diffBefore = store.volumes()[0].diffBytes
            try await store.revert(volume: "disk", to: generations.second)
            #expect(try await volume.read(at: 0, count: Self.size) == generations.secondContents)
            #expect(store.volumes()[0].diffBytes == diffBefore)
            #expect(store.consistencyProblems().isEmpty)
        }
    }

    @Test func refusesWithoutRoomAndChangesNothing() async throws {
        try await Fixture.withStore { store, _ in
            // Room for the copies the generations made (9 chunks), and 1 more: reverting to the first
            // snapshot needs a copy of chunks 2, 3 and 12 for the second.
            let generations = try await Self.makeGenerations(store, diffLimit: ByteCount(UInt64(10 * Self.chunk)))
            let volume = try store.volume(named: "disk")
            await #expect {
                try await store.revert(volume: "disk", to: generations.first)
            } throws: { error in
                "\(error)".contains("needs room for up to 12288 bytes")
            }
            #expect(!volume.isReverting)
            #expect(try await volume.read(at: 0, count: Self.size) == generations.liveContents)
            await #expect(throws: EngineError.snapshotNotFound("0c0c0c0c-0000-0000-0000-000000000000")) {
                try await store.revert(volume: "disk", to: UUID(uuidString: "0c0c0c0c-0000-0000-0000-000000000000")!)
            }
            try await store.createVolume(VolumeSpec(name: "other", size: .kibibytes(64)))
            await #expect(throws: EngineError.self) {
                try await store.revert(volume: "other", to: generations.first)
            }
        }
    }

    /// A revert that fails halfway (an I/O error) leaves the volume offline, refusing live I/O,
    /// until a revert succeeds; reopening the store completes it too.
    @Test func anIncompleteRevertKeepsTheVolumeOffline() async throws {
        var configuration = Fixture.configuration()
        configuration.logger.logLevel = .critical
        let (disk, generations) = try await Self.prepared(configuration)
        var store = try await SnapshotStore.open(directory: disk.directory(), configuration: configuration)
        var volume = try store.volume(named: "disk")
        disk.injectFault(afterOperations: 8, errno: .ioError, syncsOnly: false)
        await #expect {
            try await store.revert(volume: "disk", to: generations.first)
        } throws: { error in
            if case .revertIncomplete(volume: "disk", _) = error as? EngineError { return true }
            return false
        }
        #expect(volume.isReverting)
        await #expect(throws: EngineError.volumeReverting("disk")) { try await volume.read(at: 0, count: 4096) }
        await #expect(throws: EngineError.volumeReverting("disk")) {
            try await volume.write(at: 0, [UInt8](repeating: 1, count: 4096))
        }
        // Neither a set of what it holds now, nor deleting the snapshot the revert still needs.
        await #expect(throws: EngineError.volumeReverting("disk")) {
            try await store.createSnapshotSet(volumes: ["disk"])
        }
        await #expect(throws: EngineError.self) { try await store.deleteSnapshots(ids: [generations.first]) }
        #expect(try store.snapshots().count == 2)
        try await store.close()
        store = try await SnapshotStore.open(directory: disk.directory(), configuration: configuration)
        volume = try store.volume(named: "disk")
        #expect(!volume.isReverting)
        #expect(try await volume.read(at: 0, count: Self.size) == generations.firstContents)
        #expect(
            try await store.snapshot(id: generations.second).read(at: 0, count: Self.size) == generations.secondContents
        )
        try await store.close()
    }

    /// Crashes at every operation of a revert in turn; after recovery (itself crashed now and then)
    /// the live volume reads as before or as the snapshot, and both snapshots as they were.
    @Test func atomicAcrossCrashes() async throws {
        let failures = try await Self.crashAtEveryOperation(brokenOrdering: nil)
        #expect(failures.isEmpty, "\(failures.prefix(3))")
    }

    /// Teeth: with either ordering of the revert broken, some crash point leaves the volume in between.
    @Test(arguments: [BrokenOrdering.revertWritesBeforeRecord, .revertFinishedBeforeSync])
    func catchesBrokenOrderings(_ ordering: BrokenOrdering) async throws {
        let failures = try await Self.crashAtEveryOperation(brokenOrdering: ordering)
        print("broken revert ordering \(ordering) caught: \(failures.first ?? "nothing")")
        #expect(!failures.isEmpty, "no crash point noticed \(ordering)")
    }

    static func crashAtEveryOperation(brokenOrdering: BrokenOrdering?) async throws -> [String] {
        var configuration = Fixture.configuration()
        configuration.brokenOrderingForTesting = brokenOrdering
        configuration.logger.logLevel = .critical
        // One clean run to learn how many operations a revert takes.
        let (template, _) = try await prepared(configuration)
        let before = template.operationCount
        do {
            let store = try await SnapshotStore.open(directory: template.directory(), configuration: configuration)
            try await store.revert(volume: "disk", to: try store.snapshots()[0].id)
            try await store.close()
        }
        let operations = template.operationCount - before
        #expect(operations > 10)
        var failures: [String] = []
        var random = SeededRandom(seed: 0x5EED_2E7E)
        for crashPoint in 1...operations {
            let (disk, generations) = try await prepared(configuration)
            let store = try await SnapshotStore.open(directory: disk.directory(), configuration: configuration)
            disk.crash(afterOperations: crashPoint)
            _ = try? await store.revert(volume: "disk", to: generations.first)
            try? await store.close()
            disk.crashNow()
            var recovered = disk.recovered(using: &random)
            // One time in three the recovery crashes too (while it completes the revert).
            if random.chance(1, in: 3) {
                recovered.crash(afterOperations: Int.random(in: 1...40, using: &random))
                if let store = try? await SnapshotStore.open(
                    directory: recovered.directory(), configuration: configuration)
                {
                    try? await store.close()
                }
                recovered.crashNow()
                recovered = recovered.recovered(using: &random)
            }
            let reopened = try await SnapshotStore.open(directory: recovered.directory(), configuration: configuration)
            let volume = try reopened.volume(named: "disk")
            let live = try await volume.read(at: 0, count: size)
            if live != generations.liveContents && live != generations.firstContents {
                failures.append(
                    "crash at operation \(crashPoint) of \(operations): the live volume is neither as before nor reverted"
                )
            }
            if try await reopened.snapshot(id: generations.first).read(at: 0, count: size) != generations.firstContents
            {
                failures.append("crash at operation \(crashPoint): the first snapshot changed")
            }
            if try await reopened.snapshot(id: generations.second).read(at: 0, count: size)
                != generations.secondContents
            {
                failures.append("crash at operation \(crashPoint): the second snapshot changed")
            }
            failures += reopened.consistencyProblems().map { "crash at operation \(crashPoint): \($0)" }
            try await reopened.close()
        }
        return failures
    }

    /// A simulated disk holding the generations, closed cleanly.
    static func prepared(_ configuration: StoreConfiguration) async throws -> (SimulatedDisk, Generations) {
        let disk = SimulatedDisk()
        let store = try await SnapshotStore.open(directory: disk.directory(), configuration: configuration)
        let generations = try await makeGenerations(store)
        try await store.close()
        return (disk, generations)
    }
}

/// The progress a revert reported, last call kept.
final class ProgressLog: Sendable {
    private let state = Mutex<(UInt64, UInt64)?>(nil)
    func note(_ done: UInt64, _ total: UInt64) { state.withLock { $0 = (done, total) } }
    var last: (UInt64, UInt64)? { state.withLock { $0 } }
}
