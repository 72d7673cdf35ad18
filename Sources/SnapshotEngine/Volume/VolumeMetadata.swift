// A volume's snapshot chain and where every preserved chunk lives. Recovery builds it by replaying
// the catalog; at run time it sits behind the volume's mutex. The deletion algorithm lives here once
// and both use it, so the state after a replay is the state the running engine had.
//
// Deleting snapshot k (ARCHITECTURE.md): each chunk k preserved passes to the next older snapshot if
// that one has no copy of its own (its view of the chunk was the same as k's), otherwise k's copy is
// dropped and its diff slot freed. The cost is proportional to what k preserved.

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

struct SnapshotState: Sendable {
    let id: UUID
    let setID: UUID
    let sequence: SnapshotSequence
    let createdAtNanoseconds: Int64
    /// Its set was taken but not yet kept: recovery rolls the set back.
    var isPending: Bool
    /// The chunks this snapshot holds a copy of (its change bitmap).
    var preserved = ChunkSet()
    /// How many of those copies occupy a diff slot (the rest were zeros).
    var dataSlotCount: UInt64 = 0
    /// Reads in flight; a deletion waits for them to finish.
    var readers = 0
    /// Set when a deletion has begun: new reads are refused.
    var deleting = false
    /// Why the `failSnapshot` policy is failing it, while it does (`deleting` is set too): reads are
    /// told it failed, not that it was deleted.
    var failingReason: String?
    var readersDrained: CheckedContinuation<Void, Never>?

    init(id: UUID, setID: UUID, sequence: SnapshotSequence, createdAtNanoseconds: Int64, isPending: Bool = false) {
        self.id = id
        self.setID = setID
        self.sequence = sequence
        self.createdAtNanoseconds = createdAtNanoseconds
        self.isPending = isPending
    }
}

struct FailedSnapshot: Sendable {
    let id: UUID
    let setID: UUID
    let sequence: SnapshotSequence
    let createdAtNanoseconds: Int64
    let reason: String
    var isPending: Bool

    init(failing snapshot: SnapshotState, reason: String) {
        id = snapshot.id
        setID = snapshot.setID
        sequence = snapshot.sequence
        createdAtNanoseconds = snapshot.createdAtNanoseconds
        self.reason = reason
        isPending = snapshot.isPending
    }
}

struct VolumeMetadata: Sendable {
    /// Readable snapshots, oldest first.
    var chain: [SnapshotState] = []
    /// Snapshots that failed; listed until deleted, never readable.
    var failed: [FailedSnapshot] = []
    var index = PreservationIndex()
    var slots: SlotAllocator
    /// The checksum of each slot's copy.
    var checksums = SlotChecksums()
    /// Chunks being copied right now, with the writers waiting for each copy to finish.
    var chunksInCopy: [UInt64: [CheckedContinuation<Void, Never>]] = [:]
    var policy: DiffStorePolicy
    /// The diff store's limit in bytes, nil for none; `slots` holds it in whole chunks.
    private(set) var diffLimit: UInt64?
    /// The snapshot a revert in progress (or interrupted) makes the live data read as. No snapshot
    /// gives way to the diff-store policy meanwhile: a revert keeps every one.
    var revertTarget: SnapshotSequence?
    /// Created to be filled (a restore) and not yet filled: opening the store deletes it.
    var isFilling = false

    init(diffLimit: UInt64?, chunkShift: UInt8, policy: DiffStorePolicy) {
        self.slots = SlotAllocator(limit: diffLimit.map { $0 >> chunkShift })
        self.policy = policy
        self.diffLimit = diffLimit
    }

    /// A new limit (nil: none) and policy. Lowering the limit below what the diff store holds frees
    /// nothing now: the next copy that needs a slot finds none and the policy gives way then.
    mutating func limitDiffStore(to bytes: UInt64?, chunkShift: UInt8, policy: DiffStorePolicy) {
        slots.limit = bytes.map { $0 >> chunkShift }
        diffLimit = bytes
        self.policy = policy
    }

    /// The position in `chain` of the snapshot with `sequence`.
    func position(of sequence: SnapshotSequence) -> Int? {
        var low = 0
        var high = chain.count
        while low < high {
            let middle = (low + high) / 2
            if chain[middle].sequence < sequence { low = middle + 1 } else { high = middle }
        }
        return low < chain.count && chain[low].sequence == sequence ? low : nil
    }

    func position(of id: UUID) -> Int? { chain.firstIndex { $0.id == id } }

    /// Adds a snapshot, keeping the chain ordered by sequence.
    mutating func addSnapshot(_ snapshot: SnapshotState) {
        let index = chain.firstIndex { $0.sequence > snapshot.sequence } ?? chain.count
        chain.insert(snapshot, at: index)
    }

    /// Marks every snapshot of set `id` kept; returns whether the volume has any.
    mutating func keepSet(_ id: UUID) -> Bool {
        var found = false
        for position in chain.indices where chain[position].setID == id {
            chain[position].isPending = false
            found = true
        }
        for position in failed.indices where failed[position].setID == id {
            failed[position].isPending = false
            found = true
        }
        return found
    }

    /// Records that the snapshot at `position` holds a copy of `chunk` in `slot`, whose bytes have
    /// `checksum` (nil for zeros, or a copy recorded before checksums existed).
    mutating func recordCopy(of chunk: UInt64, in slot: DiffSlot, checksum: UInt32?, snapshotAt position: Int) {
        checksums.set(checksum, of: slot)
        let replaced = index.insert(Preservation(sequence: chain[position].sequence, slot: slot), for: chunk)
        chain[position].preserved.insert(chunk)
        // Replay may meet the same copy twice; count each chunk's slot once.
        if let replaced, !replaced.isZero { chain[position].dataSlotCount -= 1 }
        if !slot.isZero { chain[position].dataSlotCount += 1 }
    }

    /// Removes the snapshot at `position` from the chain, handing its copies to the next older
    /// snapshot where that one has none of its own. Returns the diff slots no snapshot needs any
    /// more; the caller frees them once the removal is durable.
    mutating func removeSnapshot(at position: Int) -> [DiffSlot] {
        let removed = chain.remove(at: position)
        let heirPosition = position > 0 ? position - 1 : nil
        let heir = heirPosition.map { chain[$0].sequence }
        var freed: [DiffSlot] = []
        removed.preserved.forEachRun(in: 0..<UInt64.max) { run in
            for chunk in run {
                switch index.removeCopy(of: chunk, heldBy: removed.sequence, heir: heir) {
                case .passed(let slot):
                    chain[heirPosition!].preserved.insert(chunk)
                    if !slot.isZero { chain[heirPosition!].dataSlotCount += 1 }
                case .dropped(let slot):
                    if !slot.isZero { freed.append(slot) }
                case .absent:
                    assertionFailure("snapshot \(removed.sequence) lists chunk \(chunk) but the index has no copy")
                }
            }
        }
        return freed
    }

    /// Every problem with the metadata's internal consistency, for tests and `umbra check`-style tools.
    func consistencyProblems(volume: String) -> [String] {
        var problems: [String] = []
        var slotsSeen: [UInt64: UInt64] = [:]
        var chunksBySequence: [SnapshotSequence: ChunkSet] = [:]
        var dataBySequence: [SnapshotSequence: UInt64] = [:]
        index.forEach { chunk, preservation in
            chunksBySequence[preservation.sequence, default: ChunkSet()].insert(chunk)
            guard !preservation.slot.isZero else { return }
            dataBySequence[preservation.sequence, default: 0] += 1
            if let other = slotsSeen[preservation.slot.rawValue] {
                problems.append("\(volume): diff slot \(preservation.slot.rawValue) holds chunks \(other) and \(chunk)")
            }
            slotsSeen[preservation.slot.rawValue] = chunk
        }
        for snapshot in chain {
            if chunksBySequence[snapshot.sequence] ?? ChunkSet() != snapshot.preserved {
                problems.append("\(volume): snapshot \(snapshot.sequence.rawValue)'s bitmap differs from the index")
            }
            if dataBySequence[snapshot.sequence] ?? 0 != snapshot.dataSlotCount {
                problems.append(
                    "\(volume): snapshot \(snapshot.sequence.rawValue) counts \(snapshot.dataSlotCount) slots")
            }
        }
        let known = Set(chain.map(\.sequence))
        for sequence in chunksBySequence.keys where !known.contains(sequence) {
            problems.append(
                "\(volume): the index holds copies for snapshot \(sequence.rawValue), which is not in the chain")
        }
        if UInt64(slotsSeen.count) != slots.usedCount {
            problems.append("\(volume): \(slotsSeen.count) slots referenced but \(slots.usedCount) allocated")
        }
        if zip(chain, chain.dropFirst()).contains(where: { $0.sequence >= $1.sequence }) {
            problems.append("\(volume): the chain is out of order")
        }
        return problems
    }
}
