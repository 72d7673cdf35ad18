// A snapshot set in the making: writes held on all its volumes until it is committed or aborted, and
// never longer than the hold limit.
//
// Taking a set owns the store's operation lock from `hold` to its end: it is taken and released here
// and nowhere else, through `releaseHold`. The volumes are flushed first while writes still flow.
// Phases: acquiring (taking each volume's gate, in volume number order, which drains the writes in
// flight) → held → committing → finished; or expired, when the watchdog fires first. Exactly one party
// releases the gates and the lock on each path: the acquisition itself if it fails, the watchdog if it
// expires a held set, and commit or abort otherwise. A commit already under way is not interrupted; it releases the
// writes once the set's record is queued in the catalog (the snapshots have joined their chains by
// then), so writes are held for the drain only, never for a device flush. A pending commit returns
// right then too, so a coordinator can thaw its writers without waiting for the disk.

import BlockIO
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

public final class PreparedSnapshotSet: Sendable {
    private enum Phase {
        case acquiring
        case held
        case committing
        case finished
        case expired
    }

    private struct State {
        var phase = Phase.acquiring
        var acquisition: Task<Void, any Error>?
        var watchdog: Task<Void, Never>?
        /// A commit released the gates and the operation lock once its record was queued.
        var releasedByCommit = false
        /// When new writes began to be held (the gates requested) and when they were let go.
        var holdStarted: ContinuousClock.Instant?
        var holdEnded: ContinuousClock.Instant?
    }

    /// How long new writes were held (from the moment the gates were requested, draining included,
    /// to their release); nil if they never were, or still are.
    public var holdDuration: Duration? {
        state.withLock { state in
            guard let started = state.holdStarted, let ended = state.holdEnded else { return nil }
            return started.duration(to: ended)
        }
    }

    /// The volumes of the set, in the order the caller named them (the snapshots come in that order).
    public let volumes: [String]
    let store: SnapshotStore
    /// In the caller's order.
    let members: [Volume]
    let holdLimit: Duration
    /// The set's GUID if the caller chose it (the coordinator names sets before they exist).
    let requestedID: UUID?
    private let state = Mutex(State())

    private init(store: SnapshotStore, members: [Volume], holdLimit: Duration, id: UUID?) {
        self.store = store
        self.members = members
        self.requestedID = id
        self.volumes = members.map(\.name)
        self.holdLimit = holdLimit
    }

    /// Takes the store's operation lock, checks the set can be taken, and holds its writes (see
    /// `hold(flushingFirst:)`). The names were validated by the caller (non-empty, each once).
    static func prepare(
        _ names: [String], in store: SnapshotStore, id: UUID?, holdLimit: Duration, flushingFirst: Bool
    ) async throws -> PreparedSnapshotSet {
        await store.operations.lock()
        let members: [Volume]
        do {
            members = try store.membersForNewSet(names, id: id)
        } catch {
            store.operations.unlock()
            throw error
        }
        let prepared = PreparedSnapshotSet(store: store, members: members, holdLimit: holdLimit, id: id)
        try await prepared.hold(flushingFirst: flushingFirst)
        return prepared
    }

    /// Releases the operation lock, and the gates if they are held: the one place either is let go.
    private func releaseHold(gatesHeld: Bool) {
        if gatesHeld {
            for volume in members { volume.gate.releaseExclusive() }
            state.withLock { $0.holdEnded = $0.holdEnded ?? .now }
        }
        store.operations.unlock()
    }

    private var expiredError: EngineError {
        let (seconds, attoseconds) = holdLimit.components
        return .holdExpired(limitMilliseconds: seconds * 1000 + attoseconds / 1_000_000_000_000_000)
    }

    /// Flushes (unless told not to) and takes the gates, holding the operation lock. On failure it has
    /// released everything, the operation lock included. A
    /// cancellation of the calling task before the writes are held gives up with `CancellationError`
    /// (a flush under way finishes first), so a caller past its own deadline frees held writes at once.
    func hold(flushingFirst: Bool) async throws {
        let configuration = store.context.configuration
        let members = self.members
        // Flush once while writes still flow, so the flush under the hold only has the writes of the
        // last moments to make durable: the hold stays short however much was dirty.
        do {
            if flushingFirst { try await Self.flush(members) }
            // Writes answered before the set began are in it, even one that left its gate to free
            // diff space: wait for them to land (the gates would not).
            for volume in members { try await volume.heldWrites.waitCancellably(for: nil) }
            try Task.checkCancellation()
        } catch {
            state.withLock { $0.phase = .finished }
            releaseHold(gatesHeld: false)
            throw error is CancellationError ? error : EngineError.wrap(error)
        }
        // Gates are taken in volume number order, whatever the caller's order, so two holders never
        // wait for each other.
        let gateOrder = members.sorted { $0.id < $1.id }
        state.withLock { $0.holdStarted = .now }
        let acquisition = Task(executorPreference: configuration.taskExecutor) {
            var acquired: [Volume] = []
            do {
                for volume in gateOrder {
                    try await volume.gate.acquireExclusive()
                    acquired.append(volume)
                }
            } catch {
                for volume in acquired { volume.gate.releaseExclusive() }
                throw error
            }
        }
        let clock = configuration.clock
        let limit = holdLimit
        let watchdog = Task(executorPreference: configuration.taskExecutor) { [weak self] in
            do {
                try await clock.sleep(for: limit)
            } catch {
                return
            }
            self?.expire()
        }
        state.withLock { state in
            state.acquisition = acquisition
            state.watchdog = watchdog
        }
        do {
            try await withTaskCancellationHandler {
                try await acquisition.value
            } onCancel: {
                acquisition.cancel()
            }
        } catch {
            let expired = state.withLock { state -> Bool in
                defer { state.phase = .finished }
                return state.phase == .expired
            }
            watchdog.cancel()
            releaseHold(gatesHeld: false)
            if expired { throw expiredError }
            throw error is CancellationError ? error : EngineError.wrap(error)
        }
        let held = state.withLock { state -> Bool in
            guard state.phase == .acquiring else { return false }
            state.phase = .held
            return true
        }
        if !held {
            // The watchdog fired between the last gate and here.
            releaseHold(gatesHeld: true)
            throw expiredError
        }
        // A write answered before its copy was done may have been lost while the gates drained: a
        // set taken now would leave out a write its client was told had happened.
        do {
            for volume in members { try volume.checkWritable() }
        } catch {
            state.withLock { $0.phase = .finished }
            watchdog.cancel()
            releaseHold(gatesHeld: true)
            throw error
        }
    }

    /// Makes the members' live data durable, all at once.
    private static func flush(_ members: [Volume]) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for volume in members {
                group.addTask { try await volume.synchronizeLive() }
            }
            try await group.waitForAll()
        }
    }

    private func expire() {
        enum Action {
            case none
            case cancelAcquisition(Task<Void, any Error>?)
            case release
        }
        let action = state.withLock { state -> Action in
            switch state.phase {
            case .acquiring:
                state.phase = .expired
                return .cancelAcquisition(state.acquisition)
            case .held:
                state.phase = .expired
                return .release
            case .committing, .finished, .expired:
                return .none
            }
        }
        switch action {
        case .none:
            return
        case .cancelAcquisition(let task):
            task?.cancel()
        case .release:
            releaseHold(gatesHeld: true)
        }
        store.context.logger.warning(
            "a prepared snapshot set held writes past its limit and was aborted",
            metadata: ["volumes": "\(volumes.joined(separator: ","))", "limit": "\(holdLimit)"])
    }

    /// Takes the snapshots: one durable record names the set, its GUID, its timestamp and a GUID per
    /// snapshot; then the snapshots join their volumes' chains and writes are released. The set is
    /// kept: returns once its record is durable.
    public func commit() async throws -> SnapshotSetInfo {
        try await take(pending: false)
    }

    /// Takes the snapshots as a *pending* set: returns as soon as they have joined their chains and
    /// writes are released, before anything is durable. The snapshots are readable at once; the set
    /// is kept only by `SnapshotStore.keepSnapshotSet(id:)` (which waits for this record), and the
    /// next open of the store rolls it back (deletes it) if that never happened.
    public func commitPending() async throws -> SnapshotSetInfo {
        try await take(pending: true)
    }

    private func take(pending: Bool) async throws -> SnapshotSetInfo {
        let watchdog = try state.withLock { (state: inout State) throws(EngineError) -> Task<Void, Never>? in
            switch state.phase {
            case .held:
                state.phase = .committing
                return state.watchdog
            case .expired:
                throw expiredError
            case .acquiring, .committing, .finished:
                throw .holdNotActive
            }
        }
        watchdog?.cancel()
        defer {
            let released = state.withLock { state in
                state.phase = .finished
                return state.releasedByCommit
            }
            if !released { releaseHold(gatesHeld: true) }
        }
        let configuration = store.context.configuration
        let setID = requestedID ?? configuration.makeIdentifier()
        let createdAt = SnapshotStore.nanoseconds(configuration.wallClock())
        let sequences = store.nextSequences(members.count)
        let snapshotIDs = members.map { _ in configuration.makeIdentifier() }
        let definition = SetDefinition(
            id: setID, createdAtNanoseconds: createdAt,
            members: members.indices.map {
                SetMember(volume: members[$0].id, snapshotID: snapshotIDs[$0], sequence: sequences[$0])
            }, isPending: pending)
        // Writes may go on as soon as the record has its place in the log: each of them needs a copy
        // for the new snapshot, and that copy's record lands after this one, so no new data reaches a
        // live volume before the set is durable. The same group commit makes the live volumes durable
        // before it writes the record, so the set never depends on live data a crash could undo.
        let joinChainsAndRelease: @Sendable () -> Void = { [self] in
            for (index, volume) in members.enumerated() {
                volume.metadata.withLock { metadata in
                    metadata.addSnapshot(
                        SnapshotState(
                            id: snapshotIDs[index], setID: setID, sequence: sequences[index],
                            createdAtNanoseconds: createdAt, isPending: pending))
                }
            }
            releaseHold(gatesHeld: true)
            state.withLock { $0.releasedByCommit = true }
        }
        do {
            if pending {
                try await appendPending(definition, joinChainsAndRelease: joinChainsAndRelease)
            } else {
                try await store.context.catalog.append(
                    [.setCreated(definition)], syncingFirst: members.map(\.liveSync), whenQueued: joinChainsAndRelease)
            }
        } catch {
            throw EngineError.wrap(error)
        }
        let date = SnapshotStore.date(createdAt)
        let snapshots = members.indices.map {
            SnapshotInfo(
                id: snapshotIDs[$0], setID: setID, volume: members[$0].name, createdAt: date, diffBytes: .zero,
                state: .ready, isPending: pending)
        }
        store.context.logger.debug(
            "took snapshot set",
            metadata: [
                "set.id": "\(setID.guidString)", "volumes": "\(volumes.joined(separator: ","))",
                "pending": "\(pending)",
            ])
        let info = SnapshotSetInfo(id: setID, createdAt: date, snapshots: snapshots)
        store.context.configuration.eventHandler?(.snapshotSetCreated(info))
        return info
    }

    /// Queues a pending set's record and returns once it is queued; the append itself goes on in a
    /// task the store tracks, which `keepSnapshotSet` (and compaction, and close) wait for.
    private func appendPending(_ definition: SetDefinition, joinChainsAndRelease: @escaping @Sendable () -> Void)
        async throws
    {
        let store = self.store
        let live = members.map(\.liveSync)
        let setID = definition.id
        // Tracked before the append can start, so that close and compaction (which wait for tracked
        // appends) can never slip in between its queueing and its tracking.
        let done = store.trackPendingCommit(setID)
        try await withCheckedThrowingContinuation { (queued: CheckedContinuation<Void, any Error>) in
            let answered = Atomic<Bool>(false)
            Task(executorPreference: store.context.configuration.taskExecutor) {
                do {
                    try await store.context.catalog.append(
                        [.setCreated(definition)], syncingFirst: live,
                        whenQueued: {
                            joinChainsAndRelease()
                            answered.store(true, ordering: .releasing)
                            queued.resume()
                        })
                } catch {
                    // Not queued at all (the log had failed): the caller hears it. Queued but not
                    // durable: the log has failed, so keeping the set fails, and the next open
                    // rolls it back.
                    if !answered.load(ordering: .acquiring) { queued.resume(throwing: error) }
                }
                store.pendingCommitFinished(setID, done)
            }
        }
    }

    /// Gives up the set and releases the writes. Does nothing if it was already committed, aborted or
    /// expired.
    public func abort() {
        let (release, watchdog) = state.withLock { state -> (Bool, Task<Void, Never>?) in
            guard state.phase == .held else { return (false, nil) }
            state.phase = .finished
            return (true, state.watchdog)
        }
        watchdog?.cancel()
        if release { releaseHold(gatesHeld: true) }
    }

    /// Whether writes are still held for this set.
    public var isHeld: Bool { state.withLock { $0.phase == .held } }
}
