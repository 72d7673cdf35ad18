// The coordinator: the registry of connected writers, the one-set-at-a-time slot, and the driver of
// `ShadowCopySetMachine`.
//
// It owns no sockets. Writers reach it through a `WriterSink` (the server's connection, or a test's
// recorder) and answer through `writerAnswered`; requesters call `createSet` and friends and are
// suspended until the machine says the set is open, created or failed. Provider calls and the one
// deadline timer run in their own tasks and report back into the actor, tagged with the set's GUID so
// that a late answer from a finished set is ignored. Time comes only from the injected clock.

import Foundation
import Logging

public actor ShadowCopyCoordinator<Provider: SnapshotProvider, C: Clock>: SetCoordinating
where C.Duration == Duration {
    typealias Machine = ShadowCopySetMachine<C.Instant>

    struct WriterRecord {
        var hello: HelloParams
        var name: String
        var instance: UUID
        var volumes: [String]
        var sink: WriterSink
        var status = WriterStatus()
        var nextRequestID: Int64 = 0
        /// Events sent and not yet answered, by request id.
        var outstanding: [Int64: (set: UUID, event: WriterEvent)] = [:]

        func cares(about setVolumes: [String]) -> Bool {
            volumes.contains("*") || volumes.contains(where: setVolumes.contains)
        }
    }

    struct ActiveSet {
        var machine: Machine
        var requester: RequesterID
        var token: Provider.HoldToken?
        var createWaiter: CheckedContinuation<SnapshotSetResult, any Error>?
        var completeWaiter: CheckedContinuation<SnapshotSetResult, any Error>?
        var abortWaiter: CheckedContinuation<Void, any Error>?
        var timer: Task<Void, Never>?
        var timerDeadline: C.Instant?
        /// The provider's prepare, cancelled when the set is aborted while it drains writes.
        var prepareTask: Task<Void, Never>?
        /// Callers waiting for the set to be finished, clean-up included (shutdown).
        var finishWaiters: [CheckedContinuation<Void, Never>] = []
        /// When the set began (for its one log line).
        var startedAt: C.Instant
    }

    enum Slot {
        case free
        /// Handed to a waiting requester that has not started its set yet.
        case reserved
        case running(ActiveSet)
    }

    public nonisolated let serverName: String
    let provider: Provider
    let clock: C
    let configuration: CoordinatorConfiguration
    let logger: Logger
    var writers: [WriterID: WriterRecord] = [:]
    var slot = Slot.free
    var waiting: [(requester: RequesterID, continuation: CheckedContinuation<Void, any Error>)] = []
    var writerCountWaiters: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []
    /// `createSet` calls under way per requester, and the requesters among them whose connection closed.
    var creating: [RequesterID: Int] = [:]
    var departed: Set<RequesterID> = []
    var isShuttingDown = false
    /// Early flushes still running (nobody waits for them, but shutdown lets them end first).
    var flushes: [UUID: Task<Void, Never>] = [:]

    public init(
        provider: Provider,
        clock: C,
        configuration: CoordinatorConfiguration = CoordinatorConfiguration(),
        logger: Logger = Logger(label: "umbra.shadow-copy")
    ) {
        self.provider = provider
        self.clock = clock
        self.configuration = configuration
        self.logger = logger
        self.serverName = configuration.serverName
    }

    // MARK: - Writers

    /// Registers a writer connection. `confirm` runs before any event can be sent to the writer, so the
    /// answer to its hello always goes out first.
    func registerWriter(
        _ hello: HelloParams,
        id: WriterID,
        confirm: (UUID) -> Void,
        sink: @escaping WriterSink
    ) throws -> UUID {
        guard let name = hello.name, !name.isEmpty else {
            throw ShadowCopyError(.invalidParams, "A writer's hello must give its name.")
        }
        guard let volumes = hello.volumes, !volumes.isEmpty, !volumes.contains(where: \.isEmpty) else {
            throw ShadowCopyError(
                .invalidParams,
                "A writer's hello must list the volumes it cares about (\"*\" for all of them)."
            )
        }
        guard writers.count < configuration.writersMax else {
            throw ShadowCopyError(
                .invalidArgument,
                "The daemon already has \(configuration.writersMax) writers connected, its limit."
            )
        }
        let instance = hello.instance ?? UUID()
        if let other = writers.values.first(where: { $0.instance == instance }) {
            throw ShadowCopyError(
                .duplicateWriter,
                "Writer '\(other.name)' with instance \(instance.guidString) is already connected."
            )
        }
        writers[id] = WriterRecord(hello: hello, name: name, instance: instance, volumes: volumes, sink: sink)
        confirm(instance)
        logger.debug(
            "writer registered",
            metadata: ["shadow.writer": "\(name)", "shadow.instance": "\(instance.guidString)"]
        )
        let count = writers.count
        let ready = writerCountWaiters.filter { $0.count <= count }
        writerCountWaiters.removeAll { $0.count <= count }
        for waiter in ready { waiter.continuation.resume() }
        return instance
    }

    func writerAnswered(_ writer: WriterID, requestID: Int64, answer: WriterAnswer) {
        guard let sent = writers[writer]?.outstanding.removeValue(forKey: requestID) else {
            logger.debug("answer to no outstanding event ignored", metadata: ["shadow.request": "\(requestID)"])
            return
        }
        guard sent.event != .abort else { return }
        drive(set: sent.set) { machine, now in
            switch answer {
            case .success(let metadata):
                machine.writerSucceeded(writer, event: sent.event, metadata: metadata, now: now)
            case .veto(let failure, let message):
                machine.writerVetoed(writer, event: sent.event, failure: failure, message: message, now: now)
            }
        }
    }

    func writerDisconnected(_ writer: WriterID) {
        guard let record = writers.removeValue(forKey: writer) else { return }
        logger.debug("writer disconnected", metadata: ["shadow.writer": "\(record.name)"])
        if case .running(let active) = slot {
            drive(set: active.machine.id) { machine, now in machine.writerDisconnected(writer, now: now) }
        }
    }

    /// Every connected writer with its state and last failure.
    public func listWriters() -> WriterList {
        WriterList(
            writers: writers.sorted { $0.key < $1.key }.map { _, record in
                WriterInfo(
                    name: record.name,
                    instance: record.instance,
                    volumes: record.volumes,
                    state: record.status.state,
                    failure: record.status.failure,
                    message: record.status.message,
                    metadata: record.status.metadata
                )
            }
        )
    }

    /// Suspends until at least `count` writers are connected.
    public func waitForWriters(count: Int) async {
        if writers.count >= count { return }
        await withCheckedContinuation { continuation in writerCountWaiters.append((count, continuation)) }
    }

    // MARK: - Sets

    func createSet(_ params: CreateSetParams, requester: RequesterID) async throws -> SnapshotSetResult {
        let freezeWindow = try validate(params)
        creating[requester, default: 0] += 1
        defer {
            creating[requester]! -= 1
            if creating[requester] == 0 {
                creating[requester] = nil
                departed.remove(requester)
            }
        }
        do {
            try await provider.validateSnapshotSet(volumes: params.volumes)
        } catch {
            throw ShadowCopyError.wrapping(error, as: .providerFailed)
        }
        try await acquireSlot(for: requester, wait: params.wait)
        // A requester that left while its set was being validated must not get a set nobody will close.
        guard !departed.contains(requester) else {
            releaseSlot()
            throw ShadowCopyError(.connectionClosed, "The requester's connection closed.")
        }
        guard !isShuttingDown else {
            releaseSlot()
            throw ShadowCopyError(.shuttingDown, "The daemon is shutting down.")
        }

        let participants =
            params.writers
            ? writers.filter { $0.value.cares(about: params.volumes) }.sorted { $0.key < $1.key }.map { id, record in
                SetParticipant(id: id, name: record.name, instance: record.instance, volumes: record.volumes)
            } : []
        let machine = Machine(
            id: UUID(),
            volumes: params.volumes,
            participants: participants,
            configuration: .init(
                eventTimeout: configuration.eventTimeout,
                freezeWindow: freezeWindow,
                keepOpen: params.keepOpen
            )
        )
        logger.debug(
            "shadow copy set starting",
            metadata: [
                "shadow.set": "\(machine.id.guidString)", "shadow.volumes": "\(params.volumes)",
                "shadow.writers": "\(participants.map(\.name))",
            ]
        )
        return try await withCheckedThrowingContinuation { continuation in
            slot = .running(
                ActiveSet(machine: machine, requester: requester, createWaiter: continuation, startedAt: clock.now))
            drive(set: machine.id) { machine, now in machine.start(now: now) }
        }
    }

    func completeSet(_ id: UUID, requester: RequesterID) async throws -> SnapshotSetResult {
        guard case .running(let active) = slot, active.machine.id == id, active.requester == requester,
            active.machine.step == .open
        else {
            throw ShadowCopyError(.unknownSet, "This connection has no open shadow copy set \(id.guidString).")
        }
        return try await withCheckedThrowingContinuation { continuation in
            update { $0.completeWaiter = continuation }
            drive(set: id) { machine, now in machine.requesterCompleted(now: now) }
        }
    }

    func abortSet(_ id: UUID, requester: RequesterID) async throws {
        guard case .running(let active) = slot, active.machine.id == id, active.requester == requester,
            active.machine.step == .open
        else {
            throw ShadowCopyError(.unknownSet, "This connection has no open shadow copy set \(id.guidString).")
        }
        try await withCheckedThrowingContinuation { continuation in
            update { $0.abortWaiter = continuation }
            drive(set: id) { machine, now in
                machine.requesterAborted(reason: "The requester aborted the shadow copy set.", now: now)
            }
        }
    }

    func requesterDisconnected(_ requester: RequesterID) {
        if creating[requester] != nil { departed.insert(requester) }
        if let index = waiting.firstIndex(where: { $0.requester == requester }) {
            waiting.remove(at: index).continuation.resume(
                throwing: ShadowCopyError(.connectionClosed, "The requester's connection closed.")
            )
        }
        guard case .running(let active) = slot, active.requester == requester else { return }
        drive(set: active.machine.id) { machine, now in
            machine.requesterAborted(
                reason: "The requester's connection closed, so the shadow copy set was aborted.",
                now: now
            )
        }
    }

    /// Stops for good: turns away everyone waiting or arriving, answers the requester of the set in
    /// progress with `shutting-down` at once, sends its writers Abort, and returns once the set is
    /// rolled back (its hold released or its snapshots deleted). A set already at BackupComplete is
    /// kept and finishes as created, its unanswered writers failed at backup-complete.
    public func shutdown() async {
        isShuttingDown = true
        let error = ShadowCopyError(.shuttingDown, "The daemon is shutting down.")
        for waiter in waiting { waiter.continuation.resume(throwing: error) }
        waiting = []
        if case .running(let active) = slot {
            let id = active.machine.id
            if active.machine.abortsOnShutdown {
                // The requester hears it now; rolling the set back (which may wait for the disk) comes
                // after, and shutdown waits for that below.
                let deleted = active.machine.committed == nil ? "" : " and its snapshots are deleted"
                let aborted = ShadowCopyError(
                    .shuttingDown,
                    "The daemon is shutting down; the shadow copy set \(id.guidString) was aborted\(deleted).",
                    details: ControlErrorDetails(set: id, writers: active.machine.writerInfos()))
                update { active in
                    active.createWaiter?.resume(throwing: aborted)
                    active.completeWaiter?.resume(throwing: aborted)
                    active.createWaiter = nil
                    active.completeWaiter = nil
                }
            }
            drive(set: id) { machine, now in machine.shuttingDown(now: now) }
            if case .running(let still) = slot, still.machine.id == id {
                await withCheckedContinuation { continuation in update { $0.finishWaiters.append(continuation) } }
            }
        }
        for flush in flushes.values { await flush.value }
    }

    /// The set in progress, if any (for tests and status).
    public var currentSetID: UUID? {
        if case .running(let active) = slot { return active.machine.id }
        return nil
    }

    /// How many requesters wait for the set slot.
    public var waitingCount: Int { waiting.count }
}
