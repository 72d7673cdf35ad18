// What a store answers with: plain values describing volumes, snapshots, sets, changed extents and
// allocation, copied out so a caller holds no reference into the store.

import BlockIO
import Logging

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

public struct VolumeInfo: Sendable, Equatable {
    public var name: String
    public var id: UUID
    public var size: ByteCount
    public var chunkSize: ByteCount
    public var backing: VolumeBacking
    public var diffLimit: ByteCount?
    public var policy: DiffStorePolicy
    public var snapshotCount: Int
    /// Bytes the diff store holds for this volume's snapshots.
    public var diffBytes: ByteCount
    /// How copy-on-write copies this volume's chunks.
    public var copyMethod: CopyMethod
}

/// How copy-on-write puts a chunk's old contents into the diff store.
public enum CopyMethod: String, Sendable, Equatable {
    /// The diff store shares the live data's blocks (FICLONERANGE, on XFS with reflink or Btrfs): the
    /// copy is metadata, and the live write that follows gets new blocks from the file system.
    case reflink
    /// The chunk is read and written to the diff store.
    case write
}

public struct SnapshotInfo: Sendable, Equatable {
    public enum State: Sendable, Equatable {
        case ready
        case failed(reason: String)
    }

    public var id: UUID
    public var setID: UUID
    public var volume: String
    public var createdAt: Date
    /// Bytes of diff store this snapshot's own copies take.
    public var diffBytes: ByteCount
    public var state: State
    /// Its set was taken with `commitPending()` and not yet kept: opening the store after a crash or
    /// close rolls it back.
    public var isPending = false
    /// What its set was taken for (`backup`), if that was recorded.
    public var purpose: String?
    /// The NBD export name: `VOLUME@GUID`.
    public var exportName: String { "\(volume)@\(id.guidString)" }
}

public struct SnapshotSetInfo: Sendable, Equatable {
    public var id: UUID
    public var createdAt: Date
    public var snapshots: [SnapshotInfo]
}

/// The byte ranges that may differ between two points of a volume's history.
public struct ChangedExtents: Sendable, Equatable {
    public var chunkSize: ByteCount
    /// Sorted, merged, clipped to the volume.
    public var extents: [ByteRange]
}

/// Whether a range of a volume or snapshot holds data or is a hole that reads as zeros.
public struct AllocationExtent: Sendable, Equatable {
    public var range: ByteRange
    public var isHole: Bool
}
