// I/O errors without a crash, on the simulated disk: a failed fdatasync leaves a volume (or, for
// the catalog and diff stores, the store) read-only, because no later sync can vouch for the pages
// the kernel dropped; reads and snapshots stay exact; reopening shows what is really on disk.

import BlockIO
import Foundation
import Testing
import UmbraTestSupport

@testable import SnapshotEngine

@Suite struct StorageFailureTests {
    /// A failed sync of the live data: the flush fails, and so does every later flush, write and
    /// set on that volume (even though the disk would now sync fine); reads go on; the other volume
    /// works; after a crash the volume holds its last durable contents.
    @Test func failedLiveSyncMakesTheVolumeReadOnly() async throws {
        let disk = SimulatedDisk()
        let store = try await SnapshotStore.open(directory: disk.directory(), configuration: Fixture.configuration())
        for name in ["a", "b"] {
            try await store.createVolume(VolumeSpec(name: name, size: .kibibytes(64), chunkSize: .kibibytes(4)))
        }
        let a = try store.volume(named: "a")
        let durable = Fixture.pattern(1, count: 8192)
        try await a.write(at: 0, durable)
        try await a.flush()
        let lost = Fixture.pattern(2, count: 8192)
        try await a.write(at: 0, lost)
        disk.injectFault(afterOperations: 1, errno: .ioError, syncsOnly: true)
        await #expect(throws: EngineError.self) { try await a.flush() }
        #expect(disk.hasFaulted)
        // The disk would sync now, but the dropped pages are not in it: nothing may say otherwise.
        for _ in 0..<2 {
            await #expect { try await a.flush() } throws: { isStorageFailure($0) }
        }
        await #expect { try await a.write(at: 16384, Fixture.pattern(3, count: 4096)) } throws: { isStorageFailure($0) }
        await #expect { _ = try await store.createSnapshotSet(volumes: ["a"]) } throws: { isStorageFailure($0) }
        // Reads see what was written; the other volume goes on.
        #expect(try await a.read(at: 0, count: 8192) == lost)
        let b = try store.volume(named: "b")
        try await b.write(at: 0, Fixture.pattern(4, count: 4096))
        try await b.flush()
        _ = try await store.createSnapshotSet(volumes: ["b"])

        disk.crashNow()
        var random = SeededRandom(seed: 5)
        let reopened = try await SnapshotStore.open(
            directory: disk.recovered(using: &random).directory(), configuration: Fixture.configuration())
        #expect(try await reopened.volume(named: "a").read(at: 0, count: 8192) == durable)
        #expect(try await reopened.volume(named: "b").read(at: 0, count: 4096) == Fixture.pattern(4, count: 4096))
        try await reopened.close()
    }

    /// A write answered before its copy-on-write was done, whose copy then fails: its data never
    /// reaches the volume, so the next flush fails (and every later one), a read of those bytes fails
    /// rather than return what the write replaced, other bytes read on, writes and sets are refused,
    /// and the snapshot still reads what it held.
    @Test func lostAnsweredWriteFailsFlushesAndReads() async throws {
        let (disk, store, a, original, snapshot) = try await snapshottedVolume()
        // The copy's diff write, then its sync fails; the write itself is answered first.
        disk.injectFault(afterOperations: 1, errno: .ioError, syncsOnly: true)
        try await a.write(at: 0, Fixture.pattern(2, count: 4096))
        await #expect { try await a.flush() } throws: { isStorageFailure($0) }
        #expect(disk.hasFaulted)
        await #expect { try await a.flush() } throws: { isStorageFailure($0) }
        await #expect { _ = try await a.read(at: 0, count: 4096) } throws: { isStorageFailure($0) }
        #expect(try await a.read(at: 4096, count: 12288) == Array(original[4096...]))
        await #expect(throws: EngineError.self) { try await a.write(at: 8192, Fixture.pattern(3, count: 4096)) }
        await #expect(throws: EngineError.self) { _ = try await store.createSnapshotSet(volumes: ["a"]) }
        #expect(try await store.snapshot(id: snapshot).read(at: 0, count: 16384) == original)
        try? await store.close()
    }

    /// A failed sync of a diff store, in a copy's group commit: the write fails, the store turns
    /// read-only (its catalog stops), the snapshot still reads what it held, and after a crash it
    /// still does.
    @Test func failedDiffSyncStopsTheStore() async throws {
        let (disk, store, a, original, snapshot) = try await snapshottedVolume()
        // The copy's diff write, then its sync fails (a FUA write waits for its copy, so it fails itself).
        disk.injectFault(afterOperations: 1, errno: .ioError, syncsOnly: true)
        await #expect(throws: EngineError.self) {
            try await a.write(at: 0, Fixture.pattern(2, count: 4096), fua: true)
        }
        #expect(disk.hasFaulted)
        await #expect { try await a.write(at: 8192, Fixture.pattern(3, count: 4096)) } throws: { isStorageFailure($0) }
        await #expect { try await a.flush() } throws: { isStorageFailure($0) }
        #expect(try await store.snapshot(id: snapshot).read(at: 0, count: 16384) == original)
        #expect(try await a.read(at: 0, count: 16384) == original)

        disk.crashNow()
        var random = SeededRandom(seed: 9)
        let reopened = try await SnapshotStore.open(
            directory: disk.recovered(using: &random).directory(), configuration: Fixture.configuration())
        #expect(try await reopened.snapshot(id: snapshot).read(at: 0, count: 16384) == original)
        try await reopened.close()
    }

    /// A store on a simulated disk with volume "a" (64 KiB of 4 KiB chunks) whose first 16 KiB hold
    /// `original`, and a snapshot of it.
    private func snapshottedVolume() async throws -> (
        disk: SimulatedDisk, store: SnapshotStore, volume: Volume, original: [UInt8], snapshot: UUID
    ) {
        let disk = SimulatedDisk()
        let store = try await SnapshotStore.open(directory: disk.directory(), configuration: Fixture.configuration())
        try await store.createVolume(VolumeSpec(name: "a", size: .kibibytes(64), chunkSize: .kibibytes(4)))
        let a = try store.volume(named: "a")
        let original = Fixture.pattern(1, count: 16384)
        try await a.write(at: 0, original)
        let snapshot = try await store.createSnapshotSet(volumes: ["a"]).snapshots[0].id
        return (disk, store, a, original, snapshot)
    }

    private func isStorageFailure(_ error: any Error) -> Bool {
        if case .storageFailed = error as? EngineError { return true }
        return false
    }
}
