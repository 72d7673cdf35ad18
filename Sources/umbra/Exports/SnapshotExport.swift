// A snapshot as a read-only NBD export, NAME@GUID, with what changed since each older snapshot of
// the same volume as a dirty-bitmap context.

import BlockIO
import Logging
import NBDProtocol
import NBDServer
import NIOCore
import SnapshotEngine
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A snapshot, read-only.
struct SnapshotExport: ReadOnlySnapshotExport {
    let snapshot: SnapshotView
    let store: SnapshotStore

    var name: String { snapshot.exportName }
    /// Counted with its volume (one series per volume, however many snapshots come and go).
    var metricsName: String { snapshot.volumeName }
    var description: String {
        "Umbra snapshot of \(snapshot.volumeName) taken \(snapshot.createdAt.formatted(.iso8601))"
    }
    var size: UInt64 { snapshot.size.rawValue }
    var blockSize: NBDBlockSize { ExportNaming.blockSize(chunkSize: snapshot.chunkSize) }
    /// Older snapshots of the same volume: what changed between each of them and this one.
    var metaContexts: [String] {
        let all = ((try? store.snapshots(volume: snapshot.volumeName)) ?? []).filter { $0.state == .ready }
        return ExportNaming.dirtyBitmapContexts(olderThan: snapshot.id, among: all.map(\.id))
    }

    func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult {
        try await ExportError.wrapping {
            let target = ReadTarget(length: length, buffers: buffers)
            return .data(try await snapshot.read(at: ByteOffset(offset), into: consume target).filled())
        }
    }

    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws -> [NBDExtent] {
        try await ExportError.wrapping {
            if let id = ExportNaming.snapshotID(fromContext: context) {
                let older = try store.snapshot(id: id)
                let changed = try older.changes(
                    until: snapshot, within: ByteRange(offset: ByteOffset(offset), count: ByteCount(UInt64(length))))
                return ExportNaming.dirtyExtents(changed, offset: offset, length: length)
            }
            return ExportNaming.allocationExtents(
                try await snapshot.allocation(at: ByteOffset(offset), count: ByteCount(UInt64(length))))
        }
    }
}

/// A snapshot export of any provider: read-only, so the server refuses writes before they reach it
/// (these answers are for a server that did not).
protocol ReadOnlySnapshotExport: NBDExport {}

extension ReadOnlySnapshotExport {
    var isReadOnly: Bool { true }

    func write(offset: UInt64, data: NBDWritePayload, fua: Bool) async throws {
        throw NBDError(.eperm, "snapshots are read-only")
    }

    func flush() async throws {}

    func writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fast: Bool, fua: Bool) async throws {
        throw NBDError(.eperm, "snapshots are read-only")
    }
}
