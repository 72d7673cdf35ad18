// Volumes on Ceph RBD images: the second provider. Each volume is an image Umbra opened for reading
// and writing; its snapshots are RBD snapshots named by their GUIDs. What RBD does not keep (which
// set a snapshot belongs to, when it was taken, whether the set is settled) is kept in
// DATA/rbd-volumes.json, replaced whole and synced on every change.
//
// Crash safety of a set: its RBD snapshots are taken while writes through Umbra are held, and
// recorded as pending. A set with local volumes too is decided by the local catalog (its record
// is the commit point); an RBD-only set is decided by its own registry write. At start, pending
// snapshots of sets that were not decided are removed, and so are RBD snapshots named by a GUID that
// the registry does not know (taken just before a crash, never recorded).

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

    /// Written beside, synced, renamed over the old one (the rename synced with its directory).
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
    /// Read-only handles of its snapshots, opened when first exported.
    private let snapshotImages = Mutex<[UUID: RBDImage]>([:])

    init(name: String, image: RBDImage) throws(RBDError) {
        self.name = name
        self.image = image
        size = try image.size()
        objectSize = try image.objectSize()
    }

    var path: String { image.path }

    func snapshotImage(_ id: UUID) throws(RBDError) -> RBDImage {
        if let open = snapshotImages.withLock({ $0[id] }) { return open }
        let opened = try image.pool.open(image.name, snapshot: id.guidString)
        return snapshotImages.withLock { images in
            if let open = images[id] { return open }
            images[id] = opened
            return opened
        }
    }

    func forgetSnapshot(_ id: UUID) {
        snapshotImages.withLock { $0.removeValue(forKey: id) }?.close()
    }

    func close() {
        for image in snapshotImages.withLock({ images in
            defer { images.removeAll() }
            return Array(images.values)
        }) { image.close() }
        image.close()
    }
}

/// Holds new writes through Umbra's exports and drains those in flight, for the instant of a set.
final class RBDWriteGate: Sendable {
    private struct State {
        var held = false
        var inFlight = 0
        var waitingWrites: [CheckedContinuation<Void, Never>] = []
        var drained: CheckedContinuation<Void, Never>?
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
                return CheckedContinuation<Void, Never>?.none
            }
            state.drained = nil
            return drained
        }
        drained?.resume()
    }

    /// Holds new writes and returns once those in flight are done.
    func hold() async {
        await withCheckedContinuation { continuation in
            let done = state.withLock { state in
                state.held = true
                guard state.inFlight > 0 else { return true }
                state.drained = continuation
                return false
            }
            if done { continuation.resume() }
        }
    }

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
final class RBDProvider: Sendable {
    let cluster: RBDCluster
    private let directory: String
    private let io: any IOExecutor
    private let logger: Logger
    /// The registry and the open volumes change together, under this lock; registry writes happen
    /// under it too, so two changes never write back each other's old state.
    private let state: Mutex<(registry: RBDRegistry, volumes: [String: RBDVolume])>
    /// Told when volumes or snapshots come or go (the exports follow).
    private let changed: @Sendable () -> Void

    private init(
        cluster: RBDCluster, directory: String, io: any IOExecutor, logger: Logger, registry: RBDRegistry,
        volumes: [String: RBDVolume], changed: @escaping @Sendable () -> Void
    ) {
        self.cluster = cluster
        self.directory = directory
        self.io = io
        self.logger = logger
        self.state = Mutex((registry, volumes))
        self.changed = changed
    }

    /// Connects, opens every recorded volume, and settles what a crash left: pending snapshots of
    /// undecided sets and unrecorded GUID-named snapshots are removed, recorded snapshots RBD no longer
    /// has are forgotten (with a warning). `keptSets` are the sets the local catalog holds.
    static func open(
        configurationPath: String, id: String, timeout: Int, directory: String, io: any IOExecutor,
        keptSets: Set<UUID>, logger: Logger, changed: @escaping @Sendable () -> Void
    ) async throws -> RBDProvider {
        try await io.run {
            let cluster = try RBDCluster(configurationPath: configurationPath, id: id, timeout: timeout)
            var registry = try RBDRegistry.load(from: directory)
            var volumes: [String: RBDVolume] = [:]
            for index in registry.volumes.indices {
                let record = registry.volumes[index]
                let volume = try RBDVolume(
                    name: record.name, image: try cluster.pool(record.pool).open(record.image))
                volumes[record.name] = volume
                let present = Set(try volume.image.snapshotNames())
                var kept: [RBDRegistry.Snapshot] = []
                for var snapshot in record.snapshots {
                    let name = snapshot.id.guidString
                    guard present.contains(name) else {
                        logger.warning(
                            "an RBD snapshot is gone; forgetting it",
                            metadata: ["volume": "\(record.name)", "snapshot.id": "\(name)", "image": "\(volume.path)"])
                        continue
                    }
                    if snapshot.pending, snapshot.decidedByCatalog, keptSets.contains(snapshot.set) {
                        snapshot.pending = false
                    }
                    if snapshot.pending {
                        try volume.image.removeSnapshot(name)
                        logger.notice(
                            "rolled back an RBD snapshot of a set that was not kept",
                            metadata: ["volume": "\(record.name)", "snapshot.id": "\(name)"])
                        continue
                    }
                    kept.append(snapshot)
                }
                let recorded = Set(record.snapshots.map(\.id.guidString))
                for name in present where UUID(uuidString: name) != nil && !recorded.contains(name) {
                    try volume.image.removeSnapshot(name)
                    logger.notice(
                        "removed an RBD snapshot that no set recorded",
                        metadata: ["volume": "\(record.name)", "snapshot": "\(name)"])
                }
                registry.volumes[index].snapshots = kept
            }
            try registry.save(to: directory)
            return RBDProvider(
                cluster: cluster, directory: directory, io: io, logger: logger, registry: registry, volumes: volumes,
                changed: changed)
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

    /// Puts a volume on `pool/image`, creating the image when `size` is given.
    func createVolume(name: String, pool: String, image: String, size: UInt64?) async throws -> RBDVolume {
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
            volume.close()
            if size != nil { try? await io.run { [cluster] in try cluster.pool(pool).removeImage(image) } }
            throw error
        }
        changed()
        return volume
    }

    /// Removes the volume's snapshots and forgets it; removes the image too with `deletingImage`.
    func deleteVolume(name: String, deletingImage: Bool) async throws {
        guard let volume = volume(named: name), let record = records().first(where: { $0.name == name }) else {
            throw ShadowCopyError(.notFound, "No volume is named \(name).")
        }
        for snapshot in record.snapshots {
            _ = try await deleteSnapshots(ids: [snapshot.id])
        }
        try state.withLock { state in
            var registry = state.registry
            registry.volumes.removeAll { $0.name == name }
            try registry.save(to: directory)
            state.registry = registry
            state.volumes[name] = nil
        }
        changed()
        volume.close()
        if deletingImage {
            try await io.run { [cluster] in try cluster.pool(record.pool).removeImage(record.image) }
        }
    }

    // MARK: Sets

    /// Writes held on RBD volumes for one set.
    final class Hold: Sendable {
        let setID: UUID
        let volumes: [RBDVolume]
        /// When writes were let go, once they were.
        private let released = Mutex<ContinuousClock.Instant?>(nil)
        let heldAt = ContinuousClock.now
        let watchdog: Mutex<Task<Void, Never>?> = Mutex(nil)

        init(setID: UUID, volumes: [RBDVolume]) {
            self.setID = setID
            self.volumes = volumes
        }

        /// Lets the writes go; true the first time.
        @discardableResult
        func release() -> Bool {
            let first = released.withLock { released in
                guard released == nil else { return false }
                released = .now
                return true
            }
            guard first else { return false }
            watchdog.withLock { $0?.cancel() }
            for volume in volumes { volume.gate.release() }
            return true
        }

        var isReleased: Bool { released.withLock { $0 != nil } }

        /// How long writes were held, once they were let go.
        var holdDuration: Duration? { released.withLock { $0.map { heldAt.duration(to: $0) } } }
    }

    func flush(_ names: [String]) async throws {
        for name in names { try await volume(named: name)?.image.flush() }
    }

    /// Holds new writes on the volumes, drains those in flight and flushes the images, so that the
    /// snapshots hold every write that completed. Past `limit` the writes are released by themselves
    /// and `takeSnapshots` throws.
    func hold(setID: UUID, volumes names: [String], limit: Duration) async throws -> Hold {
        let volumes = try names.map { name in
            guard let volume = volume(named: name) else {
                throw ShadowCopyError(.notFound, "No volume is named \(name).")
            }
            return volume
        }
        for volume in volumes { await volume.gate.hold() }
        let hold = Hold(setID: setID, volumes: volumes)
        hold.watchdog.withLock { watchdog in
            watchdog = Task { [logger] in
                try? await Task.sleep(for: limit)
                if !Task.isCancelled, hold.release() {
                    logger.warning(
                        "the hold limit passed; RBD writes released", metadata: ["set.id": "\(setID.guidString)"])
                }
            }
        }
        do {
            for volume in volumes { try await volume.image.flush() }
        } catch {
            hold.release()
            throw error
        }
        return hold
    }

    /// Takes each held volume's RBD snapshot and records them as pending (writes stay held). On
    /// failure the snapshots taken are removed again.
    func takeSnapshots(_ hold: Hold, createdAt: Date, decidedByCatalog: Bool) async throws -> [CreatedSnapshot] {
        let ids = hold.volumes.map { _ in UUID() }
        var taken: [(RBDVolume, UUID)] = []
        do {
            for (volume, id) in zip(hold.volumes, ids) {
                guard !hold.isReleased else {
                    throw ShadowCopyError(.aborted, "The set took longer than the hold limit; it was abandoned.")
                }
                try await io.run { try volume.image.createSnapshot(id.guidString) }
                taken.append((volume, id))
            }
            try update { registry in
                for (volume, id) in taken {
                    guard let index = registry.volumes.firstIndex(where: { $0.name == volume.name }) else { continue }
                    registry.volumes[index].snapshots.append(
                        RBDRegistry.Snapshot(
                            id: id, set: hold.setID, createdAt: createdAt, pending: true,
                            decidedByCatalog: decidedByCatalog))
                }
            }
        } catch {
            for (volume, id) in taken { try? await io.run { try volume.image.removeSnapshot(id.guidString) } }
            throw error
        }
        return zip(hold.volumes, ids).map { volume, id in
            CreatedSnapshot(id: id, volume: volume.name, export: "\(volume.name)@\(id.guidString)")
        }
    }

    /// Gives a set's snapshots the set's time, and with `kept` keeps them for good.
    func settleSet(_ id: UUID, createdAt: Date?, kept: Bool) throws {
        try update { registry in
            for volume in registry.volumes.indices {
                for snapshot in registry.volumes[volume].snapshots.indices
                where registry.volumes[volume].snapshots[snapshot].set == id {
                    if kept { registry.volumes[volume].snapshots[snapshot].pending = false }
                    if let createdAt { registry.volumes[volume].snapshots[snapshot].createdAt = createdAt }
                }
            }
        }
        changed()
    }

    func labelSet(_ id: UUID, purpose: String) throws -> Bool {
        var found = false
        try update { registry in
            for volume in registry.volumes.indices {
                for snapshot in registry.volumes[volume].snapshots.indices
                where registry.volumes[volume].snapshots[snapshot].set == id {
                    registry.volumes[volume].snapshots[snapshot].purpose = purpose
                    found = true
                }
            }
        }
        return found
    }

    /// Deletes the snapshots named (or all of the sets named) that are RBD snapshots; returns their GUIDs.
    func deleteSnapshots(ids: [UUID]) async throws -> [UUID] {
        let wanted = Set(ids)
        let doomed: [(RBDVolume, UUID)] = state.withLock { state in
            state.registry.volumes.flatMap { record in
                record.snapshots.filter { wanted.contains($0.id) || wanted.contains($0.set) }.compactMap { snapshot in
                    state.volumes[record.name].map { ($0, snapshot.id) }
                }
            }
        }
        guard !doomed.isEmpty else { return [] }
        for (volume, id) in doomed {
            volume.forgetSnapshot(id)
            try await io.run {
                do {
                    try volume.image.removeSnapshot(id.guidString)
                } catch let error as RBDError where error.errno == ENOENT {
                    // Already gone: what was asked for holds.
                }
            }
        }
        let gone = Set(doomed.map(\.1))
        try update { registry in
            for index in registry.volumes.indices {
                registry.volumes[index].snapshots.removeAll { gone.contains($0.id) }
            }
        }
        changed()
        return doomed.map(\.1)
    }

    /// Rolls back what `takeSnapshots` recorded for a set that did not commit.
    func rollBack(_ hold: Hold) async {
        _ = try? await deleteSnapshots(ids: [hold.setID])
        hold.release()
    }

    // MARK: Reading

    func snapshots(volume: String?) -> [ShadowCopy.SnapshotInfo] {
        records().filter { volume == nil || $0.name == volume }.flatMap { record in
            record.snapshots.map { snapshot in
                SnapshotInfo(
                    id: snapshot.id, set: snapshot.set, volume: record.name,
                    export: "\(record.name)@\(snapshot.id.guidString)", createdAt: snapshot.createdAt, diffBytes: 0,
                    state: snapshot.pending ? "pending" : "ready", purpose: snapshot.purpose)
            }
        }.sorted { $0.createdAt < $1.createdAt }
    }

    func hasSnapshot(_ id: UUID) -> Bool {
        records().contains { $0.snapshots.contains { $0.id == id } }
    }

    /// What changed since snapshot `since` until snapshot `until` (the live image when nil).
    func changes(volume name: String, since: UUID, until: UUID?, within range: (offset: UInt64, count: UInt64)? = nil)
        async throws -> [(offset: UInt64, count: UInt64)]
    {
        guard let volume = volume(named: name), let record = records().first(where: { $0.name == name }) else {
            throw ShadowCopyError(.notFound, "No volume is named \(name).")
        }
        let order = record.snapshots.map(\.id)
        guard let older = order.firstIndex(of: since) else {
            throw ShadowCopyError(.notFound, "Volume \(name) has no snapshot \(since.guidString).")
        }
        var image = volume.image
        if let until {
            guard let newer = order.firstIndex(of: until) else {
                throw ShadowCopyError(.notFound, "Volume \(name) has no snapshot \(until.guidString).")
            }
            guard newer >= older else {
                throw ShadowCopyError(
                    .invalidArgument, "Snapshot \(until.guidString) is older than \(since.guidString).")
            }
            image = try volume.snapshotImage(until)
        }
        let (offset, count) = range ?? (0, volume.size)
        return try await io.run { [image] in
            try image.changedRanges(since: since.guidString, offset: offset, count: count)
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
