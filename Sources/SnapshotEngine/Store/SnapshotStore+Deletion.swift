// Deleting snapshots (each by its own GUID or its set's, all in one durable step), and change
// tracking between snapshots.

import BlockIO
import Logging
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

extension SnapshotStore {
    // MARK: - Deleting snapshots

    /// Deletes snapshots, each named by its own GUID or by its set's GUID (the whole set), all in one
    /// durable step. Returns the GUIDs of the snapshots deleted. Nothing is deleted if any id is unknown.
    @discardableResult
    public func deleteSnapshots(ids: [UUID]) async throws -> [UUID] {
        try checkOpen()
        await operations.lock()
        defer { operations.unlock() }
        try checkOpen()
        // Resolve every id first: all or nothing.
        var targets: [Volume: [SnapshotSequence]] = [:]
        var deletedIDs: [UUID] = []
        let volumes = allVolumes()
        for id in ids {
            var matched = false
            for volume in volumes {
                volume.metadata.withLock { metadata in
                    let ready = metadata.chain.filter { $0.id == id || $0.setID == id }.map { ($0.id, $0.sequence) }
                    let failed = metadata.failed.filter { $0.id == id || $0.setID == id }.map { ($0.id, $0.sequence) }
                    for (snapshotID, sequence) in ready + failed where !(targets[volume]?.contains(sequence) ?? false) {
                        targets[volume, default: []].append(sequence)
                        deletedIDs.append(snapshotID)
                    }
                    if !ready.isEmpty || !failed.isEmpty { matched = true }
                }
            }
            if !matched { throw EngineError.snapshotNotFound(id.guidString) }
        }
        // A revert to be run again reads its snapshot: that one stays until the revert succeeds.
        for (volume, sequences) in targets {
            if let target = volume.metadata.withLock({ $0.revertTarget }), sequences.contains(target) {
                throw EngineError.snapshotOrder(
                    "volume '\(volume.name)' waits to be reverted to that snapshot; it can be deleted once a revert succeeds"
                )
            }
        }
        let ordered = targets.keys.sorted { $0.id < $1.id }
        var held: [Volume] = []
        defer { for volume in held { volume.gate.releaseExclusive() } }
        for volume in ordered {
            try await volume.gate.acquireExclusive()
            held.append(volume)
        }
        // A snapshot the diff-store policy removed meanwhile needs no second deletion.
        var references: [SnapshotReference] = []
        for volume in ordered {
            let present = volume.metadata.withLock { metadata -> [SnapshotSequence] in
                targets[volume]!.filter { sequence in
                    if let position = metadata.position(of: sequence) {
                        metadata.chain[position].deleting = true
                        return true
                    }
                    return metadata.failed.contains { $0.sequence == sequence }
                }
            }
            for sequence in present {
                await volume.waitForReaders(of: sequence)
                references.append(SnapshotReference(volume: volume.id, sequence: sequence))
            }
        }
        guard !references.isEmpty else { return deletedIDs }
        do {
            // Nothing changes in memory before the record is durable, and a failure undoes the
            // marks (the gates are held, so no other deletion marked anything here): it fails cleanly.
            try await context.catalog.append([.snapshotsDeleted(references)], failsCleanly: true)
        } catch {
            for volume in ordered {
                volume.metadata.withLock { metadata in
                    for position in metadata.chain.indices { metadata.chain[position].deleting = false }
                }
            }
            throw EngineError.wrap(error)
        }
        for volume in ordered {
            let freed = volume.metadata.withLock { metadata -> [DiffSlot] in
                var freed: [DiffSlot] = []
                for reference in references where reference.volume == volume.id {
                    if let position = metadata.position(of: reference.sequence) {
                        freed += metadata.removeSnapshot(at: position)
                    } else {
                        metadata.failed.removeAll { $0.sequence == reference.sequence }
                    }
                }
                return freed
            }
            await volume.releaseSlots(freed)
        }
        for volume in held { volume.gate.releaseExclusive() }
        held = []
        context.configuration.eventHandler?(.snapshotsDeleted(ids: deletedIDs))
        await compactIfWorthIt(holdingOperations: true)
        return deletedIDs
    }

    // MARK: - Change tracking

    /// The byte ranges of `volume` that may differ between snapshot `since` and snapshot `until` (nil:
    /// the live volume now). `until` must be newer than `since`.
    public func changes(volume name: String, since: UUID, until: UUID? = nil) throws -> ChangedExtents {
        let volume = try self.volume(named: name)
        let sinceSnapshot = try snapshot(id: since)
        guard sinceSnapshot.volume === volume else {
            throw EngineError.snapshotOrder("snapshot \(since.guidString) is not of volume '\(name)'")
        }
        var untilSequence: SnapshotSequence?
        if let until {
            let untilSnapshot = try snapshot(id: until)
            guard untilSnapshot.volume === volume else {
                throw EngineError.snapshotOrder("snapshot \(until.guidString) is not of volume '\(name)'")
            }
            guard untilSnapshot.sequence > sinceSnapshot.sequence else {
                throw EngineError.snapshotOrder("snapshot \(until.guidString) is not newer than \(since.guidString)")
            }
            untilSequence = untilSnapshot.sequence
        }
        return ChangedExtents(
            chunkSize: volume.chunkSize, extents: volume.changes(since: sinceSnapshot.sequence, until: untilSequence))
    }
}
