/// The block size constraints of an export (proto.md, "Block size constraints").
public struct NBDBlockSize: Hashable, Sendable, CustomStringConvertible {
    /// Smallest addressable length and alignment: a power of two, at most 64 KiB.
    public var minimum: UInt32
    /// Smallest efficient request: a power of two, at least `max(minimum, 512)`.
    public var preferred: UInt32
    /// Largest request length the export handles: a multiple of `minimum`, or `0xffff_ffff`.
    public var maximum: UInt32

    public init(minimum: UInt32, preferred: UInt32, maximum: UInt32) {
        self.minimum = minimum
        self.preferred = preferred
        self.maximum = maximum
    }

    /// Byte-granular access, 4 KiB preferred, 32 MiB requests.
    public static let `default` = NBDBlockSize(minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024)

    public static let maximumMinimum: UInt32 = 64 * 1024

    /// Why these constraints may not be advertised for an export of `exportSize` bytes, or nil.
    public func violation(exportSize: UInt64) -> String? {
        if minimum == 0 || minimum & (minimum - 1) != 0 || minimum > Self.maximumMinimum {
            return "minimum block size \(minimum) is not a power of two of at most 64 KiB"
        }
        if preferred & (preferred - 1) != 0 || preferred < Swift.max(minimum, 512) {
            return "preferred block size \(preferred) is not a power of two of at least max(minimum, 512)"
        }
        if maximum != .max && maximum % minimum != 0 {
            return "maximum block size \(maximum) is not a multiple of the minimum \(minimum)"
        }
        if UInt64(maximum) < Swift.min(UInt64(preferred), exportSize) {
            return "maximum block size \(maximum) is below min(preferred, export size)"
        }
        return nil
    }

    /// These constraints with the maximum lowered to at most `cap` bytes (rounded down to a
    /// multiple of the minimum, never below the preferred size).
    public func capped(atMaximum cap: Int) -> NBDBlockSize {
        let capped = UInt32(clamping: cap)
        guard maximum > capped else { return self }
        let rounded = capped - capped % minimum
        return NBDBlockSize(minimum: minimum, preferred: preferred, maximum: Swift.max(rounded, preferred))
    }

    public var description: String { "min \(minimum) preferred \(preferred) max \(maximum)" }
}
