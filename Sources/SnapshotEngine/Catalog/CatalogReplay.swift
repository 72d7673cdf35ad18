// Rebuilding the state from the catalog's records, and the reverse: the records that rebuild the
// current state (what compaction writes). Replay runs the same deletion algorithm as the running
// engine (VolumeMetadata.removeSnapshot), so the two cannot drift apart.

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

struct CatalogReplay {
    struct VolumeEntry {
        var definition: VolumeDefinition
        var metadata: VolumeMetadata
    }

    var volumes: [VolumeID: VolumeEntry] = [:]
    var nextSequence: UInt64 = 1
    var nextVolumeID: UInt32 = 1
    /// What sets were taken for, by set GUID (only sets with a purpose).
    var setPurposes: [UUID: String] = [:]
    /// Records that referred to things that no longer exist (kept for diagnostics; harmless).
    var ignoredRecords = 0

    mutating func apply(_ record: CatalogRecord) {
        switch record {
        case .counters(let sequence, let volumeID):
            nextSequence = max(nextSequence, sequence)
            nextVolumeID = max(nextVolumeID, volumeID)
        case .volumeCreated(let definition):
            volumes[definition.id] = VolumeEntry(
                definition: definition,
                metadata: VolumeMetadata(
                    diffLimit: definition.diffLimit == 0 ? nil : definition.diffLimit,
                    chunkShift: definition.chunkShift,
                    policy: definition.policy))
            nextVolumeID = max(nextVolumeID, definition.id.rawValue + 1)
        case .volumeDeleted(let id):
            if volumes.removeValue(forKey: id) == nil { ignoredRecords += 1 }
        case .diffStoreLimited(let id, let diffLimit, let policy):
            guard var entry = volumes.removeValue(forKey: id) else {
                ignoredRecords += 1
                return
            }
            entry.definition.diffLimit = diffLimit
            entry.definition.policy = policy
            entry.metadata.limitDiffStore(
                to: diffLimit == 0 ? nil : diffLimit, chunkShift: entry.definition.chunkShift, policy: policy)
            volumes[id] = entry
        case .revertStarted(let id, let sequence):
            guard volumes[id] != nil else {
                ignoredRecords += 1
                return
            }
            volumes[id]!.metadata.revertTarget = sequence
        case .setLabelled(let id, let purpose):
            setPurposes[id] = purpose
        case .volumeFilling(let id):
            if volumes[id] == nil { ignoredRecords += 1 } else { volumes[id]!.metadata.isFilling = true }
        case .volumeFilled(let id):
            if volumes[id] == nil { ignoredRecords += 1 } else { volumes[id]!.metadata.isFilling = false }
        case .revertFinished(let id):
            guard volumes[id] != nil else {
                ignoredRecords += 1
                return
            }
            volumes[id]!.metadata.revertTarget = nil
        case .setCreated(let set):
            for member in set.members {
                nextSequence = max(nextSequence, member.sequence.rawValue + 1)
                guard volumes[member.volume] != nil else {
                    ignoredRecords += 1
                    continue
                }
                volumes[member.volume]!.metadata.addSnapshot(
                    SnapshotState(
                        id: member.snapshotID, setID: set.id, sequence: member.sequence,
                        createdAtNanoseconds: set.createdAtNanoseconds, isPending: set.isPending))
            }
        case .setKept(let id):
            var found = false
            for volume in volumes.keys where volumes[volume]!.metadata.keepSet(id) { found = true }
            if !found { ignoredRecords += 1 }
        case .preserved(let volume, let sequence, let firstChunk, let count, let firstSlot, let checksums):
            guard var entry = volumes.removeValue(forKey: volume) else {
                ignoredRecords += 1
                return
            }
            defer { volumes[volume] = entry }
            guard let position = entry.metadata.position(of: sequence) else {
                ignoredRecords += 1
                return
            }
            for offset in 0..<UInt64(count) {
                let slot = firstSlot.isZero ? DiffSlot.zero : DiffSlot(rawValue: firstSlot.rawValue + offset)
                entry.metadata.recordCopy(
                    of: firstChunk + offset, in: slot, checksum: checksums?[Int(offset)], snapshotAt: position)
            }
        case .snapshotsDeleted(let references):
            for reference in references {
                guard volumes[reference.volume] != nil else {
                    ignoredRecords += 1
                    continue
                }
                if let position = volumes[reference.volume]!.metadata.position(of: reference.sequence) {
                    _ = volumes[reference.volume]!.metadata.removeSnapshot(at: position)
                } else {
                    volumes[reference.volume]!.metadata.failed.removeAll { $0.sequence == reference.sequence }
                }
            }
        case .snapshotFailed(let reference, let reason):
            guard var entry = volumes.removeValue(forKey: reference.volume) else {
                ignoredRecords += 1
                return
            }
            defer { volumes[reference.volume] = entry }
            guard let position = entry.metadata.position(of: reference.sequence) else {
                ignoredRecords += 1
                return
            }
            let snapshot = entry.metadata.chain[position]
            _ = entry.metadata.removeSnapshot(at: position)
            entry.metadata.failed.append(FailedSnapshot(failing: snapshot, reason: reason))
        }
    }

    /// Rebuilds each volume's slot allocator from the slots its index references.
    mutating func rebuildAllocators() {
        for id in volumes.keys {
            var used = Set<UInt64>()
            volumes[id]!.metadata.index.forEach { _, preservation in
                if !preservation.slot.isZero { used.insert(preservation.slot.rawValue) }
            }
            let limit = volumes[id]!.metadata.slots.limit
            volumes[id]!.metadata.slots = SlotAllocator(used: used, limit: limit)
        }
    }

    /// The records that rebuild exactly this state: what a compacted catalog holds.
    static func records(
        volumes: [(definition: VolumeDefinition, metadata: VolumeMetadata)], nextSequence: UInt64, nextVolumeID: UInt32,
        setPurposes: [UUID: String] = [:]
    ) -> [CatalogRecord] {
        var records: [CatalogRecord] = [.counters(nextSequence: nextSequence, nextVolumeID: nextVolumeID)]
        // Sets are rebuilt from their surviving members, in creation order.
        struct SetBuilder {
            var createdAt: Int64
            var members: [SetMember]
            var firstSequence: SnapshotSequence
            var isPending: Bool
        }
        var sets: [UUID: SetBuilder] = [:]
        var failures: [CatalogRecord] = []
        for (definition, metadata) in volumes.sorted(by: { $0.definition.id < $1.definition.id }) {
            records.append(.volumeCreated(definition))
            if metadata.isFilling { records.append(.volumeFilling(definition.id)) }
            let members =
                metadata.chain.map { ($0.id, $0.setID, $0.sequence, $0.createdAtNanoseconds, $0.isPending) }
                + metadata.failed.map { ($0.id, $0.setID, $0.sequence, $0.createdAtNanoseconds, $0.isPending) }
            for (id, setID, sequence, createdAt, isPending) in members {
                let member = SetMember(volume: definition.id, snapshotID: id, sequence: sequence)
                if sets[setID] == nil {
                    sets[setID] = SetBuilder(
                        createdAt: createdAt, members: [member], firstSequence: sequence, isPending: isPending)
                } else {
                    sets[setID]!.members.append(member)
                    sets[setID]!.firstSequence = min(sets[setID]!.firstSequence, sequence)
                }
            }
            for failed in metadata.failed {
                failures.append(
                    .snapshotFailed(
                        SnapshotReference(volume: definition.id, sequence: failed.sequence), reason: failed.reason))
            }
        }
        for (id, set) in sets.sorted(by: { $0.value.firstSequence < $1.value.firstSequence }) {
            records.append(
                .setCreated(
                    SetDefinition(
                        id: id, createdAtNanoseconds: set.createdAt,
                        members: set.members.sorted { $0.sequence < $1.sequence }, isPending: set.isPending)))
        }
        for (id, _) in sets.sorted(by: { $0.value.firstSequence < $1.value.firstSequence }) {
            if let purpose = setPurposes[id] { records.append(.setLabelled(id, purpose: purpose)) }
        }
        // Failed snapshots hold no copies, so failing them again on replay hands nothing on.
        records.append(contentsOf: failures)
        for (definition, metadata) in volumes.sorted(by: { $0.definition.id < $1.definition.id }) {
            for snapshot in metadata.chain {
                var copies: [PlacedCopy] = []
                snapshot.preserved.forEachRun(in: 0..<UInt64.max) { run in
                    for chunk in run {
                        let slot = metadata.index.copy(of: chunk, forSnapshotAt: snapshot.sequence)!.slot
                        copies.append(
                            PlacedCopy(
                                chunk: chunk, slot: slot,
                                checksum: slot.isZero ? nil : metadata.checksums.checksum(of: slot)
                            ))
                    }
                }
                records.append(
                    contentsOf: Volume.records(for: copies, volume: definition.id, sequence: snapshot.sequence))
            }
            // A revert still to complete stays so, after the snapshot it reverts to.
            if let target = metadata.revertTarget { records.append(.revertStarted(definition.id, sequence: target)) }
        }
        return records
    }
}
