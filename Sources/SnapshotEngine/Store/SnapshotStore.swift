// The data directory: its volumes, their snapshot sets, and the catalog that makes them durable.
//
// Metadata operations (volumes created and deleted, sets taken, snapshots deleted) run one at a time
// behind `operations`; the data path never touches that lock. A prepared snapshot set keeps it until
// it is committed or aborted, which its hold limit bounds.
//
// A set may be taken *pending* (`PreparedSnapshotSet.commitPending`): its snapshots are readable at
// once, but it is kept only when `keepSnapshotSet` says so (the coordinator does at BackupComplete).
// Opening a data directory rolls back every set still pending, so a set whose writers never got to
// the end (a crash while they thawed, or while a requester copied a kept-open set) is never handed
// out as if it were whole.

import BlockIO
import Logging
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

public final class SnapshotStore: Sendable {
    public let directory: any StorageDirectory
    let context: StoreContext
    let operations = AsyncLock()
    private let directoryLock: any DirectoryLock
    private let ownedPool: IOThreadPool?

    struct State {
        var volumes: [String: Volume] = [:]
        var nextSequence: UInt64
        var nextVolumeID: UInt32
        /// The appends of pending sets taken and not yet durable, by set GUID.
        var pendingCommits: [UUID: PendingCommit] = [:]
        /// The sets that opening rolled back.
        var rolledBackSets: [SnapshotSetInfo] = []
        /// What sets were taken for (`labelSnapshotSet`), by set GUID.
        var setPurposes: [UUID: String] = [:]
    }

    let state: Mutex<State>

    static let volumesDirectory = "volumes"
    /// Entries a directory may hold and still be taken for a new, empty data directory.
    static let entriesAllowedInNewDirectory: Set<String> = ["lock", "control.sock", CatalogLog.newFileName]

    private init(
        directory: any StorageDirectory, context: StoreContext, lock: any DirectoryLock, ownedPool: IOThreadPool?,
        volumes: [Volume], nextSequence: UInt64, nextVolumeID: UInt32
    ) {
        self.directory = directory
        self.context = context
        self.directoryLock = lock
        self.ownedPool = ownedPool
        self.state = Mutex(
            State(
                volumes: Dictionary(uniqueKeysWithValues: volumes.map { ($0.name, $0) }), nextSequence: nextSequence,
                nextVolumeID: nextVolumeID))
    }

    // MARK: - Opening and closing

    /// Opens (or creates) the data directory at `path`.
    public static func open(path: String, configuration: StoreConfiguration = StoreConfiguration()) async throws
        -> SnapshotStore
    {
        let directory: FileSystemDirectory
        do {
            directory = try FileSystemDirectory(path: path)
        } catch {
            throw EngineError.io(error)
        }
        return try await open(directory: directory, configuration: configuration)
    }

    /// Opens (or creates) a data directory, recovering from whatever state a crash left it in: the
    /// catalog is replayed (its torn last batch, if any, cut off), files no record accounts for are
    /// removed, and diff stores are cut back to what their snapshots use.
    public static func open(directory: any StorageDirectory, configuration: StoreConfiguration = StoreConfiguration())
        async throws -> SnapshotStore
    {
        let lock: any DirectoryLock
        do {
            guard let acquired = try directory.lockExclusively() else {
                throw EngineError.directoryLocked(directory.path)
            }
            lock = acquired
        } catch let error as BlockIOError {
            throw EngineError.io(error)
        }
        let ownedPool = configuration.ioExecutor == nil ? IOThreadPool(threadCount: configuration.ioThreadCount) : nil
        let io: any IOExecutor = configuration.ioExecutor ?? ownedPool!
        do {
            if !directory.fileExists(CatalogLog.fileName) {
                let unexpected = try directory.list("").filter { !entriesAllowedInNewDirectory.contains($0) }
                if !unexpected.isEmpty { throw EngineError.notADataDirectory(directory.path) }
            }
            let (catalog, records, formatVersion) = try await CatalogLog.open(in: directory, io: io)
            var replay = CatalogReplay()
            for record in records { replay.apply(record) }
            replay.rebuildAllocators()
            if replay.ignoredRecords > 0 {
                configuration.logger.debug(
                    "catalog replay skipped records about removed items",
                    metadata: ["count": "\(replay.ignoredRecords)"])
            }
            catalog.retriesFailedSyncForTesting.store(
                configuration.brokenOrderingForTesting == .retryFailedSync, ordering: .relaxed)
            let context = StoreContext(catalog: catalog, io: io, configuration: configuration)
            let volumes = try await openVolumes(replay, in: directory, context: context)
            let store = SnapshotStore(
                directory: directory, context: context, lock: lock, ownedPool: ownedPool, volumes: volumes,
                nextSequence: replay.nextSequence, nextVolumeID: replay.nextVolumeID)
            store.state.withLock { $0.setPurposes = replay.setPurposes }
            try await store.rollBackPendingSets()
            if formatVersion < CatalogLog.formatVersion {
                try await store.compact(force: true)
                configuration.logger.info(
                    "upgraded the catalog's format",
                    metadata: ["from": "\(formatVersion)", "to": "\(CatalogLog.formatVersion)"])
            } else {
                await store.compactIfWorthIt()
            }
            await store.finishInterruptedReverts()
            await store.deleteUnfinishedVolumes()
            configuration.logger.debug(
                "opened data directory",
                metadata: ["path": "\(directory.path)", "volumes": "\(volumes.count)", "records": "\(records.count)"])
            return store
        } catch {
            ownedPool?.shutdown()
            throw EngineError.wrap(error)
        }
    }

    static func volumeDirectory(_ id: VolumeID) -> String { "\(volumesDirectory)/\(id.rawValue)" }

    private static func openVolumes(_ replay: CatalogReplay, in directory: any StorageDirectory, context: StoreContext)
        async throws -> [Volume]
    {
        if !directory.fileExists(volumesDirectory) { try directory.makeDirectory(volumesDirectory) }
        // Remove what a crash left of volumes being created or deleted.
        let known = Set(replay.volumes.keys.map { String($0.rawValue) })
        for name in try directory.list(volumesDirectory) where !known.contains(name) {
            let path = "\(volumesDirectory)/\(name)"
            for file in try directory.list(path) { try directory.removeFile("\(path)/\(file)") }
            try directory.removeDirectory(path)
            context.logger.info("removed the remains of an unfinished volume", metadata: ["path": "\(path)"])
        }
        var volumes: [Volume] = []
        for entry in replay.volumes.values.sorted(by: { $0.definition.id < $1.definition.id }) {
            let definition = entry.definition
            let base = volumeDirectory(definition.id)
            let live: any BlockStorage
            switch definition.backing {
            case .owned: live = try directory.openFile("\(base)/live", mode: .existing)
            case .external(let path): live = try directory.openExternal(path)
            }
            let liveSize = try live.size().rawValue
            if liveSize < definition.size {
                throw EngineError.invalidSize(
                    "volume '\(definition.name)' is \(definition.size) bytes but \(live.path) holds only \(liveSize)")
            }
            let diff = try directory.openFile("\(base)/diff", mode: .createIfMissing)
            // Slots past the high-water mark hold copies whose records never became durable.
            let usedBytes = entry.metadata.slots.highWater << definition.chunkShift
            if try diff.size().rawValue > usedBytes {
                try await context.io.run {
                    try diff.resize(to: ByteCount(usedBytes))
                    try diff.synchronize()
                }
            }
            volumes.append(
                Volume(definition: definition, metadata: entry.metadata, live: live, diff: diff, context: context))
        }
        return volumes
    }

    /// Waits for writes in flight, makes the live volumes durable, and releases the directory. Every
    /// later call fails with `EngineError.closed`.
    public func close() async throws {
        await operations.lock()
        guard !context.closed.exchange(true, ordering: .acquiringAndReleasing) else {
            operations.unlock()
            return
        }
        // Pending sets stay pending (the next open rolls them back), but their records finish first.
        await waitForPendingCommits()
        var firstError: (any Error)?
        for volume in allVolumes() {
            // Writes answered early land first (their gate may be free while they free diff space);
            // one that was lost is reported here too.
            do {
                try await volume.heldWrites.wait(for: nil)
            } catch {
                if firstError == nil { firstError = error }
            }
            // Drain the writers that already passed the gate; the ones behind it will see `closed`.
            try? await volume.gate.acquireExclusive()
            do {
                let liveSync = volume.liveSync
                try await context.io.run { try liveSync.synchronize() }
            } catch {
                if firstError == nil { firstError = error }
            }
            volume.gate.releaseExclusive()
        }
        operations.unlock()
        directoryLock.release()
        ownedPool?.shutdown()
        if let firstError { throw EngineError.wrap(firstError) }
    }

    func checkOpen() throws(EngineError) {
        if context.closed.load(ordering: .relaxed) { throw .closed }
    }

    // MARK: - Volumes

    func allVolumes() -> [Volume] {
        state.withLock { Array($0.volumes.values) }.sorted { $0.name < $1.name }
    }

    /// The volume named `name`.
    public func volume(named name: String) throws -> Volume {
        try checkOpen()
        guard let volume = state.withLock({ $0.volumes[name] }) else { throw EngineError.volumeNotFound(name) }
        return volume
    }

    /// The threads the store does its blocking disk I/O on (`StoreConfiguration.ioThreadCount`), for
    /// callers with blocking file work of their own beside it (backup images).
    public var io: any IOExecutor { context.io }

    /// The length of the catalog file in use (it grows with records until compaction rewrites it).
    public var catalogBytes: ByteCount { ByteCount(context.catalog.usedBytes) }

    /// Every volume, by name.
    public func volumes() -> [VolumeInfo] {
        allVolumes().map { info(for: $0) }
    }

    func info(for volume: Volume) -> VolumeInfo {
        let (count, dataSlots) = volume.metadata.withLock { metadata in
            (metadata.chain.count + metadata.failed.count, metadata.slots.usedCount)
        }
        return VolumeInfo(
            name: volume.name, id: volume.guid, size: volume.size, chunkSize: volume.chunkSize, backing: volume.backing,
            diffLimit: volume.diffLimit, policy: volume.metadata.withLock { $0.policy }, snapshotCount: count,
            diffBytes: ByteCount(dataSlots << volume.chunkShift), copyMethod: volume.copyMethod)
    }

    /// Creates a volume. Its files exist before the catalog names it, so a crash in between leaves
    /// only files that the next open removes.
    /// With `filling`, the volume counts as unfinished until `finishFilling` records that it was filled
    /// (a restore): opening the store deletes an unfinished one, so a restore a crash interrupted never
    /// leaves a volume that looks whole.
    @discardableResult
    public func createVolume(_ spec: VolumeSpec, filling: Bool = false) async throws -> VolumeInfo {
        try checkOpen()
        guard VolumeSpec.isValidName(spec.name) else { throw EngineError.invalidVolumeName(spec.name) }
        let chunk = spec.chunkSize.rawValue
        guard chunk.nonzeroBitCount == 1, chunk >= VolumeSpec.minimumChunkSize.rawValue,
            chunk <= VolumeSpec.maximumChunkSize.rawValue
        else { throw EngineError.invalidChunkSize(chunk) }
        if let size = spec.size { try Self.validate(size: size) }
        if case .owned = spec.backing, spec.size == nil {
            throw EngineError.invalidSize("a volume needs a size")
        }
        if let limit = spec.diffLimit, limit.rawValue < chunk {
            throw EngineError.invalidSize("the diff store limit must hold at least one chunk (\(chunk) bytes)")
        }
        await operations.lock()
        defer { operations.unlock() }
        try checkOpen()
        let id = try state.withLock { (state: inout State) throws(EngineError) -> VolumeID in
            guard state.volumes[spec.name] == nil else { throw .volumeExists(spec.name) }
            defer { state.nextVolumeID += 1 }
            return VolumeID(rawValue: state.nextVolumeID)
        }
        let directory = self.directory
        let base = Self.volumeDirectory(id)
        do {
            let (live, diff, size) = try await context.io.run { () -> (any BlockStorage, any BlockStorage, UInt64) in
                try directory.makeDirectory(base)
                let live: any BlockStorage
                let size: UInt64
                switch spec.backing {
                case .owned:
                    size = spec.size!.rawValue
                    live = try directory.openFile("\(base)/live", mode: .createNew)
                    try live.resize(to: ByteCount(size))
                    try live.synchronize()
                case .external(let path):
                    live = try directory.openExternal(path)
                    let available = try live.size().rawValue
                    size = spec.size?.rawValue ?? (available / VolumeSpec.sizeGranularity * VolumeSpec.sizeGranularity)
                    guard size > 0, size <= available else {
                        throw EngineError.invalidSize(
                            "\(path) holds \(available) bytes, not enough for a volume of \(spec.size?.rawValue ?? size) bytes"
                        )
                    }
                }
                let diff = try directory.openFile("\(base)/diff", mode: .createNew)
                return (live, diff, size)
            }
            try Self.validate(size: ByteCount(size))
            let definition = VolumeDefinition(
                id: id, guid: context.configuration.makeIdentifier(), name: spec.name, size: size,
                chunkShift: UInt8(chunk.trailingZeroBitCount), backing: spec.backing,
                diffLimit: spec.diffLimit?.rawValue ?? 0, policy: spec.policy)
            // One batch: the volume and its mark are durable together.
            try await context.catalog.append([.volumeCreated(definition)] + (filling ? [.volumeFilling(id)] : []))
            var metadata = VolumeMetadata(
                diffLimit: spec.diffLimit?.rawValue, chunkShift: definition.chunkShift, policy: spec.policy)
            metadata.isFilling = filling
            let volume = Volume(definition: definition, metadata: metadata, live: live, diff: diff, context: context)
            state.withLock { $0.volumes[spec.name] = volume }
            context.configuration.eventHandler?(.volumeCreated(name: spec.name))
            context.logger.debug("created volume", metadata: ["volume": "\(spec.name)", "size": "\(size)"])
            return info(for: volume)
        } catch {
            // Best effort: whatever is left is removed at the next open anyway.
            try? await context.io.run { try Self.removeFiles(of: base, in: directory) }
            throw EngineError.wrap(error)
        }
    }

    /// Records that a volume created `filling` is filled (its data flushed first): it survives
    /// reopening from now on.
    public func finishFilling(volume name: String) async throws {
        try checkOpen()
        let volume = try self.volume(named: name)
        try await volume.flush()
        try await context.catalog.append([.volumeFilled(volume.id)])
        volume.metadata.withLock { $0.isFilling = false }
    }

    /// At open: deletes the volumes a restore was filling when it stopped.
    func deleteUnfinishedVolumes() async {
        for volume in allVolumes() where volume.metadata.withLock({ $0.isFilling }) {
            do {
                try await deleteVolume(named: volume.name, deletingSnapshots: true)
                context.logger.notice(
                    "deleted a volume whose restore did not finish", metadata: ["volume": "\(volume.name)"])
            } catch {
                context.logger.error(
                    "could not delete a volume whose restore did not finish",
                    metadata: ["volume": "\(volume.name)", "error": "\(error)"])
            }
        }
    }

    /// Gives a volume a new diff-store limit (nil: none) and policy, durably. A limit below what the
    /// diff store holds frees nothing at once: the next copy that needs space makes the policy give
    /// way, as when the limit is reached by writes.
    @discardableResult
    public func limitDiffStore(
        ofVolume name: String, to diffLimit: ByteCount?, policy: DiffStorePolicy
    ) async throws -> VolumeInfo {
        try checkOpen()
        // Compaction holds this lock too: it must not write the volume's old limit over the record.
        await operations.lock()
        defer { operations.unlock() }
        return try await limitDiffStore(try self.volume(named: name), to: diffLimit, policy: policy)
    }

    /// A new limit for `limitDiffStore(ofVolume:changing:policy:)`.
    public enum DiffLimitChange: Sendable, Equatable {
        case unlimited
        case limit(ByteCount)
    }

    /// Changes what is given (nil: as it is) and keeps the rest, reading the rest under the same lock
    /// as the change, so two changes at once never write back each other's old values. Without a
    /// limit the policy goes back to `deleteOldest`; a policy needs a limit.
    @discardableResult
    public func limitDiffStore(
        ofVolume name: String, changing limit: DiffLimitChange?, policy: DiffStorePolicy?
    ) async throws -> VolumeInfo {
        try checkOpen()
        await operations.lock()
        defer { operations.unlock() }
        let volume = try self.volume(named: name)
        let newLimit: ByteCount? =
            switch limit {
            case nil: volume.diffLimit
            case .unlimited?: nil
            case .limit(let bytes)?: bytes
            }
        guard policy == nil || newLimit != nil else {
            throw EngineError.invalidSize(
                "a policy for a full diff store needs a limit: without one the diff store is never full")
        }
        let newPolicy = newLimit == nil ? .deleteOldest : policy ?? volume.metadata.withLock { $0.policy }
        return try await limitDiffStore(volume, to: newLimit, policy: newPolicy)
    }

    /// Holding the operations lock.
    private func limitDiffStore(_ volume: Volume, to diffLimit: ByteCount?, policy: DiffStorePolicy) async throws
        -> VolumeInfo
    {
        let name = volume.name
        let chunk = volume.chunkSize.rawValue
        if let limit = diffLimit, limit.rawValue < chunk {
            throw EngineError.invalidSize("the diff store limit must hold at least one chunk (\(chunk) bytes)")
        }
        // The diff store holds whole chunks: a limit in between would be rounded down unseen.
        if let limit = diffLimit, limit.rawValue % chunk != 0 {
            throw EngineError.invalidSize(
                "the diff limit (\(limit.rawValue) bytes) must be a whole number of chunks (\(chunk) bytes each)")
        }
        try await context.catalog.append([
            .diffStoreLimited(volume.id, diffLimit: diffLimit?.rawValue ?? 0, policy: policy)
        ])
        volume.metadata.withLock {
            $0.limitDiffStore(to: diffLimit?.rawValue, chunkShift: UInt8(volume.chunkShift), policy: policy)
        }
        context.logger.info(
            "changed the diff-store limit",
            metadata: [
                "volume": "\(name)", "diff.limit": "\(diffLimit.map { "\($0.rawValue)" } ?? "none")",
                "policy": "\(policy)",
            ])
        return info(for: volume)
    }

    static func validate(size: ByteCount) throws(EngineError) {
        guard size.rawValue > 0, size.rawValue % VolumeSpec.sizeGranularity == 0 else {
            throw .invalidSize("volume size \(size.rawValue) must be a positive multiple of 4096 bytes")
        }
        guard size <= VolumeSpec.maximumSize else {
            throw .invalidSize(
                "volume size \(size.rawValue) exceeds the maximum of \(VolumeSpec.maximumSize.rawValue) bytes")
        }
    }

    private static func removeFiles(of base: String, in directory: any StorageDirectory) throws {
        guard directory.fileExists(base) else { return }
        for file in try directory.list(base) { try directory.removeFile("\(base)/\(file)") }
        try directory.removeDirectory(base)
    }

    /// Deletes a volume (its live data too, if the store owns it; an external file or device is left
    /// alone). Refuses while it has snapshots unless `deletingSnapshots`.
    public func deleteVolume(named name: String, deletingSnapshots: Bool = false) async throws {
        try checkOpen()
        await operations.lock()
        defer { operations.unlock() }
        let volume = try self.volume(named: name)
        try await volume.gate.acquireExclusive()
        defer { volume.gate.releaseExclusive() }
        let sequences = volume.metadata.withLock { metadata -> [SnapshotSequence]? in
            let count = metadata.chain.count + metadata.failed.count
            if count > 0 && !deletingSnapshots { return nil }
            for position in metadata.chain.indices { metadata.chain[position].deleting = true }
            return metadata.chain.map(\.sequence)
        }
        guard let sequences else {
            throw EngineError.volumeHasSnapshots(
                name, count: volume.metadata.withLock { $0.chain.count + $0.failed.count })
        }
        for sequence in sequences { await volume.waitForReaders(of: sequence) }
        do {
            try await context.catalog.append([.volumeDeleted(volume.id)])
        } catch {
            volume.metadata.withLock { metadata in
                for position in metadata.chain.indices { metadata.chain[position].deleting = false }
            }
            throw EngineError.wrap(error)
        }
        volume.removed.store(true, ordering: .releasing)
        _ = state.withLock { $0.volumes.removeValue(forKey: name) }
        context.configuration.eventHandler?(.volumeDeleted(name: name))
        let directory = self.directory
        let base = Self.volumeDirectory(volume.id)
        do {
            try await context.io.run { try Self.removeFiles(of: base, in: directory) }
        } catch {
            context.logger.warning(
                "could not remove a deleted volume's files; the next open will", metadata: ["error": "\(error)"])
        }
    }

    // MARK: - Listing

    /// Every snapshot, oldest first, optionally only those of one volume.
    public func snapshots(volume name: String? = nil) throws -> [SnapshotInfo] {
        try checkOpen()
        let volumes = try name.map { [try volume(named: $0)] } ?? allVolumes()
        let purposes = state.withLock { $0.setPurposes }
        var entries: [(SnapshotSequence, SnapshotInfo)] = []
        for volume in volumes {
            volume.metadata.withLock { metadata in
                for snapshot in metadata.chain {
                    entries.append(
                        (
                            snapshot.sequence,
                            SnapshotInfo(
                                id: snapshot.id, setID: snapshot.setID, volume: volume.name,
                                createdAt: Self.date(snapshot.createdAtNanoseconds),
                                diffBytes: ByteCount(snapshot.dataSlotCount << volume.chunkShift), state: .ready,
                                isPending: snapshot.isPending, purpose: purposes[snapshot.setID])
                        ))
                }
                for failed in metadata.failed {
                    entries.append(
                        (
                            failed.sequence,
                            SnapshotInfo(
                                id: failed.id, setID: failed.setID, volume: volume.name,
                                createdAt: Self.date(failed.createdAtNanoseconds), diffBytes: .zero,
                                state: .failed(reason: failed.reason), isPending: failed.isPending,
                                purpose: purposes[failed.setID])
                        ))
                }
            }
        }
        return entries.sorted { $0.0 < $1.0 }.map(\.1)
    }

    /// Records what set `id` was taken for (letters, digits and `-`, 1 to 32 of them; `backup` for
    /// the backups `umbra backup` takes), durably. Its snapshots show it from then on.
    public func labelSnapshotSet(id: UUID, purpose: String) async throws {
        try checkOpen()
        guard (1...32).contains(purpose.count),
            purpose.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") })
        else {
            throw EngineError.invalidSnapshotSet("a purpose is 1 to 32 letters, digits or dashes (got '\(purpose)')")
        }
        // Compaction must not rewrite the catalog between the record and the state that holds it.
        await operations.lock()
        defer { operations.unlock() }
        guard try snapshots().contains(where: { $0.setID == id }) else {
            throw EngineError.snapshotNotFound(id.guidString)
        }
        try await context.catalog.append([.setLabelled(id, purpose: purpose)])
        state.withLock { $0.setPurposes[id] = purpose }
    }

    /// Every snapshot set, oldest first, with its remaining snapshots.
    public func snapshotSets() throws -> [SnapshotSetInfo] {
        var sets: [UUID: SnapshotSetInfo] = [:]
        var order: [UUID] = []
        for snapshot in try snapshots() {
            if sets[snapshot.setID] == nil {
                sets[snapshot.setID] = SnapshotSetInfo(id: snapshot.setID, createdAt: snapshot.createdAt, snapshots: [])
                order.append(snapshot.setID)
            }
            sets[snapshot.setID]!.snapshots.append(snapshot)
        }
        return order.map { sets[$0]! }
    }

    /// A readable snapshot.
    public func snapshot(id: UUID) throws -> SnapshotView {
        try checkOpen()
        for volume in allVolumes() {
            let found = try volume.metadata.withLock {
                (metadata: inout VolumeMetadata) throws(EngineError) -> SnapshotView? in
                if let position = metadata.position(of: id) {
                    let snapshot = metadata.chain[position]
                    return SnapshotView(
                        volume: volume, id: snapshot.id, setID: snapshot.setID, sequence: snapshot.sequence,
                        createdAt: Self.date(snapshot.createdAtNanoseconds))
                }
                if let failed = metadata.failed.first(where: { $0.id == id }) {
                    throw .snapshotFailed(id, reason: failed.reason)
                }
                return nil
            }
            if let found { return found }
        }
        throw EngineError.snapshotNotFound(id.guidString)
    }

    static func date(_ nanoseconds: Int64) -> Date {
        Date(timeIntervalSince1970: Double(nanoseconds) / 1e9)
    }

    static func nanoseconds(_ date: Date) -> Int64 {
        Int64((date.timeIntervalSince1970 * 1e9).rounded())
    }
}

extension Volume: Hashable {
    public static func == (lhs: Volume, rhs: Volume) -> Bool { lhs === rhs }
    public func hash(into hasher: inout Hasher) { hasher.combine(ObjectIdentifier(self)) }
}
