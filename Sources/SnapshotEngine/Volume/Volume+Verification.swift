// Verification: every preserved copy in the diff store is read once, in slot order, and compared
// with the CRC-32C recorded with it. A copy that does not match (or cannot be read) is reported for
// every snapshot whose reads meet it, as a range of the volume. Writes, deletions and snapshots go on
// meanwhile: a slot whose copy was freed or replaced while it was being read is not damage, so every
// mismatch is confirmed under the volume's lock before it is reported.

import BlockIO

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// What verifying one volume's preserved data found.
public struct VerificationReport: Sendable, Equatable {
    /// A range of the volume that reads wrong through one snapshot.
    public struct Damage: Sendable, Equatable {
        public var snapshot: UUID
        public var range: ByteRange
    }

    public var volume: String
    /// The snapshots that were readable when verification began.
    public var snapshotsChecked: Int
    /// Preserved bytes read and compared with their checksums.
    public var bytesChecked: UInt64
    /// Preserved bytes recorded before the catalog held checksums (format 2 or older): nothing to
    /// compare them with.
    public var bytesUnchecked: UInt64
    /// By snapshot (oldest first), then offset; neighbouring chunks merged.
    public var damaged: [Damage]
}

extension Volume {
    /// How many bytes of the diff store verification reads at once.
    static let verificationBatchBytes = 8 << 20

    /// Reads every preserved copy of this volume and compares it with its checksum.
    /// `progress(done, total)` is called after each batch, in bytes of preserved data.
    public func verifyPreserved(progress: (@Sendable (UInt64, UInt64) -> Void)? = nil) async throws
        -> VerificationReport
    {
        try checkUsable()
        var (copies, snapshotsChecked) = metadata.withLock { metadata in
            var copies: [(slot: DiffSlot, chunk: UInt64)] = []
            copies.reserveCapacity(metadata.index.count)
            metadata.index.forEach { chunk, preservation in
                if !preservation.slot.isZero { copies.append((preservation.slot, chunk)) }
            }
            return (copies, metadata.chain.count)
        }
        // Sorted outside the lock: writes and reads of the volume need it meanwhile.
        copies.sort { $0.slot < $1.slot }
        let chunkBytes = self.chunkBytes
        let total = UInt64(copies.count) * UInt64(chunkBytes)
        var report = VerificationReport(
            volume: name, snapshotsChecked: snapshotsChecked, bytesChecked: 0, bytesUnchecked: 0, damaged: [])
        var damaged: [(sequence: SnapshotSequence, snapshot: UUID, chunk: UInt64)] = []
        let perBatch = max(1, Self.verificationBatchBytes / chunkBytes)
        let buffer = copyBuffers.take(count: perBatch * chunkBytes)
        defer { copyBuffers.give(buffer) }
        var done: UInt64 = 0
        for start in stride(from: 0, to: copies.count, by: perBatch) {
            try checkUsable()
            let batch = Array(copies[start..<min(start + perBatch, copies.count)])
            let expected = metadata.withLock { metadata in batch.map { metadata.checksums.checksum(of: $0.slot) } }
            let matches = try await context.io.run { [diff, chunkShift] in
                Self.compare(batch.map(\.slot), expected, in: diff, chunkShift: chunkShift, buffer: buffer)
            }
            metadata.withLock { metadata in
                for (position, copy) in batch.enumerated() {
                    // A copy freed or replaced while it was read proves nothing either way.
                    guard metadata.index.holds(copy.slot, for: copy.chunk),
                        metadata.checksums.checksum(of: copy.slot) == expected[position]
                    else { continue }
                    switch matches[position] {
                    case nil:
                        report.bytesUnchecked += UInt64(chunkBytes)
                    case true?:
                        report.bytesChecked += UInt64(chunkBytes)
                    case false?:
                        report.bytesChecked += UInt64(chunkBytes)
                        for snapshot in metadata.chain
                        where metadata.index.copy(of: copy.chunk, forSnapshotAt: snapshot.sequence)?.slot == copy.slot {
                            damaged.append((snapshot.sequence, snapshot.id, copy.chunk))
                        }
                    }
                }
            }
            done += UInt64(batch.count) * UInt64(chunkBytes)
            progress?(done, total)
        }
        for (_, snapshot, chunk) in damaged.sorted(by: { ($0.sequence, $0.chunk) < ($1.sequence, $1.chunk) }) {
            let range = ByteRange(offset: ByteOffset(chunk << chunkShift), count: chunkSize)
            if let last = report.damaged.last, last.snapshot == snapshot, last.range.end == range.offset {
                report.damaged[report.damaged.count - 1].range.count = last.range.count + range.count
            } else {
                report.damaged.append(.init(snapshot: snapshot, range: range))
            }
        }
        if !report.damaged.isEmpty {
            context.logger.error(
                "verification found preserved data that does not match its checksums",
                metadata: [
                    "volume": "\(name)", "damaged": "\(report.damaged.map { "\($0.snapshot.guidString) \($0.range)" })",
                ])
        }
        return report
    }

    /// Reads `slots` (ascending) into `buffer`, runs of consecutive slots with one read each, and
    /// compares each with its checksum: true if it matches, false if not (or it could not be read),
    /// nil if it has no checksum.
    static func compare(
        _ slots: [DiffSlot], _ expected: [UInt32?], in diff: any BlockStorage, chunkShift: UInt64,
        buffer: AlignedBuffer
    ) -> [Bool?] {
        let chunkBytes = 1 << Int(chunkShift)
        var readable = Array(repeating: true, count: slots.count)
        var start = 0
        while start < slots.count {
            var end = start + 1
            while end < slots.count, slots[end].rawValue == slots[end - 1].rawValue + 1 { end += 1 }
            let run = start..<end
            do {
                try buffer.withUnsafeMutableBytes((start * chunkBytes)..<(end * chunkBytes)) {
                    try diff.read(fromAbsoluteOffset: ByteOffset(slots[start].rawValue << chunkShift), into: $0)
                }
            } catch {
                // One bad sector should not condemn its neighbours: read the run slot by slot.
                for position in run {
                    readable[position] =
                        (try? buffer.withUnsafeMutableBytes((position * chunkBytes)..<((position + 1) * chunkBytes)) {
                            try diff.read(
                                fromAbsoluteOffset: ByteOffset(slots[position].rawValue << chunkShift), into: $0)
                        }) != nil
                }
            }
            start = end
        }
        return slots.indices.map { position in
            guard let checksum = expected[position] else { return nil }
            guard readable[position] else { return false }
            return buffer.withUnsafeBytes((position * chunkBytes)..<((position + 1) * chunkBytes)) {
                CRC32C.checksum($0) == checksum
            }
        }
    }
}
