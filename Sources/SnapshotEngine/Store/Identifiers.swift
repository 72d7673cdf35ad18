import BlockIO

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// A volume's number inside one data directory (stable for its lifetime, never reused).
struct VolumeID: RawRepresentable, Hashable, Comparable, Sendable {
    var rawValue: UInt32
    static func < (lhs: VolumeID, rhs: VolumeID) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// Creation order of snapshots across the data directory; a newer snapshot has a larger sequence.
struct SnapshotSequence: RawRepresentable, Hashable, Comparable, Sendable {
    var rawValue: UInt64
    static func < (lhs: SnapshotSequence, rhs: SnapshotSequence) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// A place in a volume's diff store, one chunk long; or `zero`, for a preserved chunk that held only
/// zeros and so needs no place at all.
struct DiffSlot: RawRepresentable, Hashable, Comparable, Sendable {
    var rawValue: UInt64
    init(rawValue: UInt64) { self.rawValue = rawValue }
    static let zero = DiffSlot(rawValue: .max)
    var isZero: Bool { rawValue == .max }
    static func < (lhs: DiffSlot, rhs: DiffSlot) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// A byte range of a volume.
public struct ByteRange: Hashable, Sendable, CustomStringConvertible {
    public var offset: ByteOffset
    public var count: ByteCount
    public init(offset: ByteOffset, count: ByteCount) {
        self.offset = offset
        self.count = count
    }
    public var end: ByteOffset { offset + count }
    public var description: String { "[\(offset), +\(count))" }
}

extension UUID {
    /// The GUID as Umbra prints it: lowercase, 8-4-4-4-12.
    public var guidString: String { uuidString.lowercased() }

    var bytes: [UInt8] {
        withUnsafeBytes(of: uuid) { Array($0) }
    }

    init?(bytes: some Collection<UInt8>) {
        guard bytes.count == 16 else { return nil }
        let b = Array(bytes)
        self.init(
            uuid: (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15])
        )
    }
}
