// Pending sets: taken and readable at once, kept only when told, rolled back by the next open
// otherwise. This is what lets the coordinator thaw writers without waiting for the disk, and what
// makes a crash before BackupComplete lose the set rather than hand it out.

import BlockIO
import Foundation
import Testing
import UmbraTestSupport

@testable import SnapshotEngine

@Suite struct PendingSetTests {
    /// A pending set's snapshots read the old contents at once and are listed as pending until kept.
    @Test func pendingSnapshotsAreReadableAndListedAsPending() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: 65536, chunkSize: .kibibytes(4)))
            let volume = try store.volume(named: "disk")
            let before = Fixture.pattern(1, count: 65536)
            try await volume.write(at: 0, before)
            let set = try await store.prepareSnapshotSet(volumes: ["disk"]).commitPending()
            #expect(set.snapshots.map(\.isPending) == [true])
            try await volume.write(at: 100, Fixture.pattern(2, count: 9000))
            #expect(try await store.snapshot(id: set.snapshots[0].id).read(at: 0, count: 65536) == before)
            #expect(try store.snapshots().map(\.isPending) == [true])

            try await store.keepSnapshotSet(id: set.id)
            #expect(try store.snapshots().map(\.isPending) == [false])
            // Keeping twice is harmless; keeping what is gone is not.
            try await store.keepSnapshotSet(id: set.id)
            await #expect(
                throws: EngineError.snapshotNotFound(
                    UUID(uuidString: "00000000-0000-0000-0000-000000000001")!.guidString)
            ) {
                try await store.keepSnapshotSet(id: UUID(uuidString: "00000000-0000-0000-0000-000000000001")!)
            }
        }
    }

    /// A set's snapshots come in the order its volumes were named, whatever their names or numbers.
    @Test func snapshotsComeInTheCallersOrder() async throws {
        try await Fixture.withStore { store, _ in
            for name in ["a", "b", "c"] {
                try await store.createVolume(VolumeSpec(name: name, size: 65536, chunkSize: .kibibytes(4)))
            }
            let kept = try await store.createSnapshotSet(volumes: ["c", "a", "b"])
            #expect(kept.snapshots.map(\.volume) == ["c", "a", "b"])
            let pending = try await store.prepareSnapshotSet(volumes: ["b", "c"]).commitPending()
            #expect(pending.snapshots.map(\.volume) == ["b", "c"])
        }
    }

    /// Reopening rolls back a set that was never kept: its snapshots are gone, the older snapshot it
    /// sat on still reads exactly, and the rollback is reported; a kept set survives.
    @Test func reopeningRollsBackWhatWasNeverKept() async throws {
        try await TemporaryDirectory.with("umbra-pending") { directory in
            let path = directory.path + "/data"
            let first = Fixture.pattern(1, count: 65536)
            let second = Fixture.pattern(2, count: 65536)
            var kept: SnapshotSetInfo
            var pending: SnapshotSetInfo
            do {
                let store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
                try await store.createVolume(VolumeSpec(name: "a", size: 65536, chunkSize: .kibibytes(4)))
                try await store.createVolume(VolumeSpec(name: "b", size: 65536, chunkSize: .kibibytes(4)))
                let a = try store.volume(named: "a")
                try await a.write(at: 0, first)
                kept = try await store.prepareSnapshotSet(volumes: ["a"]).commitPending()
                try await a.write(at: 0, second)
                pending = try await store.prepareSnapshotSet(volumes: ["a", "b"]).commitPending()
                // The pending snapshot preserves what the kept one needs too: its copies are handed
                // back when it is rolled back.
                try await a.write(at: 0, Fixture.pattern(3, count: 65536))
                try await store.keepSnapshotSet(id: kept.id)
                try await store.close()
            }
            let store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(try store.snapshots().map(\.id) == kept.snapshots.map(\.id))
            #expect(store.rolledBackSets.map(\.id) == [pending.id])
            #expect(store.rolledBackSets.first?.snapshots.count == 2)
            #expect(try await store.snapshot(id: kept.snapshots[0].id).read(at: 0, count: 65536) == first)
            #expect(store.consistencyProblems().isEmpty)
            try await store.close()

            // Rolled back once, for good: the next open has nothing to roll back.
            let again = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(again.rolledBackSets.isEmpty)
            #expect(try again.snapshots().map(\.id) == kept.snapshots.map(\.id))
            try await again.close()
        }
    }

    /// A pending set survives compaction as pending, and a kept one as kept.
    @Test func compactionKeepsPendingSetsPending() async throws {
        try await TemporaryDirectory.with("umbra-pending") { directory in
            let path = directory.path + "/data"
            var configuration = Fixture.configuration()
            configuration.catalogCompactionThreshold = ByteCount(512)
            let store = try await SnapshotStore.open(path: path, configuration: configuration)
            try await store.createVolume(VolumeSpec(name: "a", size: .mebibytes(1), chunkSize: .kibibytes(4)))
            let a = try store.volume(named: "a")
            let kept = try await store.prepareSnapshotSet(volumes: ["a"]).commitPending()
            try await store.keepSnapshotSet(id: kept.id)
            let pending = try await store.prepareSnapshotSet(volumes: ["a"]).commitPending()
            // Enough copies and a deletion to pass the threshold and compact.
            let doomed = try await store.createSnapshotSet(volumes: ["a"])
            for chunk in 0..<64 { try await a.write(at: ByteOffset(UInt64(chunk) * 4096), [UInt8(chunk)]) }
            try await store.deleteSnapshots(ids: [doomed.id])
            #expect(store.context.catalog.appendedBytes < 4096, "the catalog was compacted")
            try await store.close()

            let reopened = try await SnapshotStore.open(path: path, configuration: configuration)
            #expect(reopened.rolledBackSets.map(\.id) == [pending.id])
            #expect(try reopened.snapshots().map(\.id) == kept.snapshots.map(\.id))
            try await reopened.close()
        }
    }

    /// A catalog in format version 1 opens, keeps its sets, and is rewritten in the current version.
    @Test func upgradesVersionOneCatalogs() async throws {
        try await TemporaryDirectory.with("umbra-pending") { directory in
            let path = directory.path + "/data"
            let store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await store.createVolume(VolumeSpec(name: "a", size: 65536, chunkSize: .kibibytes(4)))
            try await store.volume(named: "a").write(at: 0, Fixture.pattern(1, count: 4096))
            let set = try await store.createSnapshotSet(volumes: ["a"])
            try await store.volume(named: "a").write(at: 0, Fixture.pattern(2, count: 4096))
            try await store.close()

            // What version 1 wrote: the same records (none of types 8 and 9) under a version 1 header.
            let catalog = URL(fileURLWithPath: path + "/catalog")
            var bytes = try [UInt8](Data(contentsOf: catalog))
            #expect(bytes[8] == UInt8(CatalogLog.formatVersion))
            bytes[8] = 1
            let checksum = CRC32C.checksum(Array(bytes[0..<16]))
            withUnsafeBytes(of: checksum.littleEndian) { bytes.replaceSubrange(16..<20, with: $0) }
            try Data(bytes).write(to: catalog)

            let reopened = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(try reopened.snapshots().map(\.id) == set.snapshots.map(\.id))
            #expect(
                try await reopened.snapshot(id: set.snapshots[0].id).read(at: 0, count: 4096)
                    == Fixture.pattern(1, count: 4096))
            try await reopened.close()
            #expect(try Data(contentsOf: catalog)[8] == UInt8(CatalogLog.formatVersion))
        }
    }
}

@Suite struct PreparedSetCancellationTests {
    /// A prepare whose caller gives up (a coordinator past its freeze window) stops waiting for
    /// writes to drain: it throws `CancellationError`, holds no gate, and the next set can be taken.
    @Test func cancelledPrepareHoldsNothing() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: 65536, chunkSize: .kibibytes(4)))
            let volume = try store.volume(named: "disk")
            // A write that never finishes: the drain would wait for it forever.
            await volume.gate.enter()
            let prepare = Task { try await store.prepareSnapshotSet(volumes: ["disk"], flushingFirst: false) }
            while !volume.gate.hasExclusiveWaiter { await Task.yield() }
            prepare.cancel()
            await #expect(throws: CancellationError.self) { _ = try await prepare.value }
            volume.gate.leave()
            // Writes pass, and a new set is taken.
            try await volume.write(at: 0, [7])
            let set = try await store.createSnapshotSet(volumes: ["disk"])
            #expect(set.snapshots.count == 1)
        }
    }
}
