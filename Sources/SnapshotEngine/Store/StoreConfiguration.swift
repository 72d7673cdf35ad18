// How a store runs (limits, clocks, executors, the diff-store policy) and the durable changes it
// reports to an observer.

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
    /// Live writes of at least this many bytes go to the I/O executor even with
    /// `writesLiveDataInline`: while one copies a big payload into the page cache, the caller's
    /// thread goes on receiving the next, so one connection's big writes use two cores. Measured on
    /// 1 MiB writes at queue depth 8 (docs/performance.md): one connection gains, two lose (both
    /// cores are busy already) but stay ahead of nbdkit.
    public var inlineLiveWriteLimit: ByteCount = .kibibytes(256)
    /// The most memory per volume that writes answered before their copy-on-write is durable may
    /// keep until their live write (their payloads and the buffers for their copies; see
    /// `Volume.write`). Zero answers every write only once its copy is durable and its data written.
    public var heldWriteBytes: ByteCount = .mebibytes(64)
    /// Copy-on-write clones chunks into the diff store where the file system lets the two files share
    /// blocks (`CopyMethod.reflink`); false writes every copy.
    public var clonesCopies = true
    /// Only runs of consecutive chunks at least this long are cloned; shorter ones are written. A clone
    /// has a fixed cost (XFS locks both files, flushes the range and logs the remap) and leaves the rest
    /// of a partly overwritten chunk shared, so every later write there copies again. Measured on XFS
    /// with reflink (docs/performance.md): 1 MiB sequential first writes 4.4x faster cloned, one 4 KiB
    /// write per 64 KiB chunk 2.8x slower.
    public var minimumCloneBytes: ByteCount = .kibibytes(256)
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
    /// Tests only: break one durability ordering on purpose, to show the crash simulation notices.
    var brokenOrderingForTesting: BrokenOrdering?

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
    /// The live volume went offline for a revert (its exports should end their connections), and
    /// came back once the revert was done.
    case volumeReverting(name: String)
    case volumeReverted(name: String)
}

/// The orderings the engine's durability rests on, each of which a test can break (ARCHITECTURE.md,
/// "Durability ordering"): the crash simulation must catch every one.
enum BrokenOrdering: Sendable {
    /// The live write lands before the record of the copy it overwrites is durable.
    case liveWriteBeforeCopyCommit
    /// The copy's record is made durable without syncing the diff store holding its data first.
    case noDiffStoreSync
    /// The same, only for copies that were all clones (written copies are still synced first).
    case noDiffStoreSyncForClones
    /// A failed fdatasync is retried, and the retry's success taken to cover what the failed one was
    /// writing (after a failed sync Linux drops those pages from the way to the disk, so it does not).
    case retryFailedSync
    /// A flush does not wait for writes answered before their copy-on-write was done (HeldWrites).
    case flushIgnoresHeldWrites
    /// A FUA write is answered without syncing the live data.
    case fuaWithoutSync
    /// A revert writes the live data before its start is recorded.
    case revertWritesBeforeRecord
    /// A revert records that it finished before its writes are durable.
    case revertFinishedBeforeSync
}
