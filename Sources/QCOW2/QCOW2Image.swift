// Reads a qcow2 image and its backing chain: what a guest cluster holds, resolved through the
// chain, and its bytes. Enough for the images Umbra writes and for plain ones QEMU writes; anything
// this does not understand (encryption, compression, an external data file, extended L2 entries) is
// refused with a sentence saying what, never misread. Every offset read from the file is checked
// against the file's length before it is used.

import BlockIO

public final class QCOW2Image {
    public let path: String
    public let virtualSize: UInt64
    public let clusterSize: Int
    /// The backing file as this image records it, if any.
    public let backingFile: String?
    /// The image under this one (its backing file, opened), if any.
    public private(set) var backing: QCOW2Image?
    private let storage: any BlockStorage
    private let clusterBits: UInt32
    private let fileSize: UInt64
    private let l1: [UInt64]
    private var l2Cache: [Int: [UInt64]] = [:]

    /// This image, then its backing file, then that one's, and so on.
    public var chain: [QCOW2Image] {
        var images = [self]
        while let next = images.last!.backing { images.append(next) }
        return images
    }

    /// Opens the image at `path` (absolute) and its backing chain (names relative to each image's
    /// directory), at most `depth` images deep.
    public static func open(path: String, depth: Int = 256) throws -> QCOW2Image {
        let image = try QCOW2Image(path: path)
        var paths = [path]
        var current = image
        while let backing = current.backingFile {
            guard paths.count < depth else {
                throw QCOW2Error("\(path): the backing chain is deeper than \(depth) images")
            }
            let directory = current.path.split(separator: "/", omittingEmptySubsequences: false).dropLast()
                .joined(separator: "/")
            let backingPath = backing.hasPrefix("/") ? backing : directory + "/" + backing
            guard !paths.contains(backingPath) else {
                throw QCOW2Error("\(path): the backing chain loops at \(backingPath)")
            }
            let next: QCOW2Image
            do {
                next = try QCOW2Image(path: backingPath)
            } catch let error as BlockIOError where error.errno == .noSuchFileOrDirectory {
                throw QCOW2Error("\(current.path): its backing file \(backingPath) is missing (the chain is broken)")
            }
            current.backing = next
            paths.append(backingPath)
            current = next
        }
        return image
    }

    private init(path: String) throws {
        self.path = path
        // Read-only: backups may sit on read-only media or belong to someone else.
        storage = try FileStorage(path: path, mode: .readOnly)
        fileSize = try storage.size().rawValue
        guard fileSize >= 512 else { throw QCOW2Error("\(path) is not a qcow2 image (too short)") }
        let header = try Self.read(storage, at: 0, count: 512)
        guard header.bigEndian32(at: 0) == QCOW2Layout.magic else { throw QCOW2Error("\(path) is not a qcow2 image") }
        let version = header.bigEndian32(at: 4)
        guard version == 2 || version == 3 else { throw QCOW2Error("\(path) is qcow2 version \(version), not 2 or 3") }
        clusterBits = header.bigEndian32(at: 20)
        guard (9...21).contains(clusterBits) else { throw QCOW2Error("\(path) has a cluster size of 2^\(clusterBits)") }
        clusterSize = 1 << Int(clusterBits)
        virtualSize = header.bigEndian64(at: 24)
        // Every value from the file is bounded before arithmetic uses it (none may overflow).
        guard virtualSize <= 1 << 56 else { throw QCOW2Error("\(path) is damaged: its size is \(virtualSize) bytes") }
        guard header.bigEndian32(at: 32) == 0 else { throw QCOW2Error("\(path) is encrypted") }
        if version == 3 {
            let incompatible = header.bigEndian64(at: 72)
            guard incompatible & ~QCOW2Layout.readableIncompatibleFeatures == 0 else {
                throw QCOW2Error("\(path) uses qcow2 features Umbra does not read (incompatible bits \(incompatible))")
            }
        }
        let l1Entries = Int(header.bigEndian32(at: 36))
        let l1Offset = header.bigEndian64(at: 40)
        let entriesPerTable = UInt64(clusterSize / 8)
        let guestClusters = (virtualSize + UInt64(clusterSize) - 1) >> UInt64(clusterBits)
        guard UInt64(l1Entries) * entriesPerTable >= guestClusters, l1Entries <= 1 << 25 else {
            throw QCOW2Error("\(path) has an L1 table of \(l1Entries) entries for \(virtualSize) bytes")
        }
        guard l1Offset % UInt64(clusterSize) == 0, l1Offset <= fileSize, UInt64(l1Entries) * 8 <= fileSize - l1Offset
        else {
            throw QCOW2Error("\(path) is damaged: its L1 table lies outside the file")
        }
        let l1Bytes = try Self.read(storage, at: l1Offset, count: l1Entries * 8)
        l1 = (0..<l1Entries).map { l1Bytes.bigEndian64(at: $0 * 8) }
        let backingOffset = header.bigEndian64(at: 8)
        let backingLength = Int(header.bigEndian32(at: 16))
        if backingOffset != 0 && backingLength > 0 {
            guard backingLength <= 1023, backingOffset < UInt64(clusterSize),
                backingOffset + UInt64(backingLength) <= min(fileSize, UInt64(clusterSize))
            else {
                throw QCOW2Error("\(path) is damaged: its backing file name lies outside the header")
            }
            let name = try Self.read(storage, at: backingOffset, count: backingLength)
            backingFile = String(decoding: name, as: UTF8.self)
        } else {
            backingFile = nil
        }
    }

    private static func read(_ storage: any BlockStorage, at offset: UInt64, count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try storage.read(fromAbsoluteOffset: ByteOffset(offset), into: $0) }
        return bytes
    }

    /// What this image itself says about guest cluster `cluster`: data at a host offset, zeros, or
    /// nothing (unallocated here: the backing file says).
    private enum Entry {
        case data(UInt64)
        case zero
        case unallocated
    }

    private func entry(of cluster: UInt64) throws -> Entry {
        let entriesPerTable = UInt64(clusterSize / 8)
        let table = Int(cluster / entriesPerTable)
        guard table < l1.count else { return .unallocated }
        let l2Offset = l1[table] & QCOW2Layout.offsetMask
        guard l2Offset != 0 else { return .unallocated }
        if l2Cache[table] == nil {
            guard l2Offset % UInt64(clusterSize) == 0, l2Offset + UInt64(clusterSize) <= fileSize else {
                throw QCOW2Error("\(path) is damaged: an L2 table lies outside the file")
            }
            let bytes = try Self.read(storage, at: l2Offset, count: clusterSize)
            // A handful of tables at a time is plenty: restore and verify go through clusters in order.
            if l2Cache.count >= 64 { l2Cache.removeAll(keepingCapacity: true) }
            l2Cache[table] = (0..<Int(entriesPerTable)).map { bytes.bigEndian64(at: $0 * 8) }
        }
        let entry = l2Cache[table]![Int(cluster % entriesPerTable)]
        guard entry & QCOW2Layout.compressedFlag == 0 else {
            throw QCOW2Error("\(path) holds compressed clusters, which Umbra does not read")
        }
        if entry & QCOW2Layout.zeroFlag != 0 { return .zero }
        let host = entry & QCOW2Layout.offsetMask
        guard host != 0 else { return .unallocated }
        guard host % UInt64(clusterSize) == 0, host + UInt64(clusterSize) <= fileSize else {
            throw QCOW2Error("\(path) is damaged: guest cluster \(cluster) points outside the file")
        }
        return .data(host)
    }

    /// Reads guest bytes from `offset` into `buffer`, through the chain (what lies past an image's
    /// end, or is unallocated all the way down, reads as zeros). Images of a chain may have
    /// different cluster sizes.
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try visit(offset, buffer.count) { position, count, source in
            let target = UnsafeMutableRawBufferPointer(
                rebasing: buffer[Int(position - offset)..<Int(position - offset + UInt64(count))])
            switch source {
            case .bytes(let image, let host):
                try image.storage.read(fromAbsoluteOffset: ByteOffset(host), into: target)
            case .zeros:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }

    /// Whether any byte of `offset ..< offset + count` holds data somewhere in the chain (if not, the
    /// range reads as zeros).
    public func holdsData(at offset: UInt64, count: Int) throws -> Bool {
        var found = false
        try visit(offset, count) { _, _, source in
            if case .bytes = source { found = true }
        }
        return found
    }

    private enum Source {
        case bytes(QCOW2Image, host: UInt64)
        case zeros
    }

    /// Calls `body` for consecutive pieces of the range with where each piece's bytes come from.
    private func visit(
        _ offset: UInt64, _ count: Int, _ body: (UInt64, Int, Source) throws -> Void
    ) throws {
        var position = offset
        let end = offset + UInt64(count)
        while position < end {
            guard position < virtualSize else { return try body(position, Int(end - position), .zeros) }
            let cluster = position >> UInt64(clusterBits)
            let within = position - (cluster << UInt64(clusterBits))
            let piece = Int(min(end, min(virtualSize, (cluster + 1) << UInt64(clusterBits))) - position)
            switch try entry(of: cluster) {
            case .data(let host): try body(position, piece, .bytes(self, host: host + within))
            case .zero: try body(position, piece, .zeros)
            case .unallocated:
                if let backing {
                    try backing.visit(position, piece, body)
                } else {
                    try body(position, piece, .zeros)
                }
            }
            position += UInt64(piece)
        }
    }
}
