import BlockIO
import SystemPackage

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Everything the engine can refuse or fail at, each with a sentence for people and an errno for wire
/// protocols (mapped in exactly one place, `errno`; the control protocol's codes are mapped in one
/// place too, by the daemon, which knows that protocol).
public enum EngineError: Error, CustomStringConvertible, Sendable, Equatable {
    case volumeNotFound(String)
    case volumeExists(String)
    case invalidVolumeName(String)
    case invalidSize(String)
    case invalidChunkSize(UInt64)
    case outOfRange(offset: UInt64, count: UInt64, size: UInt64)
    case snapshotNotFound(String)
    /// The snapshot stopped being readable because its diff store ran out of space.
    case snapshotFailed(UUID, reason: String)
    /// The snapshot was deleted while the request was in flight.
    case snapshotDeleted(UUID)
    case volumeHasSnapshots(String, count: Int)
    case tooManySnapshots(volume: String, limit: Int)
    case invalidSnapshotSet(String)
    case snapshotOrder(String)
    case directoryLocked(String)
    case notADataDirectory(String)
    case unsupportedFormatVersion(path: String, found: UInt32, supported: ClosedRange<UInt32>)
    case corruptCatalog(path: String, offset: UInt64, reason: String)
    /// Writes were held longer than the limit, so the set was aborted and the writes released.
    case holdExpired(limitMilliseconds: Int64)
    /// The prepared set was already committed or aborted.
    case holdNotActive
    /// A storage call failed in a way that leaves durability unknown (a failed fdatasync); the store
    /// refuses further changes until it is reopened.
    case storageFailed(BlockIOError)
    /// A snapshot read met preserved data that does not match its checksum (the chunk at `range`).
    case damagedCopy(volume: String, snapshot: UUID, range: ByteRange)
    case io(BlockIOError)
    case closed
    /// Zeros were asked for only if they cost less than writing them (NBD's FAST_ZERO), and the
    /// storage cannot do that.
    case cannotZeroQuickly
    /// The live volume is being reverted to a snapshot (or a revert was interrupted and waits to be
    /// run again): it takes no I/O until the revert is done.
    case volumeReverting(String)
    /// A revert could not finish: the live volume stays unavailable until one succeeds.
    case revertIncomplete(volume: String, reason: String)

    public var description: String {
        switch self {
        case .volumeNotFound(let name): "no volume named '\(name)'"
        case .volumeExists(let name): "a volume named '\(name)' already exists"
        case .invalidVolumeName(let name):
            "'\(name)' is not a valid volume name (use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.' or '-')"
        case .invalidSize(let reason): reason
        case .invalidChunkSize(let size): "chunk size \(size) must be a power of two from 4 KiB to 1 MiB"
        case .outOfRange(let offset, let count, let size):
            "the range at \(offset) of \(count) bytes lies outside the volume's \(size) bytes"
        case .snapshotNotFound(let id): "no snapshot or snapshot set with id \(id)"
        case .snapshotFailed(let id, let reason): "snapshot \(id.guidString) has failed: \(reason)"
        case .snapshotDeleted(let id): "snapshot \(id.guidString) was deleted"
        case .volumeHasSnapshots(let name, let count):
            "volume '\(name)' has \(count) snapshot\(count == 1 ? "" : "s"); delete them first"
        case .tooManySnapshots(let volume, let limit):
            "volume '\(volume)' already has the maximum of \(limit) snapshots"
        case .invalidSnapshotSet(let reason): reason
        case .snapshotOrder(let reason): reason
        case .directoryLocked(let path): "the data directory \(path) is in use by another Umbra process"
        case .notADataDirectory(let path): "\(path) is not an Umbra data directory (it holds other files)"
        case .unsupportedFormatVersion(let path, let found, let supported):
            "\(path) has on-disk format version \(found); this Umbra reads versions \(supported.lowerBound) to \(supported.upperBound)"
        case .corruptCatalog(let path, let offset, let reason): "\(path) is corrupt at byte \(offset): \(reason)"
        case .holdExpired(let limit):
            "writes were held longer than the limit of \(limit) ms, so the snapshot set was aborted"
        case .holdNotActive: "the prepared snapshot set was already committed or aborted"
        case .storageFailed(let error): "storage failed and durability is unknown (\(error)); reopen the data directory"
        case .damagedCopy(let volume, let snapshot, let range):
            "snapshot \(snapshot.guidString) of volume '\(volume)' is damaged at bytes \(range.offset.rawValue)–\(range.end.rawValue - 1): the preserved data does not match its checksum"
        case .io(let error): error.description
        case .closed: "the data directory is closed"
        case .cannotZeroQuickly: "the storage cannot make this range read as zeros faster than writing zeros"
        case .volumeReverting(let name): "volume '\(name)' is being reverted to a snapshot"
        case .revertIncomplete(let name, let reason):
            "the revert of volume '\(name)' could not finish (\(reason)); the volume stays offline until a revert succeeds: fix the cause and run it again"
        }
    }

    /// The errno a block protocol reports for this error: always one that NBD can carry (EPERM,
    /// EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN). A volume or snapshot that went
    /// away mid-request is ESHUTDOWN (what the client used is gone); no room is ENOSPC; a request the
    /// engine cannot take is EINVAL; every other failure is EIO.
    public var errno: Errno {
        switch self {
        case .invalidVolumeName, .invalidSize, .invalidChunkSize, .outOfRange, .invalidSnapshotSet, .snapshotOrder:
            .invalidArgument
        case .volumeNotFound, .snapshotDeleted, .closed, .volumeReverting, .revertIncomplete: .socketShutdown
        case .tooManySnapshots: .noSpace
        case .cannotZeroQuickly: .notSupported
        case .io(let error) where error.errno == .noSpace: .noSpace
        case .snapshotNotFound, .volumeExists, .snapshotFailed, .volumeHasSnapshots, .directoryLocked,
            .notADataDirectory, .unsupportedFormatVersion, .corruptCatalog, .holdExpired, .holdNotActive,
            .storageFailed, .damagedCopy, .io:
            .ioError
        }
    }

    /// Wraps storage errors; passes engine errors through.
    static func wrap(_ error: any Error) -> EngineError {
        if let engine = error as? EngineError { return engine }
        if let storage = error as? BlockIOError { return .io(storage) }
        return .io(BlockIOError(.system(.ioError), operation: "\(error)", path: ""))
    }
}
