// Writes a qcow2 image in one pass: data clusters are appended as they come (cluster 0 is kept for
// the header), and the tables and refcounts follow the data once it is all there. The header goes
// last, so an image cut short by a crash has no magic and is never taken for a good one.
//
// A cluster of zeros takes no space: without a backing file it stays unallocated (which reads as
// zeros); with one it is marked "reads as zeros", so it hides what the backing file holds there.

import BlockIO

public struct QCOW2Error: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

public final class QCOW2Writer {
    /// A checksum computed as the file is written, from the bytes the writer has anyway: `update`
    /// continues it over more bytes, `combine` joins two (A's, B's, B's length) into A-then-B's.
    public struct Checksum: Sendable {
        public var update: @Sendable (UnsafeRawBufferPointer, UInt32) -> UInt32
        public var combine: @Sendable (UInt32, UInt32, UInt64) -> UInt32

        public init(
            update: @escaping @Sendable (UnsafeRawBufferPointer, UInt32) -> UInt32,
            combine: @escaping @Sendable (UInt32, UInt32, UInt64) -> UInt32
        ) {
            self.update = update
            self.combine = combine
        }
    }

    public let virtualSize: UInt64
    public let clusterSize: Int
    /// The backing file as the image records it (a path relative to the image), if any.
    public let backingFile: String?
    /// Bytes of guest data written into the image (zeros excluded).
    public private(set) var dataBytes: UInt64 = 0
    private let storage: any BlockStorage
    private let clusterBits: UInt32
    private let entriesPerTable: Int
    /// The L2 tables that have entries, by L1 index.
    private var tables: [Int: [UInt64]] = [:]
    /// The next host cluster for data (0 is the header's).
    private var nextHostCluster: UInt64 = 1
    private var finished = false
    private let checksumming: Checksum?
    /// Of the data clusters as appended (the file from its second cluster on, in order).
    private var dataChecksum: UInt32 = 0
    /// The whole file's, once finished (with a `Checksum`).
    public private(set) var fileChecksum: UInt32?

    /// The number of guest clusters.
    public var guestClusters: UInt64 { (virtualSize + UInt64(clusterSize) - 1) >> UInt64(clusterBits) }

    public init(
        storage: any BlockStorage, virtualSize: UInt64, backingFile: String? = nil,
        clusterBits: UInt32 = QCOW2Layout.defaultClusterBits, checksum: Checksum? = nil
    ) throws {
        guard (9...21).contains(clusterBits) else { throw QCOW2Error("cluster bits \(clusterBits) are not 9 to 21") }
        guard virtualSize > 0, virtualSize <= 1 << 56 else {
            throw QCOW2Error("image size \(virtualSize) is out of range")
        }
        if let backingFile {
            guard !backingFile.isEmpty, backingFile.utf8.count <= 1023 else {
                throw QCOW2Error("the backing file name must be 1 to 1023 bytes")
            }
        }
        // The header, its extensions and the backing file's name share the first cluster.
        guard Int(QCOW2Layout.headerLength) + 24 + (backingFile?.utf8.count ?? 0) <= 1 << Int(clusterBits) else {
            throw QCOW2Error("the backing file name does not fit in the image's first cluster")
        }
        self.storage = storage
        self.checksumming = checksum
        self.virtualSize = virtualSize
        self.backingFile = backingFile
        self.clusterBits = clusterBits
        self.clusterSize = 1 << Int(clusterBits)
        self.entriesPerTable = clusterSize / 8
    }

    /// Writes guest clusters from `first` on, from `bytes` (whole clusters: pad the image's last one
    /// with zeros). A cluster of zeros takes no space. Clusters may come in any order, each once.
    /// `checksum` is the `Checksum` of all of `bytes`, if the caller computed it (elsewhere, in
    /// parallel): used when every cluster holds data, otherwise the writer checksums what it writes.
    public func write(firstCluster first: UInt64, _ bytes: UnsafeRawBufferPointer, checksum: UInt32? = nil) throws {
        guard !finished else { throw QCOW2Error("the image is already finished") }
        guard bytes.count % clusterSize == 0 else { throw QCOW2Error("\(bytes.count) bytes is not whole clusters") }
        let count = UInt64(bytes.count / clusterSize)
        guard first + count <= guestClusters else {
            throw QCOW2Error("clusters \(first)..<\(first + count) lie outside the image's \(guestClusters)")
        }
        // Runs of data clusters go out in one write each.
        var runStart: Int?
        func flushRun(until end: Int) throws {
            guard let start = runStart else { return }
            runStart = nil
            let hostFirst = nextHostCluster
            let slice = UnsafeRawBufferPointer(rebasing: bytes[(start * clusterSize)..<(end * clusterSize)])
            try storage.write(toAbsoluteOffset: ByteOffset(hostFirst << UInt64(clusterBits)), slice)
            if let checksumming {
                dataChecksum =
                    if let checksum, slice.count == bytes.count {
                        checksumming.combine(dataChecksum, checksum, UInt64(slice.count))
                    } else {
                        checksumming.update(slice, dataChecksum)
                    }
            }
            for index in start..<end {
                let host = (hostFirst + UInt64(index - start)) << UInt64(clusterBits)
                setEntry(first + UInt64(index), host | QCOW2Layout.copiedFlag)
            }
            nextHostCluster += UInt64(end - start)
            dataBytes += UInt64(slice.count)
        }
        for index in 0..<Int(count) {
            let cluster = UnsafeRawBufferPointer(rebasing: bytes[(index * clusterSize)..<((index + 1) * clusterSize)])
            if Self.isZero(cluster) {
                try flushRun(until: index)
                if backingFile != nil { setEntry(first + UInt64(index), QCOW2Layout.zeroFlag) }
            } else if runStart == nil {
                runStart = index
            }
        }
        try flushRun(until: Int(count))
    }

    private func setEntry(_ cluster: UInt64, _ entry: UInt64) {
        let table = Int(cluster / UInt64(entriesPerTable))
        let index = Int(cluster % UInt64(entriesPerTable))
        tables[table, default: [UInt64](repeating: 0, count: entriesPerTable)][index] = entry
    }

    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        // Eight bytes at a time (a cluster is a multiple of 512 bytes).
        var offset = 0
        while offset + 8 <= bytes.count {
            if bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self) != 0 { return false }
            offset += 8
        }
        return bytes[offset...].allSatisfy { $0 == 0 }
    }

    /// Writes the tables, the refcounts and then the header, and syncs the file.
    public func finish() throws {
        guard !finished else { throw QCOW2Error("the image is already finished") }
        finished = true
        let cluster = UInt64(clusterSize)
        let l1Entries = Int((guestClusters + UInt64(entriesPerTable) - 1) / UInt64(entriesPerTable))
        let l1Clusters = (UInt64(l1Entries) * 8 + cluster - 1) / cluster
        let tableOrder = tables.keys.sorted()
        let firstTableCluster = nextHostCluster
        let l1Cluster = firstTableCluster + UInt64(tableOrder.count)
        let refcountTableCluster = l1Cluster + l1Clusters
        // The refcount table and blocks count themselves: grow them until they cover everything.
        let refcountsPerBlock = cluster * 8 / (1 << UInt64(QCOW2Layout.refcountOrder))
        var blocks: UInt64 = 1
        var tableClusters: UInt64 = 1
        var total: UInt64 = 0
        while true {
            total = refcountTableCluster + tableClusters + blocks
            let neededBlocks = (total + refcountsPerBlock - 1) / refcountsPerBlock
            let neededTableClusters = (neededBlocks * 8 + cluster - 1) / cluster
            if neededBlocks == blocks && neededTableClusters == tableClusters { break }
            blocks = max(blocks, neededBlocks)
            tableClusters = max(tableClusters, neededTableClusters)
        }
        let firstBlockCluster = refcountTableCluster + tableClusters

        // Everything after the data goes out in file order; its checksum follows along.
        var metadataChecksum: UInt32 = 0
        var metadataLength: UInt64 = 0
        func writeMetadata(_ bytes: [UInt8], at offset: UInt64) throws {
            try write(bytes, at: offset)
            if let checksumming {
                metadataChecksum = bytes.withUnsafeBytes { checksumming.update($0, metadataChecksum) }
                metadataLength += UInt64(bytes.count)
            }
        }
        var l1 = BigEndianWriter(count: Int(l1Clusters * cluster))
        for (position, table) in tableOrder.enumerated() {
            let host = (firstTableCluster + UInt64(position)) * cluster
            var l2 = BigEndianWriter(count: clusterSize)
            for (index, entry) in tables[table]!.enumerated() where entry != 0 { l2.put(entry, at: index * 8) }
            try writeMetadata(l2.bytes, at: host)
            l1.put(host | QCOW2Layout.copiedFlag, at: table * 8)
        }
        try writeMetadata(l1.bytes, at: l1Cluster * cluster)
        var refcountTable = BigEndianWriter(count: Int(tableClusters * cluster))
        for block in 0..<blocks {
            refcountTable.put((firstBlockCluster + block) * cluster, at: Int(block) * 8)
        }
        try writeMetadata(refcountTable.bytes, at: refcountTableCluster * cluster)
        for block in 0..<blocks {
            var refcounts = BigEndianWriter(count: clusterSize)
            let covered = min(refcountsPerBlock, total - block * refcountsPerBlock)
            for index in 0..<Int(covered) { refcounts.put(UInt16(1), at: index * 2) }
            try writeMetadata(refcounts.bytes, at: (firstBlockCluster + block) * cluster)
        }
        try storage.synchronize()
        let headerBytes = header(
            l1Entries: l1Entries, l1Offset: l1Cluster * cluster, refcountTableOffset: refcountTableCluster * cluster,
            refcountTableClusters: tableClusters)
        try write(headerBytes, at: 0)
        try storage.synchronize()
        if let checksumming {
            // The file in order: the header's cluster, the data clusters, then the tables.
            let headerChecksum = headerBytes.withUnsafeBytes { checksumming.update($0, 0) }
            let withData = checksumming.combine(headerChecksum, dataChecksum, dataBytes)
            fileChecksum = checksumming.combine(withData, metadataChecksum, metadataLength)
        }
    }

    /// The file's length (once finished: every cluster it uses).
    public func fileLength() throws -> UInt64 { try storage.size().rawValue }

    private func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try storage.write(toAbsoluteOffset: ByteOffset(offset), $0) }
    }

    private func header(
        l1Entries: Int, l1Offset: UInt64, refcountTableOffset: UInt64, refcountTableClusters: UInt64
    ) -> [UInt8] {
        var header = BigEndianWriter(count: clusterSize)
        header.put(QCOW2Layout.magic, at: 0)
        header.put(QCOW2Layout.version, at: 4)
        header.put(clusterBits, at: 20)
        header.put(virtualSize, at: 24)
        header.put(UInt32(l1Entries), at: 36)
        header.put(l1Offset, at: 40)
        header.put(refcountTableOffset, at: 48)
        header.put(UInt32(refcountTableClusters), at: 56)
        header.put(QCOW2Layout.refcountOrder, at: 96)
        header.put(QCOW2Layout.headerLength, at: 100)
        var position = Int(QCOW2Layout.headerLength)
        if let backingFile {
            // The backing file's format, then the end of the extensions, then its name.
            header.put(QCOW2Layout.backingFormatExtension, at: position)
            header.put(UInt32(5), at: position + 4)
            header.bytes.replaceSubrange((position + 8)..<(position + 13), with: Array("qcow2".utf8))
            position += 16
            position += 8  // end of extensions: type 0, length 0
            let name = Array(backingFile.utf8)
            header.bytes.replaceSubrange(position..<(position + name.count), with: name)
            header.put(UInt64(position), at: 8)
            header.put(UInt32(name.count), at: 16)
        }
        return header.bytes
    }
}
