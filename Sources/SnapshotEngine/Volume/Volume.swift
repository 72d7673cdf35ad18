// A volume: its live data, its diff store and its snapshot chain. Its parts, by what they do:
// the write path (Volume+WritePath.swift), copy-on-write (Volume+CopyOnWrite.swift), snapshot reads
// and change tracking (Volume+SnapshotReads.swift), and freeing diff space (Volume+SpaceReclaim.swift).
// This file holds the type, its checks, and the live volume's own I/O.

import BlockIO
import CoreMetrics
import Logging
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

public final class Volume: Sendable {
    /// The most bytes one copy-on-write batch reads and writes at once.
    static let maximumCopyBytes = 32 << 20

    public let name: String
    public let guid: UUID
    public let size: ByteCount
    public let chunkSize: ByteCount
    public let backing: VolumeBacking
    /// The diff store's limit; nil for none (it can change: `SnapshotStore.limitDiffStore`).
    public var diffLimit: ByteCount? { metadata.withLock { $0.diffLimit }.map { ByteCount($0) } }
    let id: VolumeID
    let chunkShift: UInt64
    let live: any BlockStorage
    let diff: any BlockStorage
    let context: StoreContext
    let gate = WriteGate()
    let metadata: Mutex<VolumeMetadata>
    /// Buffers for copy-on-write, reused: a fresh megabyte per write costs a page fault per page.
    let copyBuffers = AlignedBufferPool()
    /// Set once the volume is deleted: every later request is refused.
    let removed = Atomic<Bool>(false)
    /// Set while the live data is reverted to a snapshot (SnapshotStore+Revert.swift), and after an
    /// interrupted revert until one succeeds: live I/O is refused (ESHUTDOWN) meanwhile.
    let reverting = Atomic<Bool>(false)
    /// Set while copies fail with ENOSPC, so that is logged once rather than per write.
    let outOfSpace = Atomic<Bool>(false)
    /// Every sync of the live data goes through this latch (flushes, sets, the catalog's syncs before
    /// a set's record). Once one fails, what was written since the last good sync may never reach
    /// the disk and no later sync can vouch for it (the kernel drops the failed pages from
    /// writeback): every later sync fails too, writes and flushes are refused, reads go on, and
    /// reopening the store shows what is really there.
    let liveSync: StorageSync
    /// The same for the diff store (its syncs come before the records of copies).
    let diffSync: StorageSync
    /// The end of the diff store's space allocated ahead for new slots (see `reserveSpace`): every
    /// slot from the high-water mark at open up to here has its space, unless it was freed since
    /// (a freed slot comes back from the free list and is allocated again one by one).
    let diffReservedEnd: Atomic<UInt64>
    /// Writes answered before their copies are durable (HeldWrites.swift).
    let heldWrites = HeldWrites()
    /// Chunks preserved, and the bytes of those written to the diff store (all-zero chunks are
    /// recorded without any), through swift-metrics: the application chooses the backend.
    let copiesMade: Counter
    let bytesCopied: Counter
    /// The bytes of copies made by sharing blocks with the live data instead (`CopyMethod.reflink`).
    let bytesCloned: Counter
    /// Whether copies share blocks with the live data (see `copyMethod`); cleared for good if the file
    /// system stops allowing it.
    let clonesCopies: Atomic<Bool>

    init(
        definition: VolumeDefinition, metadata: VolumeMetadata, live: any BlockStorage, diff: any BlockStorage,
        context: StoreContext
    ) {
        self.name = definition.name
        self.guid = definition.guid
        self.size = ByteCount(definition.size)
        self.chunkSize = ByteCount(UInt64(1) << definition.chunkShift)
        self.backing = definition.backing
        self.id = definition.id
        self.chunkShift = UInt64(definition.chunkShift)
        self.live = live
        self.diff = diff
        let retrying = context.configuration.brokenOrderingForTesting == .retryFailedSync
        self.liveSync = StorageSync(live, retryingForTesting: retrying)
        self.diffSync = StorageSync(diff, retryingForTesting: retrying)
        self.context = context
        self.metadata = Mutex(metadata)
        self.diffReservedEnd = Atomic(metadata.slots.highWater << UInt64(definition.chunkShift))
        self.copiesMade = Counter(label: "umbra_cow_copies_total", dimensions: [("volume", definition.name)])
        self.bytesCopied = Counter(label: "umbra_cow_copied_bytes_total", dimensions: [("volume", definition.name)])
        self.bytesCloned = Counter(label: "umbra_cow_cloned_bytes_total", dimensions: [("volume", definition.name)])
        // One ioctl that clones nothing: whether the diff store and the live data share a file
        // system whose files can share blocks.
        self.clonesCopies = Atomic(context.configuration.clonesCopies && diff.canClone(from: live))
    }

    var chunkBytes: Int { Int(chunkSize.rawValue) }

    /// How copy-on-write copies a chunk into the diff store.
    public var copyMethod: CopyMethod { clonesCopies.load(ordering: .relaxed) ? .reflink : .write }

    // MARK: - Checks

    /// `whileClosing`: a write already answered goes on while the store closes (closing waits for it).
    func checkUsable(whileClosing: Bool = false) throws(EngineError) {
        if !whileClosing && context.closed.load(ordering: .relaxed) { throw .closed }
        if removed.load(ordering: .relaxed) { throw .volumeNotFound(name) }
    }

    /// Refuses live I/O while a revert runs or waits to be run again.
    func checkNotReverting() throws(EngineError) {
        if reverting.load(ordering: .acquiring) { throw .volumeReverting(name) }
    }

    /// Whether the live volume is offline for a revert (in progress, or interrupted and to be run again).
    public var isReverting: Bool { reverting.load(ordering: .acquiring) }

    /// Refuses changes once the live data's durability is unknown (see `liveSync`), or once a write
    /// answered early was lost (see `heldWrites`).
    func checkWritable() throws(EngineError) {
        if let failure = liveSync.failure { throw .storageFailed(failure) }
        if let failure = heldWrites.failure { throw failure }
    }

    func checkRange(_ offset: ByteOffset, _ count: ByteCount) throws(EngineError) {
        let (end, overflow) = offset.rawValue.addingReportingOverflow(count.rawValue)
        if overflow || end > size.rawValue {
            throw .outOfRange(offset: offset.rawValue, count: count.rawValue, size: size.rawValue)
        }
    }

    /// The chunks that bytes `offset ..< offset + count` touch (count > 0).
    func chunks(_ offset: ByteOffset, _ count: ByteCount) -> Range<UInt64> {
        (offset.rawValue >> chunkShift)..<((offset.rawValue + count.rawValue - 1) >> chunkShift + 1)
    }

    // MARK: - Live I/O

    /// Reads `buffer.count` bytes of the live volume at `offset` into `buffer`, and gives it back.
    public func read<Buffer: IOBuffer>(at offset: ByteOffset, into buffer: consuming Buffer) async throws -> Buffer {
        try checkUsable()
        try checkNotReverting()
        try checkRange(offset, ByteCount(buffer.count))
        guard buffer.count > 0 else { return buffer }
        try await heldWrites.wait(for: offset.rawValue..<(offset.rawValue + UInt64(buffer.count)))
        let live = self.live
        if context.configuration.readsCachedDataInline,
            (try? buffer.withUnsafeMutableBytes { try live.readIfCached(fromAbsoluteOffset: offset, into: $0) }) == true
        {
            return buffer
        }
        let target = IOBufferHandoff(consume buffer)
        do {
            try await context.io.run {
                try target.withUnsafeMutableBytes { try live.read(fromAbsoluteOffset: offset, into: $0) }
            }
        } catch {
            throw EngineError.wrap(error)
        }
        return target.take()
    }

    /// Writes `bytes` to the live volume at `offset`, preserving what the newest snapshot still needs
    /// first. With `fua`, the data is durable when this returns. Without it the write may return
    /// before its copy-on-write is done (reads and writes of its bytes wait for it; `flush` waits
    /// for it and fails if it was lost), so `bytes` may be kept until then.
    public func write<Bytes: IOBytes>(at offset: ByteOffset, _ bytes: Bytes, fua: Bool = false) async throws {
        let live = self.live
        try await writeLive(at: offset, count: bytes.count, fua: fua) { durably in
            try bytes.withUnsafeBytes {
                if durably {
                    try live.writeDurably(toAbsoluteOffset: offset, gathering: [$0])
                } else {
                    try live.write(toAbsoluteOffset: offset, $0)
                }
            }
        }
    }

    /// Writes `pieces`, back to back, to the live volume at `offset` (one vectored write), like
    /// `write(at:_:fua:)`.
    public func write<Bytes: IOBytes>(at offset: ByteOffset, gathering pieces: [Bytes], fua: Bool = false)
        async throws
    {
        // Most writes arrive in one buffer: no arrays of pieces or pointers for them.
        if pieces.count == 1 { return try await write(at: offset, pieces[0], fua: fua) }
        let live = self.live
        try await writeLive(at: offset, count: pieces.reduce(0) { $0 + $1.count }, fua: fua) { durably in
            try withUnsafeBytes(of: pieces) {
                if durably {
                    try live.writeDurably(toAbsoluteOffset: offset, gathering: $0)
                } else {
                    try live.write(toAbsoluteOffset: offset, gathering: $0)
                }
            }
        }
    }

    /// The checks, the write path and FUA around `apply`, which writes `count` bytes at `offset`;
    /// `apply(true)` must make them durable itself. A FUA write does that where the storage can
    /// (`BlockStorage.writesDurably`: only its bytes are synced); otherwise it syncs the live data
    /// after.
    private func writeLive(
        at offset: ByteOffset, count: Int, fua: Bool, _ apply: @escaping @Sendable (_ durably: Bool) throws -> Void
    ) async throws {
        try checkRange(offset, ByteCount(count))
        guard count > 0 else { return }
        let durably = fua && live.writesDurably
        // A durable write waits for the disk: never on the caller's thread (an event loop).
        try await mutate(offset, ByteCount(count), mayAnswerEarly: !fua, mayRunInline: !durably) {
            try apply(durably)
        }
        if fua && !durably { try await synchronizeForFUA() }
    }

    /// Where bytes of the live volume sit in its backing file, for sending them straight from the
    /// file: the descriptor, and `releasing`, which keeps the volume (and so the descriptor) alive
    /// until it is called. Nil when the storage has no descriptor. The bytes may change under a
    /// concurrent write, as with any read racing a write.
    public func liveFileRange(at offset: ByteOffset, count: ByteCount) throws -> (
        descriptor: Int32, release: @Sendable () -> Void
    )? {
        try checkUsable()
        try checkNotReverting()
        try checkRange(offset, count)
        // Bytes a held write will change are read through `read`, which waits for it.
        guard let descriptor = live.fileDescriptor,
            !heldWrites.overlaps(offset.rawValue..<(offset.rawValue + count.rawValue))
        else { return nil }
        return (descriptor, { withExtendedLifetime(self) {} })
    }

    /// Makes every completed write to the live volume durable.
    public func flush() async throws {
        try checkUsable()
        try checkNotReverting()
        if context.configuration.brokenOrderingForTesting != .flushIgnoresHeldWrites {
            try await heldWrites.wait(for: nil)
        }
        try checkWritable()
        // A store whose catalog failed is read-only: its syncs may have dropped this volume's pages too.
        if let failure = context.catalog.failure { throw failure }
        try await synchronizeLive()
    }

    /// Makes a FUA write durable once it is done, where the storage cannot write durably by itself
    /// (`BlockStorage.writesDurably`), and a FUA trim or zero: its copies were made durable before it
    /// (it is never answered early), so one sync of the live data covers it. Unlike `flush`, it does not wait for
    /// writes answered early to other bytes (those it overlaps, it waited for before it started):
    /// FUA covers its own write, and FLUSH everything completed.
    func synchronizeForFUA() async throws {
        try checkUsable()
        try checkNotReverting()
        try checkWritable()
        if let failure = context.catalog.failure { throw failure }
        if context.configuration.brokenOrderingForTesting == .fuaWithoutSync { return }
        try await synchronizeLive()
    }

    /// Syncs the live data through its latch; the first failure is logged.
    func synchronizeLive() async throws {
        let liveSync = self.liveSync
        do {
            try await context.io.run { try liveSync.synchronize() }
        } catch let error as BlockIOError {
            if liveSync.claimsFailureReport() {
                context.logger.error(
                    "syncing the live volume failed: writes since the last good sync may be lost; the volume refuses writes and flushes until the data directory is reopened",
                    metadata: ["volume": "\(name)", "error": "\(error)"])
            }
            throw EngineError.storageFailed(error)
        } catch {
            throw EngineError.wrap(error)
        }
    }

    /// Discards (trims) a range: it reads as zeros afterwards and its space is given back where the
    /// storage can. Counts as a change for snapshots and change tracking.
    public func discard(at offset: ByteOffset, count: ByteCount, fua: Bool = false) async throws {
        try await writeZeroes(at: offset, count: count, mayDiscard: true, fua: fua)
    }

    /// Makes a range read as zeros; with `mayDiscard` its space may be given back too. With `fast`,
    /// fails with `cannotZeroQuickly` (ENOTSUP) where that would mean writing the zeros.
    public func writeZeroes(
        at offset: ByteOffset, count: ByteCount, mayDiscard: Bool = true, fast: Bool = false, fua: Bool = false
    ) async throws {
        try checkRange(offset, count)
        guard count.rawValue > 0 else { return }
        let live = self.live
        // Known not to zero quickly: say so before any copy-on-write is done for nothing.
        if fast && !live.mayZeroQuickly(mayDiscard: mayDiscard) { throw EngineError.cannotZeroQuickly }
        try await mutate(offset, count) {
            if fast {
                guard try live.zeroQuickly(at: offset, count: count, mayDiscard: mayDiscard) else {
                    throw EngineError.cannotZeroQuickly
                }
            } else if mayDiscard {
                try live.discard(at: offset, count: count)
            } else {
                try live.writeZeroes(at: offset, count: count)
            }
        }
        if fua { try await synchronizeForFUA() }
    }

    /// Which parts of a range of the live volume hold data and which are holes.
    public func allocation(at offset: ByteOffset, count: ByteCount) async throws -> [AllocationExtent] {
        try checkUsable()
        try checkNotReverting()
        try checkRange(offset, count)
        let live = self.live
        do {
            return try await context.io.run { try Self.allocation(of: live, from: offset, count: count) }
        } catch {
            throw EngineError.wrap(error)
        }
    }

    static func allocation(of storage: any BlockStorage, from offset: ByteOffset, count: ByteCount) throws
        -> [AllocationExtent]
    {
        var extents: [AllocationExtent] = []
        var position = offset.rawValue
        let end = offset.rawValue + count.rawValue
        while position < end {
            let data = try storage.nextData(from: ByteOffset(position))?.rawValue ?? end
            if data > position {
                let holeEnd = min(data, end)
                extents.append(
                    AllocationExtent(
                        range: ByteRange(offset: ByteOffset(position), count: ByteCount(holeEnd - position)),
                        isHole: true))
                position = holeEnd
                continue
            }
            let hole = min(max(try storage.nextHole(from: ByteOffset(position)).rawValue, position + 1), end)
            extents.append(
                AllocationExtent(
                    range: ByteRange(offset: ByteOffset(position), count: ByteCount(hole - position)), isHole: false))
            position = hole
        }
        return extents
    }
}

/// A file's syncs, serialized and latched: once one fails, every later one fails with the same error
/// (see `Volume.liveSync`).
final class StorageSync: Sendable {
    let storage: any BlockStorage
    private let retryingForTesting: Bool
    /// Held across the fdatasync itself.
    private let syncing = Mutex<Void>(())
    /// The failure, readable at any time without waiting for a sync under way (every write checks it).
    private let latched = Mutex<BlockIOError?>(nil)
    /// Set with `latched`, so the write path's check costs one atomic load.
    private let failed = Atomic<Bool>(false)
    private let reported = Atomic<Bool>(false)

    init(_ storage: any BlockStorage, retryingForTesting: Bool) {
        self.storage = storage
        self.retryingForTesting = retryingForTesting
    }

    var failure: BlockIOError? { failed.load(ordering: .acquiring) ? latched.withLock { $0 } : nil }

    /// One sync at a time: Linux reports a writeback error to only one of two overlapping
    /// fdatasyncs of a descriptor, so an overlapping one could succeed over dropped pages.
    /// Serialized, the second starts after the first has latched the failure, and fails too.
    func synchronize() throws(BlockIOError) {
        try syncing.withLock { (_: inout Void) throws(BlockIOError) in
            if let failure { throw failure }
            do throws(BlockIOError) {
                try storage.synchronize(retryingForTesting: retryingForTesting)
            } catch {
                latched.withLock { $0 = $0 ?? error }
                failed.store(true, ordering: .releasing)
                throw error
            }
        }
    }

    /// True once, for the first caller to report the failure.
    func claimsFailureReport() -> Bool {
        !reported.exchange(true, ordering: .relaxed)
    }
}
