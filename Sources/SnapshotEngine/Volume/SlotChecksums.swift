// The CRC-32C of what each diff slot holds, indexed by slot: 4 bytes per slot, set when a copy is
// recorded (by the copy-on-write or by replay) and read by every snapshot read and by verification.
// A freed slot keeps its stale value until a new copy overwrites it; nothing reads a slot that no
// copy references. Copies recorded before format 3 of the catalog have no checksum: their slots are
// "unchecked", read as they are and reported as such by verification.

struct SlotChecksums: Sendable {
    /// Slots below this are kept in the array; a slot number above it (only a damaged or hostile
    /// catalog could hold one: it would be a diff store of petabytes) goes to a dictionary, so no
    /// record can make the array absurdly large.
    static let arrayLimit: UInt64 = 1 << 32

    private var values: ContiguousArray<UInt32> = []
    private var beyondArray: [UInt64: UInt32] = [:]
    private var unchecked: Set<UInt64> = []

    /// The checksum of the copy in `slot`; nil if it was recorded without one.
    func checksum(of slot: DiffSlot) -> UInt32? {
        if !unchecked.isEmpty, unchecked.contains(slot.rawValue) { return nil }
        guard slot.rawValue < Self.arrayLimit else { return beyondArray[slot.rawValue] }
        return slot.rawValue < UInt64(values.count) ? values[Int(slot.rawValue)] : nil
    }

    mutating func set(_ checksum: UInt32?, of slot: DiffSlot) {
        guard !slot.isZero else { return }
        guard let checksum else {
            unchecked.insert(slot.rawValue)
            return
        }
        if !unchecked.isEmpty { unchecked.remove(slot.rawValue) }
        guard slot.rawValue < Self.arrayLimit else {
            beyondArray[slot.rawValue] = checksum
            return
        }
        let index = Int(slot.rawValue)
        if index >= values.count {
            values.append(contentsOf: repeatElement(0, count: max(index + 1 - values.count, values.count)))
        }
        values[index] = checksum
    }
}
