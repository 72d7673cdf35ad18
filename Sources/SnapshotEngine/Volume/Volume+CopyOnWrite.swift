// Copy-on-write: the claimed chunks' old contents are read from the live data into a pooled
// buffer, those that are not all zeros checksummed (CRC-32C) and written to diff slots (consecutive
// slots in one write), and the copies recorded in the catalog with their checksums, whose append syncs
// the diff store first and then itself, group-committed with every other writer's copies. Where the
// file system shares blocks between files (`CopyMethod.reflink`), a run of chunks is cloned into its
// slots instead of written: the same order of syncs, with no data written.

import BlockIO
import Synchronization

extension Volume {
    /// Preserves `chunks` (claimed, ascending) for the snapshot at `sequence`: reads their live
    /// contents, writes those that are not all zeros into `slots`, makes the records durable, and
    /// records the copies. Returns `.needSpace` if there were more non-zero chunks than slots (those
    /// are left unpreserved and unclaimed).
    func copy(
        _ chunks: [UInt64], into slots: [DiffSlot], for sequence: SnapshotSequence,
        beforeCommit: (@Sendable () throws -> Void)? = nil
    ) async throws -> CopyOutcome {
        let chunkBytes = self.chunkBytes
        let buffer = copyBuffers.take(count: chunks.count * chunkBytes)
        defer { copyBuffers.give(buffer) }
        var placed: [(copy: PlacedCopy, bufferIndex: Int)] = []
        var unplaced: [UInt64] = []
        var clonedBytes = 0
        do {
            let (live, diff) = (self.live, self.diff)
            let shift = chunkShift
            let cloneEnd = clonesCopies.load(ordering: .relaxed) ? size.rawValue : 0
            let minimumClone = Int(context.configuration.minimumCloneBytes.rawValue)
            // One trip to the I/O threads: read the chunks, place and checksum them, write the copies.
            let written = try await context.io.run {
                try Self.readPlaceAndWrite(
                    chunks, slots: slots, buffer: buffer, chunkBytes: chunkBytes, shift: shift, live: live, diff: diff,
                    cloningBelow: cloneEnd, cloningAtLeast: minimumClone)
            }
            (placed, unplaced, clonedBytes) = (written.placed, written.unplaced, written.clonedBytes)
            if clonedBytes > 0 { bytesCloned.increment(by: clonedBytes) }
            if let refusal = written.cloneRefusal { noteCloneRefused(refusal) }
            if !placed.isEmpty {
                context.logger.trace(
                    "preserving chunks",
                    metadata: [
                        "volume": "\(name)", "snapshot.sequence": "\(sequence.rawValue)",
                        "copies":
                            "\(placed.map { "\($0.copy.chunk)->\($0.copy.slot.isZero ? "zero" : String($0.copy.slot.rawValue))" })",
                        "unplaced": "\(unplaced)",
                    ])
                if let beforeCommit { try await context.io.run(beforeCommit) }
                let writtenBytes = placed.count { !$0.copy.slot.isZero } * chunkBytes - clonedBytes
                let broken = context.configuration.brokenOrderingForTesting
                let syncsDiff =
                    placed.contains { !$0.copy.slot.isZero } && broken != .noDiffStoreSync
                    && !(broken == .noDiffStoreSyncForClones && writtenBytes == 0)
                try await context.catalog.append(
                    Self.records(for: placed.map(\.copy), volume: id, sequence: sequence),
                    syncingFirst: syncsDiff ? [diffSync] : [], failsCleanly: true)
                copiesMade.increment(by: placed.count)
                bytesCopied.increment(by: writtenBytes)
            }
        } catch {
            // Unless the catalog failed with durability unknown, no record names these slots: give
            // back the space a half-done write took (on a full disk that is what the next copy needs).
            let recordsMayBeDurable: Bool
            if case .storageFailed = error as? EngineError {
                recordsMayBeDurable = true
            } else {
                recordsMayBeDurable = false
            }
            if !recordsMayBeDurable { await releaseSlots(slots) }
            let waiters = metadata.withLock { metadata -> [CheckedContinuation<Void, Never>] in
                chunks.flatMap { metadata.chunksInCopy.removeValue(forKey: $0) ?? [] }
            }
            for waiter in waiters { waiter.resume() }
            if EngineError.wrap(error).errno == .noSpace {
                noteOutOfSpace(error)
                // With a diff limit the user chose what gives way when space runs out; a full file
                // system is the same case. Without one, the write fails and every snapshot stays.
                if diffLimit != nil && !metadata.withLock({ $0.chain.isEmpty }) { return .fileSystemFull }
            }
            throw error
        }
        noteSpaceAvailable()
        let usedSlots = Set(placed.map(\.copy.slot))
        let waiters = metadata.withLock { metadata -> [CheckedContinuation<Void, Never>] in
            let position = metadata.chain.count - 1
            assert(metadata.chain[position].sequence == sequence, "the chain changed under a writer holding the gate")
            for (copy, _) in placed {
                metadata.recordCopy(of: copy.chunk, in: copy.slot, checksum: copy.checksum, snapshotAt: position)
            }
            metadata.slots.release(slots.filter { !usedSlots.contains($0) })
            return chunks.flatMap { metadata.chunksInCopy.removeValue(forKey: $0) ?? [] }
        }
        for waiter in waiters { waiter.resume() }
        return unplaced.isEmpty ? .done : .needSpace
    }

    /// The I/O of a copy: reads `chunks` (ascending) from the live data into `buffer`, gives each that
    /// is not all zeros the next of `slots` and its CRC-32C, and writes those to the diff store
    /// (copies whose slots are consecutive in one vectored write). A run of consecutive chunks in
    /// consecutive slots, `cloningAtLeast` bytes long or more, that ends at or below `cloningBelow` is
    /// cloned from the live data instead, where the diff store allows: claimed chunks cannot change
    /// between the read that checksummed them and the clone. Returns the placed copies with their
    /// index in the buffer, the chunks left without a slot, the bytes cloned, and why a clone was
    /// refused or failed, if one was (that run, and every later one, was written instead: into the
    /// slot whose space is already allocated, so a write answered early cannot fail here for want of
    /// the space a clone needs).
    static func readPlaceAndWrite(
        _ chunks: [UInt64], slots: [DiffSlot], buffer: AlignedBuffer, chunkBytes: Int, shift: UInt64,
        live: any BlockStorage, diff: any BlockStorage, cloningBelow cloneEnd: UInt64 = 0,
        cloningAtLeast minimumClone: Int = 0
    ) throws -> (
        placed: [(copy: PlacedCopy, bufferIndex: Int)], unplaced: [UInt64], clonedBytes: Int, cloneRefusal: String?
    ) {
        for run in runs(of: chunks) {
            try buffer.withUnsafeMutableBytes((run.index * chunkBytes)..<((run.index + run.count) * chunkBytes)) {
                try live.read(fromAbsoluteOffset: ByteOffset(run.first << shift), into: $0)
            }
        }
        var placed: [(copy: PlacedCopy, bufferIndex: Int)] = []
        var unplaced: [UInt64] = []
        var freeSlots = slots[...]
        for (index, chunk) in chunks.enumerated() {
            let bytes = (index * chunkBytes)..<((index + 1) * chunkBytes)
            if buffer.withUnsafeBytes(bytes, isAllZero) {
                placed.append((PlacedCopy(chunk: chunk, slot: .zero, checksum: nil), index))
            } else if let slot = freeSlots.popFirst() {
                let checksum = buffer.withUnsafeBytes(bytes) { CRC32C.checksum($0) }
                placed.append((PlacedCopy(chunk: chunk, slot: slot, checksum: checksum), index))
            } else {
                unplaced.append(chunk)
            }
        }
        // Copies whose slots are consecutive go out as one vectored write.
        var groups: [(slot: UInt64, pieces: [Int])] = []
        for (copy, bufferIndex) in placed where !copy.slot.isZero {
            if let last = groups.last, last.slot + UInt64(last.pieces.count) == copy.slot.rawValue {
                groups[groups.count - 1].pieces.append(bufferIndex)
            } else {
                groups.append((copy.slot.rawValue, [bufferIndex]))
            }
        }
        var clonedBytes = 0
        var cloneRefusal: String?
        for run in groups {
            let first = run.pieces[0]
            let last = run.pieces[run.pieces.count - 1]
            // Pieces side by side in the buffer go out as one range (else as a gathered write), and
            // may be one clone if their chunks are side by side too.
            let contiguous = last - first + 1 == run.pieces.count
            let adjacentChunks = chunks[last] - chunks[first] == UInt64(last - first)
            let count = run.pieces.count * chunkBytes
            if cloneRefusal == nil, contiguous, adjacentChunks, count >= minimumClone,
                (chunks[last] + 1) << shift <= cloneEnd
            {
                do {
                    if try diff.clone(
                        from: live, at: ByteOffset(chunks[first] << shift), count: ByteCount(UInt64(count)),
                        to: ByteOffset(run.slot << shift))
                    {
                        clonedBytes += count
                        continue
                    }
                    cloneRefusal = "the file system refused to share blocks between the live data and the diff store"
                } catch {
                    cloneRefusal = "a clone failed: \(error)"
                }
            }
            if contiguous {
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
        return (placed, unplaced, clonedBytes, cloneRefusal)
    }

    /// Logs once when copies start failing for want of space, not once per write.
    func noteOutOfSpace(_ error: any Error) {
        guard !outOfSpace.exchange(true, ordering: .relaxed) else { return }
        let policy = diffLimit == nil ? "" : " (the volume's diff-limit policy frees some)"
        context.logger.warning(
            "copy-on-write is failing: no space left for the diff store; writes that need a copy fail with ENOSPC until space is freed\(policy)",
            metadata: ["volume": "\(name)", "error": "\(error)"])
    }

    /// Logs once, and reports from then on, that copies are written (until the volume is opened
    /// again): a clone was refused or failed.
    func noteCloneRefused(_ reason: String) {
        guard clonesCopies.exchange(false, ordering: .relaxed) else { return }
        context.logger.warning(
            "copy-on-write writes its copies from now on: \(reason)",
            metadata: ["volume": "\(name)", "live": "\(live.path)", "diff": "\(diff.path)"])
    }

    func noteSpaceAvailable() {
        guard outOfSpace.load(ordering: .relaxed), outOfSpace.exchange(false, ordering: .relaxed) else { return }
        context.logger.notice("copy-on-write has space again", metadata: ["volume": "\(name)"])
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

    /// Catalog records for copies, merging runs of consecutive chunks in consecutive slots (or zeros);
    /// a run's copies all have checksums or all lack them.
    static func records(for copies: [PlacedCopy], volume: VolumeID, sequence: SnapshotSequence) -> [CatalogRecord] {
        var records: [CatalogRecord] = []
        var start = 0
        while start < copies.count {
            var end = start + 1
            while end < copies.count, copies[end].chunk == copies[end - 1].chunk + 1, end - start < Int(UInt32.max),
                copies[end].slot.isZero
                    ? copies[end - 1].slot.isZero
                    : (!copies[end - 1].slot.isZero && copies[end].slot.rawValue == copies[end - 1].slot.rawValue + 1
                        && (copies[end].checksum == nil) == (copies[end - 1].checksum == nil))
            {
                end += 1
            }
            let run = copies[start..<end]
            records.append(
                .preserved(
                    volume: volume, sequence: sequence, firstChunk: copies[start].chunk, count: UInt32(end - start),
                    firstSlot: copies[start].slot,
                    checksums: copies[start].checksum == nil ? nil : run.map { $0.checksum! }))
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
}

/// A chunk's copy: where it went, and the CRC-32C of its bytes (nil for zeros, which take no slot, or
/// for a copy recorded before checksums existed).
struct PlacedCopy: Sendable, Equatable {
    var chunk: UInt64
    var slot: DiffSlot
    var checksum: UInt32?
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
