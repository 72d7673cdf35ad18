// Copy-on-write on XFS with reflink: copies share the live data's blocks instead of being written,
// snapshots still read what the volume held, checksums still hold, and it all survives a reopen.

import BlockIO
import Foundation
import Testing
import UmbraTestSupport

@testable import SnapshotEngine

@Suite struct ReflinkTests {
    @Test(.enabled(if: ReflinkFileSystem.unavailableReason == nil, "needs root, xfsprogs and a loop device"))
    func copiesShareBlocksAndSnapshotsReadExactly() async throws {
        try await ReflinkFileSystem.with { fileSystem in
            let path = fileSystem.path + "/data"
            let chunk = 64 << 10
            let size = 64 * chunk
            var store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            try await store.createVolume(VolumeSpec(name: "v", size: .mebibytes(4)))
            #expect(store.volumes().map(\.copyMethod) == [.reflink])
            let original = Fixture.pattern(1, count: size)
            let volume = try store.volume(named: "v")
            try await volume.write(at: 0, original)
            try await volume.flush()
            let snapshot = try await store.createSnapshotSet(volumes: ["v"]).snapshots[0].id

            // One 4 KiB write at the start of each of the first 32 chunks: too short to clone, each
            // copy is written.
            var expected = original
            for index in 0..<32 {
                let bytes = Fixture.pattern(UInt64(100 + index), count: 4096)
                try await volume.write(at: ByteOffset(UInt64(index * chunk)), bytes)
                expected.replaceSubrange((index * chunk)..<(index * chunk + 4096), with: bytes)
            }
            // 1 MiB from the middle of chunk 40: a run of 17 chunks, cloned. The first and the last are
            // overwritten only in part, so the rest of them stays shared.
            let long = Fixture.pattern(7, count: 1 << 20)
            let start = 40 * chunk + chunk / 2
            try await volume.write(at: ByteOffset(UInt64(start)), long)
            expected.replaceSubrange(start..<(start + long.count), with: long)
            try await volume.flush()
            #expect(try ReflinkFileSystem.hasSharedExtents(path + "/volumes/1/diff"))

            func check(_ store: SnapshotStore) async throws {
                #expect(try await store.snapshot(id: snapshot).read(at: 0, count: size) == original)
                #expect(try await store.volume(named: "v").read(at: 0, count: size) == expected)
                let report = try await store.verify(volumes: ["v"])
                #expect(report.first?.damaged == [])
                #expect(report.first?.bytesChecked == UInt64(49 * chunk))  // 32 written copies, 17 cloned
            }
            try await check(store)
            try await store.close()
            store = try await SnapshotStore.open(path: path, configuration: Fixture.configuration())
            #expect(store.volumes().map(\.copyMethod) == [.reflink])
            try await check(store)
            try await store.close()
        }
    }
}
