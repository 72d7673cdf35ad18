import ArgumentParser
import Foundation

/// A size on the command line: plain bytes, or a number with `K`, `M`, `G` or `T` (powers of 1024;
/// `KiB`, `MiB` … and lowercase are accepted too).
struct Size: ExpressibleByArgument, CustomStringConvertible {
    var bytes: UInt64

    init(bytes: UInt64) { self.bytes = bytes }

    init?(argument: String) {
        guard let parsed = Size.parse(argument) else { return nil }
        self = parsed
    }

    static func parse(_ text: String) -> Size? {
        var digits = Substring(text.trimmingCharacters(in: .whitespaces))
        var multiplier: UInt64 = 1
        for suffix in ["ib", "b"] where digits.lowercased().hasSuffix(suffix) && digits.count > suffix.count {
            digits = digits.dropLast(suffix.count)
            break
        }
        if let last = digits.last?.lowercased(), let shift = ["k": 10, "m": 20, "g": 30, "t": 40][last] {
            multiplier = 1 << UInt64(shift)
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy(\.isNumber), let value = UInt64(digits) else { return nil }
        let (bytes, overflow) = value.multipliedReportingOverflow(by: multiplier)
        return overflow ? nil : Size(bytes: bytes)
    }

    var description: String { Size.format(bytes) }

    /// `1 GiB`, `64 KiB`, `12345 bytes`: the largest unit that divides exactly, else bytes.
    static func format(_ bytes: UInt64) -> String {
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
        where bytes >= 1 << UInt64(shift) && bytes % (1 << UInt64(shift)) == 0 {
            return "\(bytes >> UInt64(shift)) \(unit)"
        }
        return "\(bytes) bytes"
    }

    static var defaultValueDescription: String { "" }
}
