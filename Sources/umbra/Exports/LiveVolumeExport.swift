// A volume's live data as a read-write NBD export named for the volume.

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

/// A volume's live data.
struct LiveVolumeExport: NBDExport {
    let volume: Volume
    let store: SnapshotStore

    var name: String { volume.name }
    var description: String { "Umbra volume \(volume.name)" }
    var size: UInt64 { volume.size.rawValue }
    var isReadOnly: Bool { false }
    var blockSize: NBDBlockSize { ExportNaming.blockSize(chunkSize: volume.chunkSize) }
    var supportsFastZero: Bool { true }
    var metaContexts: [String] {
        ExportNaming.dirtyBitmapContexts(
            ((try? store.snapshots(volume: volume.name)) ?? []).filter { $0.state == .ready }.map(\.id))
    }

    func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult {
        try await read(offset: offset, length: length, buffers: buffers, allowsFileSegments: true)
    }

    func read(
        offset: UInt64, length: UInt32, buffers: NBDBufferPool, allowsFileSegments: Bool
    ) async throws -> NBDReadResult {
        try await ExportError.wrapping {
            if allowsFileSegments, length >= ExportNaming.sendfileThreshold,
                let file = try volume.liveFileRange(at: ByteOffset(offset), count: ByteCount(UInt64(length)))
            {
                return .file(
                    NBDFileSegment(descriptor: file.descriptor, offset: offset, length: length, release: file.release))
            }
            // Handed over, not copied: a second reference to the pooled storage would make the
            // fill copy it first.
            let target = ReadTarget(length: length, buffers: buffers)
            return .data(try await volume.read(at: ByteOffset(offset), into: consume target).filled())
        }
    }

    func write(offset: UInt64, data: NBDWritePayload, fua: Bool) async throws {
        try await ExportError.wrapping {
            let buffers = data.buffers
            if buffers.count == 1 {
                // Not through `gathering`: that would allocate an array of one for every write.
                try await volume.write(at: ByteOffset(offset), PayloadBytes(buffer: buffers[0]), fua: fua)
            } else {
                try await volume.write(at: ByteOffset(offset), gathering: buffers.map(PayloadBytes.init), fua: fua)
            }
        }
    }

    func flush() async throws {
        try await ExportError.wrapping { try await volume.flush() }
    }

    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws {
        try await ExportError.wrapping {
            try await volume.discard(at: ByteOffset(offset), count: ByteCount(UInt64(length)), fua: fua)
        }
    }

    func writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fast: Bool, fua: Bool) async throws {
        try await ExportError.wrapping {
            try await volume.writeZeroes(
                at: ByteOffset(offset), count: ByteCount(UInt64(length)), mayDiscard: mayTrim, fast: fast, fua: fua)
        }
    }

    func cache(offset: UInt64, length: UInt32) async throws {}

    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws -> [NBDExtent] {
        try await ExportError.wrapping {
            if let id = ExportNaming.snapshotID(fromContext: context) {
                let since = try store.snapshot(id: id)
                let changed = try since.changes(
                    within: ByteRange(offset: ByteOffset(offset), count: ByteCount(UInt64(length))))
                return ExportNaming.dirtyExtents(changed, offset: offset, length: length)
            }
            return ExportNaming.allocationExtents(
                try await volume.allocation(at: ByteOffset(offset), count: ByteCount(UInt64(length))))
        }
    }
}
