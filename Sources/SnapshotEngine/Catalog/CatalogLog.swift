// The catalog file: a header, then batches of records, each batch checksummed and padded to 512
// bytes (docs/on-disk-format.md). Appends are group-committed: callers hand in records (and the diff
// stores whose data those records point at); one caller at a time leads, syncing those diff stores,
// writing everything pending as one batch and fdatasync-ing it, while the others wait and are woken
// together. The leader of a batch hands leadership to the first waiter of the next one, so no caller
// waits for more than its own batch and the one in flight before it.
//
// A crash can only tear the last batch (one batch is in flight at a time), so recovery stops at the
// first batch that does not check out, makes sure no valid batch follows it (that would be
// corruption, not a torn write), and cuts the file there.

import BlockIO
import CoreMetrics
import Synchronization

final class CatalogLog: Sendable {
    static let fileName = "catalog"
    static let newFileName = "catalog.new"
    static let magic: [UInt8] = Array("UMBRACAT".utf8)
    /// The version this code writes. Version 2 added the pending-set records (types 8 and 9), version
    /// 3 the checksummed copies (type 10), version 4 changes of a volume's diff-store limit (type 11) and reverts (types 12 and 13).
    /// An older catalog is read as it is and rewritten whole in
    /// the current version when the store opens; its copies keep having no checksums.
    static let formatVersion: UInt32 = 4
    static let readableFormatVersions: ClosedRange<UInt32> = 1...4
    static let headerSize = 512
    static let batchAlignment = 512
    static let batchHeaderSize = 32
    static let batchMagic: UInt32 = 0x3142_4D55  // "UMB1"
    /// The largest batch payload recovery accepts; appends split larger record lists.
    static let maximumBatchPayload = 16 << 20
    static let preallocationStep: UInt64 = 1 << 20

    private enum Role {
        case done
        case lead
    }

    private struct State {
        var storage: any BlockStorage
        var tail: UInt64
        var preallocatedEnd: UInt64
        var nextBatchSequence: UInt64
        var pendingPayload: [UInt8] = []
        var pendingWaiters: [CheckedContinuation<Role, any Error>] = []
        var pendingSyncs: [ObjectIdentifier: StorageSync] = [:]
        /// Every append in the pending batch undoes itself if it fails (see `append`).
        var pendingFailsCleanly = true
        var leaderActive = false
        var failure: EngineError?
        /// Bytes appended since the file was written whole (by creation or compaction).
        var appendedBytes: UInt64 = 0
        /// Room in the allocated space ahead promised to appends still to come (`reserveRoom`).
        var reservedRoom = 0
    }

    private let state: Mutex<State>
    /// Set with `State.failure`, for the write path to check without taking the lock.
    private let failed = Atomic<Bool>(false)
    private let io: any IOExecutor
    let path: String
    /// Per batch (group commit), through swift-metrics: how many appends it carried, and how long
    /// making it durable took (the data syncs first, then the write and sync of the catalog).
    private let batchAppends = Recorder(label: "umbra_catalog_commit_appends", aggregate: true)
    private let batchSeconds = CoreMetrics.Timer(label: "umbra_catalog_commit_seconds")

    private init(storage: any BlockStorage, io: any IOExecutor, tail: UInt64, nextBatchSequence: UInt64) {
        self.path = storage.path
        self.io = io
        self.state = Mutex(
            State(storage: storage, tail: tail, preallocatedEnd: tail, nextBatchSequence: nextBatchSequence))
    }

    /// Tests only (`BrokenOrdering.retryFailedSync`): retry a failed sync and trust the retry.
    let retriesFailedSyncForTesting = Atomic<Bool>(false)

    /// The file's length in use (header and batches).
    var usedBytes: UInt64 { state.withLock { $0.tail } }

    /// Bytes appended since the file was last written whole.
    var appendedBytes: UInt64 { state.withLock { $0.appendedBytes } }

    /// Promises `bytes` of the space the file has allocated ahead to appends still to come (the
    /// records of writes answered before their copies), so that they cannot fail for want of space.
    /// False if that much is not free; otherwise give it back with `releaseRoom` once appended.
    /// Appends that promised nothing (records of copies answered only once done, policy records)
    /// may take room meanwhile; `unpromisedMargin` is left for them.
    func reserveRoom(_ bytes: Int) -> Bool {
        state.withLock { state in
            let promised = UInt64(state.pendingPayload.count + state.reservedRoom + bytes + Self.unpromisedMargin)
            guard state.failure == nil, state.preallocatedEnd >= state.tail + promised else { return false }
            state.reservedRoom += bytes
            return true
        }
    }

    static let unpromisedMargin = 128 << 10

    func releaseRoom(_ bytes: Int) {
        state.withLock { $0.reservedRoom -= bytes }
    }

    /// The error that stopped the log, if any.
    var failure: EngineError? {
        guard failed.load(ordering: .acquiring) else { return nil }
        return state.withLock { $0.failure }
    }

    // MARK: - Opening

    /// Opens the catalog of `directory`, creating an empty one if there is none, and returns it with
    /// the records it holds and the format version it was written in.
    static func open(in directory: any StorageDirectory, io: any IOExecutor) async throws -> (
        log: CatalogLog, records: [CatalogRecord], formatVersion: UInt32
    ) {
        if directory.fileExists(newFileName) {
            // A creation or compaction that did not reach its rename: the old catalog (if any) stands.
            try directory.removeFile(newFileName)
        }
        if !directory.fileExists(fileName) {
            let storage = try await writeWhole(records: [], in: directory, io: io)
            return (
                CatalogLog(storage: storage, io: io, tail: UInt64(headerSize), nextBatchSequence: 1), [], formatVersion
            )
        }
        let storage = try directory.openFile(fileName, mode: .existing)
        let contents = try await io.run { try read(storage) }
        if contents.fileSize != contents.tail {
            // Cut off the torn batch (or preallocated zeros) so nothing stale lies past the tail.
            try await io.run {
                try storage.resize(to: ByteCount(contents.tail))
                try storage.synchronize()
            }
        }
        let log = CatalogLog(
            storage: storage, io: io, tail: contents.tail, nextBatchSequence: contents.nextBatchSequence)
        return (log, contents.records, contents.formatVersion)
    }

    struct Contents {
        var formatVersion: UInt32
        var records: [CatalogRecord]
        var tail: UInt64
        var nextBatchSequence: UInt64
        var fileSize: UInt64
    }

    /// Parses a whole catalog file.
    static func read(_ storage: any BlockStorage) throws -> Contents {
        let size = Int(try storage.size().rawValue)
        var bytes = [UInt8](repeating: 0, count: size)
        try bytes.withUnsafeMutableBytes { try storage.read(fromAbsoluteOffset: .zero, into: $0) }
        let path = storage.path

        guard size >= headerSize, Array(bytes[0..<8]) == magic else {
            throw EngineError.corruptCatalog(
                path: path, offset: 0, reason: "the file does not start with an Umbra catalog header")
        }
        var header = BinaryReader(bytes, from: 8, to: headerSize)
        let version = try header.u32OrCorrupt(path)
        let declaredHeaderSize = try header.u32OrCorrupt(path)
        let headerChecksum = try header.u32OrCorrupt(path)
        guard readableFormatVersions.contains(version) else {
            throw EngineError.unsupportedFormatVersion(path: path, found: version, supported: readableFormatVersions)
        }
        guard declaredHeaderSize == UInt32(headerSize),
            headerChecksum == bytes.withUnsafeBytes({ CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<16])) })
        else { throw EngineError.corruptCatalog(path: path, offset: 8, reason: "the header checksum does not match") }

        var records: [CatalogRecord] = []
        var position = headerSize
        var expectedSequence: UInt64 = 1
        while let payload = validBatch(in: bytes, at: position, sequence: expectedSequence) {
            var reader = BinaryReader(bytes, from: payload.lowerBound, to: payload.upperBound)
            while reader.remaining > 0 {
                let recordOffset = reader.position
                do {
                    records.append(try CatalogRecord.decode(from: &reader))
                } catch {
                    throw EngineError.corruptCatalog(path: path, offset: UInt64(recordOffset), reason: error.reason)
                }
            }
            position = align(payload.upperBound)
            expectedSequence += 1
        }
        // Anything valid after the first bad batch means the damage is not a torn last write.
        var probe = position + batchAlignment
        while probe + batchHeaderSize <= size {
            if let sequence = batchSequence(in: bytes, at: probe), sequence >= expectedSequence,
                validBatch(in: bytes, at: probe, sequence: sequence) != nil
            {
                throw EngineError.corruptCatalog(
                    path: path, offset: UInt64(position),
                    reason: "batch \(expectedSequence) is damaged but batch \(sequence) follows it")
            }
            probe += batchAlignment
        }
        return Contents(
            formatVersion: version, records: records, tail: UInt64(position), nextBatchSequence: expectedSequence,
            fileSize: UInt64(size))
    }

    private static func align(_ position: Int) -> Int {
        (position + batchAlignment - 1) / batchAlignment * batchAlignment
    }

    private static func batchSequence(in bytes: [UInt8], at position: Int) -> UInt64? {
        var reader = BinaryReader(bytes, from: position)
        guard (try? reader.u32()) == batchMagic, (try? reader.u32()) != nil else { return nil }
        return try? reader.u64()
    }

    /// The payload range of the batch at `position` if it is whole, checks out and has `sequence`.
    private static func validBatch(in bytes: [UInt8], at position: Int, sequence: UInt64) -> Range<Int>? {
        var reader = BinaryReader(bytes, from: position)
        guard (try? reader.u32()) == batchMagic, let length = try? reader.u32(), let found = try? reader.u64(),
            let checksum = try? reader.u32(), found == sequence, Int(length) <= maximumBatchPayload
        else { return nil }
        let payloadStart = position + batchHeaderSize
        let payloadEnd = payloadStart + Int(length)
        guard payloadEnd <= bytes.count else { return nil }
        let computed = bytes.withUnsafeBytes { raw in
            let covered = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[(position + 4)..<(position + 16)]))
            return CRC32C.checksum(
                UnsafeRawBufferPointer(rebasing: raw[payloadStart..<payloadEnd]), continuing: covered)
        }
        return computed == checksum ? payloadStart..<payloadEnd : nil
    }

    private static func headerBytes(version: UInt32) -> [UInt8] {
        var writer = BinaryWriter()
        writer.bytes.append(contentsOf: magic)
        writer.u32(version)
        writer.u32(UInt32(headerSize))
        writer.u32(CRC32C.checksum(writer.bytes))
        writer.bytes.append(contentsOf: repeatElement(0, count: headerSize - writer.bytes.count))
        return writer.bytes
    }

    /// Encodes `payload` as batch `sequence`, padded to the batch alignment.
    private static func batchBytes(payload: [UInt8], sequence: UInt64) -> [UInt8] {
        var writer = BinaryWriter()
        writer.u32(batchMagic)
        writer.u32(UInt32(payload.count))
        writer.u64(sequence)
        let covered = CRC32C.checksum(Array(writer.bytes[4..<16]))
        writer.u32(CRC32C.checksum(payload, continuing: covered))
        writer.bytes.append(contentsOf: repeatElement(0, count: batchHeaderSize - writer.bytes.count))
        writer.bytes.append(contentsOf: payload)
        writer.bytes.append(contentsOf: repeatElement(0, count: align(writer.bytes.count) - writer.bytes.count))
        return writer.bytes
    }

    /// Splits encoded records into batch payloads no larger than the maximum.
    private static func payloads(for records: [CatalogRecord]) -> [[UInt8]] {
        var payloads: [[UInt8]] = []
        var writer = BinaryWriter()
        for record in records {
            let before = writer.bytes.count
            record.encode(into: &writer)
            if writer.bytes.count > maximumBatchPayload && before > 0 {
                payloads.append(Array(writer.bytes[0..<before]))
                writer.bytes.removeFirst(before)
            }
        }
        if !writer.bytes.isEmpty { payloads.append(writer.bytes) }
        return payloads
    }

    /// Writes a complete catalog holding `records` to `catalog.new`, syncs it, and renames it over
    /// `catalog`. Returns the new file, open.
    /// A whole catalog file holding `records` (tests write older versions with it).
    static func fileBytes(records: [CatalogRecord], version: UInt32 = formatVersion) -> [UInt8] {
        var bytes = headerBytes(version: version)
        for (index, payload) in payloads(for: records).enumerated() {
            bytes.append(contentsOf: batchBytes(payload: payload, sequence: UInt64(index + 1)))
        }
        return bytes
    }

    private static func writeWhole(
        records: [CatalogRecord], in directory: any StorageDirectory, io: any IOExecutor
    ) async throws -> (any BlockStorage) {
        let storage = try await writeNew(records: records, in: directory, io: io)
        try await io.run { try directory.rename(newFileName, to: fileName) }
        return storage
    }

    /// Writes `records` as a whole catalog to `catalog.new` and syncs it. A failure here leaves the
    /// catalog in use untouched (the next open removes `catalog.new`).
    private static func writeNew(
        records: [CatalogRecord], in directory: any StorageDirectory, io: any IOExecutor
    ) async throws -> (any BlockStorage) {
        let bytes = fileBytes(records: records)
        return try await io.run {
            if directory.fileExists(newFileName) { try directory.removeFile(newFileName) }
            let storage = try directory.openFile(newFileName, mode: .createNew)
            do {
                try bytes.withUnsafeBytes { try storage.write(toAbsoluteOffset: .zero, $0) }
                try storage.synchronize()
            } catch {
                // Give the space back at once (a full disk is the likely cause).
                try? directory.removeFile(newFileName)
                throw error
            }
            return storage
        }
    }

    // MARK: - Appending

    /// Makes `records` durable, after making `dataFirst` durable (the diff stores holding the data the
    /// records point at). Concurrent calls share one write and one fdatasync. `whenQueued` runs once
    /// the records have their place in the log (every later append lands after them), before they are
    /// durable; it does not run if the log has failed. `failsCleanly` promises that the caller has
    /// applied nothing of the records before they are durable and leaves no trace if the append
    /// fails: only a batch made entirely of such appends may fail for want of space (ENOSPC) and
    /// leave the log usable; any other failure stops the log.
    func append(
        _ records: [CatalogRecord], syncingFirst dataFirst: [StorageSync] = [], failsCleanly: Bool = false,
        whenQueued: (() -> Void)? = nil
    ) async throws {
        var writer = BinaryWriter()
        for record in records { record.encode(into: &writer) }
        let payload = writer.bytes
        let role = try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Role, any Error>) in
            enum Decision {
                case fail(EngineError)
                case lead
                case wait
            }
            let decision = state.withLock { state -> Decision in
                if let failure = state.failure { return .fail(failure) }
                state.pendingPayload.append(contentsOf: payload)
                state.pendingFailsCleanly = state.pendingFailsCleanly && failsCleanly && whenQueued == nil
                for storage in dataFirst { state.pendingSyncs[ObjectIdentifier(storage)] = storage }
                if state.leaderActive {
                    state.pendingWaiters.append(continuation)
                    return .wait
                }
                state.leaderActive = true
                return .lead
            }
            if case .fail = decision {} else { whenQueued?() }
            switch decision {
            case .fail(let error): continuation.resume(throwing: error)
            case .lead: continuation.resume(returning: .lead)
            case .wait: break
            }
        }
        if role == .lead { try await lead() }
    }

    /// Writes everything pending as one batch, wakes its waiters, and hands leadership on.
    private func lead() async throws {
        let batch = state.withLock { state in
            defer {
                state.pendingPayload = []
                state.pendingWaiters = []
                state.pendingSyncs = [:]
                state.pendingFailsCleanly = true
            }
            return (
                storage: state.storage, payload: state.pendingPayload, waiters: state.pendingWaiters,
                syncs: Array(state.pendingSyncs.values), tail: state.tail, sequence: state.nextBatchSequence,
                preallocatedEnd: state.preallocatedEnd, failsCleanly: state.pendingFailsCleanly
            )
        }
        let started = ContinuousClock.now
        do {
            let retrying = retriesFailedSyncForTesting.load(ordering: .relaxed)
            for target in batch.syncs {
                try await io.run { try target.synchronize() }
            }
            var written: UInt64 = 0
            var tail = batch.tail
            var sequence = batch.sequence
            var preallocatedEnd = batch.preallocatedEnd
            // Payloads over the batch maximum (rare: a huge deletion) go out as several batches.
            var remaining = batch.payload[...]
            repeat {
                let take = min(remaining.count, Self.maximumBatchPayload)
                let bytes = Self.batchBytes(payload: Array(remaining.prefix(take)), sequence: sequence)
                remaining = remaining.dropFirst(take)
                let offset = tail
                // Grown once less than half a step is left after this batch, so that room stays
                // ahead for the records that `reserveRoom` promises.
                let growTo: UInt64? =
                    offset + UInt64(bytes.count) + Self.preallocationStep / 2 > preallocatedEnd
                    ? (offset + UInt64(bytes.count) + Self.preallocationStep) / Self.preallocationStep
                        * Self.preallocationStep : nil
                let storage = batch.storage
                let allocatedEnd = preallocatedEnd
                let first = written == 0 && batch.failsCleanly
                let grew = try await io.run {
                    // Growing ahead is only an optimisation: on a full disk the batch itself may
                    // still fit, so it goes out without it.
                    var grown = false
                    if let growTo {
                        do {
                            try storage.preallocate(
                                at: ByteOffset(allocatedEnd), count: ByteCount(growTo - allocatedEnd))
                            grown = true
                        } catch let error as BlockIOError where error.errno == .noSpace {}
                    }
                    do {
                        try bytes.withUnsafeBytes { try storage.write(toAbsoluteOffset: ByteOffset(offset), $0) }
                    } catch let error as BlockIOError where first && error.errno == .noSpace {
                        throw NoRoomForBatch(error: error)
                    }
                    try storage.synchronize(retryingForTesting: retrying)
                    return grown
                }
                if grew, let growTo { preallocatedEnd = growTo }
                tail += UInt64(bytes.count)
                written += UInt64(bytes.count)
                sequence += 1
            } while !remaining.isEmpty
            let next = state.withLock { state -> CheckedContinuation<Role, any Error>? in
                state.tail = tail
                state.nextBatchSequence = sequence
                state.preallocatedEnd = preallocatedEnd
                state.appendedBytes += written
                guard !state.pendingWaiters.isEmpty else {
                    state.leaderActive = false
                    return nil
                }
                return state.pendingWaiters.removeFirst()
            }
            batchSeconds.recordNanoseconds(started.duration(to: .now).wholeNanoseconds)
            batchAppends.record(batch.waiters.count + 1)
            for waiter in batch.waiters { waiter.resume(returning: .done) }
            next?.resume(returning: .lead)
        } catch let noRoom as NoRoomForBatch {
            // Nothing of this batch was synced and the tail stays where it was, so the next batch
            // simply overwrites whatever part of it reached the page cache: the log is intact and
            // only these records fail, with ENOSPC. Space may be freed before the next append.
            let next = state.withLock { state -> CheckedContinuation<Role, any Error>? in
                guard !state.pendingWaiters.isEmpty else {
                    state.leaderActive = false
                    return nil
                }
                return state.pendingWaiters.removeFirst()
            }
            for waiter in batch.waiters { waiter.resume(throwing: EngineError.io(noRoom.error)) }
            next?.resume(returning: .lead)
            throw EngineError.io(noRoom.error)
        } catch {
            let failure = EngineError.storageFailed(
                (error as? BlockIOError) ?? BlockIOError(.system(.ioError), operation: "catalog append", path: path))
            let stranded = state.withLock { state -> [CheckedContinuation<Role, any Error>] in
                state.failure = failure
                failed.store(true, ordering: .releasing)
                state.leaderActive = false
                defer { state.pendingWaiters = [] }
                return state.pendingWaiters
            }
            for waiter in batch.waiters + stranded { waiter.resume(throwing: failure) }
            throw failure
        }
    }

    /// Replaces the whole catalog with `records` (compaction). The caller guarantees that nothing is
    /// appending meanwhile.
    func rewrite(with records: [CatalogRecord], in directory: any StorageDirectory) async throws {
        if let failure { throw failure }
        let storage = try await Self.writeNew(records: records, in: directory, io: io)
        let size: UInt64
        do {
            // Once the rename may have happened, which file `catalog` names after a crash is unknown
            // if it fails: the log stops rather than append to a file that may not be the catalog.
            try await io.run { try directory.rename(Self.newFileName, to: Self.fileName) }
            size = try await io.run { try storage.size().rawValue }
        } catch {
            let failure = EngineError.storageFailed(
                (error as? BlockIOError) ?? BlockIOError(.system(.ioError), operation: "catalog rename", path: path))
            state.withLock { $0.failure = failure }
            failed.store(true, ordering: .releasing)
            throw failure
        }
        state.withLock { state in
            assert(
                !state.leaderActive && state.pendingWaiters.isEmpty, "catalog rewritten while appends were in flight")
            state.storage = storage
            state.tail = size
            state.preallocatedEnd = size
            state.nextBatchSequence = UInt64(Self.payloads(for: records).count + 1)
            state.appendedBytes = 0
        }
    }
}

extension BinaryReader {
    fileprivate mutating func u32OrCorrupt(_ path: String) throws -> UInt32 {
        do {
            return try u32()
        } catch {
            throw EngineError.corruptCatalog(path: path, offset: UInt64(position), reason: error.reason)
        }
    }
}

/// A batch that could not be written for want of space, before anything of it was synced.
private struct NoRoomForBatch: Error {
    let error: BlockIOError
}

extension BlockStorage {
    /// fdatasync. With `retryingForTesting` (tests only, `BrokenOrdering.retryFailedSync`) a failure
    /// is retried once and a success believed: the mistake the crash simulation must catch.
    func synchronize(retryingForTesting: Bool) throws(BlockIOError) {
        do {
            try synchronize()
        } catch  where retryingForTesting {
            try synchronize()
        }
    }
}
