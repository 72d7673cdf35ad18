// Checksummed preserved data: a copy whose bytes rot on disk fails every snapshot read that meets it
// (never wrong bytes), verification names exactly the snapshots and ranges affected, and data
// directories from before checksums still open and read.

import BlockIO
import Foundation
import Testing
import UmbraTestSupport

@testable import SnapshotEngine

@Suite struct ChecksumTests {
    /// ISA-L's CRC-32C is the Castagnoli CRC: the standard check value, continuation, and a bitwise
    /// reference over unaligned lengths and starts.
    /// Checksums of pieces combine into the checksum of the whole, at any split.
    @Test func crc32cCombines() {
        let bytes = Fixture.pattern(8, count: 70_000)
        for split in [0, 1, 7, 512, 4096, 65_536, 69_999, 70_000] {
            let first = CRC32C.checksum(Array(bytes[..<split]))
            let second = CRC32C.checksum(Array(bytes[split...]))
            let combined = CRC32C.combine(first, second, secondLength: UInt64(bytes.count - split))
            #expect(combined == CRC32C.checksum(bytes), "split at \(split)")
        }
    }

    @Test func crc32cMatchesTheStandard() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([]) == 0)
        func reference(_ bytes: ArraySlice<UInt8>) -> UInt32 {
            var crc: UInt32 = 0xFFFF_FFFF
            for byte in bytes {
                crc ^= UInt32(byte)
                for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
            }
            return ~crc
        }
        let bytes = Fixture.pattern(7, count: 5000)
        for (start, end) in [(0, 5000), (1, 4096), (3, 4100), (0, 1), (17, 18), (100, 163)] {
            let slice = bytes[start..<end]
            #expect(CRC32C.checksum(Array(slice)) == reference(slice), "bytes \(start)..<\(end)")
            let middle = (start + end) / 2
            #expect(
                CRC32C.checksum(Array(bytes[middle..<end]), continuing: CRC32C.checksum(Array(bytes[start..<middle])))
                    == reference(slice))
        }
    }

    /// Flips one byte of a preserved copy: reads of both snapshots that read through it fail with
    /// `damagedCopy` (whole-chunk and partial reads alike), everything else reads exactly, and
    /// verification reports that chunk for those two snapshots only, before and after a reopen.
    @Test func damagedCopyFailsReadsAndIsReported() async throws {
        try await withVolume { path, store, original in
            var store = store
            let older = try await store.createSnapshotSet(volumes: ["v"]).snapshots[0].id
            let newer = try await store.createSnapshotSet(volumes: ["v"]).snapshots[0].id
            // Chunks 1 and 2 are copied for `newer` (slots 0 and 1); `older` reads through them.
            try await store.volume(named: "v").write(
                at: ByteOffset(UInt64(chunk)), Fixture.pattern(2, count: 2 * chunk))
            let newest = try await store.createSnapshotSet(volumes: ["v"]).snapshots[0].id
            // Chunk 3 is copied for `newest` (slot 2).
            try await store.volume(named: "v").write(
                at: ByteOffset(UInt64(3 * chunk)), Fixture.pattern(3, count: chunk))
            try await store.volume(named: "v").flush()

            let report = try await store.verify(volumes: [])
            #expect(report.map(\.damaged) == [[]])
            #expect(report.first?.bytesChecked == UInt64(3 * chunk))
            #expect(report.first?.snapshotsChecked == 3)

            try flipByte(at: 100, of: path + "/volumes/1/diff")  // slot 0: chunk 1

            func expectDamaged(_ store: SnapshotStore) async throws {
                let damagedRange = ByteRange(offset: ByteOffset(UInt64(chunk)), count: ByteCount(UInt64(chunk)))
                for id in [older, newer] {
                    let view = try store.snapshot(id: id)
                    for (offset, count) in [(chunk, chunk), (chunk + 50, 200), (0, 4 * chunk)] {
                        await #expect(throws: EngineError.damagedCopy(volume: "v", snapshot: id, range: damagedRange)) {
                            _ = try await view.read(at: ByteOffset(UInt64(offset)), count: count)
                        }
                    }
                    // The neighbouring copy, and the chunks still on the live volume, read exactly.
                    #expect(
                        try await view.read(at: ByteOffset(UInt64(2 * chunk)), count: 2 * chunk)
                            == Array(original[(2 * chunk)...]))
                    #expect(try await view.read(at: 0, count: chunk) == Array(original[..<chunk]))
                }
                #expect(
                    try await store.snapshot(id: newest).read(at: 0, count: 4 * chunk)
                        == Array(original[..<chunk]) + Fixture.pattern(2, count: 2 * chunk) + original[(3 * chunk)...])
                let reports = try await store.verify(volumes: ["v"])
                #expect(
                    reports.first?.damaged == [
                        .init(snapshot: older, range: damagedRange), .init(snapshot: newer, range: damagedRange),
                    ])
                #expect(reports.first?.bytesChecked == UInt64(3 * chunk))
                #expect(reports.first?.bytesUnchecked == 0)
            }
            try await expectDamaged(store)
            try await store.close()
            // After a reopen the checksums come from the catalog.
            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await expectDamaged(store)
            // Deleting the snapshot that holds the copy hands it to `older`, still damaged and still caught.
            _ = try await store.deleteSnapshots(ids: [newer])
            #expect(try await store.verify(volumes: []).first?.damaged.map(\.snapshot) == [older])
            try await store.close()
        }
    }

    /// A format 2 catalog (copies without checksums) opens, is rewritten as format 3, and reads
    /// exactly; its old copies are reported unchecked, while copies made afterwards are checked.
    @Test func catalogsWithoutChecksumsStillOpen() async throws {
        try await withVolume { path, store, original in
            var store = store
            let snapshot = try await store.createSnapshotSet(volumes: ["v"]).snapshots[0].id
            try await store.volume(named: "v").write(at: 0, Fixture.pattern(2, count: 2 * chunk))
            try await store.close()

            // What format 2 wrote: the same records, with copies that carry no checksums.
            let catalog = path + "/catalog"
            let pool = IOThreadPool(threadCount: 1)
            let records = try await CatalogLog.open(in: FileSystemDirectory(path: path), io: pool).records
            pool.shutdown()
            let stripped = records.map { record -> CatalogRecord in
                guard case .preserved(let volume, let sequence, let first, let count, let slot, _) = record else {
                    return record
                }
                return .preserved(
                    volume: volume, sequence: sequence, firstChunk: first, count: count, firstSlot: slot, checksums: nil
                )
            }
            #expect(stripped != records)
            try Data(CatalogLog.fileBytes(records: stripped, version: 2)).write(to: URL(fileURLWithPath: catalog))

            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(try Data(contentsOf: URL(fileURLWithPath: catalog))[8] == UInt8(CatalogLog.formatVersion))
            #expect(try await store.snapshot(id: snapshot).read(at: 0, count: 4 * chunk) == original)
            try await store.volume(named: "v").write(
                at: ByteOffset(UInt64(2 * chunk)), Fixture.pattern(3, count: chunk))
            try await store.volume(named: "v").flush()
            let report = try await store.verify(volumes: ["v"])
            #expect(report.first?.bytesUnchecked == UInt64(2 * chunk))
            #expect(report.first?.bytesChecked == UInt64(chunk))
            try await store.close()

            // The upgrade kept them unchecked (compaction writes them without checksums).
            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(try await store.verify(volumes: []).first?.bytesUnchecked == UInt64(2 * chunk))
            #expect(try await store.snapshot(id: snapshot).read(at: 0, count: 4 * chunk) == original)
            try await store.close()
        }
    }

    private let chunk = 4096

    /// A fresh store at `path` with volume "v" (4 KiB chunks) whose first four chunks hold `original`;
    /// `body` closes the store it ends with.
    private func withVolume(_ body: (_ path: String, SnapshotStore, _ original: [UInt8]) async throws -> Void)
        async throws
    {
        try await TemporaryDirectory.with("umbra-checksum") { directory in
            let path = directory.path + "/data"
            let store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await store.createVolume(VolumeSpec(name: "v", size: .kibibytes(64), chunkSize: .kibibytes(4)))
            let original = Fixture.pattern(1, count: 4 * chunk)
            try await store.volume(named: "v").write(at: 0, original)
            try await body(path, store, original)
        }
    }

    private func flipByte(at offset: UInt64, of path: String) throws {
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        let byte = try handle.read(upToCount: 1)![0]
        try handle.seek(toOffset: offset)
        try handle.write(contentsOf: [byte ^ 0x40])
    }
}
