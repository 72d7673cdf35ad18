// A volume: its live data, its diff store, its snapshot chain, and the write path that keeps every
// snapshot exact.
//
// The write path (ARCHITECTURE.md, "The engine"): a write passes the volume's gate, then for every
// chunk it touches asks whether the *newest* snapshot holds a copy; the chunks that lack one are
// claimed (so a second writer of the same chunk waits rather than copying again), their old contents
// read from the live data, written to diff slots, and recorded in the catalog; the catalog append
// syncs the diff store first and then itself, group-committed with every other writer's copies. Only
// then does the new data go to the live volume. Holding the gate shared means the chain cannot change
// underneath: creating, deleting and failing snapshots all take it exclusively.
//
// A snapshot read resolves each chunk to a diff slot, zeros, or the live data. A chunk read from the
// live data could be overwritten by a copy-on-write in the middle of the read, so after reading, the
// chunks that came from the live data are resolved again: a copy-on-write records its copy before it
// writes the live data, so any chunk whose live bytes changed now resolves to the copy, and is read
// again from there.

import BlockIO
import Logging
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Shared by a store and its volumes.
final class StoreContext: Sendable {
    let catalog: CatalogLog
    let io: any IOExecutor
    let configuration: StoreConfiguration
    let closed = Atomic<Bool>(false)

    var logger: Logger { configuration.logger }

    init(catalog: CatalogLog, io: any IOExecutor, configuration: StoreConfiguration) {
        self.catalog = catalog
        self.io = io
        self.configuration = configuration
    }
}

public final class Volume: Sendable {
    /// The most bytes one copy-on-write batch reads and writes at once.
    static let maximumCopyBytes = 32 << 20

    public let name: String
    public let guid: UUID
    public let size: ByteCount
    public let chunkSize: ByteCount
    public let backing: VolumeBacking
    public let diffLimit: ByteCount?
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

    init(
        definition: VolumeDefinition, metadata: VolumeMetadata, live: any BlockStorage, diff: any BlockStorage,
        context: StoreContext
    ) {
        self.name = definition.name
        self.guid = definition.guid
        self.size = ByteCount(definition.size)
        self.chunkSize = ByteCount(UInt64(1) << definition.chunkShift)
        self.backing = definition.backing
        self.diffLimit = definition.diffLimit == 0 ? nil : ByteCount(definition.diffLimit)
        self.id = definition.id
        self.chunkShift = UInt64(definition.chunkShift)
        self.live = live
        self.diff = diff
        self.context = context
        self.metadata = Mutex(metadata)
    }

    var chunkBytes: Int { Int(chunkSize.rawValue) }

    // MARK: - Checks

    func checkUsable() throws(EngineError) {
        if context.closed.load(ordering: .relaxed) { throw .closed }
        if removed.load(ordering: .relaxed) { throw .volumeNotFound(name) }
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
        try checkRange(offset, ByteCount(buffer.count))
        guard buffer.count > 0 else { return buffer }
        let live = self.live
        if context.configuration.readsCachedDataInline,
            (try? buffer.withUnsafeMutableBytes { try live.readIfCached(fromAbsoluteOffset: offset, into: $0) }) == true
        {
            return buffer
        }
        let target = IOBufferHandoff(buffer)
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
    /// first. With `fua`, the data is durable when this returns.
    public func write<Bytes: IOBytes>(at offset: ByteOffset, _ bytes: Bytes, fua: Bool = false) async throws {
        try await write(at: offset, gathering: [bytes], fua: fua)
    }

    /// Writes `pieces`, back to back, to the live volume at `offset` (one vectored write), like
    /// `write(at:_:fua:)`.
    public func write<Bytes: IOBytes>(at offset: ByteOffset, gathering pieces: [Bytes], fua: Bool = false)
        async throws
    {
        let count = pieces.reduce(0) { $0 + $1.count }
        try checkRange(offset, ByteCount(count))
        guard count > 0 else { return }
        let live = self.live
        try await mutate(offset, ByteCount(count)) {
            try withUnsafeBytes(of: pieces) { try live.write(toAbsoluteOffset: offset, gathering: $0) }
        }
        if fua { try await flush() }
    }

    /// Where bytes of the live volume sit in its backing file, for sending them straight from the
    /// file: the descriptor, and `releasing`, which keeps the volume (and so the descriptor) alive
    /// until it is called. Nil when the storage has no descriptor. The bytes may change under a
    /// concurrent write, as with any read racing a write.
    public func liveFileRange(at offset: ByteOffset, count: ByteCount) throws -> (
        descriptor: Int32, release: @Sendable () -> Void
    )? {
        try checkUsable()
        try checkRange(offset, count)
        guard let descriptor = live.fileDescriptor else { return nil }
        return (descriptor, { withExtendedLifetime(self) {} })
    }

    /// Makes every completed write to the live volume durable.
    public func flush() async throws {
        try checkUsable()
        let live = self.live
        do {
            try await context.io.run { try live.synchronize() }
        } catch {
            throw EngineError.wrap(error)
        }
    }

    /// Discards (trims) a range: it reads as zeros afterwards and its space is given back where the
    /// storage can. Counts as a change for snapshots and change tracking.
    public func discard(at offset: ByteOffset, count: ByteCount, fua: Bool = false) async throws {
        try await writeZeroes(at: offset, count: count, mayDiscard: true, fua: fua)
    }

    /// Makes a range read as zeros; with `mayDiscard` its space may be given back too.
    public func writeZeroes(at offset: ByteOffset, count: ByteCount, mayDiscard: Bool = true, fua: Bool = false)
        async throws
    {
        try checkRange(offset, count)
        guard count.rawValue > 0 else { return }
        let live = self.live
        try await mutate(offset, count) {
            if mayDiscard {
                try live.discard(at: offset, count: count)
            } else {
                try live.writeZeroes(at: offset, count: count)
            }
        }
        if fua { try await flush() }
    }

    /// Which parts of a range of the live volume hold data and which are holes.
    public func allocation(at offset: ByteOffset, count: ByteCount) async throws -> [AllocationExtent] {
        try checkUsable()
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

    // MARK: - The write path

    private enum CopyOutcome {
        case done
        /// Some chunk could not be preserved because the diff store is full.
        case needSpace
    }

    /// Runs `apply` (the change to the live data) once every chunk of the range is preserved for the
    /// newest snapshot.
    private func mutate(_ offset: ByteOffset, _ count: ByteCount, _ apply: @escaping @Sendable () throws -> Void)
        async throws
    {
        let touched = chunks(offset, count)
        while true {
            await gate.enter()
            let outcome: CopyOutcome
            do {
                try checkUsable()
                if let failure = context.catalog.failure { throw failure }
                outcome = try await preserve(touched)
            } catch {
                gate.leave()
                throw EngineError.wrap(error)
            }
            if outcome == .needSpace {
                gate.leave()
                try await reclaimSpace()
                continue
            }
            do {
                if context.configuration.writesLiveDataInline {
                    try apply()
                } else {
                    try await context.io.run(apply)
                }
            } catch {
                gate.leave()
                throw EngineError.wrap(error)
            }
            gate.leave()
            return
        }
    }

    private enum CopyPlan {
        case nothing
        case wait([UInt64])
        case copy(sequence: SnapshotSequence, chunks: [UInt64], slots: [DiffSlot], busy: [UInt64])
    }

    /// Makes sure the newest snapshot holds a copy of every chunk in `touched`.
    private func preserve(_ touched: Range<UInt64>) async throws -> CopyOutcome {
        let maximumChunks = max(1, Self.maximumCopyBytes / chunkBytes)
        while true {
            let plan = metadata.withLock { metadata -> CopyPlan in
                guard let newest = metadata.chain.last else { return .nothing }
                var claim: [UInt64] = []
                var busy: [UInt64] = []
                for chunk in touched where !metadata.index.hasCopy(of: chunk, heldBy: newest.sequence) {
                    if metadata.chunksInCopy[chunk] != nil {
                        busy.append(chunk)
                    } else if claim.count < maximumChunks {
                        claim.append(chunk)
                    }
                }
                guard !claim.isEmpty else { return busy.isEmpty ? .nothing : .wait(busy) }
                for chunk in claim { metadata.chunksInCopy[chunk] = [] }
                // Zero chunks need no slot, so a full store is only known to be a problem after reading.
                let slots = metadata.slots.reserve(upTo: claim.count)
                return .copy(sequence: newest.sequence, chunks: claim, slots: slots, busy: busy)
            }
            switch plan {
            case .nothing:
                return .done
            case .wait(let busy):
                for chunk in busy { await waitForCopy(of: chunk) }
            case .copy(let sequence, let chunks, let slots, let busy):
                if try await copy(chunks, into: slots, for: sequence) == .needSpace { return .needSpace }
                for chunk in busy { await waitForCopy(of: chunk) }
            }
        }
    }

    private func waitForCopy(of chunk: UInt64) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let finished = metadata.withLock { metadata -> Bool in
                guard metadata.chunksInCopy[chunk] != nil else { return true }
                metadata.chunksInCopy[chunk]!.append(continuation)
                return false
            }
            if finished { continuation.resume() }
        }
    }

    /// Preserves `chunks` (claimed, ascending) for the snapshot at `sequence`: reads their live
    /// contents, writes those that are not all zeros into `slots`, makes the records durable, and
    /// records the copies. Returns `.needSpace` if there were more non-zero chunks than slots (those
    /// are left unpreserved and unclaimed).
    private func copy(_ chunks: [UInt64], into slots: [DiffSlot], for sequence: SnapshotSequence) async throws
        -> CopyOutcome
    {
        let chunkBytes = self.chunkBytes
        let buffer = copyBuffers.take(count: chunks.count * chunkBytes)
        defer { copyBuffers.give(buffer) }
        var placed: [(chunk: UInt64, slot: DiffSlot, bufferIndex: Int)] = []
        var unplaced: [UInt64] = []
        do {
            let live = self.live
            let runs = Self.runs(of: chunks)
            let shift = chunkShift
            try await context.io.run {
                for run in runs {
                    try buffer.withUnsafeMutableBytes((run.index * chunkBytes)..<((run.index + run.count) * chunkBytes)) {
                        try live.read(fromAbsoluteOffset: ByteOffset(run.first << shift), into: $0)
                    }
                }
            }
            var freeSlots = slots[...]
            for (index, chunk) in chunks.enumerated() {
                if buffer.withUnsafeBytes((index * chunkBytes)..<((index + 1) * chunkBytes), Self.isAllZero) {
                    placed.append((chunk, .zero, index))
                } else if let slot = freeSlots.popFirst() {
                    placed.append((chunk, slot, index))
                } else {
                    unplaced.append(chunk)
                }
            }
            let dataCopies = placed.filter { !$0.slot.isZero }
            if !dataCopies.isEmpty {
                let diff = self.diff
                // Copies whose slots are consecutive go out as one vectored write.
                var groups: [(slot: UInt64, pieces: [Int])] = []
                for copy in dataCopies {
                    if let last = groups.last, last.slot + UInt64(last.pieces.count) == copy.slot.rawValue {
                        groups[groups.count - 1].pieces.append(copy.bufferIndex)
                    } else {
                        groups.append((copy.slot.rawValue, [copy.bufferIndex]))
                    }
                }
                let runs = groups
                try await context.io.run {
                    for run in runs {
                        // Consecutive pieces are consecutive in the buffer too, so one range covers them.
                        let first = run.pieces[0]
                        let last = run.pieces[run.pieces.count - 1]
                        if last - first + 1 == run.pieces.count {
                            try buffer.withUnsafeBytes((first * chunkBytes)..<((last + 1) * chunkBytes)) {
                                try diff.write(toAbsoluteOffset: ByteOffset(run.slot << shift), $0)
                            }
                        } else {
                            let pieces = run.pieces.map { ChunkOfBuffer(buffer: buffer, index: $0, chunkBytes: chunkBytes) }
                            try withUnsafeBytes(of: pieces) {
                                try diff.write(toAbsoluteOffset: ByteOffset(run.slot << shift), gathering: $0)
                            }
                        }
                    }
                }
            }
            if !placed.isEmpty {
                context.logger.trace(
                    "preserving chunks",
                    metadata: [
                        "volume": "\(name)", "snapshot.sequence": "\(sequence.rawValue)",
                        "copies":
                            "\(placed.map { "\($0.chunk)->\($0.slot.isZero ? "zero" : String($0.slot.rawValue))" })",
                        "unplaced": "\(unplaced)",
                    ])
                try await context.catalog.append(
                    Self.records(for: placed.map { ($0.chunk, $0.slot) }, volume: id, sequence: sequence),
                    syncingFirst: dataCopies.isEmpty ? [] : [diff])
            }
        } catch {
            let waiters = metadata.withLock { metadata -> [CheckedContinuation<Void, Never>] in
                metadata.slots.release(slots)
                return chunks.flatMap { metadata.chunksInCopy.removeValue(forKey: $0) ?? [] }
            }
            for waiter in waiters { waiter.resume() }
            throw error
        }
        let usedSlots = Set(placed.map(\.slot))
        let waiters = metadata.withLock { metadata -> [CheckedContinuation<Void, Never>] in
            let position = metadata.chain.count - 1
            assert(metadata.chain[position].sequence == sequence, "the chain changed under a writer holding the gate")
            for copy in placed { metadata.recordCopy(of: copy.chunk, in: copy.slot, snapshotAt: position) }
            metadata.slots.release(slots.filter { !usedSlots.contains($0) })
            return chunks.flatMap { metadata.chunksInCopy.removeValue(forKey: $0) ?? [] }
        }
        for waiter in waiters { waiter.resume() }
        return unplaced.isEmpty ? .done : .needSpace
    }

    /// Consecutive chunks grouped: (first chunk, count, index of the first in the list).
    static func runs(of chunks: [UInt64]) -> [(first: UInt64, count: Int, index: Int)] {
        var runs: [(first: UInt64, count: Int, index: Int)] = []
        for (index, chunk) in chunks.enumerated() {
            if let last = runs.last, last.first + UInt64(last.count) == chunk {
                runs[runs.count - 1].count += 1
            } else {
                runs.append((chunk, 1, index))
            }
        }
        return runs
    }

    /// Catalog records for copies, merging runs of consecutive chunks in consecutive slots (or zeros).
    static func records(for copies: [(chunk: UInt64, slot: DiffSlot)], volume: VolumeID, sequence: SnapshotSequence)
        -> [CatalogRecord]
    {
        var records: [CatalogRecord] = []
        var start = 0
        while start < copies.count {
            var end = start + 1
            while end < copies.count, copies[end].chunk == copies[end - 1].chunk + 1, end - start < Int(UInt32.max),
                copies[end].slot.isZero
                    ? copies[end - 1].slot.isZero
                    : (!copies[end - 1].slot.isZero && copies[end].slot.rawValue == copies[end - 1].slot.rawValue + 1)
            {
                end += 1
            }
            records.append(
                .preserved(
                    volume: volume, sequence: sequence, firstChunk: copies[start].chunk, count: UInt32(end - start),
                    firstSlot: copies[start].slot))
            start = end
        }
        return records
    }

    static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let words = bytes.count / 8
        let aligned = bytes.baseAddress.map { Int(bitPattern: $0) % 8 == 0 } ?? true
        if aligned && words > 0 {
            let wordBuffer = UnsafeBufferPointer(
                start: bytes.baseAddress!.assumingMemoryBound(to: UInt64.self), count: words)
            var accumulated: UInt64 = 0
            for word in wordBuffer { accumulated |= word }
            if accumulated != 0 { return false }
            return bytes[(words * 8)...].allSatisfy { $0 == 0 }
        }
        return bytes.allSatisfy { $0 == 0 }
    }

    // MARK: - Running out of diff space

    /// Frees diff space by the volume's policy: deletes the oldest snapshot, or fails the newest (the
    /// one that needs the space). Runs with the gate held, like any change to the chain.
    private func reclaimSpace() async throws {
        try await gate.acquireExclusive()
        defer { gate.releaseExclusive() }
        try checkUsable()
        let victim = metadata.withLock { metadata -> (SnapshotState, DiffStorePolicy)? in
            guard metadata.slots.availableCount == 0, !metadata.chain.isEmpty else { return nil }
            let position = metadata.policy == .deleteOldest ? 0 : metadata.chain.count - 1
            metadata.chain[position].deleting = true
            return (metadata.chain[position], metadata.policy)
        }
        guard let (snapshot, policy) = victim else { return }
        context.logger.trace(
            "reclaiming diff space",
            metadata: ["volume": "\(name)", "snapshot.sequence": "\(snapshot.sequence.rawValue)"])
        await waitForReaders(of: snapshot.sequence)
        let reference = SnapshotReference(volume: id, sequence: snapshot.sequence)
        let limit = diffLimit?.rawValue ?? 0
        let reason = "the diff store of volume '\(name)' reached its limit of \(limit) bytes"
        do {
            try await context.catalog.append(
                [policy == .deleteOldest ? .snapshotsDeleted([reference]) : .snapshotFailed(reference, reason: reason)])
        } catch {
            metadata.withLock { metadata in
                if let position = metadata.position(of: snapshot.sequence) { metadata.chain[position].deleting = false }
            }
            throw error
        }
        let freed = metadata.withLock { metadata -> [DiffSlot] in
            guard let position = metadata.position(of: snapshot.sequence) else { return [] }
            let freed = metadata.removeSnapshot(at: position)
            if policy == .failSnapshot {
                metadata.failed.append(FailedSnapshot(failing: snapshot, reason: reason))
            }
            return freed
        }
        await releaseSlots(freed)
        context.configuration.eventHandler?(
            policy == .deleteOldest
                ? .snapshotsDeleted(ids: [snapshot.id]) : .snapshotFailed(id: snapshot.id, reason: reason))
        context.logger.warning(
            "\(policy == .deleteOldest ? "deleted" : "failed") snapshot to free diff space",
            metadata: ["volume": "\(name)", "snapshot.id": "\(snapshot.id.guidString)", "diff.limit": "\(limit)"])
    }

    /// Gives freed slots' space back to the file system, then to the allocator. Call only once the
    /// deletion that freed them is durable, with the gate held (so no copy can be writing a slot).
    func releaseSlots(_ freed: [DiffSlot]) async {
        guard !freed.isEmpty else { return }
        context.logger.trace(
            "freeing diff slots", metadata: ["volume": "\(name)", "slots": "\(freed.map(\.rawValue))"])
        let diff = self.diff
        let shift = chunkShift
        let runs = Self.runs(of: freed.map(\.rawValue).sorted())
        do {
            try await context.io.run {
                for run in runs {
                    try diff.discard(at: ByteOffset(run.first << shift), count: ByteCount(UInt64(run.count) << shift))
                }
            }
        } catch {
            // The slots are free either way; only their space stays allocated until reused.
            context.logger.warning("could not give freed diff space back", metadata: ["error": "\(error)"])
        }
        metadata.withLock { $0.slots.release(freed) }
    }

    // MARK: - Snapshot reads

    /// Registers a read of the snapshot at `sequence`, refusing it if the snapshot is gone or going.
    func beginSnapshotRead(_ sequence: SnapshotSequence, id: UUID) throws(EngineError) {
        try checkUsable()
        try metadata.withLock { (metadata: inout VolumeMetadata) throws(EngineError) in
            guard let position = metadata.position(of: sequence), !metadata.chain[position].deleting else {
                if let failed = metadata.failed.first(where: { $0.sequence == sequence }) {
                    throw .snapshotFailed(id, reason: failed.reason)
                }
                throw .snapshotDeleted(id)
            }
            metadata.chain[position].readers += 1
        }
    }

    func endSnapshotRead(_ sequence: SnapshotSequence) {
        let drained = metadata.withLock { metadata -> CheckedContinuation<Void, Never>? in
            guard let position = metadata.position(of: sequence) else { return nil }
            metadata.chain[position].readers -= 1
            guard metadata.chain[position].readers == 0 else { return nil }
            defer { metadata.chain[position].readersDrained = nil }
            return metadata.chain[position].readersDrained
        }
        drained?.resume()
    }

    /// Waits until no read of the snapshot is in flight. The caller has set `deleting`.
    func waitForReaders(of sequence: SnapshotSequence) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let idle = metadata.withLock { metadata -> Bool in
                guard let position = metadata.position(of: sequence), metadata.chain[position].readers > 0 else {
                    return true
                }
                metadata.chain[position].readersDrained = continuation
                return false
            }
            if idle { continuation.resume() }
        }
    }

    /// Reads bytes of the snapshot at `sequence` (see the note atop this file) into `buffer`, and
    /// gives it back.
    func readSnapshot<Buffer: IOBuffer>(
        _ sequence: SnapshotSequence, id: UUID, at offset: ByteOffset, into buffer: consuming Buffer
    ) async throws -> Buffer {
        try checkRange(offset, ByteCount(buffer.count))
        guard buffer.count > 0 else { return buffer }
        try beginSnapshotRead(sequence, id: id)
        defer { endSnapshotRead(sequence) }
        let touched = chunks(offset, ByteCount(buffer.count))
        let sources = metadata.withLock { metadata in
            touched.map { ChunkSource(metadata.index.copy(of: $0, forSnapshotAt: sequence)) }
        }
        let plan = ReadPlan(
            offset: offset.rawValue, count: buffer.count, firstChunk: touched.lowerBound, chunkShift: chunkShift)
        let target = IOBufferHandoff(buffer)
        let live = self.live
        let diff = self.diff
        do {
            try await context.io.run {
                try target.withUnsafeMutableBytes {
                    try plan.execute(sources: sources, only: nil, live: live, diff: diff, into: $0)
                }
            }
            let moved = metadata.withLock { metadata -> [Int: ChunkSource] in
                var moved: [Int: ChunkSource] = [:]
                for (position, source) in sources.enumerated() where source == .live {
                    let now = ChunkSource(
                        metadata.index.copy(of: touched.lowerBound + UInt64(position), forSnapshotAt: sequence))
                    if now != .live { moved[position] = now }
                }
                return moved
            }
            if !moved.isEmpty {
                var changed = sources
                for (position, source) in moved { changed[position] = source }
                let updated = changed
                let positions = Set(moved.keys)
                try await context.io.run {
                    try target.withUnsafeMutableBytes {
                        try plan.execute(sources: updated, only: positions, live: live, diff: diff, into: $0)
                    }
                }
            }
        } catch {
            throw EngineError.wrap(error)
        }
        return target.take()
    }

    /// Allocation of a snapshot's range: preserved zeros are holes, preserved data is data, and
    /// chunks still on the live volume take the live allocation.
    func snapshotAllocation(_ sequence: SnapshotSequence, id: UUID, at offset: ByteOffset, count: ByteCount)
        async throws
        -> [AllocationExtent]
    {
        try checkRange(offset, count)
        guard count.rawValue > 0 else { return [] }
        try beginSnapshotRead(sequence, id: id)
        defer { endSnapshotRead(sequence) }
        let touched = chunks(offset, count)
        let sources = metadata.withLock { metadata in
            touched.map { ChunkSource(metadata.index.copy(of: $0, forSnapshotAt: sequence)) }
        }
        let live = self.live
        let shift = chunkShift
        let end = offset.rawValue + count.rawValue
        do {
            return try await context.io.run {
                var extents: [AllocationExtent] = []
                func add(_ start: UInt64, _ stop: UInt64, hole: Bool) {
                    guard stop > start else { return }
                    if let last = extents.last, last.isHole == hole, last.range.end.rawValue == start {
                        extents[extents.count - 1].range.count = ByteCount(stop - last.range.offset.rawValue)
                    } else {
                        extents.append(
                            AllocationExtent(
                                range: ByteRange(offset: ByteOffset(start), count: ByteCount(stop - start)),
                                isHole: hole))
                    }
                }
                var position = 0
                while position < sources.count {
                    let chunk = touched.lowerBound + UInt64(position)
                    let start = max(chunk << shift, offset.rawValue)
                    var stopPosition = position + 1
                    while stopPosition < sources.count, sources[stopPosition] == .live, sources[position] == .live {
                        stopPosition += 1
                    }
                    let stop = min((touched.lowerBound + UInt64(stopPosition)) << shift, end)
                    switch sources[position] {
                    case .zero: add(start, stop, hole: true)
                    case .slot: add(start, stop, hole: false)
                    case .live:
                        for extent in try Self.allocation(
                            of: live, from: ByteOffset(start), count: ByteCount(stop - start))
                        {
                            add(extent.range.offset.rawValue, extent.range.end.rawValue, hole: extent.isHole)
                        }
                    }
                    position = stopPosition
                }
                return extents
            }
        } catch {
            throw EngineError.wrap(error)
        }
    }

    // MARK: - Change tracking

    /// The byte ranges that may differ between the snapshot `since` and the snapshot `until` (nil: the
    /// live volume), limited to `within` if given.
    func changes(since: SnapshotSequence, until: SnapshotSequence?, within: ByteRange? = nil) -> [ByteRange] {
        let limit = within.map { $0.offset.rawValue..<$0.end.rawValue } ?? 0..<size.rawValue
        guard !limit.isEmpty else { return [] }
        let chunkRange = (limit.lowerBound >> chunkShift)..<((limit.upperBound - 1) >> chunkShift + 1)
        let union = metadata.withLock { metadata -> ChunkSet in
            var union = ChunkSet()
            for snapshot in metadata.chain
            where snapshot.sequence >= since && (until.map { snapshot.sequence < $0 } ?? true) {
                union.formUnion(snapshot.preserved)
            }
            return union
        }
        var ranges: [ByteRange] = []
        union.forEachRun(in: chunkRange) { run in
            let start = max(run.lowerBound << chunkShift, limit.lowerBound)
            let end = min(run.upperBound << chunkShift, limit.upperBound)
            if end > start { ranges.append(ByteRange(offset: ByteOffset(start), count: ByteCount(end - start))) }
        }
        return ranges
    }
}

/// How a snapshot read maps chunks to places: coalesces neighbouring chunks that come from the live
/// data into one pread.
struct ReadPlan: Sendable {
    let offset: UInt64
    let count: Int
    let firstChunk: UInt64
    let chunkShift: UInt64

    func execute(
        sources: [ChunkSource], only positions: Set<Int>?, live: any BlockStorage, diff: any BlockStorage,
        into buffer: UnsafeMutableRawBufferPointer
    ) throws {
        let end = offset + UInt64(count)
        var position = 0
        while position < sources.count {
            guard positions?.contains(position) ?? true else {
                position += 1
                continue
            }
            let chunk = firstChunk + UInt64(position)
            let start = max(chunk << chunkShift, offset)
            var stopPosition = position + 1
            if sources[position] == .live {
                while stopPosition < sources.count, sources[stopPosition] == .live,
                    positions?.contains(stopPosition) ?? true
                {
                    stopPosition += 1
                }
            }
            let stop = min((firstChunk + UInt64(stopPosition)) << chunkShift, end)
            let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(start - offset)..<Int(stop - offset)])
            switch sources[position] {
            case .live:
                try live.read(fromAbsoluteOffset: ByteOffset(start), into: bytes)
            case .zero:
                bytes.initializeMemory(as: UInt8.self, repeating: 0)
            case .slot(let slot):
                let withinChunk = start - (chunk << chunkShift)
                try diff.read(fromAbsoluteOffset: ByteOffset((slot.rawValue << chunkShift) + withinChunk), into: bytes)
            }
            position = stopPosition
        }
    }
}

/// One chunk of a copy buffer, as a piece of a vectored write.
struct ChunkOfBuffer: IOBytes {
    let buffer: AlignedBuffer
    let index: Int
    let chunkBytes: Int
    var count: Int { chunkBytes }

    func withUnsafeBytes<Result>(_ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result {
        try buffer.withUnsafeBytes((index * chunkBytes)..<((index + 1) * chunkBytes), body)
    }
}
