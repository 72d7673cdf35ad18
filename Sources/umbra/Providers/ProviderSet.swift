// The coordinator's one provider, made of the daemon's providers: the local engine, and Ceph RBD
// when the daemon was given a cluster. A set splits its volumes by provider and stays one instant:
//
//   prepare: the engine's prepare holds the local writes, then RBD writes are held (drained, flushed);
//   commit:  take the RBD snapshots (recorded as pending, writes still held on every volume), then
//            commit the engine's part (its catalog record is the set's commit point when it has
//            local volumes), then let the RBD writes go and settle their records;
//   abort:   release everything; RBD snapshots already taken are removed.
//
// The coordinator never learns which provider holds which volume.

import Logging
import ShadowCopy
import SnapshotEngine
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// One set's holds, one per provider that has volumes in it.
final class ProviderSetHold: Sendable {
    let id: UUID
    let volumes: [String]
    let local: PreparedSnapshotSet?
    let rbd: RBDProvider.Hold?
    /// RBD snapshots were taken (and recorded as pending): an abort must remove them.
    let rbdTaken = Mutex(false)

    init(id: UUID, volumes: [String], local: PreparedSnapshotSet?, rbd: RBDProvider.Hold?) {
        self.id = id
        self.volumes = volumes
        self.local = local
        self.rbd = rbd
    }
}

struct ProviderSet: SnapshotProvider {
    let engine: EngineProvider
    let rbd: RBDProvider?
    let holdLimit: Duration

    private func split(_ volumes: [String]) -> (local: [String], rbd: [String]) {
        guard let rbd else { return (volumes, []) }
        let names = Set(rbd.volumeNames)
        return (volumes.filter { !names.contains($0) }, volumes.filter { names.contains($0) })
    }

    func validateSnapshotSet(volumes: [String]) async throws {
        try await engine.validateSnapshotSet(volumes: split(volumes).local)
    }

    func flushVolumes(_ volumes: [String]) async throws {
        let (local, remote) = split(volumes)
        try await rbd?.flush(remote)
        if !local.isEmpty { try await engine.flushVolumes(local) }
    }

    func prepareSnapshotSet(id: UUID, volumes: [String], flushingFirst: Bool) async throws -> ProviderSetHold {
        let (local, remote) = split(volumes)
        // The engine first: it flushes before it holds, and RBD writes should not wait for that.
        let prepared =
            local.isEmpty
            ? nil : try await engine.prepareSnapshotSet(id: id, volumes: local, flushingFirst: flushingFirst)
        do {
            var rbdHold: RBDProvider.Hold?
            if let rbd, !remote.isEmpty {
                if flushingFirst { try await rbd.flush(remote) }
                rbdHold = try await rbd.hold(setID: id, volumes: remote, limit: holdLimit)
            }
            return ProviderSetHold(id: id, volumes: volumes, local: prepared, rbd: rbdHold)
        } catch {
            if let prepared { await engine.abortSnapshotSet(prepared) }
            throw error
        }
    }

    func commitSnapshotSet(_ hold: ProviderSetHold, keep: Bool) async throws -> CommittedSnapshotSet {
        var createdAt = Date()
        var snapshots: [CreatedSnapshot] = []
        if let rbd, let rbdHold = hold.rbd {
            snapshots += try await rbd.takeSnapshots(rbdHold, createdAt: createdAt, decidedByCatalog: hold.local != nil)
            hold.rbdTaken.withLock { $0 = true }
        }
        if let local = hold.local {
            let committed = try await engine.commitSnapshotSet(local, keep: keep)
            createdAt = committed.createdAt
            snapshots += committed.snapshots
        }
        if let rbd, let rbdHold = hold.rbd {
            rbdHold.release()
            do {
                try rbd.settleSet(rbdHold.setID, createdAt: createdAt, kept: keep)
            } catch  where hold.local != nil {
                // The local record decided the set: it is committed, and the next start settles the
                // RBD records from the catalog. Failing here would roll back only the RBD half.
                rbd.logger.error(
                    "could not record an RBD snapshot's set as settled; the next start does it",
                    metadata: ["set.id": "\(hold.id.guidString)", "error": "\(error)"])
            }
        }
        if let rbd, hold.rbd != nil { await rbd.announceSnapshots() }
        let order = Dictionary(uniqueKeysWithValues: hold.volumes.enumerated().map { ($1, $0) })
        return CommittedSnapshotSet(
            id: hold.id,
            createdAt: createdAt,
            snapshots: snapshots.sorted { order[$0.volume, default: 0] < order[$1.volume, default: 0] })
    }

    func keepSnapshotSet(id: UUID) async throws {
        let rbdHasIt = rbd?.snapshots(volume: nil).contains { $0.set == id } ?? false
        do {
            try await engine.keepSnapshotSet(id: id)
        } catch let error as ShadowCopyError where error.code == .notFound && rbdHasIt {
            // An RBD-only set: its own record decides it.
        }
        if rbdHasIt { try rbd?.settleSet(id, createdAt: nil, kept: true) }
    }

    func abortSnapshotSet(_ hold: ProviderSetHold) async {
        if let local = hold.local { await engine.abortSnapshotSet(local) }
        if let rbd, let rbdHold = hold.rbd {
            if hold.rbdTaken.withLock({ $0 }) {
                await rbd.rollBack(rbdHold)
            } else {
                rbdHold.release()
            }
        }
    }

    func deleteSnapshotSet(id: UUID) async throws {
        if let rbd { _ = try await rbd.deleteSnapshots(ids: [id]) }
        try await engine.deleteSnapshotSet(id: id)
    }

    func holdDuration(of hold: ProviderSetHold) -> Duration? {
        // The longer of the two: the local writes are held from before the RBD ones, the RBD ones until after.
        [hold.local.flatMap { engine.holdDuration(of: $0) }, hold.rbd?.holdDuration].compactMap { $0 }.max()
    }
}
