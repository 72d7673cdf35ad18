// Places in a volume's diff store. Slots come from a free stack first (space given back by deleted
// snapshots) and then from the high-water mark, so sequential copy-on-write fills consecutive slots.
// A slot freed by a deletion goes back on the stack only once that deletion is durable: reusing it
// earlier could let a crash resurrect the snapshot with someone else's data in its slot.

struct SlotAllocator: Sendable {
    private(set) var highWater: UInt64 = 0
    private var free: [UInt64] = []
    /// The most slots the diff store may use; nil for no limit.
    var limit: UInt64?

    init(limit: UInt64?) {
        self.limit = limit
    }

    /// Rebuilds the allocator after recovery from the set of slots in use.
    init(used: Set<UInt64>, limit: UInt64?) {
        self.limit = limit
        highWater = (used.max() ?? UInt64.max) &+ 1
        free = (0..<highWater).reversed().filter { !used.contains($0) }
    }

    var usedCount: UInt64 { highWater - UInt64(free.count) }

    var availableCount: UInt64 {
        guard let limit else { return .max }
        return limit > usedCount ? limit - usedCount : 0
    }

    /// Takes up to `count` slots (fewer if the limit is near; none if it is reached).
    mutating func reserve(upTo count: Int) -> [DiffSlot] {
        let granted = Int(min(UInt64(count), availableCount))
        var slots: [DiffSlot] = []
        slots.reserveCapacity(granted)
        while slots.count < granted, let slot = free.popLast() { slots.append(DiffSlot(rawValue: slot)) }
        while slots.count < granted {
            slots.append(DiffSlot(rawValue: highWater))
            highWater += 1
        }
        return slots
    }

    /// Gives slots back (unused reservations, or slots whose release is durable).
    mutating func release(_ slots: some Sequence<DiffSlot>) {
        for slot in slots where !slot.isZero {
            assert(slot.rawValue < highWater, "releasing slot \(slot.rawValue) above the high-water mark")
            free.append(slot.rawValue)
        }
    }
}
