// Taking snapshot sets, and pending sets: kept when told, rolled back by the next open otherwise
// (SnapshotStore.swift's design note says why).

import BlockIO
import Logging
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

extension SnapshotStore {
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
        // A volume whose live data failed to sync cannot vouch for what a snapshot of it would hold.
        for volume in members {
            try volume.checkWritable()
            // Offline for a revert (one that failed halfway): what it holds is neither before nor after.
            try volume.checkNotReverting()
        }
        if let failure = context.catalog.failure { throw failure }
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

    func waitForPendingCommits() async {
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
    func rollBackPendingSets() async throws {
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
