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
    /// newest snapshot.
    func mutate(_ offset: ByteOffset, _ count: ByteCount, _ apply: @escaping @Sendable () throws -> Void)
        async throws
    {
        let touched = chunks(offset, count)
        let early =
            context.configuration.brokenOrderingForTesting == .liveWriteBeforeCopyCommit ? EarlyLiveWrite(apply) : nil
        var beforeCommit: (@Sendable () throws -> Void)?
        if let early { beforeCommit = { try early.run() } }
        // A full file system gives way to the volume's policy once per write: if that freed no
        // room (another process holds the space, or holes cannot be punched), the write fails with
        // ENOSPC rather than taking every snapshot of the volume with it.
        var reclaimedForFullFileSystem = false
        while true {
            await gate.enter()
            let outcome: CopyOutcome
            do {
                try checkUsable()
                try checkWritable()
                if let failure = context.catalog.failure { throw failure }
                outcome = try await preserve(touched, beforeCommit: beforeCommit)
            } catch {
                gate.leave()
                throw EngineError.wrap(error)
            }
            if outcome != .done {
                gate.leave()
                if outcome == .fileSystemFull {
                    guard !reclaimedForFullFileSystem else {
                        throw EngineError.io(
                            BlockIOError(.system(.noSpace), operation: "copy-on-write", path: diff.path))
                    }
                    reclaimedForFullFileSystem = true
                }
                try await reclaimSpace(fileSystemFull: outcome == .fileSystemFull)
                continue
            }
            do {
                if early?.done == true {
                    // Broken on purpose (tests only): the live data went out before the copy's record.
                } else if context.configuration.writesLiveDataInline {
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
}
