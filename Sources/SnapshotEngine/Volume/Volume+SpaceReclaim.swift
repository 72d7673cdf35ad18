// Running out of diff space: the volume's policy deletes the oldest snapshot or fails the newest,
// and freed slots go back to the file system and the allocator once their deletion is durable.

import BlockIO

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

extension Volume {
    // MARK: - Running out of diff space

    /// Frees diff space by the volume's policy: deletes the oldest snapshot, or fails the newest (the
    /// one that needs the space). Runs with the gate held, like any change to the chain. With
    /// `fileSystemFull`, the file system ran out before the limit did; `forAnsweredWrite`, it makes room
    /// for a write already answered, which goes on while the store closes.
    func reclaimSpace(fileSystemFull: Bool = false, forAnsweredWrite: Bool = false) async throws {
        try await gate.acquireExclusive()
        defer { gate.releaseExclusive() }
        try checkUsable(whileClosing: forAnsweredWrite)
        let limit = diffLimit?.rawValue ?? 0
        let reason =
            fileSystemFull
            ? "the file system holding the diff store of volume '\(name)' is full"
            : "the diff store of volume '\(name)' reached its limit of \(limit) bytes"
        let victim = metadata.withLock { metadata -> (SnapshotState, DiffStorePolicy)? in
            guard fileSystemFull || metadata.slots.availableCount == 0, !metadata.chain.isEmpty,
                metadata.revertTarget == nil
            else { return nil }
            let position = metadata.policy == .deleteOldest ? 0 : metadata.chain.count - 1
            metadata.chain[position].deleting = true
            if metadata.policy == .failSnapshot { metadata.chain[position].failingReason = reason }
            return (metadata.chain[position], metadata.policy)
        }
        guard let (snapshot, policy) = victim else { return }
        context.logger.trace(
            "reclaiming diff space",
            metadata: ["volume": "\(name)", "snapshot.sequence": "\(snapshot.sequence.rawValue)"])
        await waitForReaders(of: snapshot.sequence)
        let reference = SnapshotReference(volume: id, sequence: snapshot.sequence)
        do {
            try await context.catalog.append(
                [policy == .deleteOldest ? .snapshotsDeleted([reference]) : .snapshotFailed(reference, reason: reason)],
                failsCleanly: true)
        } catch {
            metadata.withLock { metadata in
                if let position = metadata.position(of: snapshot.sequence) {
                    metadata.chain[position].deleting = false
                    metadata.chain[position].failingReason = nil
                }
            }
            throw error
        }
        let freed = metadata.withLock { metadata -> [DiffSlot] in
            guard let position = metadata.position(of: snapshot.sequence) else { return [] }
            // As it is now, not as it was chosen: its set may have been kept while this waited for
            // readers and for the record, and a failed snapshot recorded as still pending would be
            // rolled back (deleted) at the next start.
            let current = metadata.chain[position]
            let freed = metadata.removeSnapshot(at: position)
            if policy == .failSnapshot {
                metadata.failed.append(FailedSnapshot(failing: current, reason: reason))
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

    /// Gives freed slots' space back to the file system, then to the allocator. Call only once no
    /// durable record can name them (their deletion is durable, or the copy that took them failed
    /// before its record), with no copy writing them.
    func releaseSlots(_ freed: [DiffSlot]) async {
        guard !freed.isEmpty else { return }
        context.logger.trace(
            "freeing diff slots", metadata: ["volume": "\(name)", "slots": "\(freed.map(\.rawValue))"])
        let diff = self.diff
        let shift = chunkShift
        let runs = Self.runs(of: freed.map(\.rawValue).sorted())
        do {
            try await context.io.run {
                // Only what the file holds: discarding past its end could write zeros there.
                let end = try diff.size().rawValue
                for run in runs where run.first << shift < end {
                    let count = min(UInt64(run.count) << shift, end - (run.first << shift))
                    try diff.discard(at: ByteOffset(run.first << shift), count: ByteCount(count))
                }
            }
        } catch {
            // The slots are free either way; only their space stays allocated until reused.
            context.logger.warning("could not give freed diff space back", metadata: ["error": "\(error)"])
        }
        metadata.withLock { $0.slots.release(freed) }
    }
}
