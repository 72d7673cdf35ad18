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
            let context = StoreContext(catalog: catalog, io: io, configuration: configuration)
            let volumes = try await openVolumes(replay, in: directory, context: context)
            let store = SnapshotStore(
                directory: directory, context: context, lock: lock, ownedPool: ownedPool, volumes: volumes,
                nextSequence: replay.nextSequence, nextVolumeID: replay.nextVolumeID)
            try await store.rollBackPendingSets()
            if formatVersion < CatalogLog.formatVersion {
                try await store.compact(force: true)
                configuration.logger.info(
                    "upgraded the catalog's format",
                    metadata: ["from": "\(formatVersion)", "to": "\(CatalogLog.formatVersion)"])
            } else {
                try await store.compactIfWorthIt()
            }
            configuration.logger.debug(
                "opened data directory",
                metadata: ["path": "\(directory.path)", "volumes": "\(volumes.count)", "records": "\(records.count)"])
            return store
        } catch {
            ownedPool?.shutdown()
            throw EngineError.wrap(error)
        }
    }

    private static func volumeDirectory(_ id: VolumeID) -> String { "\(volumesDirectory)/\(id.rawValue)" }

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
            // Drain the writers that already passed the gate; the ones behind it will see `closed`.
            try? await volume.gate.acquireExclusive()
            do {
                let live = volume.live
                try await context.io.run { try live.synchronize() }
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

    private func checkOpen() throws(EngineError) {
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
            diffBytes: ByteCount(dataSlots << volume.chunkShift))
    }

    /// Creates a volume. Its files exist before the catalog names it, so a crash in between leaves
    /// only files that the next open removes.
    @discardableResult
    public func createVolume(_ spec: VolumeSpec) async throws -> VolumeInfo {
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
            try await context.catalog.append([.volumeCreated(definition)])
            let metadata = VolumeMetadata(
                diffLimitSlots: spec.diffLimit.map { $0.rawValue >> definition.chunkShift }, policy: spec.policy)
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

    // MARK: - Snapshot sets

    /// Takes one snapshot of each volume at one instant.
    public func createSnapshotSet(volumes names: [String]) async throws -> SnapshotSetInfo {
        try await prepareSnapshotSet(volumes: names).commit()
    }

    /// Holds new writes on every volume of the set, drains the writes in flight, and makes the volumes
    /// durable; `commit()` then takes the snapshots, `abort()` gives up. Writes stay held for at most
    /// `holdLimit` (default: the configuration's): past it the set is aborted and the writes released.
    /// The set gets GUID `id` if given (it must be new), else a fresh one. `flushingFirst: false`
    /// skips the flush that runs before writes are held (a caller that flushed just before, and wants
    /// no disk wait here); the commit makes the volumes durable before the set either way.
    public func prepareSnapshotSet(
        volumes names: [String], id: UUID? = nil, holdLimit: Duration? = nil, flushingFirst: Bool = true
    ) async throws -> PreparedSnapshotSet {
        try checkOpen()
        guard !names.isEmpty else { throw EngineError.invalidSnapshotSet("a snapshot set needs at least one volume") }
        guard Set(names).count == names.count else {
            throw EngineError.invalidSnapshotSet("a snapshot set names each volume once")
        }
        return try await PreparedSnapshotSet.prepare(
            names, in: self, id: id, holdLimit: holdLimit ?? context.configuration.holdLimit,
            flushingFirst: flushingFirst)
    }

    /// The volumes of a set about to be taken, in the caller's order, once checked: open, each
    /// known, none at its snapshot limit, and `id` (if chosen) new. Called holding the operation lock.
    func membersForNewSet(_ names: [String], id: UUID?) throws -> [Volume] {
        try checkOpen()
        let members = try names.map { try volume(named: $0) }
        if let id, try snapshots().contains(where: { $0.id == id || $0.setID == id }) {
            throw EngineError.invalidSnapshotSet("a snapshot or set with GUID \(id.guidString) already exists")
        }
        let maximum = context.configuration.maximumSnapshotsPerVolume
        for volume in members where volume.metadata.withLock({ $0.chain.count + $0.failed.count }) >= maximum {
            throw EngineError.tooManySnapshots(volume: volume.name, limit: maximum)
        }
        return members
    }

    func nextSequences(_ count: Int) -> [SnapshotSequence] {
        state.withLock { state in
            defer { state.nextSequence += UInt64(count) }
            return (0..<UInt64(count)).map { SnapshotSequence(rawValue: state.nextSequence + $0) }
        }
    }

    // MARK: - Listing

    /// Every snapshot, oldest first, optionally only those of one volume.
    public func snapshots(volume name: String? = nil) throws -> [SnapshotInfo] {
        try checkOpen()
        let volumes = try name.map { [try volume(named: $0)] } ?? allVolumes()
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
                                isPending: snapshot.isPending)
                        ))
                }
                for failed in metadata.failed {
                    entries.append(
                        (
                            failed.sequence,
                            SnapshotInfo(
                                id: failed.id, setID: failed.setID, volume: volume.name,
                                createdAt: Self.date(failed.createdAtNanoseconds), diffBytes: .zero,
                                state: .failed(reason: failed.reason), isPending: failed.isPending)
                        ))
                }
            }
        }
        return entries.sorted { $0.0 < $1.0 }.map(\.1)
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

    // MARK: - Deleting snapshots

    /// Deletes snapshots, each named by its own GUID or by its set's GUID (the whole set), all in one
    /// durable step. Returns the GUIDs of the snapshots deleted. Nothing is deleted if any id is unknown.
    @discardableResult
    public func deleteSnapshots(ids: [UUID]) async throws -> [UUID] {
        try checkOpen()
        await operations.lock()
        defer { operations.unlock() }
        try checkOpen()
        // Resolve every id first: all or nothing.
        var targets: [Volume: [SnapshotSequence]] = [:]
        var deletedIDs: [UUID] = []
        let volumes = allVolumes()
        for id in ids {
            var matched = false
            for volume in volumes {
                volume.metadata.withLock { metadata in
                    let ready = metadata.chain.filter { $0.id == id || $0.setID == id }.map { ($0.id, $0.sequence) }
                    let failed = metadata.failed.filter { $0.id == id || $0.setID == id }.map { ($0.id, $0.sequence) }
                    for (snapshotID, sequence) in ready + failed where !(targets[volume]?.contains(sequence) ?? false) {
                        targets[volume, default: []].append(sequence)
                        deletedIDs.append(snapshotID)
                    }
                    if !ready.isEmpty || !failed.isEmpty { matched = true }
                }
            }
            if !matched { throw EngineError.snapshotNotFound(id.guidString) }
        }
        let ordered = targets.keys.sorted { $0.id < $1.id }
        var held: [Volume] = []
        defer { for volume in held { volume.gate.releaseExclusive() } }
        for volume in ordered {
            try await volume.gate.acquireExclusive()
            held.append(volume)
        }
        // A snapshot the diff-store policy removed meanwhile needs no second deletion.
        var references: [SnapshotReference] = []
        for volume in ordered {
            let present = volume.metadata.withLock { metadata -> [SnapshotSequence] in
                targets[volume]!.filter { sequence in
                    if let position = metadata.position(of: sequence) {
                        metadata.chain[position].deleting = true
                        return true
                    }
                    return metadata.failed.contains { $0.sequence == sequence }
                }
            }
            for sequence in present {
                await volume.waitForReaders(of: sequence)
                references.append(SnapshotReference(volume: volume.id, sequence: sequence))
            }
        }
        guard !references.isEmpty else { return deletedIDs }
        do {
            try await context.catalog.append([.snapshotsDeleted(references)])
        } catch {
            for volume in ordered {
                volume.metadata.withLock { metadata in
                    for position in metadata.chain.indices { metadata.chain[position].deleting = false }
                }
            }
            throw EngineError.wrap(error)
        }
        for volume in ordered {
            let freed = volume.metadata.withLock { metadata -> [DiffSlot] in
                var freed: [DiffSlot] = []
                for reference in references where reference.volume == volume.id {
                    if let position = metadata.position(of: reference.sequence) {
                        freed += metadata.removeSnapshot(at: position)
                    } else {
                        metadata.failed.removeAll { $0.sequence == reference.sequence }
                    }
                }
                return freed
            }
            await volume.releaseSlots(freed)
        }
        for volume in held { volume.gate.releaseExclusive() }
        held = []
        context.configuration.eventHandler?(.snapshotsDeleted(ids: deletedIDs))
        try await compactIfWorthIt(holdingOperations: true)
        return deletedIDs
    }

    // MARK: - Change tracking

    /// The byte ranges of `volume` that may differ between snapshot `since` and snapshot `until` (nil:
    /// the live volume now). `until` must be newer than `since`.
    public func changes(volume name: String, since: UUID, until: UUID? = nil) throws -> ChangedExtents {
        let volume = try self.volume(named: name)
        let sinceSnapshot = try snapshot(id: since)
        guard sinceSnapshot.volume === volume else {
            throw EngineError.snapshotOrder("snapshot \(since.guidString) is not of volume '\(name)'")
        }
        var untilSequence: SnapshotSequence?
        if let until {
            let untilSnapshot = try snapshot(id: until)
            guard untilSnapshot.volume === volume else {
                throw EngineError.snapshotOrder("snapshot \(until.guidString) is not of volume '\(name)'")
            }
            guard untilSnapshot.sequence > sinceSnapshot.sequence else {
                throw EngineError.snapshotOrder("snapshot \(until.guidString) is not newer than \(since.guidString)")
            }
            untilSequence = untilSnapshot.sequence
        }
        return ChangedExtents(
            chunkSize: volume.chunkSize, extents: volume.changes(since: sinceSnapshot.sequence, until: untilSequence))
    }

    // MARK: - Consistency and compaction

    /// Problems with the in-memory metadata's consistency (empty when all is well). Meaningful when no
    /// writes are in flight.
    public func consistencyProblems() -> [String] {
        allVolumes().flatMap { volume in volume.metadata.withLock { $0.consistencyProblems(volume: volume.name) } }
    }

    /// Rewrites the catalog as the records of the current state when the appended log has grown well
    /// past that.
    private func compactIfWorthIt(holdingOperations: Bool = false) async throws {
        guard context.catalog.appendedBytes > context.configuration.catalogCompactionThreshold.rawValue else { return }
        try await compact(force: false, holdingOperations: holdingOperations)
    }

    /// Rewrites the catalog as the records of the current state: always when `force` (a format
    /// upgrade), else only if the appended log is over four times their size. All volumes' gates are
    /// held meanwhile, so no copy is between durable and applied, and no set's append is in flight.
    private func compact(force: Bool, holdingOperations: Bool = false) async throws {
        if !holdingOperations { await operations.lock() }
        defer { if !holdingOperations { operations.unlock() } }
        await waitForPendingCommits()
        let appended = context.catalog.appendedBytes
        let volumes = allVolumes().sorted { $0.id < $1.id }
        var held: [Volume] = []
        defer { for volume in held { volume.gate.releaseExclusive() } }
        for volume in volumes {
            try await volume.gate.acquireExclusive()
            held.append(volume)
        }
        let (nextSequence, nextVolumeID) = state.withLock { ($0.nextSequence, $0.nextVolumeID) }
        let snapshot = volumes.map { volume in
            (
                definition: VolumeDefinition(
                    id: volume.id, guid: volume.guid, name: volume.name, size: volume.size.rawValue,
                    chunkShift: UInt8(volume.chunkShift), backing: volume.backing,
                    diffLimit: volume.diffLimit?.rawValue ?? 0, policy: volume.metadata.withLock { $0.policy }),
                metadata: volume.metadata.withLock { $0 }
            )
        }
        let records = CatalogReplay.records(volumes: snapshot, nextSequence: nextSequence, nextVolumeID: nextVolumeID)
        var writer = BinaryWriter()
        for record in records { record.encode(into: &writer) }
        guard force || appended > 4 * UInt64(writer.bytes.count) else { return }
        try await context.catalog.rewrite(with: records, in: directory)
        context.logger.info(
            "compacted the catalog", metadata: ["bytes.before": "\(appended)", "bytes.after": "\(writer.bytes.count)"])
    }

    // MARK: - Pending sets

    /// Remembers that the append making pending set `id` durable is about to start.
    func trackPendingCommit(_ id: UUID) -> PendingCommit {
        let commit = PendingCommit()
        state.withLock { $0.pendingCommits[id] = commit }
        return commit
    }

    /// The append of pending set `id` is over (durable, or the log failed).
    func pendingCommitFinished(_ id: UUID, _ commit: PendingCommit) {
        state.withLock { state in
            if state.pendingCommits[id] === commit { state.pendingCommits[id] = nil }
        }
        commit.finish()
    }

    private func waitForPendingCommits() async {
        for commit in state.withLock({ Array($0.pendingCommits.values) }) { await commit.wait() }
    }

    /// Keeps a set taken with `commitPending()`: once this returns, a crash no longer rolls it back.
    /// Its record lands after the set's own, so it is durable only once that one is (and fails if
    /// that one failed: the log stops at its first failure). Keeping a set that is already kept does
    /// nothing; a set with no snapshot left (deleted meanwhile) is `snapshotNotFound`.
    public func keepSnapshotSet(id: UUID) async throws {
        try checkOpen()
        await operations.lock()
        defer { operations.unlock() }
        try checkOpen()
        let members = allVolumes().filter { volume in
            volume.metadata.withLock { metadata in
                metadata.chain.contains { $0.setID == id } || metadata.failed.contains { $0.setID == id }
            }
        }
        guard !members.isEmpty else { throw EngineError.snapshotNotFound(id.guidString) }
        let pending = members.contains { volume in
            volume.metadata.withLock { metadata in
                metadata.chain.contains { $0.setID == id && $0.isPending }
                    || metadata.failed.contains { $0.setID == id && $0.isPending }
            }
        }
        guard pending else { return }
        do {
            try await context.catalog.append([.setKept(id)])
        } catch {
            throw EngineError.wrap(error)
        }
        for volume in members { _ = volume.metadata.withLock { $0.keepSet(id) } }
        context.logger.debug("kept snapshot set", metadata: ["set.id": "\(id.guidString)"])
    }

    /// The sets that were still pending when the store was last closed or crashed, and that opening
    /// it rolled back (deleted), oldest first.
    public var rolledBackSets: [SnapshotSetInfo] { state.withLock { $0.rolledBackSets } }

    /// Deletes every set that is still pending: what a crash (or a close) left unfinished.
    private func rollBackPendingSets() async throws {
        let pending = try snapshotSets().filter { set in set.snapshots.contains { $0.isPending } }
        guard !pending.isEmpty, !context.configuration.skipsRollbackForTesting else { return }
        for set in pending {
            context.logger.warning(
                "rolled back an unfinished snapshot set: it was taken but never completed (its writers or requester had not reached BackupComplete) when the store last stopped",
                metadata: [
                    "set.id": "\(set.id.guidString)", "set.createdAt": "\(set.createdAt)",
                    "volumes": "\(set.snapshots.map(\.volume).joined(separator: ","))",
                ])
        }
        try await deleteSnapshots(ids: pending.map(\.id))
        state.withLock { $0.rolledBackSets = pending }
    }
}

extension Volume: Hashable {
    public static func == (lhs: Volume, rhs: Volume) -> Bool { lhs === rhs }
    public func hash(into hasher: inout Hasher) { hasher.combine(ObjectIdentifier(self)) }
}

/// The append of a pending set, as close and compaction wait for it.
final class PendingCommit: Sendable {
    private struct State {
        var finished = false
        var waiters: [CheckedContinuation<Void, Never>] = []
    }

    private let state = Mutex(State())

    func finish() {
        let waiters = state.withLock { state in
            state.finished = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    func wait() async {
        await withCheckedContinuation { continuation in
            let finished = state.withLock { state in
                if !state.finished { state.waiters.append(continuation) }
                return state.finished
            }
            if finished { continuation.resume() }
        }
    }
}
