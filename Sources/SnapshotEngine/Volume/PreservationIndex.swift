// Where every preserved copy of every chunk is, per chunk: the copies of chunk c, ordered by the
// sequence of the snapshot that holds each. This is the shape the two hot questions want:
//  - the write path asks "does the newest snapshot hold a copy of c?" (the last entry), and
//  - a read of snapshot k asks "which is the first copy of c held by a snapshot at or after k?"
//    (a search in a short sorted list), whatever the number of snapshots.

struct Preservation: Sendable, Equatable {
    var sequence: SnapshotSequence
    var slot: DiffSlot
}

/// Where a chunk of a snapshot reads from.
enum ChunkSource: Sendable, Equatable {
    /// Not written since the snapshot: the live volume still holds it.
    case live
    /// Preserved, and it held only zeros.
    case zero
    /// Preserved in this diff slot, whose bytes have this CRC-32C (nil: recorded without one).
    case slot(DiffSlot, checksum: UInt32?)

    init(_ preservation: Preservation?, _ checksums: SlotChecksums) {
        guard let preservation else {
            self = .live
            return
        }
        self =
            preservation.slot.isZero
            ? .zero : .slot(preservation.slot, checksum: checksums.checksum(of: preservation.slot))
    }
}

struct PreservationIndex: Sendable {
    private var copies: [UInt64: ContiguousArray<Preservation>] = [:]

    /// How many (chunk, snapshot) copies there are.
    private(set) var count = 0

    /// Whether the snapshot with `sequence` holds its own copy of `chunk`.
    func hasCopy(of chunk: UInt64, heldBy sequence: SnapshotSequence) -> Bool {
        guard let list = copies[chunk] else { return false }
        // The newest snapshot's copy, when it exists, is the last one; check it first.
        if list.last?.sequence == sequence { return true }
        return list.contains { $0.sequence == sequence }
    }

    /// Whether some snapshot's copy of `chunk` lies in `slot`.
    func holds(_ slot: DiffSlot, for chunk: UInt64) -> Bool {
        copies[chunk]?.contains { $0.slot == slot } ?? false
    }

    /// The copy a snapshot with `sequence` reads `chunk` from: the first held at or after it.
    func copy(of chunk: UInt64, forSnapshotAt sequence: SnapshotSequence) -> Preservation? {
        guard let list = copies[chunk] else { return nil }
        for preservation in list where preservation.sequence >= sequence { return preservation }
        return nil
    }

    /// Records that the snapshot `preservation.sequence` holds a copy of `chunk`, replacing its
    /// previous copy if any (replay may see the same copy twice). Returns the slot it replaced.
    @discardableResult
    mutating func insert(_ preservation: Preservation, for chunk: UInt64) -> DiffSlot? {
        var list = copies.removeValue(forKey: chunk) ?? []
        defer { copies[chunk] = list }
        if let index = list.firstIndex(where: { $0.sequence >= preservation.sequence }) {
            if list[index].sequence == preservation.sequence {
                let replaced = list[index].slot
                list[index] = preservation
                return replaced
            }
            list.insert(preservation, at: index)
        } else {
            list.append(preservation)
        }
        count += 1
        return nil
    }

    /// Removes the copy of `chunk` held by the snapshot at `sequence`: either hands it to the snapshot
    /// at `heir` (the next older one) if that holds no copy of its own, or drops it. Returns what
    /// happened so the caller can keep bitmaps and slots in step.
    mutating func removeCopy(of chunk: UInt64, heldBy sequence: SnapshotSequence, heir: SnapshotSequence?)
        -> CopyRemoval
    {
        guard var list = copies.removeValue(forKey: chunk),
            let index = list.firstIndex(where: { $0.sequence == sequence })
        else { return .absent }
        let copy = list[index]
        let heirHasOwn = index > 0 && heir != nil && list[index - 1].sequence == heir
        if let heir, !heirHasOwn {
            list[index].sequence = heir
            copies[chunk] = list
            return .passed(copy.slot)
        }
        list.remove(at: index)
        count -= 1
        if !list.isEmpty { copies[chunk] = list }
        return .dropped(copy.slot)
    }

    enum CopyRemoval: Equatable {
        case absent
        case passed(DiffSlot)
        case dropped(DiffSlot)
    }

    /// Every copy, for compaction and invariant checks.
    func forEach(_ body: (UInt64, Preservation) -> Void) {
        for (chunk, list) in copies {
            for preservation in list { body(chunk, preservation) }
        }
    }
}
