// What a new volume looks like, and which names and chunk sizes a volume may have.

import BlockIO
import Logging

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// What a new volume looks like.
public struct VolumeSpec: Sendable {
    /// The smallest and largest chunk sizes; the default is chosen by benchmark (README).
    public static let minimumChunkSize = ByteCount.kibibytes(4)
    public static let maximumChunkSize = ByteCount.mebibytes(1)
    public static let defaultChunkSize = ByteCount.kibibytes(64)
    /// Volumes are sized in whole 4 KiB blocks.
    public static let sizeGranularity: UInt64 = 4096
    /// 2^56 bytes (64 PiB): offsets stay far from overflow and chunk indexes fit comfortably.
    public static let maximumSize = ByteCount(UInt64(1) << 56)

    public var name: String
    /// Required for owned volumes; for external ones nil means the whole file or device.
    public var size: ByteCount?
    public var chunkSize: ByteCount
    public var backing: VolumeBacking
    /// The most the diff store may hold; nil for no limit.
    public var diffLimit: ByteCount?
    public var policy: DiffStorePolicy

    public init(
        name: String, size: ByteCount?, chunkSize: ByteCount = VolumeSpec.defaultChunkSize,
        backing: VolumeBacking = .owned, diffLimit: ByteCount? = nil, policy: DiffStorePolicy = .deleteOldest
    ) {
        self.name = name
        self.size = size
        self.chunkSize = chunkSize
        self.backing = backing
        self.diffLimit = diffLimit
        self.policy = policy
    }

    /// Whether `name` may name a volume: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`
    /// (so it is safe in paths and export names, and `@` stays free to separate snapshot GUIDs).
    public static func isValidName(_ name: String) -> Bool {
        guard (1...64).contains(name.utf8.count), let first = name.utf8.first, first != UInt8(ascii: "."),
            first != UInt8(ascii: "-")
        else { return false }
        return name.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
        }
    }
}
