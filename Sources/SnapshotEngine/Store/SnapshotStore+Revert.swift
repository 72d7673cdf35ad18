// Reverting a live volume to one of its snapshots. Only what changed since the snapshot is written:
// the chunks that snapshot or a newer one preserved, read from the snapshot and written to the live
// data through copy-on-write, so every newer snapshot keeps what it holds. The revert is recorded
// before its first write (`revertStarted`) and after its writes are durable (`revertFinished`); a
// store that opens with a revert started and not finished runs it again before the volume serves
// anything, which is idempotent (the same bytes go to the same places). Meanwhile the live volume
// takes no I/O, and no snapshot gives way to the diff-store policy. The catalog format is in
// docs/on-disk-format.md (records 12 and 13).

import BlockIO

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// What a revert did.
public struct RevertResult: Sendable, Equatable {
    public var volume: String
    public var snapshot: UUID
    /// Bytes of the live volume rewritten: those that changed since the snapshot.
    public var changedBytes: ByteCount
}

extension SnapshotStore {
    /// The most bytes one step of a revert reads from the snapshot and writes to the live volume.
    static let revertStepBytes = 8 << 20

    /// The checks `revert` makes before it changes anything (the snapshot is of the volume and kept,
    /// the diff store has room), for a caller that must know before it ends the volume's connections.
    public func checkRevert(volume name: String, to snapshotID: UUID) throws {
        _ = try checkedRevert(volume: name, to: snapshotID)
    }

    /// `checkRevert`, returning the volume and the snapshot it resolved.
    private func checkedRevert(volume name: String, to snapshotID: UUID) throws -> (Volume, SnapshotView) {
        try checkOpen()
        let volume = try self.volume(named: name)
        let target = try snapshot(id: snapshotID)
        guard target.volume === volume else {
            throw EngineError.snapshotOrder("snapshot \(snapshotID.guidString) is not of volume '\(name)'")
        }
        if volume.metadata.withLock({ $0.chain.first { $0.sequence == target.sequence }?.isPending ?? false }) {
            throw EngineError.snapshotOrder(
                "snapshot \(snapshotID.guidString) belongs to a set still in progress; revert to it once the set is kept"
            )
        }
        try volume.checkWritable()
        try volume.checkRoomForRevert(to: target.sequence)
        return (volume, target)
    }

    /// Makes the live volume `name` read exactly as snapshot `snapshotID` of it. Every snapshot stays
    /// listed and byte-exact. `progress` hears bytes done and bytes to do. Refused before anything
    /// changes if the diff store has no room for what the newer snapshots must preserve; a failure
    /// after the revert began leaves the volume offline (`revertIncomplete`) until a revert succeeds.
    @discardableResult
    public func revert(
        volume name: String, to snapshotID: UUID, progress: (@Sendable (UInt64, UInt64) -> Void)? = nil
    ) async throws -> RevertResult {
        try checkOpen()
        // Sets, deletions and compaction wait: none may see the volume halfway, delete the snapshot
        // being read, or rewrite the catalog without the revert's record.
        await operations.lock()
        defer { operations.unlock() }
        let (volume, target) = try checkedRevert(volume: name, to: snapshotID)
        let started: CatalogRecord = .revertStarted(volume.id, sequence: target.sequence)
        let recordsFirst = context.configuration.brokenOrderingForTesting != .revertWritesBeforeRecord
        // A revert interrupted earlier may have left the volume offline; this one supersedes it.
        let wasReverting = volume.reverting.exchange(true, ordering: .acquiringAndReleasing)
        // From now on no snapshot gives way to the diff-store policy, the target included (a write
        // still in flight might otherwise make the policy delete or fail it).
        if !wasReverting { volume.metadata.withLock { $0.revertTarget = target.sequence } }
        do {
            if !wasReverting {
                context.configuration.eventHandler?(.volumeReverting(name: name))
                // Every write that entered before the flag is done, and no other enters after it.
                try await volume.gate.acquireExclusive()
                volume.gate.releaseExclusive()
                try await volume.heldWrites.wait(for: nil)
                try volume.checkWritable()
            }
            guard target.isReadable else { throw EngineError.snapshotDeleted(snapshotID) }
            try volume.checkRoomForRevert(to: target.sequence)
            if recordsFirst { try await context.catalog.append([started]) }
        } catch {
            // Nothing was changed: the volume is as it was (offline still, if it was before).
            if !wasReverting {
                volume.metadata.withLock { $0.revertTarget = nil }
                volume.reverting.store(false, ordering: .releasing)
                context.configuration.eventHandler?(.volumeReverted(name: name))
            }
            throw EngineError.wrap(error)
        }
        volume.metadata.withLock { $0.revertTarget = target.sequence }
        context.logger.info(
            "reverting a volume", metadata: ["volume": "\(name)", "snapshot.id": "\(snapshotID.guidString)"])
        let changed = try await finishRevert(
            of: volume, to: target, recordingStartAfterWrites: recordsFirst ? nil : started, progress: progress)
        return RevertResult(volume: name, snapshot: snapshotID, changedBytes: changed)
    }

    /// Writes what changed since `target` back from it, makes that durable, records the revert as
    /// finished and brings the volume back online. The revert was recorded as started (except
    /// when a test breaks that order: `recordingStartAfterWrites`).
    func finishRevert(
        of volume: Volume, to target: SnapshotView, recordingStartAfterWrites: CatalogRecord? = nil,
        progress: (@Sendable (UInt64, UInt64) -> Void)? = nil
    ) async throws -> ByteCount {
        let changed: UInt64
        do {
            changed = try await volume.writeBack(from: target, progress: progress)
            if let recordingStartAfterWrites { try await context.catalog.append([recordingStartAfterWrites]) }
            if context.configuration.brokenOrderingForTesting == .revertFinishedBeforeSync {
                try await context.catalog.append([.revertFinished(volume.id)])
                try await volume.synchronizeLive()
            } else {
                try await volume.synchronizeLive()
                try await context.catalog.append([.revertFinished(volume.id)])
            }
        } catch {
            let reason = EngineError.wrap(error).description
            context.logger.error(
                "a revert could not finish; the volume stays offline until a revert succeeds",
                metadata: ["volume": "\(volume.name)", "snapshot.id": "\(target.id.guidString)", "error": "\(reason)"])
            throw EngineError.revertIncomplete(volume: volume.name, reason: reason)
        }
        volume.metadata.withLock { $0.revertTarget = nil }
        volume.reverting.store(false, ordering: .releasing)
        context.logger.info(
            "reverted a volume",
            metadata: [
                "volume": "\(volume.name)", "snapshot.id": "\(target.id.guidString)", "bytes.changed": "\(changed)",
            ])
        context.configuration.eventHandler?(.volumeReverted(name: volume.name))
        return ByteCount(changed)
    }

    /// At open: runs again every revert that started and did not finish, before the volume serves
    /// anything. One that fails again is logged and leaves its volume offline.
    func finishInterruptedReverts() async {
        for volume in allVolumes() {
            guard let sequence = volume.metadata.withLock({ $0.revertTarget }) else { continue }
            volume.reverting.store(true, ordering: .releasing)
            let target = volume.metadata.withLock { metadata -> SnapshotView? in
                metadata.position(of: sequence).map { position in
                    let snapshot = metadata.chain[position]
                    return SnapshotView(
                        volume: volume, id: snapshot.id, setID: snapshot.setID, sequence: snapshot.sequence,
                        createdAt: Self.date(snapshot.createdAtNanoseconds))
                }
            }
            guard let target else {
                // Cannot happen (a revert's snapshot is never deleted before it finishes); say so.
                context.logger.error(
                    "an interrupted revert's snapshot is gone; the volume stays offline",
                    metadata: ["volume": "\(volume.name)", "snapshot.sequence": "\(sequence.rawValue)"])
                continue
            }
            context.logger.notice(
                "completing a revert interrupted by a crash",
                metadata: ["volume": "\(volume.name)", "snapshot.id": "\(target.id.guidString)"])
            _ = try? await finishRevert(of: volume, to: target)
        }
    }
}

extension Volume {
    /// Refuses a revert to the snapshot at `sequence` if the diff store lacks a slot for each chunk
    /// the newest snapshot must still preserve (a revert deletes and fails no snapshot for space).
    func checkRoomForRevert(to sequence: SnapshotSequence) throws(EngineError) {
        let (needed, available) = metadata.withLock { metadata -> (UInt64, UInt64) in
            guard let newest = metadata.chain.last, newest.sequence > sequence else { return (0, .max) }
            var changed = ChunkSet()
            for snapshot in metadata.chain where snapshot.sequence >= sequence { changed.formUnion(snapshot.preserved) }
            var needed: UInt64 = 0
            changed.forEachRun(in: 0..<UInt64.max) { run in
                for chunk in run where !newest.preserved.contains(chunk) { needed += 1 }
            }
            return (needed, metadata.slots.availableCount)
        }
        guard needed > available else { return }
        throw .invalidSize(
            "reverting volume '\(name)' needs room for up to \(needed << chunkShift) bytes of copies in its diff store for the newer snapshots, and its limit leaves \(available << chunkShift): raise it with `umbra volume set` or delete snapshots"
        )
    }

    /// Writes the bytes that changed since `target` back from it, in steps; returns how many.
    func writeBack(from target: SnapshotView, progress: (@Sendable (UInt64, UInt64) -> Void)?) async throws -> UInt64 {
        let ranges = changes(since: target.sequence, until: nil)
        let total = ranges.reduce(UInt64(0)) { $0 + $1.count.rawValue }
        var done: UInt64 = 0
        progress?(0, total)
        let step = UInt64(SnapshotStore.revertStepBytes)
        let live = self.live
        for range in ranges {
            var offset = range.offset.rawValue
            while offset < range.end.rawValue {
                let count = min(step, range.end.rawValue - offset)
                let bytes = try await target.read(at: ByteOffset(offset), count: Int(count))
                let at = ByteOffset(offset)
                let zeros = bytes.allSatisfy { $0 == 0 }
                try await mutate(at, ByteCount(count), forRevert: true) {
                    if zeros {
                        try live.discard(at: at, count: ByteCount(count))
                    } else {
                        try bytes.withUnsafeBytes { try live.write(toAbsoluteOffset: at, $0) }
                    }
                }
                offset += count
                done += count
                progress?(done, total)
            }
        }
        return done
    }
}
