// The engine as the coordinator's snapshot provider, and the daemon's answers to the plain requester
// operations. Engine errors that are the caller's doing become the control protocol's codes
// (`not-found`, `already-exists`, `invalid-argument`); the rest pass through as they are.

import BlockIO
import Foundation
import QCOW2
import ShadowCopy
import SnapshotEngine

struct EngineProvider: SnapshotProvider {
    let store: SnapshotStore
    let exports: ExportReconciler

    /// The coordinator validated the list itself (non-empty, each once); here: does each volume exist?
    func validateSnapshotSet(volumes: [String]) async throws {
        do {
            for name in volumes { _ = try store.volume(named: name) }
        } catch {
            throw controlError(error)
        }
    }

    func flushVolumes(_ volumes: [String]) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for name in volumes {
                let volume = try store.volume(named: name)
                group.addTask { try await volume.flush() }
            }
            try await group.waitForAll()
        }
    }

    func prepareSnapshotSet(id: UUID, volumes: [String], flushingFirst: Bool) async throws -> PreparedSnapshotSet {
        do {
            return try await store.prepareSnapshotSet(volumes: volumes, id: id, flushingFirst: flushingFirst)
        } catch is CancellationError {
            throw ShadowCopyError(.aborted, "The set was abandoned while writes were being drained.")
        } catch {
            throw controlError(error)
        }
    }

    /// The snapshots come back in the order the volumes were named.
    func commitSnapshotSet(_ prepared: PreparedSnapshotSet, keep: Bool) async throws -> CommittedSnapshotSet {
        let info = try await keep ? prepared.commit() : prepared.commitPending()
        return CommittedSnapshotSet(
            id: info.id, createdAt: info.createdAt,
            snapshots: info.snapshots.map { CreatedSnapshot(id: $0.id, volume: $0.volume, export: $0.exportName) })
    }

    func keepSnapshotSet(id: UUID) async throws {
        do {
            try await store.keepSnapshotSet(id: id)
        } catch {
            throw controlError(error)
        }
    }

    func abortSnapshotSet(_ prepared: PreparedSnapshotSet) async {
        prepared.abort()
    }

    func holdDuration(of prepared: PreparedSnapshotSet) -> Duration? {
        prepared.holdDuration
    }

    func deleteSnapshotSet(id: UUID) async throws {
        do {
            try await store.deleteSnapshots(ids: [id])
        } catch EngineError.snapshotNotFound {
            // Already gone (the diff-store policy may have deleted it): what was asked for holds.
        }
        await exports.settle()
    }
}

struct DaemonRequests: ControlRequestHandler {
    let store: SnapshotStore
    let exports: ExportReconciler
    /// The providers beside the engine (RBD, when the daemon was given a Ceph cluster).
    let others: [any VolumeProvider]
    /// What `status` reports about the daemon beyond the store.
    let daemon: DaemonFacts

    func createVolume(_ params: CreateVolumeParams) async throws -> ShadowCopy.VolumeInfo {
        if others.provider(of: params.name) != nil { throw controlError(EngineError.volumeExists(params.name)) }
        if params.rbd != nil { return try await createElsewhere(params) }
        guard params.whenFull == nil || params.diffLimit != nil else {
            throw ShadowCopyError(
                .invalidParams, "whenFull needs a diffLimit: without a limit the diff store is never full.")
        }
        let chunkSize = params.chunkSize ?? VolumeSpec.defaultChunkSize.rawValue
        if let limit = params.diffLimit, chunkSize > 0, limit % chunkSize != 0 {
            // The diff store holds whole chunks: a limit in between would be rounded down unseen.
            throw ShadowCopyError(
                .invalidArgument,
                "The diff limit (\(limit) bytes) must be a whole number of chunks (\(chunkSize) bytes each).")
        }
        do {
            let info = try await store.createVolume(
                VolumeSpec(
                    name: params.name, size: ByteCount(params.size),
                    chunkSize: params.chunkSize.map(ByteCount.init(_:)) ?? VolumeSpec.defaultChunkSize,
                    diffLimit: params.diffLimit.map(ByteCount.init(_:)),
                    policy: DiffStorePolicy(params.whenFull ?? .deleteOldest)))
            return Self.describe(info)
        } catch {
            throw controlError(error)
        }
    }

    func listVolumes() async throws -> VolumeList {
        VolumeList(
            volumes: store.volumes().map(Self.describe)
                + others.flatMap { provider in provider.volumeNames.compactMap { provider.describe(volume: $0) } })
    }

    /// A volume as the control protocol shows it.
    static func describe(_ info: SnapshotEngine.VolumeInfo) -> ShadowCopy.VolumeInfo {
        ShadowCopy.VolumeInfo(
            name: info.name, size: info.size.rawValue, chunkSize: info.chunkSize.rawValue,
            diffLimit: info.diffLimit?.rawValue,
            whenFull: info.diffLimit == nil ? nil : DiffStoreFullPolicy(info.policy), backend: "local")
    }

    func setVolume(_ params: SetVolumeParams) async throws -> ShadowCopy.VolumeInfo {
        guard params.diffLimit != nil || params.whenFull != nil else {
            throw ShadowCopyError(.invalidParams, "volume.set needs diffLimit or whenFull: there is nothing to change.")
        }
        try refuseOthers(params.name, "has no diff store to limit: its provider keeps its snapshots itself")
        do {
            // The engine reads what is not changed under the lock it changes the rest with.
            let info = try await store.limitDiffStore(
                ofVolume: params.name,
                changing: params.diffLimit.map { $0 == 0 ? .unlimited : .limit(ByteCount($0)) },
                policy: params.whenFull.map(DiffStorePolicy.init))
            return Self.describe(info)
        } catch {
            throw controlError(error)
        }
    }

    func labelSet(_ params: LabelSetParams) async throws {
        let labelledElsewhere = try others.reduce(false) { try $1.labelSet(params.set, purpose: params.purpose) || $0 }
        do {
            try await store.labelSnapshotSet(id: params.set, purpose: params.purpose)
        } catch EngineError.snapshotNotFound where labelledElsewhere {
            // The engine has no part in the set.
        } catch {
            throw controlError(error)
        }
    }

    func backupSnapshot(_ params: BackupImageParams) async throws -> BackupImageResult {
        guard params.file.hasPrefix("/"), !params.file.hasSuffix("/") else {
            throw ShadowCopyError(.invalidParams, "The image's file must be an absolute path (got '\(params.file)').")
        }
        let data = daemon.dataDirectory.hasSuffix("/") ? daemon.dataDirectory : daemon.dataDirectory + "/"
        guard !params.file.hasPrefix(data) else {
            throw ShadowCopyError(
                .invalidArgument, "An image cannot go inside the data directory \(daemon.dataDirectory).")
        }
        guard (params.backingFile == nil) == (params.base == nil) else {
            throw ShadowCopyError(.invalidParams, "An incremental image needs both base and backingFile.")
        }
        if let provider = others.first(where: { $0.hasSnapshot(params.snapshot) }) {
            throw ShadowCopyError(
                .invalidArgument,
                "Snapshot \(params.snapshot.guidString) is on a volume of backend \(provider.backend); backups to qcow2 work on local volumes only (copy its export with nbdcopy or qemu-img instead)."
            )
        }
        do {
            let view = try store.snapshot(id: params.snapshot)
            let ranges: [ByteRange]
            if let base = params.base {
                ranges = try store.changes(volume: view.volumeName, since: base, until: params.snapshot).extents
            } else {
                ranges = try await view.allocation(at: .zero, count: view.size).filter { !$0.isHole }.map(\.range)
            }
            return try await ImageTransfer.writeImage(
                of: view, ranges: ranges, to: params.file, backingFile: params.backingFile, io: store.io)
        } catch let error as QCOW2Error {
            throw ShadowCopyError(.invalidArgument, sentence(error.description))
        } catch {
            throw controlError(error)
        }
    }

    func restoreVolume(_ params: RestoreParams) async throws -> RestoreResult {
        guard params.file.hasPrefix("/") else {
            throw ShadowCopyError(.invalidParams, "The image's file must be an absolute path (got '\(params.file)').")
        }
        guard store.volumes().allSatisfy({ $0.name != params.name }), others.provider(of: params.name) == nil else {
            throw controlError(EngineError.volumeExists(params.name))
        }
        // Not served until it holds the whole image: no client reads it half-written.
        await exports.takeOffline(params.name)
        defer { exports.bringOnline(params.name) }
        do {
            return try await ImageTransfer.restore(
                params.file, as: params.name, in: store, chunkSize: VolumeSpec.defaultChunkSize)
        } catch let error as QCOW2Error {
            throw ShadowCopyError(.invalidArgument, sentence(error.description))
        } catch let error as BlockIOError {
            throw ShadowCopyError(.invalidArgument, "Cannot read \(params.file): \(error).")
        } catch {
            throw controlError(error)
        }
    }

    func revertVolume(_ params: RevertParams) async throws -> RevertResultInfo {
        let started = ContinuousClock.now
        try refuseOthers(
            params.name, "cannot be reverted by Umbra; use its storage's own rollback while nothing uses it")
        do {
            // A revert refused before it starts must not end the volume's connections.
            try store.checkRevert(volume: params.name, to: params.snapshot)
        } catch {
            throw controlError(error)
        }
        // Its clients are ended (ESHUTDOWN) before the engine takes the volume offline itself.
        await exports.takeOffline(params.name)
        defer { exports.bringOnline(params.name) }
        do {
            let result = try await store.revert(volume: params.name, to: params.snapshot)
            let elapsed = ContinuousClock.now - started
            return RevertResultInfo(
                volume: result.volume, snapshot: result.snapshot, changedBytes: result.changedBytes.rawValue,
                seconds: elapsed.seconds)
        } catch {
            throw controlError(error)
        }
    }

    func deleteVolume(name: String, deletingImage: Bool) async throws {
        if let provider = others.provider(of: name) {
            // The provider takes the volume's exports away itself, before it closes the volume.
            try await provider.deleteVolume(name: name, deletingImage: deletingImage)
            return
        }
        if deletingImage {
            throw ShadowCopyError(.invalidArgument, "Volume \(name) is a local volume: it has no image to delete.")
        }
        do {
            try await store.deleteVolume(named: name)
            await exports.settle()
        } catch {
            throw controlError(error)
        }
    }

    func listSnapshots(volume: String?) async throws -> SnapshotList {
        do {
            if let volume, let provider = others.provider(of: volume) {
                return SnapshotList(snapshots: provider.snapshots(volume: volume))
            }
            let local = try store.snapshots(volume: volume).map { snapshot in
                var failure: String?
                if case .failed(let reason) = snapshot.state { failure = reason }
                return ShadowCopy.SnapshotInfo(
                    id: snapshot.id, set: snapshot.setID, volume: snapshot.volume, export: snapshot.exportName,
                    createdAt: snapshot.createdAt, diffBytes: snapshot.diffBytes.rawValue,
                    state: failure != nil ? "failed" : snapshot.isPending ? "pending" : "ready", failure: failure,
                    purpose: snapshot.purpose)
            }
            let remote = volume == nil ? others.flatMap { $0.snapshots(volume: nil) } : []
            return SnapshotList(snapshots: (local + remote).sorted { $0.createdAt < $1.createdAt })
        } catch {
            throw controlError(error)
        }
    }

    func deleteSnapshots(ids: [UUID]) async throws -> DeleteSnapshotsResult {
        do {
            // Every id must name something before anything is deleted.
            let remote = others.flatMap { $0.snapshots(volume: nil) }
            let remoteIDs = ids.filter { id in remote.contains { $0.id == id || $0.set == id } }
            let local = try store.snapshots()
            let localIDs = ids.filter { id in local.contains { $0.id == id || $0.setID == id } }
            if let missing = ids.first(where: { !remoteIDs.contains($0) && !localIDs.contains($0) }) {
                throw EngineError.snapshotNotFound(missing.guidString)
            }
            var deleted = localIDs.isEmpty ? [] : try await store.deleteSnapshots(ids: localIDs)
            for provider in others where !remoteIDs.isEmpty {
                deleted += try await provider.deleteSnapshots(ids: remoteIDs)
            }
            await exports.settle()
            return DeleteSnapshotsResult(deleted: deleted)
        } catch {
            throw controlError(error)
        }
    }

    func changes(_ params: ChangesParams) async throws -> ChangeList {
        if let provider = others.provider(of: params.volume) { return try await provider.changes(params) }
        do {
            let changes = try store.changes(volume: params.volume, since: params.since, until: params.until)
            return ChangeList(
                chunkSize: changes.chunkSize.rawValue,
                extents: changes.extents.map { ByteExtent(offset: $0.offset.rawValue, length: $0.count.rawValue) })
        } catch {
            throw controlError(error)
        }
    }
}

/// The daemon's side of `status`: when it started, where it listens, its connections and writers.
struct DaemonFacts: Sendable {
    var startedAt: ContinuousClock.Instant
    var listeners: [String]
    var connections: @Sendable () -> Int
    var writers: @Sendable () async -> WriterList
    /// Re-reads the reloadable configuration (see `Serve.reload`).
    var reload: @Sendable () throws -> ReloadResult
    /// Successful reloads so far.
    var reloads: @Sendable () -> Int
    /// The data directory, absolute: no backup image may be written inside it.
    var dataDirectory: String
}

extension DaemonRequests {
    func status() async throws -> StatusResult {
        let now = Date()
        let writers = await daemon.writers().writers
        let snapshots = try store.snapshots()
        let uptime = ContinuousClock.now - daemon.startedAt
        return StatusResult(
            version: Umbra.version,
            uptimeSeconds: uptime.seconds,
            listeners: daemon.listeners, connections: daemon.connections(), writers: writers.count,
            writerStates: Dictionary(writers.map { ($0.state.rawValue, 1) }, uniquingKeysWith: +),
            reloads: daemon.reloads(),
            volumes: store.volumes().map { volume in
                let oldest = snapshots.filter { $0.volume == volume.name }.map(\.createdAt).min()
                return StatusResult.Volume(
                    name: volume.name, size: volume.size.rawValue, backend: "local",
                    diffBytes: volume.diffBytes.rawValue, diffLimit: volume.diffLimit?.rawValue,
                    snapshots: volume.snapshotCount,
                    oldestSnapshotAgeSeconds: oldest.map { max(0, now.timeIntervalSince($0)) },
                    copyMethod: volume.copyMethod.rawValue)
            }
                + others.flatMap { $0.status(now: now) })
    }

    func reload() async throws -> ReloadResult {
        try daemon.reload()
    }

    func verify(_ params: VerifyParams) async throws -> VerifyResult {
        for name in params.volumes {
            try refuseOthers(
                name,
                "is checked by its storage itself (for RBD, `ceph pg deep-scrub`); Umbra keeps no checksums for it")
        }
        do {
            let reports = try await store.verify(volumes: params.volumes)
            return VerifyResult(
                volumes: reports.map { report in
                    VerifyResult.Volume(
                        name: report.volume, snapshotsChecked: report.snapshotsChecked,
                        bytesChecked: report.bytesChecked, bytesUnchecked: report.bytesUnchecked,
                        damaged: report.damaged.map {
                            VerifyResult.Damage(
                                snapshot: $0.snapshot, offset: $0.range.offset.rawValue, length: $0.range.count.rawValue
                            )
                        })
                })
        } catch {
            throw controlError(error)
        }
    }
}

// The engine's diff-store policy and the control protocol's name for it, one mapping each way.
extension DiffStorePolicy {
    init(_ policy: DiffStoreFullPolicy) {
        switch policy {
        case .deleteOldest: self = .deleteOldest
        case .failSnapshot: self = .failSnapshot
        }
    }
}

extension DiffStoreFullPolicy {
    init(_ policy: DiffStorePolicy) {
        switch policy {
        case .deleteOldest: self = .deleteOldest
        case .failSnapshot: self = .failSnapshot
        }
    }
}

// The providers beside the engine in the requests that are not about sets.
extension DaemonRequests {
    /// `volume.create` for a provider beside the engine (with `rbd`: Ceph RBD).
    fileprivate func createElsewhere(_ params: CreateVolumeParams) async throws -> ShadowCopy.VolumeInfo {
        guard let provider = others.first(where: { $0.claims(params) }) else {
            throw ShadowCopyError(
                .invalidArgument, "RBD volumes need a daemon started with --ceph-conf (this one has no Ceph cluster).")
        }
        guard store.volumes().allSatisfy({ $0.name != params.name }) else {
            throw controlError(EngineError.volumeExists(params.name))
        }
        guard VolumeSpec.isValidName(params.name) else {
            throw controlError(EngineError.invalidVolumeName(params.name))
        }
        // The provider brings its exports in step itself.
        return try await provider.createVolume(params)
    }

    /// Throws if `name` is not a local volume, saying why the request does not apply to it.
    fileprivate func refuseOthers(_ name: String, _ why: String) throws {
        guard let provider = others.provider(of: name) else { return }
        throw ShadowCopyError(.invalidArgument, "Volume \(name) is on \(provider.backend) and \(why).")
    }
}
