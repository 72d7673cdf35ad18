// The parts of QEMU's qcow2 format (docs/interop/qcow2.txt) that Umbra writes and reads: version 3,
// no encryption, no compression, no internal snapshots, 16-bit refcounts, an optional backing file
// (qcow2) named in the header. All integers are big-endian.
//
// A cluster is the unit of allocation. The guest's clusters map through a two-level table: the L1
// table holds the host offsets of L2 tables, each L2 table one cluster of 8-byte entries, each entry
// the host offset of a data cluster (bit 63: the refcount is exactly 1), or bit 0 alone: the cluster
// reads as zeros, or 0: unallocated, read from the backing file (zeros without one). Every host
// cluster the file uses (header, tables, data) has a refcount, kept in refcount blocks that a
// refcount table points at.

public enum QCOW2Layout {
    public static let magic: UInt32 = 0x5146_49FB  // "QFI\xfb"
    public static let version: UInt32 = 3
    /// 64 KiB clusters, QEMU's default.
    public static let defaultClusterBits: UInt32 = 16
    /// The header Umbra writes: the version 3 fields up to and including the header length.
    public static let headerLength: UInt32 = 104
    /// 2^4 = 16-bit refcounts, the default.
    public static let refcountOrder: UInt32 = 4
    /// Header extension: the backing file's format.
    static let backingFormatExtension: UInt32 = 0xE279_2ACA
    static let copiedFlag: UInt64 = 1 << 63
    static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1
    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    /// Incompatible features Umbra can read: bit 0 (dirty; refcounts may be stale, which a reader
    /// does not use). Anything else (corrupt, external data file, compression type, extended L2) is
    /// refused.
    static let readableIncompatibleFeatures: UInt64 = 1
}

/// Big-endian writing into a byte array.
struct BigEndianWriter {
    var bytes: [UInt8]

    init(count: Int) { bytes = [UInt8](repeating: 0, count: count) }

    mutating func put(_ value: UInt32, at offset: Int) {
        for index in 0..<4 { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (24 - 8 * index)) }
    }

    mutating func put(_ value: UInt64, at offset: Int) {
        for index in 0..<8 { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (56 - 8 * index)) }
    }

    mutating func put(_ value: UInt16, at offset: Int) {
        bytes[offset] = UInt8(truncatingIfNeeded: value >> 8)
        bytes[offset + 1] = UInt8(truncatingIfNeeded: value)
    }
}

extension Array where Element == UInt8 {
    func bigEndian32(at offset: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(self[offset + $1]) }
    }

    func bigEndian64(at offset: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(self[offset + $1]) }
    }
}
