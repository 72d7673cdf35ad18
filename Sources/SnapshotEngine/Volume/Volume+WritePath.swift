// The write path (ARCHITECTURE.md, "The engine"): a write passes the volume's gate, then for every
// chunk it touches asks whether the *newest* snapshot holds a copy; the chunks that lack one are
// claimed (so a second writer of the same chunk waits rather than copying again) and copied
// (Volume+CopyOnWrite.swift). Only then does the new data go to the live volume. Holding the gate
// shared means the chain cannot change underneath: creating, deleting and failing snapshots all take
// it exclusively.

import BlockIO

extension Volume {
    // MARK: - The write path

    enum CopyOutcome {
        case done
        /// Some chunk could not be preserved because the diff store is full.
        case needSpace
        /// The file system under the diff store ran out of space (the volume has a diff limit, so its
        /// policy applies as if the limit were reached).
        case fileSystemFull
    }

    /// Runs `apply` (the change to the live data) once every chunk of the range is preserved for the
    /// newest snapshot. With `mayAnswerEarly` (a write without FUA), a write that has chunks to
    /// preserve may return once they are claimed and the space for their copies is taken
    /// (`answerEarly`): the copy and `apply` go on in the background, in order, and reads and later
    /// writes of its bytes wait for it (HeldWrites.swift).
    /// `forRevert`: a write of the revert itself, the only kind let through while it runs.
    /// `mayRunInline` false: `apply` always runs on the I/O executor (it waits for the disk).
    func mutate(
        _ offset: ByteOffset, _ count: ByteCount, mayAnswerEarly: Bool = false, mayRunInline: Bool = true,
        forRevert: Bool = false, _ apply: @escaping @Sendable () throws -> Void
    ) async throws {
        let touched = chunks(offset, count)
        let bytes = offset.rawValue..<(offset.rawValue + count.rawValue)
        let inline =
            mayRunInline && context.configuration.writesLiveDataInline
            && count < context.configuration.inlineLiveWriteLimit
        // Answered writes land in order: wait for held ones in these bytes (outside the gate, which
        // they may have to leave and take again to reclaim space).
        try await heldWrites.wait(for: bytes)
        await gate.enter()
        do {
            try checkUsable()
            // Checked inside the gate: a revert, once it flags the volume, waits for every write in it.
            if !forRevert { try checkNotReverting() }
            try checkWritable()
            if let failure = context.catalog.failure { throw failure }
        } catch {
            gate.leave()
            throw EngineError.wrap(error)
        }
        let early =
            context.configuration.brokenOrderingForTesting == .liveWriteBeforeCopyCommit ? EarlyLiveWrite(apply) : nil
        if mayAnswerEarly, let answered = await answerEarly(touched, bytes: bytes) {
            Task(executorPreference: context.configuration.taskExecutor) {
                await self.finishAnsweredWrite(answered, touched, bytes, apply, inline: inline, early: early)
            }
            return
        }
        try await mutateHoldingGate(touched, apply, inline: inline, answered: false, early: early)
    }

    /// The rest of a write answered early, in the background, holding the gate it entered with: its
    /// copy, then the live write. A failure loses the write (see HeldWrites.swift).
    private func finishAnsweredWrite(
        _ answered: EarlyAnswer, _ touched: Range<UInt64>, _ bytes: Range<UInt64>,
        _ apply: @escaping @Sendable () throws -> Void, inline: Bool, early: EarlyLiveWrite?
    ) async {
        do {
            do {
                defer { context.catalog.releaseRoom(answered.recordBytes) }
                // Whatever this returns, the loop below preserves what is still missing.
                _ = try await copy(
                    answered.chunks, into: answered.slots, for: answered.sequence, beforeCommit: early?.beforeCommit)
            } catch {
                gate.leave()
                throw error
            }
            try await mutateHoldingGate(touched, apply, inline: inline, answered: true, early: early)
            heldWrites.release(answered.place)
        } catch {
            noteLostWrite(error, bytes: bytes)
            heldWrites.release(answered.place, failure: EngineError.wrap(error))
        }
    }

    /// What a write answered early took before its answer: its place among the held writes, and the
    /// chunks it claimed for the newest snapshot with a diff slot each, whose space is allocated.
    struct EarlyAnswer: Sendable {
        var place: UInt64
        var sequence: SnapshotSequence
        var chunks: [UInt64]
        var slots: [DiffSlot]
        /// The catalog room promised to its records.
        var recordBytes: Int
    }

    /// Prepares a write's early answer, or returns nil for a write that should be answered only once
    /// it is done. After the answer nothing may fail for want of space, so it answers early only when:
    /// - it can claim every chunk the newest snapshot lacks (none is being copied by another write,
    ///   whose copy could still fail), and the diff-store limit leaves a slot for each;
    /// - the space for those slots and for the live bytes is allocated (`reserveSpace`), and the
    ///   catalog has room ahead for their records (`CatalogLog.reserveRoom`);
    /// - copies are not already failing for want of space, and the held bytes stay within
    ///   `heldWriteBytes`.
    /// A write that needs no copy gains nothing from answering early.
    private func answerEarly(_ touched: Range<UInt64>, bytes: Range<UInt64>) async -> EarlyAnswer? {
        let limit = context.configuration.heldWriteBytes.rawValue
        guard limit > 0, UInt64(bytes.count) <= limit, !outOfSpace.load(ordering: .relaxed) else { return nil }
        let maximumChunks = max(1, Self.maximumCopyBytes / chunkBytes)
        let plan = metadata.withLock {
            metadata -> (sequence: SnapshotSequence, chunks: [UInt64], slots: [DiffSlot], highWater: UInt64)? in
            guard let newest = metadata.chain.last else { return nil }
            var claim: [UInt64] = []
            for chunk in touched where !metadata.index.hasCopy(of: chunk, heldBy: newest.sequence) {
                guard metadata.chunksInCopy[chunk] == nil, claim.count < maximumChunks else { return nil }
                claim.append(chunk)
            }
            guard !claim.isEmpty, metadata.slots.availableCount >= UInt64(claim.count) else { return nil }
            for chunk in claim { metadata.chunksInCopy[chunk] = [] }
            let highWater = metadata.slots.highWater
            return (newest.sequence, claim, metadata.slots.reserve(upTo: claim.count), highWater)
        }
        guard let plan else { return nil }
        // The memory a held write keeps: its payload and the buffer for its copies.
        let cost = bytes.count + plan.chunks.count * chunkBytes
        let recordBytes = Self.catalogRoom(forCopies: plan.chunks.count)
        guard let place = heldWrites.hold(bytes, bytes: cost, limit: Int(limit)) else {
            abandonClaim(plan.chunks, slots: plan.slots)
            return nil
        }
        guard context.catalog.reserveRoom(recordBytes) else {
            heldWrites.release(place)
            abandonClaim(plan.chunks, slots: plan.slots)
            return nil
        }
        let ready = await reserveSpace(for: plan.slots, highWater: plan.highWater, live: bytes)
        guard ready else {
            context.catalog.releaseRoom(recordBytes)
            heldWrites.release(place)
            abandonClaim(plan.chunks, slots: plan.slots)
            return nil
        }
        return EarlyAnswer(
            place: place, sequence: plan.sequence, chunks: plan.chunks, slots: plan.slots, recordBytes: recordBytes)
    }

    /// Allocates the space a write answered early needs, returning false if it cannot: its slots,
    /// and the live bytes if they have a hole. Slots taken from the free list (whose space was given
    /// back) are allocated one by one; new ones, past the high-water mark, come from space allocated
    /// ahead in steps of `diffReservationStep`, so most writes make no trip to the I/O threads here.
    private func reserveSpace(for slots: [DiffSlot], highWater: UInt64, live range: Range<UInt64>) async -> Bool {
        let (live, diff, shift) = (self.live, self.diff, chunkShift)
        let reused = Self.runs(of: slots.map(\.rawValue).filter { $0 < highWater }.sorted())
        let newEnd = (slots.map(\.rawValue).filter { $0 >= highWater }.max().map { $0 + 1 } ?? 0) << shift
        let reservedEnd = diffReservedEnd.load(ordering: .relaxed)
        let grow: Range<UInt64>? = {
            guard newEnd > reservedEnd else { return nil }
            let step = Self.diffReservationStep
            var target = (newEnd + step - 1) / step * step
            if let diffLimit { target = min(target, max(newEnd, (diffLimit.rawValue >> shift) << shift)) }
            // From the end already reserved, not from this write's own slots: a write that took a
            // lower new slot may still be on its way here, and what is published must be whole.
            return reservedEnd..<target
        }()
        // A hole in the live bytes would take space when the write lands (lseek: cheap, no trip).
        let liveHole =
            ((try? live.nextHole(from: ByteOffset(range.lowerBound)).rawValue) ?? range.lowerBound) < range.upperBound
        guard !reused.isEmpty || grow != nil || liveHole else { return true }
        do {
            let reserved = try await context.io.run {
                for run in reused {
                    guard
                        try diff.reserve(
                            at: ByteOffset(run.first << shift), count: ByteCount(UInt64(run.count) << shift))
                    else { return false }
                }
                if let grow, !grow.isEmpty {
                    guard try diff.reserve(at: ByteOffset(grow.lowerBound), count: ByteCount(UInt64(grow.count))) else {
                        return false
                    }
                }
                if liveHole {
                    return try live.reserve(at: ByteOffset(range.lowerBound), count: ByteCount(UInt64(range.count)))
                }
                return true
            }
            if reserved, let grow { diffReservedEnd.max(grow.upperBound, ordering: .relaxed) }
            return reserved
        } catch {
            return false
        }
    }

    /// How far ahead of the copies the diff store's space is allocated, at most.
    static let diffReservationStep: UInt64 = 64 << 20

    /// More than the catalog takes for the records of `copies` copies: a record and a checksum per
    /// copy at worst, and a batch's header and padding.
    static func catalogRoom(forCopies copies: Int) -> Int {
        copies * 64 + CatalogLog.batchAlignment + CatalogLog.batchHeaderSize
    }

    /// Gives back chunks claimed and slots reserved for a copy that will not be made.
    private func abandonClaim(_ chunks: [UInt64], slots: [DiffSlot]) {
        let waiters = metadata.withLock { metadata -> [CheckedContinuation<Void, Never>] in
            metadata.slots.release(slots)
            return chunks.flatMap { metadata.chunksInCopy.removeValue(forKey: $0) ?? [] }
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Logs a write lost after its answer: loudly, since the client learns of it only from its next
    /// flush or write.
    private func noteLostWrite(_ error: any Error, bytes: Range<UInt64>) {
        context.logger.error(
            "a write was answered before its copy-on-write finished, and the copy failed: its data never reached the volume; the volume refuses writes and flushes (and reads of those bytes) until the data directory is reopened",
            metadata: [
                "volume": "\(name)", "offset": "\(bytes.lowerBound)", "length": "\(bytes.count)", "error": "\(error)",
            ])
    }

    /// The copy-on-write and `apply`, entered with the gate held (the caller has checked the volume);
    /// leaves it. `inline`: `apply` runs on the caller's thread. A write already `answered` goes on
    /// while the store closes or after another answered write was lost: landing it is all that is
    /// left to do for it. `early` (tests only) breaks the ordering on purpose.
    private func mutateHoldingGate(
        _ touched: Range<UInt64>, _ apply: @escaping @Sendable () throws -> Void, inline: Bool, answered: Bool,
        early: EarlyLiveWrite?
    ) async throws {
        // A full file system gives way to the volume's policy once per write: if that freed no
        // room (another process holds the space, or holes cannot be punched), the write fails with
        // ENOSPC rather than taking every snapshot of the volume with it.
        var reclaimedForFullFileSystem = false
        var holding = true
        var firstRound = true
        while true {
            if !holding {
                await gate.enter()
                holding = true
            }
            let outcome: CopyOutcome
            do {
                // The first time round, the caller has checked.
                if !firstRound {
                    try checkUsable(whileClosing: answered)
                    if !answered { try checkWritable() }
                    if let failure = context.catalog.failure { throw failure }
                }
                firstRound = false
                outcome = try await preserve(touched, beforeCommit: early?.beforeCommit)
            } catch {
                gate.leave()
                throw EngineError.wrap(error)
            }
            if outcome != .done {
                gate.leave()
                holding = false
                if outcome == .fileSystemFull {
                    guard !reclaimedForFullFileSystem else {
                        throw EngineError.io(
                            BlockIOError(.system(.noSpace), operation: "copy-on-write", path: diff.path))
                    }
                    reclaimedForFullFileSystem = true
                }
                try await reclaimSpace(fileSystemFull: outcome == .fileSystemFull, forAnsweredWrite: answered)
                continue
            }
            do {
                if early?.done == true {
                    // Broken on purpose (tests only): the live data went out before the copy's record.
                } else if inline {
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

    enum CopyPlan {
        case nothing
        case wait([UInt64])
        case copy(sequence: SnapshotSequence, chunks: [UInt64], slots: [DiffSlot], busy: [UInt64])
    }

    /// Makes sure the newest snapshot holds a copy of every chunk in `touched`. `beforeCommit` (tests
    /// only) runs after a copy's data is written and before its record is.
    func preserve(_ touched: Range<UInt64>, beforeCommit: (@Sendable () throws -> Void)? = nil) async throws
        -> CopyOutcome
    {
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
                let outcome = try await copy(chunks, into: slots, for: sequence, beforeCommit: beforeCommit)
                if outcome != .done { return outcome }
                for chunk in busy { await waitForCopy(of: chunk) }
            }
        }
    }

    func waitForCopy(of chunk: UInt64) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let finished = metadata.withLock { metadata -> Bool in
                guard metadata.chunksInCopy[chunk] != nil else { return true }
                metadata.chunksInCopy[chunk]!.append(continuation)
                return false
            }
            if finished { continuation.resume() }
        }
    }
}

/// Tests only: a live write carried out early, in the middle of its copy (`BrokenOrdering`).
final class EarlyLiveWrite: @unchecked Sendable {
    private let apply: @Sendable () throws -> Void
    private(set) var done = false

    init(_ apply: @escaping @Sendable () throws -> Void) { self.apply = apply }

    func run() throws {
        guard !done else { return }
        try apply()
        done = true
    }

    /// `run`, as the hook a copy calls between writing its data and its record.
    var beforeCommit: @Sendable () throws -> Void { { try self.run() } }
}
