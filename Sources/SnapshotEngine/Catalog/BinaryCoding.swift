// The catalog's little-endian byte coding: fixed-width integers, GUIDs and u16-length UTF-8
// strings (docs/on-disk-format.md).

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Little-endian encoding into a growing byte array.
struct BinaryWriter {
    var bytes: [UInt8] = []

    mutating func u8(_ value: UInt8) { bytes.append(value) }
    mutating func u16(_ value: UInt16) { withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u32(_ value: UInt32) { withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ value: UInt64) { withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func i64(_ value: Int64) { u64(UInt64(bitPattern: value)) }
    mutating func uuid(_ value: UUID) { bytes.append(contentsOf: value.bytes) }
    mutating func string(_ value: String) {
        let utf8 = Array(value.utf8.prefix(Int(UInt16.max)))
        u16(UInt16(utf8.count))
        bytes.append(contentsOf: utf8)
    }
}

/// Bounds-checked little-endian decoding; running off the end throws, never traps.
struct BinaryReader {
    struct Malformed: Error {
        var reason: String
    }

    private let bytes: [UInt8]
    private(set) var position: Int
    private let end: Int

    init(_ bytes: [UInt8], from start: Int = 0, to end: Int? = nil) {
        self.bytes = bytes
        self.position = start
        self.end = end ?? bytes.count
    }

    var remaining: Int { end - position }

    private mutating func take(_ count: Int) throws(Malformed) -> Int {
        guard count >= 0, count <= remaining else {
            throw Malformed(reason: "needs \(count) bytes at offset \(position) but only \(remaining) remain")
        }
        defer { position += count }
        return position
    }

    mutating func u8() throws(Malformed) -> UInt8 { bytes[try take(1)] }

    mutating func u16() throws(Malformed) -> UInt16 {
        let start = try take(2)
        return UInt16(bytes[start]) | UInt16(bytes[start + 1]) << 8
    }

    mutating func u32() throws(Malformed) -> UInt32 {
        let start = try take(4)
        var value: UInt32 = 0
        for index in 0..<4 { value |= UInt32(bytes[start + index]) << (8 * index) }
        return value
    }

    mutating func u64() throws(Malformed) -> UInt64 {
        let start = try take(8)
        var value: UInt64 = 0
        for index in 0..<8 { value |= UInt64(bytes[start + index]) << (8 * index) }
        return value
    }

    mutating func i64() throws(Malformed) -> Int64 { Int64(bitPattern: try u64()) }

    mutating func uuid() throws(Malformed) -> UUID {
        let start = try take(16)
        return UUID(bytes: bytes[start..<(start + 16)])!
    }

    mutating func string() throws(Malformed) -> String {
        let count = Int(try u16())
        let start = try take(count)
        return String(decoding: bytes[start..<(start + count)], as: UTF8.self)
    }

    /// A reader over the next `count` bytes, which this reader skips.
    mutating func subReader(count: Int) throws(Malformed) -> BinaryReader {
        let start = try take(count)
        return BinaryReader(bytes, from: start, to: start + count)
    }
}
