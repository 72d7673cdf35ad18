// Byte offsets and byte counts are different kinds of number (TigerBeetle's habit): an offset plus a
// count is an offset, two offsets differ by a count, and nothing else mixes them by accident.

public struct ByteOffset: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64

    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ value: UInt64) { self.rawValue = value }
    @inlinable public init(_ value: Int) { self.rawValue = UInt64(value) }

    public static let zero = ByteOffset(0)

    @inlinable public static func < (lhs: ByteOffset, rhs: ByteOffset) -> Bool { lhs.rawValue < rhs.rawValue }
    @inlinable public static func + (lhs: ByteOffset, rhs: ByteCount) -> ByteOffset {
        ByteOffset(lhs.rawValue + rhs.rawValue)
    }
    @inlinable public static func += (lhs: inout ByteOffset, rhs: ByteCount) { lhs.rawValue += rhs.rawValue }
    @inlinable public static func - (lhs: ByteOffset, rhs: ByteOffset) -> ByteCount {
        ByteCount(lhs.rawValue - rhs.rawValue)
    }

    /// The offset as a signed `off_t`-sized integer, for syscalls.
    @inlinable public var signed: Int64 { Int64(bitPattern: rawValue) }
    public var description: String { "\(rawValue)" }
}

public struct ByteCount: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64

    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ value: UInt64) { self.rawValue = value }
    @inlinable public init(_ value: Int) { self.rawValue = UInt64(value) }

    public static let zero = ByteCount(0)
    public static func kibibytes(_ count: UInt64) -> ByteCount { ByteCount(count << 10) }
    public static func mebibytes(_ count: UInt64) -> ByteCount { ByteCount(count << 20) }
    public static func gibibytes(_ count: UInt64) -> ByteCount { ByteCount(count << 30) }
    public static func tebibytes(_ count: UInt64) -> ByteCount { ByteCount(count << 40) }

    @inlinable public static func < (lhs: ByteCount, rhs: ByteCount) -> Bool { lhs.rawValue < rhs.rawValue }
    @inlinable public static func + (lhs: ByteCount, rhs: ByteCount) -> ByteCount {
        ByteCount(lhs.rawValue + rhs.rawValue)
    }
    @inlinable public static func - (lhs: ByteCount, rhs: ByteCount) -> ByteCount {
        ByteCount(lhs.rawValue - rhs.rawValue)
    }

    /// The count as an `Int`, for buffer sizes. Callers bound counts before they get here.
    @inlinable public var int: Int { Int(rawValue) }
    public var description: String { "\(rawValue)" }
}

extension Duration {
    /// The duration in seconds, for reports.
    public var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }

    /// The duration in whole nanoseconds (truncated), saturating at the bounds of `Int64`: for timers
    /// such as swift-metrics' `recordNanoseconds`.
    public var wholeNanoseconds: Int64 {
        let (seconds, attoseconds) = components
        let (scaled, overflowed) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        let (total, overflowedAgain) = scaled.addingReportingOverflow(attoseconds / 1_000_000_000)
        return overflowed || overflowedAgain ? (seconds < 0 ? .min : .max) : total
    }
}
