/// An extent of a block status reply: `length` bytes with the same status `flags`.
public struct NBDExtent: Hashable, Sendable {
    public var length: UInt32
    public var flags: UInt32

    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }

    /// `extents` made valid for a BLOCK_STATUS chunk answering a request of `length` bytes: empty
    /// extents dropped, neighbours with equal flags merged, the total cut to `length`, at most
    /// `maximumCount` extents (one with `requestOne`). Never empty: if nothing usable is left,
    /// one extent of `length` with status 0, which the spec says is always a safe answer.
    public static func normalized(
        _ extents: [NBDExtent],
        length: UInt32,
        requestOne: Bool,
        maximumCount: Int
    ) -> [NBDExtent] {
        let limit = requestOne ? 1 : Swift.max(1, maximumCount)
        var result: [NBDExtent] = []
        var covered: UInt32 = 0
        for extent in extents where extent.length > 0 {
            guard covered < length else { break }
            let clipped = Swift.min(extent.length, length - covered)
            covered += clipped
            if let last = result.last, last.flags == extent.flags {
                result[result.count - 1].length = last.length + clipped
            } else if result.count < limit {
                result.append(NBDExtent(length: clipped, flags: extent.flags))
            } else {
                break
            }
        }
        if result.isEmpty { return [NBDExtent(length: length, flags: 0)] }
        return result
    }
}
