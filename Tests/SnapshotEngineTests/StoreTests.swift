import BlockIO
import Foundation
import Testing
import UmbraTestSupport

@testable import SnapshotEngine

/// Helpers shared by the engine tests.
enum Fixture {
    static func pattern(_ seed: UInt64, count: Int) -> [UInt8] {
        var random = SeededRandom(seed: seed)
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { random.fill($0) }
        return bytes
    }

    static func configuration() -> StoreConfiguration {
        var configuration = StoreConfiguration()
        configuration.ioThreadCount = 4
        return configuration
    }

    /// Opens a store in a fresh temporary directory, runs `body`, closes and removes everything.
    static func withStore<T>(
        configuration: StoreConfiguration = Fixture.configuration(), _ body: (SnapshotStore, String) async throws -> T
    ) async throws -> T {
        try await TemporaryDirectory.with("umbra-engine") { directory in
            let store = try await SnapshotStore.open(path: directory.path + "/data", configuration: configuration)
            do {
                let result = try await body(store, directory.path + "/data")
                try await store.close()
                return result
            } catch {
                try? await store.close()
                throw error
            }
        }
    }
}

extension ByteOffset: ExpressibleByIntegerLiteral {
    public init(integerLiteral value: UInt64) { self.init(value) }
}

extension ByteCount: ExpressibleByIntegerLiteral {
    public init(integerLiteral value: UInt64) { self.init(value) }
}

@Suite struct VolumeTests {
    /// A new volume reads as zeros, and reads back exactly what was written, at unaligned offsets across chunk edges.
    @Test func readsBackUnalignedWrites() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: .mebibytes(1), chunkSize: .kibibytes(4)))
            let volume = try store.volume(named: "disk")
            #expect(try await volume.read(at: 0, count: 8192) == [UInt8](repeating: 0, count: 8192))
            let data = Fixture.pattern(1, count: 10_000)
            try await volume.write(at: 4090, data)
            #expect(try await volume.read(at: 4090, count: data.count) == data)
            #expect(try await volume.read(at: 4089, count: 1) == [0])
        }
    }

    /// Requests outside the volume throw `outOfRange` instead of touching storage.
    @Test func rejectsOutOfRangeRequests() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: 65536))
            let volume = try store.volume(named: "disk")
            await #expect(throws: EngineError.outOfRange(offset: 65535, count: 2, size: 65536)) {
                try await volume.write(at: 65535, [1, 2])
            }
            await #expect(throws: EngineError.self) { _ = try await volume.read(at: ByteOffset(UInt64.max), count: 1) }
            await #expect(throws: EngineError.self) { try await volume.discard(at: 65536, count: 1) }
        }
    }

    /// Volume names, sizes and chunk sizes are validated with clear errors; duplicates are refused.
    @Test func validatesVolumeSpecs() async throws {
        try await Fixture.withStore { store, _ in
            await #expect(throws: EngineError.invalidVolumeName("a@b")) {
                try await store.createVolume(VolumeSpec(name: "a@b", size: 4096))
            }
            await #expect(throws: EngineError.self) { try await store.createVolume(VolumeSpec(name: "a", size: 4095)) }
            await #expect(throws: EngineError.invalidChunkSize(3 << 12)) {
                try await store.createVolume(VolumeSpec(name: "a", size: 4096, chunkSize: ByteCount(3 << 12)))
            }
            await #expect(throws: EngineError.invalidChunkSize(2 << 20)) {
                try await store.createVolume(VolumeSpec(name: "a", size: 4096, chunkSize: .mebibytes(2)))
            }
            try await store.createVolume(VolumeSpec(name: "a", size: 4096))
            await #expect(throws: EngineError.volumeExists("a")) {
                try await store.createVolume(VolumeSpec(name: "a", size: 4096))
            }
            #expect(store.volumes().map(\.name) == ["a"])
        }
    }

    /// Trim and write-zeroes make ranges read as zeros, including unaligned edges.
    @Test func trimAndZeroesReadAsZeros() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: .kibibytes(256), chunkSize: .kibibytes(8)))
            let volume = try store.volume(named: "disk")
            let data = Fixture.pattern(2, count: 65536)
            try await volume.write(at: 0, data)
            try await volume.discard(at: 1000, count: 20000)
            try await volume.writeZeroes(at: 30000, count: 5000, mayDiscard: false)
            var expected = data
            for index in 1000..<21000 { expected[index] = 0 }
            for index in 30000..<35000 { expected[index] = 0 }
            #expect(try await volume.read(at: 0, count: 65536) == expected)
        }
    }

    /// An external file can back a volume; deleting the volume leaves the file alone.
    @Test func externalFileBacksAVolume() async throws {
        try await TemporaryDirectory.with { directory in
            let path = directory.path + "/disk.img"
            let original = Fixture.pattern(3, count: 65536)
            #expect(FileManager.default.createFile(atPath: path, contents: Data(original)))
            let store = try await SnapshotStore.open(
                path: directory.path + "/data", configuration: Fixture.configuration())
            let info = try await store.createVolume(VolumeSpec(name: "ext", size: nil, backing: .external(path: path)))
            #expect(info.size == 65536)
            let volume = try store.volume(named: "ext")
            #expect(try await volume.read(at: 0, count: 65536) == original)
            let set = try await store.createSnapshotSet(volumes: ["ext"])
            try await volume.write(at: 100, [9, 9, 9])
            #expect(try await store.snapshot(id: set.snapshots[0].id).read(at: 0, count: 65536) == original)
            try await store.deleteVolume(named: "ext", deletingSnapshots: true)
            try await store.close()
            #expect(FileManager.default.fileExists(atPath: path))
        }
    }
}

@Suite struct SnapshotTests {
    /// A snapshot keeps the contents the volume had when it was taken while the volume keeps changing.
    @Test func snapshotKeepsOldContents() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: .mebibytes(1), chunkSize: .kibibytes(16)))
            let volume = try store.volume(named: "disk")
            let before = Fixture.pattern(4, count: 300_000)
            try await volume.write(at: 0, before)
            let set = try await store.createSnapshotSet(volumes: ["disk"])
            #expect(set.snapshots.count == 1)
            let after = Fixture.pattern(5, count: 100_000)
            try await volume.write(at: 12345, after)
            try await volume.discard(at: 200_000, count: 50_000)
            let snapshot = try store.snapshot(id: set.snapshots[0].id)
            #expect(try await snapshot.read(at: 0, count: 300_000) == before)
            #expect(try await snapshot.read(at: 300_000, count: 1000) == [UInt8](repeating: 0, count: 1000))
            var live = before
            live.replaceSubrange(12345..<(12345 + after.count), with: after)
            for index in 200_000..<250_000 { live[index] = 0 }
            #expect(try await volume.read(at: 0, count: 300_000) == live)
        }
    }

    /// Snapshots of a chain each read their own point in time, and deleting the oldest, a middle and the newest keeps the rest exact.
    @Test func chainSurvivesDeletionsAnywhere() async throws {
        try await Fixture.withStore { store, _ in
            let size = 64 * 1024
            try await store.createVolume(VolumeSpec(name: "disk", size: ByteCount(size), chunkSize: .kibibytes(4)))
            let volume = try store.volume(named: "disk")
            var random = SeededRandom(seed: 6)
            var model = [UInt8](repeating: 0, count: size)
            var snapshots: [(UUID, [UInt8])] = []
            for round in 0..<8 {
                for _ in 0..<6 {
                    let offset = Int.random(in: 0..<(size - 5000), using: &random)
                    let data = Fixture.pattern(
                        UInt64(round * 100 + offset), count: Int.random(in: 1...5000, using: &random))
                    try await volume.write(at: ByteOffset(offset), data)
                    model.replaceSubrange(offset..<(offset + data.count), with: data)
                }
                let set = try await store.createSnapshotSet(volumes: ["disk"])
                snapshots.append((set.snapshots[0].id, model))
            }
            func verifyAll() async throws {
                for (id, expected) in snapshots {
                    #expect(try await store.snapshot(id: id).read(at: 0, count: size) == expected)
                }
                #expect(store.consistencyProblems().isEmpty)
            }
            try await verifyAll()
            for position in [3, 0, snapshots.count - 3, 2] {
                let (id, _) = snapshots.remove(at: position)
                #expect(try await store.deleteSnapshots(ids: [id]) == [id])
                try await verifyAll()
                await #expect(throws: EngineError.snapshotNotFound(id.guidString)) {
                    try await store.deleteSnapshots(ids: [id])
                }
            }
            #expect(try await volume.read(at: 0, count: size) == model)
        }
    }

    /// A write costs one copy whatever the number of snapshots: only the newest snapshot receives it.
    @Test func copiesOncePerFirstWrite() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: .mebibytes(1), chunkSize: .kibibytes(4)))
            let volume = try store.volume(named: "disk")
            try await volume.write(at: 0, Fixture.pattern(7, count: 8192))
            for _ in 0..<5 { _ = try await store.createSnapshotSet(volumes: ["disk"]) }
            try await volume.write(at: 0, [1])
            // The write may be answered before its copy is recorded; a flush waits for it.
            try await volume.flush()
            let diff = try store.snapshots().map(\.diffBytes)
            #expect(diff == [0, 0, 0, 0, 4096])
            #expect(store.volumes()[0].diffBytes == 4096)
        }
    }

    /// Changed-block tracking reports the chunks written between snapshots, and since a snapshot on the live volume.
    @Test func reportsChangedExtents() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: .mebibytes(1), chunkSize: .kibibytes(64)))
            let volume = try store.volume(named: "disk")
            let first = try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id
            try await volume.write(at: 70_000, [1, 2, 3])
            try await volume.write(at: 200_000, Fixture.pattern(8, count: 70_000))
            let second = try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id
            try await volume.discard(at: 655_360, count: 65_536)
            let between = try store.changes(volume: "disk", since: first, until: second)
            #expect(between.chunkSize == 65536)
            #expect(
                between.extents == [
                    ByteRange(offset: 65536, count: 65536), ByteRange(offset: 196_608, count: 131_072),
                ])
            let sinceFirst = try store.changes(volume: "disk", since: first)
            #expect(sinceFirst.extents.last == ByteRange(offset: 655_360, count: 65536))
            #expect(
                try store.changes(volume: "disk", since: second).extents == [ByteRange(offset: 655_360, count: 65536)])
            #expect(throws: EngineError.self) { try store.changes(volume: "disk", since: second, until: first) }
            // Deleting the middle snapshot hands its changes on: "since first" is unchanged.
            try await store.deleteSnapshots(ids: [second])
            #expect(try store.changes(volume: "disk", since: first) == sinceFirst)
        }
    }

    /// A set snapshots several volumes under one GUID and timestamp; deleting the set deletes all its snapshots.
    @Test func setsSpanVolumes() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "a", size: 65536))
            try await store.createVolume(VolumeSpec(name: "b", size: 65536))
            let set = try await store.createSnapshotSet(volumes: ["b", "a"])
            #expect(set.snapshots.map(\.volume) == ["b", "a"], "in the order the volumes were named")
            #expect(Set(set.snapshots.map(\.setID)) == [set.id])
            #expect(try store.snapshotSets().map(\.id) == [set.id])
            await #expect(throws: EngineError.self) { try await store.createSnapshotSet(volumes: ["a", "a"]) }
            await #expect(throws: EngineError.volumeNotFound("c")) {
                try await store.createSnapshotSet(volumes: ["a", "c"])
            }
            #expect(try await store.deleteSnapshots(ids: [set.id]).count == 2)
            #expect(try store.snapshots().isEmpty)
        }
    }

    /// 512 snapshots of one volume, each exact, and reading the oldest gives the oldest contents.
    @Test func holdsFiveHundredTwelveSnapshots() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: .kibibytes(64), chunkSize: .kibibytes(4)))
            let volume = try store.volume(named: "disk")
            var ids: [UUID] = []
            for index in 0..<512 {
                try await volume.write(
                    at: ByteOffset(UInt64(index % 16) * 4096), [UInt8(truncatingIfNeeded: index), 1])
                ids.append(try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id)
            }
            #expect(try await store.snapshot(id: ids[0]).read(at: 0, count: 2) == [0, 1])
            #expect(try await store.snapshot(id: ids[0]).read(at: 4096, count: 1) == [0])
            #expect(
                try await store.snapshot(id: ids[300]).read(at: ByteOffset(UInt64(300 % 16) * 4096), count: 1) == [44])
            #expect(try store.snapshots().count == 512)
        }
    }

    /// Writes to a volume being snapshotted wait for the set and are never lost; the snapshot excludes them.
    @Test func heldWritesGoThroughAfterCommit() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: 65536))
            let volume = try store.volume(named: "disk")
            let prepared = try await store.prepareSnapshotSet(volumes: ["disk"])
            #expect(prepared.isHeld)
            let write = Task { try await volume.write(at: 0, [7, 7, 7]) }
            let set = try await prepared.commit()
            try await write.value
            #expect(try await store.snapshot(id: set.snapshots[0].id).read(at: 0, count: 3) == [0, 0, 0])
            #expect(try await volume.read(at: 0, count: 3) == [7, 7, 7])
            await #expect(throws: EngineError.holdNotActive) { try await prepared.commit() }
        }
    }

    /// Aborting a prepared set releases the writes and leaves no snapshot.
    @Test func abortReleasesWrites() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: 65536))
            let volume = try store.volume(named: "disk")
            let prepared = try await store.prepareSnapshotSet(volumes: ["disk"])
            let write = Task { try await volume.write(at: 0, [5]) }
            prepared.abort()
            try await write.value
            #expect(try store.snapshots().isEmpty)
            #expect(try await volume.read(at: 0, count: 1) == [5])
        }
    }

    /// Past the hold limit a prepared set is aborted by itself: writes are released and commit says why.
    @Test func holdLimitAbortsTheSet() async throws {
        let clock = ManualClock()
        var configuration = Fixture.configuration()
        configuration.clock = clock
        try await Fixture.withStore(configuration: configuration) { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: 65536))
            let volume = try store.volume(named: "disk")
            let prepared = try await store.prepareSnapshotSet(volumes: ["disk"], holdLimit: .seconds(10))
            let write = Task { try await volume.write(at: 0, [5]) }
            await clock.waitForSleepers(count: 1)
            clock.advance(by: .seconds(9))
            #expect(prepared.isHeld)
            clock.advance(by: .seconds(1))
            try await write.value
            await #expect(throws: EngineError.holdExpired(limitMilliseconds: 10_000)) { try await prepared.commit() }
            #expect(try store.snapshots().isEmpty)
            // The store is usable again: the next set works.
            _ = try await store.createSnapshotSet(volumes: ["disk"])
        }
    }
}

@Suite struct PersistenceTests {
    /// A volume created to be filled (a restore) survives reopening only once it is recorded as
    /// filled; an unfinished one is deleted at open, through a compaction too.
    @Test func unfinishedFilledVolumesGoAtOpen() async throws {
        try await TemporaryDirectory.with { directory in
            let path = directory.path + "/data"
            var store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await store.createVolume(VolumeSpec(name: "done", size: .kibibytes(64)), filling: true)
            try await store.volume(named: "done").write(at: 0, Fixture.pattern(40, count: 4096))
            try await store.finishFilling(volume: "done")
            try await store.createVolume(VolumeSpec(name: "cut", size: .kibibytes(64)), filling: true)
            try await store.volume(named: "cut").write(at: 0, Fixture.pattern(41, count: 4096))
            try await store.compact(force: true)
            try await store.close()
            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(store.volumes().map(\.name) == ["done"])
            #expect(try await store.volume(named: "done").read(at: 0, count: 4096) == Fixture.pattern(40, count: 4096))
            #expect(store.consistencyProblems().isEmpty)
            try await store.close()
        }
    }

    /// A set's purpose (`labelSnapshotSet`) shows on its snapshots and survives reopening and compaction.
    @Test func setPurposesPersist() async throws {
        try await TemporaryDirectory.with { directory in
            let path = directory.path + "/data"
            var store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await store.createVolume(VolumeSpec(name: "disk", size: .kibibytes(64), chunkSize: .kibibytes(4)))
            let plain = try await store.createSnapshotSet(volumes: ["disk"])
            let backup = try await store.createSnapshotSet(volumes: ["disk"])
            try await store.labelSnapshotSet(id: backup.id, purpose: "backup")
            await #expect(
                throws: EngineError.snapshotNotFound(
                    UUID(uuidString: "0e000000-0000-0000-0000-000000000000")!.guidString)
            ) {
                try await store.labelSnapshotSet(
                    id: UUID(uuidString: "0e000000-0000-0000-0000-000000000000")!, purpose: "backup")
            }
            await #expect(throws: EngineError.self) {
                try await store.labelSnapshotSet(id: plain.id, purpose: "no spaces")
            }
            #expect(try store.snapshots().map(\.purpose) == [nil, "backup"])
            try await store.close()
            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(try store.snapshots().map(\.purpose) == [nil, "backup"])
            try await store.compact(force: true)
            try await store.close()
            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(try store.snapshots().map(\.purpose) == [nil, "backup"])
            try await store.close()
        }
    }

    /// Volumes, sets, GUIDs, timestamps and preserved data survive closing and reopening.
    @Test func survivesReopen() async throws {
        try await TemporaryDirectory.with { directory in
            let path = directory.path + "/data"
            var store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await store.createVolume(VolumeSpec(name: "disk", size: .mebibytes(1), chunkSize: .kibibytes(8)))
            let original = Fixture.pattern(9, count: 100_000)
            try await store.volume(named: "disk").write(at: 0, original)
            let set = try await store.createSnapshotSet(volumes: ["disk"])
            try await store.volume(named: "disk").write(at: 5000, Fixture.pattern(10, count: 50_000))
            try await store.volume(named: "disk").flush()
            let snapshotsBefore = try store.snapshots()
            try await store.close()

            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(try store.snapshots() == snapshotsBefore)
            #expect(try store.snapshotSets().first?.id == set.id)
            #expect(try await store.snapshot(id: set.snapshots[0].id).read(at: 0, count: 100_000) == original)
            #expect(store.consistencyProblems().isEmpty)
            try await store.close()
        }
    }

    /// A second open of the same data directory is refused while the first holds it.
    @Test func refusesSecondOpen() async throws {
        _ = try await Fixture.withStore { _, path in
            await #expect(throws: EngineError.directoryLocked(path)) {
                _ = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            }
        }
    }

    /// A catalog from another format version, or a damaged one, gives a clear error instead of a crash.
    @Test func rejectsForeignOrCorruptCatalogs() async throws {
        try await TemporaryDirectory.with { directory in
            let path = directory.path + "/data"
            let store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await store.createVolume(VolumeSpec(name: "disk", size: 65536))
            try await store.close()
            let catalog = path + "/catalog"
            let pristine = try Data(contentsOf: URL(fileURLWithPath: catalog))

            var wrongVersion = pristine
            wrongVersion[8] = 99
            try wrongVersion.write(to: URL(fileURLWithPath: catalog))
            await #expect(
                throws: EngineError.unsupportedFormatVersion(
                    path: catalog, found: 99, supported: CatalogLog.readableFormatVersions)
            ) {
                _ = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            }

            var damagedHeader = pristine
            damagedHeader[0] = UInt8(ascii: "X")
            try damagedHeader.write(to: URL(fileURLWithPath: catalog))
            await #expect(throws: EngineError.self) {
                _ = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            }

            // Damage the first batch while a later valid one follows: corruption, not a torn write.
            try pristine.write(to: URL(fileURLWithPath: catalog))
            let again = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await again.createVolume(VolumeSpec(name: "second", size: 65536))
            try await again.close()
            var damagedBatch = try Data(contentsOf: URL(fileURLWithPath: catalog))
            damagedBatch[512 + 40] ^= 0xFF
            try damagedBatch.write(to: URL(fileURLWithPath: catalog))
            do {
                _ = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
                Issue.record("opened a corrupt catalog")
            } catch let error as EngineError {
                guard case .corruptCatalog = error else {
                    Issue.record("unexpected error \(error)")
                    return
                }
                #expect(error.description.contains("is corrupt at byte"))
            }
        }
    }

    /// A directory holding other files is not taken over as a data directory.
    @Test func refusesForeignDirectory() async throws {
        try await TemporaryDirectory.with { directory in
            #expect(
                FileManager.default.createFile(atPath: directory.path + "/important.txt", contents: Data("hello".utf8)))
            await #expect(throws: EngineError.notADataDirectory(directory.path)) {
                _ = try await SnapshotStore.open(path: directory.path, configuration: Fixture.configuration())
            }
        }
    }
}

@Suite struct DiffLimitTests {
    /// With deleteOldest, a full diff store deletes the oldest snapshots; the write goes through and the rest stay exact.
    @Test func deleteOldestPolicy() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(
                VolumeSpec(name: "disk", size: .kibibytes(64), chunkSize: .kibibytes(4), diffLimit: .kibibytes(16)))
            let volume = try store.volume(named: "disk")
            try await volume.write(at: 0, Fixture.pattern(11, count: 65536))
            let first = try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id
            try await volume.write(at: 0, Fixture.pattern(12, count: 3 * 4096))
            let secondContents = try await volume.read(at: 0, count: 65536)
            let second = try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id
            // Two more chunks for the second snapshot exceed 4 slots: the first snapshot goes.
            try await volume.write(at: ByteOffset(3 * 4096), Fixture.pattern(13, count: 2 * 4096))
            try await volume.flush()
            #expect(try store.snapshots().map(\.id) == [second])
            #expect(try await store.snapshot(id: second).read(at: 0, count: 65536) == secondContents)
            #expect(throws: EngineError.snapshotNotFound(first.guidString)) { try store.snapshot(id: first) }
            #expect(store.consistencyProblems().isEmpty)
        }
    }

    /// With failSnapshot, the snapshot that needs the space fails and is listed as failed; the write goes through.
    @Test func failSnapshotPolicy() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(
                VolumeSpec(
                    name: "disk", size: .kibibytes(64), chunkSize: .kibibytes(4), diffLimit: .kibibytes(8),
                    policy: .failSnapshot))
            let volume = try store.volume(named: "disk")
            try await volume.write(at: 0, Fixture.pattern(14, count: 65536))
            let id = try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id
            let new = Fixture.pattern(15, count: 3 * 4096)
            try await volume.write(at: 0, new)
            #expect(try await volume.read(at: 0, count: new.count) == new)
            let listed = try store.snapshots()
            #expect(listed.count == 1)
            guard case .failed(let reason) = listed[0].state else {
                Issue.record("snapshot not failed: \(listed)")
                return
            }
            #expect(reason.contains("reached its limit"))
            #expect(throws: EngineError.self) { try store.snapshot(id: id) }
            try await store.deleteSnapshots(ids: [id])
            #expect(try store.snapshots().isEmpty)
            #expect(store.volumes()[0].diffBytes == 0)
        }
    }

    /// A limit set later (`limitDiffStore`) works like one given at creation, survives reopening and
    /// a compaction, and frees nothing until a copy needs space: then the policy gives way. Removing
    /// it lets the diff store grow again.
    @Test func limitChangedLater() async throws {
        try await TemporaryDirectory.with { directory in
            let path = directory.path + "/data"
            var store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await store.createVolume(VolumeSpec(name: "disk", size: .kibibytes(64), chunkSize: .kibibytes(4)))
            var volume = try store.volume(named: "disk")
            try await volume.write(at: 0, Fixture.pattern(17, count: 65536))
            let first = try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id
            try await volume.write(at: 0, Fixture.pattern(18, count: 4 * 4096))
            let second = try await store.createSnapshotSet(volumes: ["disk"]).snapshots[0].id
            let secondContents = try await store.snapshot(id: second).read(at: 0, count: 65536)
            // Four chunks held, and a limit of two: nothing goes until a copy needs a slot.
            let info = try await store.limitDiffStore(ofVolume: "disk", to: .kibibytes(8), policy: .deleteOldest)
            #expect(info.diffLimit == .kibibytes(8) && info.policy == .deleteOldest)
            #expect(info.diffBytes == .kibibytes(16))
            #expect(try store.snapshots().map(\.id) == [first, second])
            await #expect(
                throws: EngineError.invalidSize("the diff store limit must hold at least one chunk (4096 bytes)")
            ) {
                try await store.limitDiffStore(ofVolume: "disk", to: .kibibytes(2), policy: .deleteOldest)
            }
            await #expect(throws: EngineError.volumeNotFound("nope")) {
                try await store.limitDiffStore(ofVolume: "nope", to: nil, policy: .deleteOldest)
            }
            try await store.close()

            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(store.volumes()[0].diffLimit == .kibibytes(8))
            volume = try store.volume(named: "disk")
            // A copy for the second snapshot needs a slot: the first snapshot is deleted for it.
            try await volume.write(at: ByteOffset(8 * 4096), Fixture.pattern(19, count: 4096))
            try await volume.flush()
            #expect(try store.snapshots().map(\.id) == [second])
            #expect(try await store.snapshot(id: second).read(at: 0, count: 65536) == secondContents)
            // Without a limit, the diff store grows past the old one.
            try await store.limitDiffStore(ofVolume: "disk", to: nil, policy: .deleteOldest)
            try await volume.write(at: ByteOffset(9 * 4096), Fixture.pattern(20, count: 4 * 4096))
            try await volume.flush()
            #expect(try store.snapshots().map(\.id) == [second])
            #expect(store.volumes()[0].diffBytes > .kibibytes(8))
            // Compaction writes the volume with the limit it has now (none), not the one it had.
            try await store.limitDiffStore(ofVolume: "disk", to: .kibibytes(64), policy: .failSnapshot)
            try await store.compact(force: true)
            try await store.close()
            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(store.volumes()[0].diffLimit == .kibibytes(64) && store.volumes()[0].policy == .failSnapshot)
            #expect(try await store.snapshot(id: second).read(at: 0, count: 65536) == secondContents)
            #expect(store.consistencyProblems().isEmpty)
            try await store.close()
        }
    }

    /// A change of one setting keeps the other, read under the lock the change takes.
    @Test func changingOneSettingKeepsTheOther() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(VolumeSpec(name: "disk", size: .kibibytes(64), chunkSize: .kibibytes(4)))
            var info = try await store.limitDiffStore(ofVolume: "disk", changing: .limit(.kibibytes(32)), policy: nil)
            #expect(info.diffLimit == .kibibytes(32) && info.policy == .deleteOldest)
            info = try await store.limitDiffStore(ofVolume: "disk", changing: nil, policy: .failSnapshot)
            #expect(info.diffLimit == .kibibytes(32) && info.policy == .failSnapshot)
            info = try await store.limitDiffStore(ofVolume: "disk", changing: .limit(.kibibytes(16)), policy: nil)
            #expect(info.diffLimit == .kibibytes(16) && info.policy == .failSnapshot)
            await #expect(throws: EngineError.self) {
                try await store.limitDiffStore(ofVolume: "disk", changing: .unlimited, policy: .failSnapshot)
            }
            await #expect(throws: EngineError.self) {
                try await store.limitDiffStore(ofVolume: "disk", changing: .limit(ByteCount(6000)), policy: nil)
            }
            info = try await store.limitDiffStore(ofVolume: "disk", changing: .unlimited, policy: nil)
            #expect(info.diffLimit == nil && info.policy == .deleteOldest)
        }
    }

    /// Writing zeros over zeros needs no diff space, so a full store deletes nothing for it.
    @Test func zeroChunksNeedNoSpace() async throws {
        try await Fixture.withStore { store, _ in
            try await store.createVolume(
                VolumeSpec(name: "disk", size: .kibibytes(64), chunkSize: .kibibytes(4), diffLimit: .kibibytes(4)))
            let volume = try store.volume(named: "disk")
            _ = try await store.createSnapshotSet(volumes: ["disk"])
            try await volume.write(at: 0, Fixture.pattern(16, count: 65536))
            #expect(try store.snapshots().count == 1)
        }
    }
}
