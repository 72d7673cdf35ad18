import BlockIO
import Logging

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// How a `SnapshotStore` runs. The defaults suit a daemon; tests inject clocks, identifiers and an
/// inline executor to make runs deterministic.
public struct StoreConfiguration: Sendable {
    /// Where blocking storage calls run. Nil: the store starts its own `IOThreadPool` of
    /// `ioThreadCount` threads and stops it on close.
    public var ioExecutor: (any IOExecutor)?
    public var ioThreadCount = 16
    /// The longest writes may be held while a snapshot set is prepared (VSS allows 10 s). Past it the
    /// set is aborted and the writes go on.
    public var holdLimit: Duration = .seconds(10)
    /// The clock the hold limit is measured on.
    public var clock: any Clock<Duration> = ContinuousClock()
    /// The wall clock that stamps snapshot sets.
    public var wallClock: @Sendable () -> Date = { Date() }
    /// Makes the GUIDs of sets and snapshots.
    public var makeIdentifier: @Sendable () -> UUID = { UUID() }
    /// Where the store's own background tasks (the hold watchdog) run; nil for the default executor.
    public var taskExecutor: (any TaskExecutor)?
    /// Serve reads of the live volume that the page cache already holds on the caller's thread
    /// (preadv2 with RWF_NOWAIT) instead of hopping to the I/O executor.
    public var readsCachedDataInline = true
    /// Write to the live volume on the caller's thread once the copy-on-write (if any) is done,
    /// instead of hopping to the I/O executor: a buffered write usually only copies into the page
    /// cache, and the hop there and back costs more than the write. It can block when the kernel
    /// throttles dirty memory, so callers that must never block (an event loop) decide.
    public var writesLiveDataInline = false
    /// The most snapshots one volume may have.
    public var maximumSnapshotsPerVolume = 2048
    /// Compact the catalog when this many bytes were appended since it was last written whole, and
    /// they are more than four times what a compacted catalog would take.
    public var catalogCompactionThreshold: ByteCount = .mebibytes(64)
    public var logger = Logger(label: "umbra.engine")
    /// Told of every change to the store's volumes and snapshots once it is durable, including those
    /// the diff-store policy makes on its own. Called synchronously: keep it short.
    public var eventHandler: (@Sendable (StoreEvent) -> Void)?
    /// Tests only: leave pending sets alone at open, to show the crash simulation notices.
    var skipsRollbackForTesting = false

    public init() {}
}

/// A durable change to what a store holds.
public enum StoreEvent: Sendable, Equatable {
    case volumeCreated(name: String)
    case volumeDeleted(name: String)
    case snapshotSetCreated(SnapshotSetInfo)
    /// Deleted by request, or by a full diff store's `deleteOldest` policy.
    case snapshotsDeleted(ids: [UUID])
    /// Failed by a full diff store's `failSnapshot` policy; still listed, no longer readable.
    case snapshotFailed(id: UUID, reason: String)
}

/// What a new volume looks like.
public struct VolumeSpec: Sendable {
    /// The smallest and largest chunk sizes; the default is chosen by benchmark (README).
    public static let minimumChunkSize = ByteCount.kibibytes(4)
    public static let maximumChunkSize = ByteCount.mebibytes(1)
    public static let defaultChunkSize = ByteCount.kibibytes(64)
    /// Volumes are sized in whole 4 KiB blocks.
    public static let sizeGranularity: UInt64 = 4096
    /// 2^56 bytes (64 PiB): offsets stay far from overflow and chunk indexes fit comfortably.
    public static let maximumSize = ByteCount(UInt64(1) << 56)

    public var name: String
    /// Required for owned volumes; for external ones nil means the whole file or device.
    public var size: ByteCount?
    public var chunkSize: ByteCount
    public var backing: VolumeBacking
    /// The most the diff store may hold; nil for no limit.
    public var diffLimit: ByteCount?
    public var policy: DiffStorePolicy

    public init(
        name: String, size: ByteCount?, chunkSize: ByteCount = VolumeSpec.defaultChunkSize,
        backing: VolumeBacking = .owned, diffLimit: ByteCount? = nil, policy: DiffStorePolicy = .deleteOldest
    ) {
        self.name = name
        self.size = size
        self.chunkSize = chunkSize
        self.backing = backing
        self.diffLimit = diffLimit
        self.policy = policy
    }

    /// Whether `name` may name a volume: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`
    /// (so it is safe in paths and export names, and `@` stays free to separate snapshot GUIDs).
    public static func isValidName(_ name: String) -> Bool {
        guard (1...64).contains(name.utf8.count), let first = name.utf8.first, first != UInt8(ascii: "."),
            first != UInt8(ascii: "-")
        else { return false }
        return name.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
        }
    }
}

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
