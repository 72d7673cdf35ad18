// A sparse bitmap of chunk indexes: the change bitmaps of the engine. Each snapshot keeps one (the
// chunks it preserved), and changed-block queries union them. Chunks are grouped in blocks of 4096
// (64 words); only blocks with a bit set exist, so a snapshot that preserved ten chunks of a 100 TiB
// volume costs a few hundred bytes, and a dense one costs one bit per chunk.

struct ChunkSet: Sendable, Equatable {
    static let chunksPerBlock: UInt64 = 4096
    static let wordsPerBlock = Int(chunksPerBlock / 64)

    private var blocks: [UInt64: [UInt64]] = [:]
    private(set) var count = 0

    var isEmpty: Bool { count == 0 }

    func contains(_ chunk: UInt64) -> Bool {
        guard let words = blocks[chunk / Self.chunksPerBlock] else { return false }
        let bit = chunk % Self.chunksPerBlock
        return words[Int(bit / 64)] & (1 << (bit % 64)) != 0
    }

    /// Adds `chunk`; returns whether it was new.
    @discardableResult
    mutating func insert(_ chunk: UInt64) -> Bool {
        let bit = chunk % Self.chunksPerBlock
        let mask: UInt64 = 1 << (bit % 64)
        let word = Int(bit / 64)
        var inserted = false
        blocks[chunk / Self.chunksPerBlock, default: Array(repeating: 0, count: Self.wordsPerBlock)]
            .withUnsafeMutableBufferPointer { words in
                if words[word] & mask == 0 {
                    words[word] |= mask
                    inserted = true
                }
            }
        if inserted { count += 1 }
        defer { checkInvariants() }
        return inserted
    }

    /// Removes `chunk`; returns whether it was there.
    @discardableResult
    mutating func remove(_ chunk: UInt64) -> Bool {
        let key = chunk / Self.chunksPerBlock
        guard var words = blocks[key] else { return false }
        let bit = chunk % Self.chunksPerBlock
        let mask: UInt64 = 1 << (bit % 64)
        let word = Int(bit / 64)
        guard words[word] & mask != 0 else { return false }
        words[word] &= ~mask
        count -= 1
        blocks[key] = words.allSatisfy({ $0 == 0 }) ? nil : words
        defer { checkInvariants() }
        return true
    }

    mutating func formUnion(_ other: ChunkSet) {
        for (key, theirs) in other.blocks {
            if var ours = blocks[key] {
                for index in 0..<Self.wordsPerBlock {
                    count += (theirs[index] & ~ours[index]).nonzeroBitCount
                    ours[index] |= theirs[index]
                }
                blocks[key] = ours
            } else {
                blocks[key] = theirs
                count += theirs.reduce(0) { $0 + $1.nonzeroBitCount }
            }
        }
        checkInvariants()
    }

    /// Every chunk, in increasing order.
    func sorted() -> [UInt64] {
        var result: [UInt64] = []
        result.reserveCapacity(count)
        forEachRun(in: 0..<UInt64.max) { run in result.append(contentsOf: run) }
        return result
    }

    /// Calls `body` with each maximal run of consecutive chunks inside `range`, in increasing order.
    func forEachRun(in range: Range<UInt64>, _ body: (Range<UInt64>) -> Void) {
        guard !blocks.isEmpty, !range.isEmpty else { return }
        let firstBlock = range.lowerBound / Self.chunksPerBlock
        let lastBlock = (range.upperBound - 1) / Self.chunksPerBlock
        let keys: [UInt64]
        if lastBlock - firstBlock < UInt64(blocks.count) {
            keys = (firstBlock...lastBlock).filter { blocks[$0] != nil }
        } else {
            keys = blocks.keys.filter { $0 >= firstBlock && $0 <= lastBlock }.sorted()
        }
        var runStart: UInt64?
        var runEnd: UInt64 = 0
        for key in keys {
            let words = blocks[key]!
            for wordIndex in 0..<Self.wordsPerBlock where words[wordIndex] != 0 {
                var word = words[wordIndex]
                let base = key * Self.chunksPerBlock + UInt64(wordIndex) * 64
                while word != 0 {
                    let bit = UInt64(word.trailingZeroBitCount)
                    word &= word - 1
                    let chunk = base + bit
                    guard range.contains(chunk) else { continue }
                    if let start = runStart, chunk == runEnd {
                        runStart = start
                        runEnd = chunk + 1
                    } else {
                        if let start = runStart { body(start..<runEnd) }
                        runStart = chunk
                        runEnd = chunk + 1
                    }
                }
            }
        }
        if let start = runStart { body(start..<runEnd) }
    }

    private func checkInvariants() {
        #if UMBRA_CHECK_INVARIANTS
            let counted = blocks.values.reduce(0) { $0 + $1.reduce(0) { $0 + $1.nonzeroBitCount } }
            assert(counted == count, "ChunkSet count \(count) but \(counted) bits set")
            assert(blocks.values.allSatisfy { $0.count == Self.wordsPerBlock && $0.contains { $0 != 0 } })
        #endif
    }
}
