// The records of the catalog, the one append-only log that holds all metadata of a data directory
// (docs/on-disk-format.md is the reference). Replaying the records in order rebuilds the state; no
// record is ever rewritten in place. Encoding is little-endian, fixed width, with u16-length UTF-8
// strings; every record is `type u8, length u32, body`.

import BlockIO

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// What happens when a volume's diff store reaches its limit.
public enum DiffStorePolicy: String, Sendable, Codable, CaseIterable {
    /// Delete the oldest snapshots of the volume until the copy fits (what VSS does).
    case deleteOldest
    /// Mark the snapshot that needs the space as failed; the others stay readable.
    case failSnapshot
}

extension DiffStorePolicy {
    /// Its byte in catalog records.
    var code: UInt8 { self == .deleteOldest ? 0 : 1 }

    init(code: UInt8) throws(BinaryReader.Malformed) {
        switch code {
        case 0: self = .deleteOldest
        case 1: self = .failSnapshot
        default: throw .init(reason: "unknown diff store policy \(code)")
        }
    }
}

/// Where a volume's live data lives.
public enum VolumeBacking: Sendable, Equatable {
    /// A sparse file inside the data directory, created and deleted with the volume.
    case owned
    /// An existing file or block device; the engine keeps only metadata and the diff store.
    case external(path: String)
}

struct VolumeDefinition: Sendable, Equatable {
    var id: VolumeID
    var guid: UUID
    var name: String
    var size: UInt64
    var chunkShift: UInt8
    var backing: VolumeBacking
    /// The diff store limit in bytes; 0 means unlimited.
    var diffLimit: UInt64
    var policy: DiffStorePolicy
}

struct SnapshotReference: Sendable, Equatable, Hashable {
    var volume: VolumeID
    var sequence: SnapshotSequence
}

struct SetMember: Sendable, Equatable {
    var volume: VolumeID
    var snapshotID: UUID
    var sequence: SnapshotSequence
}

struct SetDefinition: Sendable, Equatable {
    var id: UUID
    /// Nanoseconds since 1970-01-01T00:00:00Z.
    var createdAtNanoseconds: Int64
    var members: [SetMember]
    /// Taken but not yet kept: recovery rolls the set back unless a `setKept` record follows.
    var isPending = false
}

enum CatalogRecord: Sendable, Equatable {
    /// Counters that must survive even when the items that used them are gone (written by compaction).
    case counters(nextSequence: UInt64, nextVolumeID: UInt32)
    case volumeCreated(VolumeDefinition)
    case volumeDeleted(VolumeID)
    /// A volume's diff-store limit (bytes, 0 for none) and policy changed (format 4).
    case diffStoreLimited(VolumeID, diffLimit: UInt64, policy: DiffStorePolicy)
    /// A revert of the volume's live data to the snapshot at `sequence` began: until `revertFinished`,
    /// opening the store completes it (format 4).
    case revertStarted(VolumeID, sequence: SnapshotSequence)
    /// The revert's writes are durable (format 4).
    case revertFinished(VolumeID)
    /// What a set was taken for (`backup`), shown with its snapshots (format 4).
    case setLabelled(UUID, purpose: String)
    /// The volume is being filled (a restore): opening the store deletes it unless `volumeFilled`
    /// follows (format 4).
    case volumeFilling(VolumeID)
    case volumeFilled(VolumeID)
    /// A set was taken: kept at once, or pending until a `setKept` record names it.
    case setCreated(SetDefinition)
    /// A pending set reached the point where its snapshots are kept.
    case setKept(UUID)
    /// Chunks `firstChunk ..< firstChunk + count` of a volume were preserved for the snapshot at
    /// `sequence`, in slots `firstSlot ..< firstSlot + count`, or all as zeros when `firstSlot` is zero.
    /// `checksums` holds each copy's CRC-32C (format 3); nil for zeros, and for copies that a catalog
    /// before format 3 recorded without them.
    case preserved(
        volume: VolumeID, sequence: SnapshotSequence, firstChunk: UInt64, count: UInt32, firstSlot: DiffSlot,
        checksums: [UInt32]?)
    /// The snapshots were deleted, all at once.
    case snapshotsDeleted([SnapshotReference])
    /// The snapshot failed (its diff store ran out of space): its copies are handed on as in a
    /// deletion and it stays listed as failed until deleted.
    case snapshotFailed(SnapshotReference, reason: String)

    private enum Kind: UInt8 {
        case counters = 1
        case volumeCreated = 2
        case volumeDeleted = 3
        case setCreated = 4
        case preserved = 5
        case snapshotsDeleted = 6
        case snapshotFailed = 7
        case setPending = 8
        case setKept = 9
        case checkedPreserved = 10
        case diffStoreLimited = 11
        case revertStarted = 12
        case revertFinished = 13
        case setLabelled = 14
        case volumeFilling = 15
        case volumeFilled = 16
    }

    func encode(into writer: inout BinaryWriter) {
        var body = BinaryWriter()
        let kind: Kind
        switch self {
        case .counters(let nextSequence, let nextVolumeID):
            kind = .counters
            body.u64(nextSequence)
            body.u32(nextVolumeID)
        case .volumeCreated(let volume):
            kind = .volumeCreated
            body.u32(volume.id.rawValue)
            body.uuid(volume.guid)
            body.string(volume.name)
            body.u64(volume.size)
            body.u8(volume.chunkShift)
            switch volume.backing {
            case .owned:
                body.u8(0)
            case .external(let path):
                body.u8(1)
                body.string(path)
            }
            body.u64(volume.diffLimit)
            body.u8(volume.policy.code)
        case .volumeDeleted(let volume):
            kind = .volumeDeleted
            body.u32(volume.rawValue)
        case .diffStoreLimited(let volume, let diffLimit, let policy):
            kind = .diffStoreLimited
            body.u32(volume.rawValue)
            body.u64(diffLimit)
            body.u8(policy.code)
        case .revertStarted(let volume, let sequence):
            kind = .revertStarted
            body.u32(volume.rawValue)
            body.u64(sequence.rawValue)
        case .revertFinished(let volume):
            kind = .revertFinished
            body.u32(volume.rawValue)
        case .setLabelled(let id, let purpose):
            kind = .setLabelled
            body.uuid(id)
            body.string(purpose)
        case .volumeFilling(let volume):
            kind = .volumeFilling
            body.u32(volume.rawValue)
        case .volumeFilled(let volume):
            kind = .volumeFilled
            body.u32(volume.rawValue)
        case .setCreated(let set):
            kind = set.isPending ? .setPending : .setCreated
            body.uuid(set.id)
            body.i64(set.createdAtNanoseconds)
            body.u16(UInt16(set.members.count))
            for member in set.members {
                body.u32(member.volume.rawValue)
                body.uuid(member.snapshotID)
                body.u64(member.sequence.rawValue)
            }
        case .setKept(let id):
            kind = .setKept
            body.uuid(id)
        case .preserved(let volume, let sequence, let firstChunk, let count, let firstSlot, let checksums):
            kind = checksums == nil ? .preserved : .checkedPreserved
            body.u32(volume.rawValue)
            body.u64(sequence.rawValue)
            body.u64(firstChunk)
            body.u32(count)
            body.u64(firstSlot.rawValue)
            for checksum in checksums ?? [] { body.u32(checksum) }
        case .snapshotsDeleted(let references):
            kind = .snapshotsDeleted
            body.u32(UInt32(references.count))
            for reference in references {
                body.u32(reference.volume.rawValue)
                body.u64(reference.sequence.rawValue)
            }
        case .snapshotFailed(let reference, let reason):
            kind = .snapshotFailed
            body.u32(reference.volume.rawValue)
            body.u64(reference.sequence.rawValue)
            body.string(reason)
        }
        writer.u8(kind.rawValue)
        writer.u32(UInt32(body.bytes.count))
        writer.bytes.append(contentsOf: body.bytes)
    }

    /// Decodes one record. Throws `BinaryReader.Malformed` on anything that does not parse.
    static func decode(from reader: inout BinaryReader) throws(BinaryReader.Malformed) -> CatalogRecord {
        let rawKind = try reader.u8()
        let length = Int(try reader.u32())
        var body = try reader.subReader(count: length)
        guard let kind = Kind(rawValue: rawKind) else { throw .init(reason: "unknown record type \(rawKind)") }
        let record: CatalogRecord
        switch kind {
        case .counters:
            record = .counters(nextSequence: try body.u64(), nextVolumeID: try body.u32())
        case .volumeCreated:
            let id = VolumeID(rawValue: try body.u32())
            let guid = try body.uuid()
            let name = try body.string()
            let size = try body.u64()
            let chunkShift = try body.u8()
            let backing: VolumeBacking
            switch try body.u8() {
            case 0: backing = .owned
            case 1: backing = .external(path: try body.string())
            case let other: throw .init(reason: "unknown volume backing \(other)")
            }
            let diffLimit = try body.u64()
            let policy = try DiffStorePolicy(code: try body.u8())
            record = .volumeCreated(
                VolumeDefinition(
                    id: id, guid: guid, name: name, size: size, chunkShift: chunkShift, backing: backing,
                    diffLimit: diffLimit, policy: policy))
        case .volumeDeleted:
            record = .volumeDeleted(VolumeID(rawValue: try body.u32()))
        case .diffStoreLimited:
            record = .diffStoreLimited(
                VolumeID(rawValue: try body.u32()), diffLimit: try body.u64(),
                policy: try DiffStorePolicy(code: try body.u8()))
        case .revertStarted:
            record = .revertStarted(
                VolumeID(rawValue: try body.u32()), sequence: SnapshotSequence(rawValue: try body.u64()))
        case .revertFinished:
            record = .revertFinished(VolumeID(rawValue: try body.u32()))
        case .setLabelled:
            record = .setLabelled(try body.uuid(), purpose: try body.string())
        case .volumeFilling:
            record = .volumeFilling(VolumeID(rawValue: try body.u32()))
        case .volumeFilled:
            record = .volumeFilled(VolumeID(rawValue: try body.u32()))
        case .setCreated, .setPending:
            let id = try body.uuid()
            let createdAt = try body.i64()
            let count = Int(try body.u16())
            var members: [SetMember] = []
            for _ in 0..<count {
                members.append(
                    SetMember(
                        volume: VolumeID(rawValue: try body.u32()), snapshotID: try body.uuid(),
                        sequence: SnapshotSequence(rawValue: try body.u64())))
            }
            record = .setCreated(
                SetDefinition(id: id, createdAtNanoseconds: createdAt, members: members, isPending: kind == .setPending)
            )
        case .setKept:
            record = .setKept(try body.uuid())
        case .preserved, .checkedPreserved:
            let volume = VolumeID(rawValue: try body.u32())
            let sequence = SnapshotSequence(rawValue: try body.u64())
            let firstChunk = try body.u64()
            let count = try body.u32()
            let firstSlot = DiffSlot(rawValue: try body.u64())
            var checksums: [UInt32]?
            if kind == .checkedPreserved {
                guard !firstSlot.isZero else { throw .init(reason: "checksums for chunks that hold only zeros") }
                guard Int(count) == body.remaining / 4 else {
                    throw .init(reason: "\(body.remaining / 4) checksums for \(count) chunks")
                }
                var values: [UInt32] = []
                values.reserveCapacity(Int(count))
                for _ in 0..<count { values.append(try body.u32()) }
                checksums = values
            }
            record = .preserved(
                volume: volume, sequence: sequence, firstChunk: firstChunk, count: count, firstSlot: firstSlot,
                checksums: checksums)
        case .snapshotsDeleted:
            let count = Int(try body.u32())
            guard count <= body.remaining / 12 else {
                throw .init(reason: "deletion count \(count) exceeds the record")
            }
            var references: [SnapshotReference] = []
            for _ in 0..<count {
                references.append(
                    SnapshotReference(
                        volume: VolumeID(rawValue: try body.u32()), sequence: SnapshotSequence(rawValue: try body.u64())
                    ))
            }
            record = .snapshotsDeleted(references)
        case .snapshotFailed:
            let reference = SnapshotReference(
                volume: VolumeID(rawValue: try body.u32()), sequence: SnapshotSequence(rawValue: try body.u64()))
            record = .snapshotFailed(reference, reason: try body.string())
        }
        guard body.remaining == 0 else {
            throw .init(reason: "record type \(rawKind) has \(body.remaining) extra bytes")
        }
        return record
    }
}
