// Volumes on Ceph RBD images: the second provider. Each volume is an image Umbra opened for reading
// and writing; its snapshots are RBD snapshots named by their GUIDs. What RBD does not keep (which
// set a snapshot belongs to, when it was taken, whether the set is settled) is kept in
// DATA/rbd-volumes.json, replaced whole and synced on every change.
//
// Crash safety of a set: each RBD snapshot is recorded (as being taken) before it is taken, while
// writes through Umbra are held, and stays pending until its set is decided. A set with local
// volumes too is decided by the local catalog (its record is the commit point); an RBD-only set by
// its own registry write. At start, snapshots still being taken or deleted, and pending ones of sets
// that were not decided, are removed. Snapshots Umbra never recorded are never touched.
//
// Every librbd call that waits for the cluster runs on the provider's own I/O threads, never on an
// event loop, so that a cluster that stops answering stalls neither NBD clients of local volumes
// nor the engine's I/O.

import BlockIO
import Dispatch
import Logging
import NBDServer
import RBD
import ShadowCopy
import Synchronization

import class Foundation.Thread

#if canImport(Glibc)
    import Glibc
#endif

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// What DATA/rbd-volumes.json holds.
struct RBDRegistry: Codable, Sendable {
    static let fileName = "rbd-volumes.json"
    static let currentFormat = 1

    struct Snapshot: Codable, Sendable {
        @GUIDCoding var id: UUID
        @GUIDCoding var set: UUID
        var createdAt: Date
        /// Rolled back at start unless the set was decided (see `decidedByCatalog`).
        var pending: Bool
        /// The set has local volumes too: the local catalog's record of it is its commit point.
        var decidedByCatalog: Bool
        var purpose: String?
        /// Recorded before `rbd_snap_create`: until this is cleared the RBD snapshot may not exist.
        var taking: Bool? = nil
        /// Being deleted: no longer served; removed at start if a crash came first.
        var deleting: Bool? = nil

        /// Served and listed: taken, and not being deleted.
        var isVisible: Bool { taking != true && deleting != true }
    }

    struct Volume: Codable, Sendable {
        var name: String
        var pool: String
        var image: String
        var snapshots: [Snapshot]
    }

    var format = currentFormat
    var volumes: [Volume] = []

    static func load(from directory: String) throws -> RBDRegistry {
        let path = directory + "/" + fileName
        guard FileManager.default.fileExists(atPath: path) else { return RBDRegistry() }
        let registry: RBDRegistry
        do {
            registry = try ControlJSON.makeDecoder().decode(
                RBDRegistry.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        } catch {
            throw CLIError(message: "\(path) is damaged (\(error)); the daemon did not start.")
        }
        guard registry.format == currentFormat else {
            throw CLIError(message: "\(path) is format \(registry.format); this Umbra reads format \(currentFormat).")
        }
        return registry
    }

    func save(to directory: String) throws {
        try DaemonFiles.replace(Self.fileName, in: directory, with: Array(try ControlJSON.makeEncoder().encode(self)))
    }
}

/// One RBD volume as the daemon serves it.
final class RBDVolume: Sendable {
    let name: String
    let image: RBDImage
    let size: UInt64
    let objectSize: UInt64
    let gate = RBDWriteGate()
    /// Read-only handles of its snapshots, opened when each was taken or when the daemon started.
    private let snapshotImages = Mutex<[UUID: RBDImage]>([:])

    init(name: String, image: RBDImage) throws(RBDError) {
        self.name = name
        self.image = image
        size = try image.size()
        objectSize = try image.objectSize()
    }

    var path: String { image.path }

    func snapshotImage(_ id: UUID) -> RBDImage? { snapshotImages.withLock { $0[id] } }

    /// Opens the snapshot's read-only handle (blocking: call on an I/O thread).
    func openSnapshot(_ id: UUID) throws(RBDError) {
        let opened = try image.pool.open(image.name, snapshot: id.guidString)
        snapshotImages.withLock { $0[id] = opened }
    }

    /// Drops the snapshot's handle; it closes once the exports and requests using it let it go.
    func forgetSnapshot(_ id: UUID) {
        _ = snapshotImages.withLock { $0.removeValue(forKey: id) }
    }

    /// Closes the image: only once nothing serves it any more.
    func close() {
        snapshotImages.withLock { $0.removeAll() }
        image.close()
    }
}

/// Holds new writes through Umbra's exports and drains those in flight, for the instant of a set.
final class RBDWriteGate: Sendable {
    private struct State {
        var held = false
        var inFlight = 0
        var waitingWrites: [CheckedContinuation<Void, Never>] = []
        var drained: CheckedContinuation<Bool, Never>?
    }
    private let state = Mutex(State())

    /// Waits while writes are held, then counts the write in flight until `leave`.
    func enter() async {
        let admitted = state.withLock { state in
            guard !state.held else { return false }
            state.inFlight += 1
            return true
        }
        if admitted { return }
        await withCheckedContinuation { continuation in
            let admitted = state.withLock { state in
                guard state.held else {
                    state.inFlight += 1
                    return true
                }
                state.waitingWrites.append(continuation)
                return false
            }
            if admitted { continuation.resume() }
        }
    }

    func leave() {
        let drained = state.withLock { state in
            state.inFlight -= 1
            guard state.inFlight == 0, let drained = state.drained else {
                return CheckedContinuation<Bool, Never>?.none
            }
            state.drained = nil
            return drained
        }
        drained?.resume(returning: true)
    }

    /// Holds new writes and waits for those in flight: true once they are done, false if they were
    /// not within `limit` (writes stay held; the caller releases them).
    func hold(within limit: Duration) async -> Bool {
        await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let done = state.withLock { state in
                state.held = true
                guard state.inFlight > 0 else { return true }
                state.drained = continuation
                return false
            }
            if done { return continuation.resume(returning: true) }
            Task { [self] in
                try? await Task.sleep(for: limit)
                let waiting = state.withLock { state in
                    defer { state.drained = nil }
                    return state.drained
                }
                waiting?.resume(returning: false)
            }
        }
    }

    var isHeld: Bool { state.withLock { $0.held } }

    func release() {
        let waiting = state.withLock { state in
            state.held = false
            state.inFlight += state.waitingWrites.count
            defer { state.waitingWrites.removeAll() }
            return state.waitingWrites
        }
        for write in waiting { write.resume() }
    }
}

/// The RBD volumes of a daemon, and their part of every set.
final class RBDProvider: VolumeProvider {
    var backend: String { "rbd" }

    let cluster: RBDCluster
    private let directory: String
    /// Threads of its own for librbd's blocking calls.
    private let io: IOThreadPool
    let logger: Logger
    /// The registry and the open volumes change together, under this lock; registry writes happen
    /// under it too, so two changes never write back each other's old state.
    private let state: Mutex<(registry: RBDRegistry, volumes: [String: RBDVolume])>
    /// Brings the exports in step with the provider and waits until those that went away are gone.
    private let settleExports: @Sendable () async -> Void

    private init(
        cluster: RBDCluster, directory: String, io: IOThreadPool, logger: Logger, registry: RBDRegistry,
        volumes: [String: RBDVolume], settleExports: @escaping @Sendable () async -> Void
    ) {
        self.cluster = cluster
        self.directory = directory
        self.io = io
        self.logger = logger
        self.state = Mutex((registry, volumes))
        self.settleExports = settleExports
    }

    /// Connects, opens every recorded volume and its snapshots, and settles what a crash left:
    /// snapshots being taken or deleted, and pending ones of sets the local catalog did not keep
    /// (`keptSets`), are removed; recorded snapshots RBD no longer has are forgotten, with a warning.
    static func open(
        configurationPath: String, id: String, timeout: Int, directory: String, keptSets: Set<UUID>,
        logger: Logger, settleExports: @escaping @Sendable () async -> Void
    ) async throws -> RBDProvider {
        let io = IOThreadPool(threadCount: 4)
        return try await io.run {
            let cluster = try RBDCluster(configurationPath: configurationPath, id: id, timeout: timeout)
            var registry = try RBDRegistry.load(from: directory)
            var volumes: [String: RBDVolume] = [:]
            for index in registry.volumes.indices {
                let record = registry.volumes[index]
                let volume: RBDVolume
                let present: Set<String>
                do {
                    volume = try RBDVolume(name: record.name, image: try cluster.pool(record.pool).open(record.image))
                    present = Set(try volume.image.snapshotNames())
                } catch {
                    // The others are served; this one stays recorded, as it was, for a later start.
                    logger.error(
                        "an RBD volume cannot be served: its image did not open; it stays recorded and is served again once it opens at a later start",
                        metadata: [
                            "volume": "\(record.name)", "image": "\(record.pool)/\(record.image)", "error": "\(error)",
                        ])
                    continue
                }
                volumes[record.name] = volume
                var kept: [RBDRegistry.Snapshot] = []
                for var snapshot in record.snapshots {
                    let name = snapshot.id.guidString
                    let metadata: Logger.Metadata = ["volume": "\(record.name)", "snapshot.id": "\(name)"]
                    if snapshot.pending, snapshot.decidedByCatalog, snapshot.taking != true,
                        keptSets.contains(snapshot.set)
                    {
                        snapshot.pending = false
                    }
                    if snapshot.pending || !snapshot.isVisible {
                        if present.contains(name) { try volume.image.removeSnapshot(name) }
                        logger.notice("rolled back an RBD snapshot of a set that was not kept", metadata: metadata)
                        continue
                    }
                    guard present.contains(name) else {
                        logger.warning("an RBD snapshot is gone; forgetting it", metadata: metadata)
                        continue
                    }
                    try volume.openSnapshot(snapshot.id)
                    kept.append(snapshot)
                }
                registry.volumes[index].snapshots = kept
            }
            try registry.save(to: directory)
            return RBDProvider(
                cluster: cluster, directory: directory, io: io, logger: logger, registry: registry, volumes: volumes,
                settleExports: settleExports)
        }
    }

    /// The volume names a data directory's registry holds, without connecting (to say why a daemon
    /// started without `--ceph-conf` cannot serve them).
    static func recordedVolumes(in directory: String) throws -> [String] {
        try RBDRegistry.load(from: directory).volumes.map(\.name)
    }

    /// Closes every image (flushing it and letting its lock go), giving up after `limit`: a cluster
    /// that went away never answers, and a daemon that stops must not wait for it. False if it gave
    /// up; the closing thread then keeps the cluster handle, and the process exits without it.
    func close(waitingAtMost limit: Duration) async -> Bool {
        let finished = DispatchSemaphore(value: 0)
        Thread.detachNewThread { [self] in
            let volumes = state.withLock { state in
                defer { state.volumes.removeAll() }
                return Array(state.volumes.values)
            }
            for volume in volumes { volume.close() }
            finished.signal()
        }
        let milliseconds = Int(limit.components.seconds * 1000)
        return await withCheckedContinuation { continuation in
            Thread.detachNewThread {
                continuation.resume(returning: finished.wait(timeout: .now() + .milliseconds(milliseconds)) == .success)
            }
        }
    }

    // MARK: Volumes

    func volume(named name: String) -> RBDVolume? { state.withLock { $0.volumes[name] } }

    var volumeNames: [String] { state.withLock { $0.registry.volumes.map(\.name) } }

    func records() -> [RBDRegistry.Volume] { state.withLock { $0.registry.volumes } }

    func hasVolume(_ name: String) -> Bool { volumeNames.contains(name) }

    func describe(volume name: String) -> ShadowCopy.VolumeInfo? {
        volume(named: name).map { volume in
            ShadowCopy.VolumeInfo(
                name: volume.name, size: volume.size, chunkSize: volume.objectSize, backend: backend,
                image: volume.path)
        }
    }

    func status(now: Date) -> [StatusResult.Volume] {
        records().map { record in
            let snapshots = record.snapshots.filter(\.isVisible)
            let oldest = snapshots.map(\.createdAt).min()
            return StatusResult.Volume(
                name: record.name, size: volume(named: record.name)?.size ?? 0, backend: backend, diffBytes: 0,
                diffLimit: nil, snapshots: snapshots.count,
                oldestSnapshotAgeSeconds: oldest.map { max(0, now.timeIntervalSince($0)) })
        }
    }

    func claims(_ params: CreateVolumeParams) -> Bool { params.rbd != nil }

    /// `volume.create` with `rbd`: the volume is that image, created when a size is given.
    func createVolume(_ params: CreateVolumeParams) async throws -> ShadowCopy.VolumeInfo {
        let image = params.rbd ?? ""
        let parts = image.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty, !image.contains("@") else {
            throw ShadowCopyError(.invalidParams, "--rbd takes POOL/IMAGE (got '\(image)').")
        }
        guard params.chunkSize == nil, params.diffLimit == nil, params.whenFull == nil else {
            throw ShadowCopyError(
                .invalidParams, "An RBD volume has no chunk size or diff store: RBD keeps its snapshots itself.")
        }
        do {
            let volume = try await createVolume(
                name: params.name, pool: String(parts[0]), image: String(parts[1]),
                size: params.size == 0 ? nil : params.size)
            return describe(volume: volume.name)!
        } catch let error as RBDError {
            let code: ControlErrorCode =
                error.errno == ENOENT ? .notFound : error.errno == EEXIST ? .alreadyExists : .invalidArgument
            throw ShadowCopyError(code, sentence(error.description))
        }
    }

    /// Puts a volume on `pool/image`, creating the image when `size` is given.
    private func createVolume(name: String, pool: String, image: String, size: UInt64?) async throws -> RBDVolume {
        let volume = try await io.run { [cluster] in
            let opened = try cluster.pool(pool)
            if let size { try opened.createImage(image, size: size) }
            do {
                return try RBDVolume(name: name, image: try opened.open(image))
            } catch {
                if size != nil { try? opened.removeImage(image) }
                throw error
            }
        }
        do {
            try state.withLock { state in
                guard state.volumes[name] == nil else {
                    throw ShadowCopyError(.alreadyExists, "Volume \(name) exists.")
                }
                if let other = state.registry.volumes.first(where: { $0.pool == pool && $0.image == image }) {
                    throw ShadowCopyError(.alreadyExists, "Image \(pool)/\(image) is already volume \(other.name).")
                }
                var registry = state.registry
                registry.volumes.append(RBDRegistry.Volume(name: name, pool: pool, image: image, snapshots: []))
                try registry.save(to: directory)
                state.registry = registry
                state.volumes[name] = volume
            }
        } catch {
            try? await io.run {
                volume.close()
                if size != nil { try self.cluster.pool(pool).removeImage(image) }
            }
            throw error
        }
        await settleExports()
        return volume
    }

    /// Removes the volume's snapshots and forgets it; removes the image too with `deletingImage`.
    /// Refused while a set holds its writes.
    func deleteVolume(name: String, deletingImage: Bool) async throws {
        guard let record = records().first(where: { $0.name == name }) else {
            throw ShadowCopyError(.notFound, "No volume is named \(name).")
        }
        guard let volume = volume(named: name) else {
            // Recorded but not served (its image did not open at start): there is nothing to remove
            // in RBD through it, only the record to forget.
            try update { registry in registry.volumes.removeAll { $0.name == name } }
            return
        }
        guard !volume.gate.isHeld else {
            throw ShadowCopyError(
                .busy, "A shadow copy set is being taken of volume \(name); try again when it is done.")
        }
        _ = try await deleteSnapshots(ids: record.snapshots.map(\.id))
        try update { registry in registry.volumes.removeAll { $0.name == name } }
        state.withLock { $0.volumes[name] = nil }
        // Its export is gone and its connections closed before the image is.
        await settleExports()
        try await io.run {
            volume.close()
            if deletingImage {
                do {
                    try self.cluster.pool(record.pool).removeImage(record.image)
                } catch {
                    throw ShadowCopyError(
                        .invalidArgument,
                        sentence("volume \(name) is deleted but its image stays: \(error) (remove it with `rbd rm`)"))
                }
            }
        }
    }

    // MARK: Sets

    /// Writes held on RBD volumes for one set.
    final class Hold: ProviderHold {
        enum Phase {
            case held
            /// Snapshots are being taken: the watchdog no longer lets writes go.
            case snapshotting
            case released(ContinuousClock.Instant)
        }

        let setID: UUID
        let volumes: [RBDVolume]
        let heldAt = ContinuousClock.now
        private let phase = Mutex(Phase.held)
        let watchdog: Mutex<Task<Void, Never>?> = Mutex(nil)

        init(setID: UUID, volumes: [RBDVolume]) {
            self.setID = setID
            self.volumes = volumes
        }

        /// Held → snapshotting; false if the writes were already let go.
        func beginSnapshots() -> Bool {
            phase.withLock { phase in
                guard case .held = phase else { return false }
                phase = .snapshotting
                return true
            }
        }

        func release() { _ = letGo(ifStillHeld: false) }

        /// Lets the writes go on every volume (again, if a gate was held late); true the first time.
        /// With `ifStillHeld` (the watchdog), only before snapshots began.
        func letGo(ifStillHeld: Bool) -> Bool {
            let first = phase.withLock { phase in
                switch phase {
                case .released: return false
                case .snapshotting where ifStillHeld: return false
                case .held, .snapshotting:
                    phase = .released(.now)
                    return true
                }
            }
            if ifStillHeld && !first { return false }
            if !ifStillHeld { watchdog.withLock { $0?.cancel() } }
            // Every gate, every time: one held after the watchdog let the others go is let go too.
            for volume in volumes { volume.gate.release() }
            return first
        }

        /// How long writes were held, once they were let go.
        var holdDuration: Duration? {
            phase.withLock { phase in
                guard case .released(let at) = phase else { return nil }
                return heldAt.duration(to: at)
            }
        }
    }

    func flush(_ names: [String]) async throws {
        for name in names { try await volume(named: name)?.image.flush() }
    }

    /// Holds new writes on the volumes, drains those in flight and flushes the images, so that the
    /// snapshots hold every write that completed. Writes are let go, and the set fails, if that
    /// takes longer than `limit`, or if the set is still not snapshotting once `limit` has passed.
    func hold(setID: UUID, volumes names: [String], limit: Duration) async throws -> any ProviderHold {
        let volumes = try names.map { name in
            guard let volume = volume(named: name) else {
                throw ShadowCopyError(.notFound, "No volume is named \(name).")
            }
            return volume
        }
        let hold = Hold(setID: setID, volumes: volumes)
        hold.watchdog.withLock { watchdog in
            watchdog = Task { [logger] in
                try? await Task.sleep(for: limit)
                if !Task.isCancelled, hold.letGo(ifStillHeld: true) {
                    logger.warning(
                        "the hold limit passed; RBD writes released", metadata: ["set.id": "\(setID.guidString)"])
                }
            }
        }
        let deadline = ContinuousClock.now + limit
        do {
            for volume in volumes {
                guard await volume.gate.hold(within: deadline - .now) else {
                    throw ShadowCopyError(
                        .aborted,
                        "Writes in flight on volume \(volume.name) did not finish within the hold limit; the set was abandoned."
                    )
                }
            }
            for volume in volumes { try await volume.image.flush() }
        } catch {
            hold.release()
            throw error
        }
        return hold
    }

    /// Takes each held volume's RBD snapshot, recording it first (writes stay held throughout). The
    /// snapshots are pending until `settleSet`. On failure the snapshots taken are removed again.
    func takeSnapshots(_ hold: any ProviderHold, createdAt: Date, decidedByCatalog: Bool) async throws
        -> [CreatedSnapshot]
    {
        guard let hold = hold as? Hold, hold.beginSnapshots() else {
            throw ShadowCopyError(.aborted, "The set took longer than the hold limit; it was abandoned.")
        }
        let ids = hold.volumes.map { _ in UUID() }
        try update { registry in
            for (volume, id) in zip(hold.volumes, ids) {
                guard let index = registry.volumes.firstIndex(where: { $0.name == volume.name }) else {
                    throw ShadowCopyError(.notFound, "Volume \(volume.name) was deleted while the set was taken.")
                }
                registry.volumes[index].snapshots.append(
                    RBDRegistry.Snapshot(
                        id: id, set: hold.setID, createdAt: createdAt, pending: true,
                        decidedByCatalog: decidedByCatalog,
                        taking: true))
            }
        }
        do {
            for (volume, id) in zip(hold.volumes, ids) {
                try await io.run {
                    try volume.image.createSnapshot(id.guidString)
                    try volume.openSnapshot(id)
                }
            }
            let taken = Set(ids)
            try updateSnapshots(where: { taken.contains($0.id) }) { $0.taking = nil }
        } catch {
            _ = try? await deleteSnapshots(ids: ids)
            throw error
        }
        return zip(hold.volumes, ids).map { volume, id in
            CreatedSnapshot(id: id, volume: volume.name, export: "\(volume.name)@\(id.guidString)")
        }
    }

    /// Serves the snapshots just taken (their exports appear).
    func announceSnapshots() async {
        await settleExports()
    }

    /// Gives a set's snapshots the set's time, and with `kept` keeps them for good.
    func settleSet(_ id: UUID, createdAt: Date?, kept: Bool) throws {
        try updateSnapshots(where: { $0.set == id }) { snapshot in
            if kept { snapshot.pending = false }
            if let createdAt { snapshot.createdAt = createdAt }
        }
    }

    func labelSet(_ id: UUID, purpose: String) throws -> Bool {
        try !updateSnapshots(where: { $0.set == id }) { $0.purpose = purpose }.isEmpty
    }

    /// Deletes the snapshots named (or all of the sets named) that are RBD snapshots; returns their
    /// GUIDs. Each is first marked as being deleted (its export goes, its clients are disconnected),
    /// then removed from RBD, then forgotten.
    func deleteSnapshots(ids: [UUID]) async throws -> [UUID] {
        let wanted = Set(ids)
        let doomed = try updateSnapshots(where: { wanted.contains($0.id) || wanted.contains($0.set) }) {
            $0.deleting = true
        }
        guard !doomed.isEmpty else { return [] }
        await settleExports()
        for (name, id) in doomed {
            if let volume = volume(named: name) {
                volume.forgetSnapshot(id)
                try await io.run {
                    do {
                        try volume.image.removeSnapshot(id.guidString)
                    } catch let error as RBDError where error.errno == ENOENT {
                        // Never taken, or already gone: what was asked for holds.
                    }
                }
            }
            try update { registry in
                for index in registry.volumes.indices { registry.volumes[index].snapshots.removeAll { $0.id == id } }
            }
        }
        return doomed.map(\.id)
    }

    /// Rolls back what `takeSnapshots` recorded for a set that did not commit, and lets writes go.
    func rollBack(_ hold: any ProviderHold) async {
        hold.release()
        do {
            _ = try await deleteSnapshots(ids: [hold.setID])
        } catch {
            logger.error(
                "could not roll back the RBD snapshots of an aborted set; the next start removes them",
                metadata: ["set.id": "\(hold.setID.guidString)", "error": "\(error)"])
        }
    }

    // MARK: Reading

    /// Taken snapshots not being deleted, oldest first.
    func snapshots(volume: String?) -> [ShadowCopy.SnapshotInfo] {
        records().filter { volume == nil || $0.name == volume }.flatMap { record in
            record.snapshots.filter(\.isVisible).map { snapshot in
                ShadowCopy.SnapshotInfo(
                    id: snapshot.id, set: snapshot.set, volume: record.name,
                    export: "\(record.name)@\(snapshot.id.guidString)", createdAt: snapshot.createdAt, diffBytes: 0,
                    state: snapshot.pending ? "pending" : "ready", purpose: snapshot.purpose)
            }
        }.sorted { $0.createdAt < $1.createdAt }
    }

    func changes(_ params: ChangesParams) async throws -> ChangeList {
        let changed = try await changes(volume: params.volume, since: params.since, until: params.until)
        return ChangeList(
            chunkSize: volume(named: params.volume)?.objectSize ?? 0,
            extents: changed.map { ByteExtent(offset: $0.offset, length: $0.count) })
    }

    /// What changed since snapshot `since` until snapshot `until` (the live image when nil).
    func changes(volume name: String, since: UUID, until: UUID?, within range: (offset: UInt64, count: UInt64)? = nil)
        async throws -> [(offset: UInt64, count: UInt64)]
    {
        guard let volume = volume(named: name), let record = records().first(where: { $0.name == name }) else {
            throw ShadowCopyError(.notFound, "No volume is named \(name).")
        }
        let order = record.snapshots.filter(\.isVisible).map(\.id)
        guard let older = order.firstIndex(of: since) else {
            throw ShadowCopyError(.notFound, "Volume \(name) has no snapshot \(since.guidString).")
        }
        var image = volume.image
        if let until {
            guard let newer = order.firstIndex(of: until), let opened = volume.snapshotImage(until) else {
                throw ShadowCopyError(.notFound, "Volume \(name) has no snapshot \(until.guidString).")
            }
            guard newer >= older else {
                throw ShadowCopyError(
                    .invalidArgument, "Snapshot \(until.guidString) is older than \(since.guidString).")
            }
            image = opened
        }
        let (offset, count) = range ?? (0, volume.size)
        do {
            return try await io.run { [image] in
                try image.changedRanges(since: since.guidString, offset: offset, count: count)
            }
        } catch let error as RBDError {
            throw ShadowCopyError(error.errno == ENOENT ? .notFound : .providerFailed, sentence(error.description))
        }
    }

    /// Applies `change` to every recorded snapshot that `matches`, in one registry write (none when
    /// nothing matches); returns the volume and GUID of each.
    @discardableResult
    private func updateSnapshots(
        where matches: (RBDRegistry.Snapshot) -> Bool, _ change: (inout RBDRegistry.Snapshot) -> Void
    ) throws -> [(volume: String, id: UUID)] {
        try state.withLock { state in
            var registry = state.registry
            var changed: [(volume: String, id: UUID)] = []
            for volume in registry.volumes.indices {
                for snapshot in registry.volumes[volume].snapshots.indices
                where matches(registry.volumes[volume].snapshots[snapshot]) {
                    change(&registry.volumes[volume].snapshots[snapshot])
                    changed.append((registry.volumes[volume].name, registry.volumes[volume].snapshots[snapshot].id))
                }
            }
            guard !changed.isEmpty else { return [] }
            try registry.save(to: directory)
            state.registry = registry
            return changed
        }
    }

    /// Applies `change` to a copy of the registry and saves it, under the lock.
    private func update(_ change: (inout RBDRegistry) throws -> Void) throws {
        try state.withLock { state in
            var registry = state.registry
            try change(&registry)
            try registry.save(to: directory)
            state.registry = registry
        }
    }
}
