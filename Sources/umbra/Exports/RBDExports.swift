// RBD volumes and their snapshots as NBD exports: `NAME` reads and writes the image through
// librbd's asynchronous calls, `NAME@GUID` reads the RBD snapshot named GUID, and
// `qemu:dirty-bitmap:GUID` is RBD's diff since that snapshot.

import BlockIO
import NBDProtocol
import NBDServer
import NIOCore
import RBD
import ShadowCopy
import SnapshotEngine

#if canImport(Glibc)
    import Glibc
#endif

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// An RBD error on its way to an NBD client: ETIMEDOUT and the like are EIO, a full cluster ENOSPC.
struct RBDExportError: NBDErrorConvertible {
    let underlying: any Error
    var nbdErrno: NBDErrno {
        guard let error = underlying as? RBDError else { return .eio }
        return error.errno == ENOSPC || error.errno == EDQUOT ? .enospc : .eio
    }
    var description: String { "\(underlying)" }

    static func wrapping<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch {
            throw RBDExportError(underlying: error)
        }
    }
}

extension RBDImage {
    /// Reads into a pooled buffer. The buffer is this call's alone until librbd completes, so its
    /// storage stays where it is while librbd fills it.
    fileprivate func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult {
        var buffer = buffers.buffer(capacity: Int(length))
        let count = Int(length)
        let target = buffer.withUnsafeMutableWritableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]) }
        try await read(at: offset, into: target)
        buffer.moveWriterIndex(forwardBy: count)
        return .data(buffer)
    }
}

/// Dirty-bitmap extents for `context` from RBD's diff.
private func dirtyExtents(
    _ provider: RBDProvider, volume: String, context: String, until: UUID?, offset: UInt64, length: UInt32
) async throws -> [NBDExtent] {
    guard let since = ExportNaming.snapshotID(fromContext: context) else {
        return [NBDExtent(length: length, flags: 0)]
    }
    let changed = try await provider.changes(
        volume: volume, since: since, until: until, within: (offset, UInt64(length)))
    return ExportNaming.dirtyExtents(
        changed.map { ByteRange(offset: ByteOffset($0.offset), count: ByteCount($0.count)) }, offset: offset,
        length: length)
}

/// An RBD volume's image, read-write.
struct RBDLiveExport: NBDExport {
    let volume: RBDVolume
    let provider: RBDProvider

    var name: String { volume.name }
    var description: String { "Umbra volume \(volume.name) on RBD image \(volume.path)" }
    var size: UInt64 { volume.size }
    var isReadOnly: Bool { false }
    var blockSize: NBDBlockSize { NBDBlockSize(minimum: 1, preferred: 4096, maximum: .max) }
    var metaContexts: [String] {
        ExportNaming.dirtyBitmapContexts(provider.snapshots(volume: volume.name).map(\.id))
    }

    func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult {
        try await RBDExportError.wrapping {
            try await volume.image.read(offset: offset, length: length, buffers: buffers)
        }
    }

    /// Every write passes the volume's gate, which a set closes for its instant.
    private func gated(_ body: () async throws -> Void) async throws {
        await volume.gate.enter()
        defer { volume.gate.leave() }
        try await RBDExportError.wrapping(body)
    }

    func write(offset: UInt64, data: NBDWritePayload, fua: Bool) async throws {
        try await gated {
            let buffers = data.buffers
            let pieces = buffers.map { buffer in buffer.withUnsafeReadableBytes { $0 } }
            try await volume.image.write(at: offset, pieces)
            // The pieces point into these buffers: they live until librbd is done with them.
            withExtendedLifetime(buffers) {}
            if fua { try await volume.image.flush() }
        }
    }

    func flush() async throws {
        try await RBDExportError.wrapping { try await volume.image.flush() }
    }

    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws {
        try await gated {
            try await volume.image.discard(at: offset, count: UInt64(length))
            if fua { try await volume.image.flush() }
        }
    }

    func writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fast: Bool, fua: Bool) async throws {
        try await gated {
            try await volume.image.writeZeroes(at: offset, count: UInt64(length))
            if fua { try await volume.image.flush() }
        }
    }

    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws -> [NBDExtent] {
        try await RBDExportError.wrapping {
            try await dirtyExtents(
                provider, volume: volume.name, context: context, until: nil, offset: offset, length: length)
        }
    }
}

/// An RBD snapshot, read-only.
struct RBDSnapshotExport: ReadOnlySnapshotExport {
    let volume: RBDVolume
    let snapshot: ShadowCopy.SnapshotInfo
    let image: RBDImage
    let provider: RBDProvider

    var name: String { snapshot.export }
    var metricsName: String { volume.name }
    var description: String {
        "Umbra snapshot of \(volume.name) (RBD image \(volume.path)) taken \(snapshot.createdAt.formatted(.iso8601))"
    }
    var size: UInt64 { volume.size }
    var blockSize: NBDBlockSize { NBDBlockSize(minimum: 1, preferred: 4096, maximum: .max) }
    var metaContexts: [String] {
        ExportNaming.dirtyBitmapContexts(
            olderThan: snapshot.id, among: provider.snapshots(volume: volume.name).map(\.id))
    }

    func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult {
        try await RBDExportError.wrapping { try await image.read(offset: offset, length: length, buffers: buffers) }
    }

    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws -> [NBDExtent] {
        try await RBDExportError.wrapping {
            try await dirtyExtents(
                provider, volume: volume.name, context: context, until: snapshot.id, offset: offset, length: length)
        }
    }
}

extension RBDProvider {
    /// An export for every RBD volume and every RBD snapshot taken and not being deleted (pending
    /// ones too, as for local volumes). Reads only what is open: never waits for the cluster.
    func exports() -> [any NBDExport] {
        var exports: [any NBDExport] = []
        for name in volumeNames {
            guard let volume = volume(named: name) else { continue }
            exports.append(RBDLiveExport(volume: volume, provider: self))
            for snapshot in snapshots(volume: name) {
                guard let image = volume.snapshotImage(snapshot.id) else { continue }
                exports.append(RBDSnapshotExport(volume: volume, snapshot: snapshot, image: image, provider: self))
            }
        }
        return exports
    }
}
