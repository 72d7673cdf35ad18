// A snapshot as readers see it: its reads, allocation and changes, and the array-returning
// conveniences of the live volume and of snapshots.

import BlockIO

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A read-only view of one snapshot.
public final class SnapshotView: Sendable {
    public let id: UUID
    public let setID: UUID
    public let createdAt: Date
    let volume: Volume
    let sequence: SnapshotSequence

    init(volume: Volume, id: UUID, setID: UUID, sequence: SnapshotSequence, createdAt: Date) {
        self.volume = volume
        self.id = id
        self.setID = setID
        self.sequence = sequence
        self.createdAt = createdAt
    }

    public var volumeName: String { volume.name }
    public var size: ByteCount { volume.size }
    public var chunkSize: ByteCount { volume.chunkSize }
    /// The NBD export name: `VOLUME@GUID`.
    public var exportName: String { "\(volume.name)@\(id.guidString)" }

    /// Reads `buffer.count` bytes of the snapshot, as the volume was when it was taken, into
    /// `buffer`, and gives it back.
    public func read<Buffer: IOBuffer>(at offset: ByteOffset, into buffer: consuming Buffer) async throws -> Buffer {
        try await volume.readSnapshot(sequence, id: id, at: offset, into: consume buffer)
    }

    /// Which parts of a range hold data and which are holes.
    public func allocation(at offset: ByteOffset, count: ByteCount) async throws -> [AllocationExtent] {
        try await volume.snapshotAllocation(sequence, id: id, at: offset, count: count)
    }

    /// The byte ranges that may have changed since this snapshot: on the live volume (`until` nil), or
    /// in a newer snapshot of the same volume; limited to `within` if given.
    public func changes(until newer: SnapshotView? = nil, within range: ByteRange? = nil) throws -> [ByteRange] {
        if let newer {
            guard newer.volume === volume, newer.sequence > sequence else {
                throw EngineError.snapshotOrder(
                    "snapshot \(newer.id.guidString) is not a newer snapshot of the same volume")
            }
        }
        return volume.changes(since: sequence, until: newer?.sequence, within: range)
    }

    /// Whether the snapshot is still readable.
    public var isReadable: Bool {
        volume.metadata.withLock { metadata in
            metadata.position(of: sequence).map { !metadata.chain[$0].deleting } ?? false
        }
    }
}

extension Volume {
    /// Reads `count` bytes of the live volume into a new array.
    public func read(at offset: ByteOffset, count: Int) async throws -> [UInt8] {
        try await read(at: offset, into: [UInt8](repeating: 0, count: count))
    }
}

extension SnapshotView {
    /// Reads `count` bytes of the snapshot into a new array.
    public func read(at offset: ByteOffset, count: Int) async throws -> [UInt8] {
        try await read(at: offset, into: [UInt8](repeating: 0, count: count))
    }
}
