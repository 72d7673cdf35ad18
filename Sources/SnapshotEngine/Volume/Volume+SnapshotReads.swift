// Snapshot reads and change tracking. A snapshot read resolves each chunk to a diff slot, zeros, or
// the live data. A chunk read from the live data could be overwritten by a copy-on-write in the
// middle of the read, so after reading, the chunks that came from the live data are resolved again:
// a copy-on-write records its copy before it writes the live data, so any chunk whose live bytes
// changed now resolves to the copy, and is read again from there.

import BlockIO

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

extension Volume {
    // MARK: - Snapshot reads

    /// Registers a read of the snapshot at `sequence`, refusing it if the snapshot is gone or going.
    func beginSnapshotRead(_ sequence: SnapshotSequence, id: UUID) throws(EngineError) {
        try checkUsable()
        try metadata.withLock { (metadata: inout VolumeMetadata) throws(EngineError) in
            guard let position = metadata.position(of: sequence), !metadata.chain[position].deleting else {
                if let failed = metadata.failed.first(where: { $0.sequence == sequence }) {
                    throw .snapshotFailed(id, reason: failed.reason)
                }
                if let position = metadata.position(of: sequence), let reason = metadata.chain[position].failingReason {
                    throw .snapshotFailed(id, reason: reason)
                }
                throw .snapshotDeleted(id)
            }
            metadata.chain[position].readers += 1
        }
    }

    func endSnapshotRead(_ sequence: SnapshotSequence) {
        let drained = metadata.withLock { metadata -> CheckedContinuation<Void, Never>? in
            guard let position = metadata.position(of: sequence) else { return nil }
            metadata.chain[position].readers -= 1
            guard metadata.chain[position].readers == 0 else { return nil }
            defer { metadata.chain[position].readersDrained = nil }
            return metadata.chain[position].readersDrained
        }
        drained?.resume()
    }

    /// Waits until no read of the snapshot is in flight. The caller has set `deleting`.
    func waitForReaders(of sequence: SnapshotSequence) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let idle = metadata.withLock { metadata -> Bool in
                guard let position = metadata.position(of: sequence), metadata.chain[position].readers > 0 else {
                    return true
                }
                metadata.chain[position].readersDrained = continuation
                return false
            }
            if idle { continuation.resume() }
        }
    }

    /// Reads bytes of the snapshot at `sequence` (see the note atop this file) into `buffer`, and
    /// gives it back.
    func readSnapshot<Buffer: IOBuffer>(
        _ sequence: SnapshotSequence, id: UUID, at offset: ByteOffset, into buffer: consuming Buffer
    ) async throws -> Buffer {
        try checkRange(offset, ByteCount(buffer.count))
        guard buffer.count > 0 else { return buffer }
        try beginSnapshotRead(sequence, id: id)
        defer { endSnapshotRead(sequence) }
        let touched = chunks(offset, ByteCount(buffer.count))
        let sources = metadata.withLock { metadata in
            touched.map { ChunkSource(metadata.index.copy(of: $0, forSnapshotAt: sequence), metadata.checksums) }
        }
        let plan = ReadPlan(
            offset: offset.rawValue, count: buffer.count, firstChunk: touched.lowerBound, chunkShift: chunkShift)
        let target = IOBufferHandoff(consume buffer)
        let live = self.live
        let diff = self.diff
        do {
            try await context.io.run {
                try target.withUnsafeMutableBytes {
                    try plan.execute(sources: sources, only: nil, live: live, diff: diff, into: $0)
                }
            }
            let moved = metadata.withLock { metadata -> [Int: ChunkSource] in
                var moved: [Int: ChunkSource] = [:]
                for (position, source) in sources.enumerated() where source == .live {
                    let now = ChunkSource(
                        metadata.index.copy(of: touched.lowerBound + UInt64(position), forSnapshotAt: sequence),
                        metadata.checksums)
                    if now != .live { moved[position] = now }
                }
                return moved
            }
            if !moved.isEmpty {
                var changed = sources
                for (position, source) in moved { changed[position] = source }
                let updated = changed
                let positions = Set(moved.keys)
                try await context.io.run {
                    try target.withUnsafeMutableBytes {
                        try plan.execute(sources: updated, only: positions, live: live, diff: diff, into: $0)
                    }
                }
            }
        } catch let damage as DamagedCopy {
            let offset = damage.chunk << chunkShift
            context.logger.error(
                "a preserved chunk does not match its checksum; the read fails",
                metadata: [
                    "volume": "\(name)", "snapshot": "\(id.guidString)", "chunk": "\(damage.chunk)",
                    "offset": "\(offset)", "diff.slot": "\(damage.slot.rawValue)",
                ])
            throw EngineError.damagedCopy(
                volume: name, snapshot: id, range: ByteRange(offset: ByteOffset(offset), count: ByteCount(chunkBytes)))
        } catch {
            throw EngineError.wrap(error)
        }
        return target.take()
    }

    /// Allocation of a snapshot's range: preserved zeros are holes, preserved data is data, and
    /// chunks still on the live volume take the live allocation.
    func snapshotAllocation(_ sequence: SnapshotSequence, id: UUID, at offset: ByteOffset, count: ByteCount)
        async throws
        -> [AllocationExtent]
    {
        try checkRange(offset, count)
        guard count.rawValue > 0 else { return [] }
        try beginSnapshotRead(sequence, id: id)
        defer { endSnapshotRead(sequence) }
        let touched = chunks(offset, count)
        let sources = metadata.withLock { metadata in
            touched.map { ChunkSource(metadata.index.copy(of: $0, forSnapshotAt: sequence), metadata.checksums) }
        }
        let live = self.live
        let shift = chunkShift
        let end = offset.rawValue + count.rawValue
        do {
            return try await context.io.run {
                var extents: [AllocationExtent] = []
                func add(_ start: UInt64, _ stop: UInt64, hole: Bool) {
                    guard stop > start else { return }
                    if let last = extents.last, last.isHole == hole, last.range.end.rawValue == start {
                        extents[extents.count - 1].range.count = ByteCount(stop - last.range.offset.rawValue)
                    } else {
                        extents.append(
                            AllocationExtent(
                                range: ByteRange(offset: ByteOffset(start), count: ByteCount(stop - start)),
                                isHole: hole))
                    }
                }
                var position = 0
                while position < sources.count {
                    let chunk = touched.lowerBound + UInt64(position)
                    let start = max(chunk << shift, offset.rawValue)
                    var stopPosition = position + 1
                    while stopPosition < sources.count, sources[stopPosition] == .live, sources[position] == .live {
                        stopPosition += 1
                    }
                    let stop = min((touched.lowerBound + UInt64(stopPosition)) << shift, end)
                    switch sources[position] {
                    case .zero: add(start, stop, hole: true)
                    case .slot: add(start, stop, hole: false)
                    case .live:
                        for extent in try Self.allocation(
                            of: live, from: ByteOffset(start), count: ByteCount(stop - start))
                        {
                            add(extent.range.offset.rawValue, extent.range.end.rawValue, hole: extent.isHole)
                        }
                    }
                    position = stopPosition
                }
                return extents
            }
        } catch {
            throw EngineError.wrap(error)
        }
    }

    // MARK: - Change tracking

    /// The byte ranges that may differ between the snapshot `since` and the snapshot `until` (nil: the
    /// live volume), limited to `within` if given.
    func changes(since: SnapshotSequence, until: SnapshotSequence?, within: ByteRange? = nil) -> [ByteRange] {
        let limit = within.map { $0.offset.rawValue..<$0.end.rawValue } ?? 0..<size.rawValue
        guard !limit.isEmpty else { return [] }
        let chunkRange = (limit.lowerBound >> chunkShift)..<((limit.upperBound - 1) >> chunkShift + 1)
        let heldRanges = until == nil ? heldWrites.ranges() : []
        var union = metadata.withLock { metadata -> ChunkSet in
            var union = ChunkSet()
            for snapshot in metadata.chain
            where snapshot.sequence >= since && (until.map { snapshot.sequence < $0 } ?? true) {
                union.formUnion(snapshot.preserved)
            }
            return union
        }
        // Writes answered and still held change their chunks, though no copy records it yet. Read
        // before the chain: a held write records its copy before it lets go of its place, so it is
        // seen in one or the other.
        for held in heldRanges where !held.isEmpty {
            for chunk in (held.lowerBound >> chunkShift)...((held.upperBound - 1) >> chunkShift) {
                _ = union.insert(chunk)
            }
        }
        var ranges: [ByteRange] = []
        union.forEachRun(in: chunkRange) { run in
            let start = max(run.lowerBound << chunkShift, limit.lowerBound)
            let end = min(run.upperBound << chunkShift, limit.upperBound)
            if end > start { ranges.append(ByteRange(offset: ByteOffset(start), count: ByteCount(end - start))) }
        }
        return ranges
    }
}

/// How a snapshot read maps chunks to places: coalesces neighbouring chunks that come from the live
/// data into one pread.
struct ReadPlan: Sendable {
    let offset: UInt64
    let count: Int
    let firstChunk: UInt64
    let chunkShift: UInt64

    func execute(
        sources: [ChunkSource], only positions: Set<Int>?, live: any BlockStorage, diff: any BlockStorage,
        into buffer: UnsafeMutableRawBufferPointer
    ) throws {
        let end = offset + UInt64(count)
        var position = 0
        while position < sources.count {
            guard positions?.contains(position) ?? true else {
                position += 1
                continue
            }
            let chunk = firstChunk + UInt64(position)
            let start = max(chunk << chunkShift, offset)
            var stopPosition = position + 1
            if sources[position] == .live {
                while stopPosition < sources.count, sources[stopPosition] == .live,
                    positions?.contains(stopPosition) ?? true
                {
                    stopPosition += 1
                }
            }
            let stop = min((firstChunk + UInt64(stopPosition)) << chunkShift, end)
            let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(start - offset)..<Int(stop - offset)])
            switch sources[position] {
            case .live:
                try live.read(fromAbsoluteOffset: ByteOffset(start), into: bytes)
            case .zero:
                bytes.initializeMemory(as: UInt8.self, repeating: 0)
            case .slot(let slot, let checksum):
                let withinChunk = Int(start - (chunk << chunkShift))
                let slotOffset = ByteOffset(slot.rawValue << chunkShift)
                let chunkBytes = 1 << Int(chunkShift)
                if let checksum {
                    // The checksum covers the whole chunk: a part of it is read through a scratch chunk.
                    try Self.readChecked(
                        from: diff, at: slotOffset, chunkBytes: chunkBytes, checksum: checksum,
                        part: withinChunk, into: bytes
                    ) {
                        DamagedCopy(chunk: chunk, slot: slot)
                    }
                } else {
                    try diff.read(fromAbsoluteOffset: slotOffset + ByteCount(UInt64(withinChunk)), into: bytes)
                }
            }
            position = stopPosition
        }
    }

    /// Reads bytes `part ..< part + bytes.count` of the chunk at `offset` of `storage` into `bytes`
    /// after checking the whole chunk against `checksum`; throws `damage()` if it does not match.
    static func readChecked(
        from storage: any BlockStorage, at offset: ByteOffset, chunkBytes: Int, checksum: UInt32, part: Int,
        into bytes: UnsafeMutableRawBufferPointer, damage: () -> DamagedCopy
    ) throws {
        if part == 0 && bytes.count == chunkBytes {
            try storage.read(fromAbsoluteOffset: offset, into: bytes)
            guard CRC32C.checksum(UnsafeRawBufferPointer(bytes)) == checksum else { throw damage() }
            return
        }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkBytes, alignment: 4096)
        defer { scratch.deallocate() }
        try storage.read(fromAbsoluteOffset: offset, into: scratch)
        guard CRC32C.checksum(UnsafeRawBufferPointer(scratch)) == checksum else { throw damage() }
        bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: scratch[part..<(part + bytes.count)]))
    }
}

/// A preserved chunk whose bytes do not match the checksum recorded with its copy.
struct DamagedCopy: Error {
    let chunk: UInt64
    let slot: DiffSlot
}
