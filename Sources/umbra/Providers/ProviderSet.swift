// The coordinator's one provider, made of the daemon's providers: the local engine, and those beside
// it (`VolumeProvider`: Ceph RBD when the daemon was given a cluster). A set splits its volumes by
// provider and stays one instant:
//
//   prepare: the engine's prepare holds the local writes, then each other provider holds its own
//            (drained, flushed);
//   commit:  the other providers take their snapshots (recorded as pending, writes still held on
//            every volume), then the engine commits its part (its catalog record is the set's commit
//            point when it has local volumes), then the others let their writes go and settle;
//   abort:   release everything; snapshots already taken are removed.
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
    /// A provider beside the engine, its hold, and whether its snapshots were taken (an abort must
    /// remove them).
    final class Part: Sendable {
        let provider: any VolumeProvider
        let hold: any ProviderHold
        let taken = Mutex(false)

        init(provider: any VolumeProvider, hold: any ProviderHold) {
            self.provider = provider
            self.hold = hold
        }
    }

    let id: UUID
    let volumes: [String]
    let local: PreparedSnapshotSet?
    let others: [Part]

    init(id: UUID, volumes: [String], local: PreparedSnapshotSet?, others: [Part]) {
        self.id = id
        self.volumes = volumes
        self.local = local
        self.others = others
    }
}

struct ProviderSet: SnapshotProvider {
    let engine: EngineProvider
    /// The providers beside the engine; a volume none of them holds is the engine's.
    let others: [any VolumeProvider]
    let holdLimit: Duration

    /// The volumes of each provider beside the engine, and the engine's.
    private func split(_ volumes: [String]) -> (local: [String], others: [(any VolumeProvider, [String])]) {
        var local = volumes
        var parts: [(any VolumeProvider, [String])] = []
        for provider in others {
            let names = Set(provider.volumeNames)
            let mine = volumes.filter { names.contains($0) }
            local.removeAll { names.contains($0) }
            if !mine.isEmpty { parts.append((provider, mine)) }
        }
        return (local, parts)
    }

    func validateSnapshotSet(volumes: [String]) async throws {
        try await engine.validateSnapshotSet(volumes: split(volumes).local)
    }

    func flushVolumes(_ volumes: [String]) async throws {
        let (local, parts) = split(volumes)
        for (provider, names) in parts { try await provider.flush(names) }
        if !local.isEmpty { try await engine.flushVolumes(local) }
    }

    func prepareSnapshotSet(id: UUID, volumes: [String], flushingFirst: Bool) async throws -> ProviderSetHold {
        let (local, parts) = split(volumes)
        // The engine first: it flushes before it holds, and the others' writes should not wait for that.
        let prepared =
            local.isEmpty
            ? nil : try await engine.prepareSnapshotSet(id: id, volumes: local, flushingFirst: flushingFirst)
        var held: [ProviderSetHold.Part] = []
        do {
            for (provider, names) in parts {
                if flushingFirst { try await provider.flush(names) }
                let hold = try await provider.hold(setID: id, volumes: names, limit: holdLimit)
                held.append(ProviderSetHold.Part(provider: provider, hold: hold))
            }
            return ProviderSetHold(id: id, volumes: volumes, local: prepared, others: held)
        } catch {
            for part in held { part.hold.release() }
            if let prepared { await engine.abortSnapshotSet(prepared) }
            throw error
        }
    }

    func commitSnapshotSet(_ hold: ProviderSetHold, keep: Bool) async throws -> CommittedSnapshotSet {
        var createdAt = Date()
        var snapshots: [CreatedSnapshot] = []
        // Every provider's snapshots while every volume is still held; the engine's last, since its
        // commit lets the local writes go.
        for part in hold.others {
            part.taken.withLock { $0 = true }
            snapshots += try await part.provider.takeSnapshots(
                part.hold, createdAt: createdAt, decidedByCatalog: hold.local != nil)
        }
        if let local = hold.local {
            let committed = try await engine.commitSnapshotSet(local, keep: keep)
            createdAt = committed.createdAt
            snapshots += committed.snapshots
        }
        for part in hold.others {
            part.hold.release()
            do {
                try part.provider.settleSet(hold.id, createdAt: createdAt, kept: keep)
            } catch  where hold.local != nil {
                // The local record decided the set: it is committed, and the next start settles the
                // provider's records from the catalog. Failing here would roll back one half.
                Logger(label: "umbra.providers").error(
                    "could not record a set as settled; the next start does it",
                    metadata: ["set.id": "\(hold.id.guidString)", "error": "\(error)"])
            }
            await part.provider.announceSnapshots()
        }
        let order = Dictionary(uniqueKeysWithValues: hold.volumes.enumerated().map { ($1, $0) })
        return CommittedSnapshotSet(
            id: hold.id,
            createdAt: createdAt,
            snapshots: snapshots.sorted { order[$0.volume, default: 0] < order[$1.volume, default: 0] })
    }

    func keepSnapshotSet(id: UUID) async throws {
        let holders = others.filter { $0.hasSet(id) }
        do {
            try await engine.keepSnapshotSet(id: id)
        } catch let error as ShadowCopyError where error.code == .notFound && !holders.isEmpty {
            // The engine has no part in it: the providers' own records decide it.
        }
        for provider in holders { try provider.settleSet(id, createdAt: nil, kept: true) }
    }

    func abortSnapshotSet(_ hold: ProviderSetHold) async {
        if let local = hold.local { await engine.abortSnapshotSet(local) }
        for part in hold.others {
            if part.taken.withLock({ $0 }) {
                await part.provider.rollBack(part.hold)
            } else {
                part.hold.release()
            }
        }
    }

    func deleteSnapshotSet(id: UUID) async throws {
        for provider in others { _ = try await provider.deleteSnapshots(ids: [id]) }
        try await engine.deleteSnapshotSet(id: id)
    }

    func holdDuration(of hold: ProviderSetHold) -> Duration? {
        // The longest: the local writes are held from before the others, the others until after.
        ([hold.local.flatMap { engine.holdDuration(of: $0) }] + hold.others.map(\.hold.holdDuration)).compactMap { $0 }
            .max()
    }
}
