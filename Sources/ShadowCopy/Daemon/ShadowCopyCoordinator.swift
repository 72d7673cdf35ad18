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

public struct CoordinatorConfiguration: Sendable, Hashable {
    /// How long a writer has to answer each event.
    public var eventTimeout: Duration
    /// The Freeze→Thaw limit of a set that does not choose its own.
    public var freezeWindow: Duration
    /// The largest Freeze→Thaw limit a requester may choose.
    public var freezeWindowMax: Duration
    /// Writers connected at once.
    public var writersMax: Int
    /// Requesters waiting for the set slot at once.
    public var waitingRequestersMax: Int
    /// The name the daemon gives in `hello`.
    public var serverName: String

    public init(
        eventTimeout: Duration = .seconds(30),
        freezeWindow: Duration = .seconds(60),
        freezeWindowMax: Duration = .seconds(3600),
        writersMax: Int = 256,
        waitingRequestersMax: Int = 64,
        serverName: String = "umbra"
    ) {
        self.eventTimeout = eventTimeout
        self.freezeWindow = freezeWindow
        self.freezeWindowMax = freezeWindowMax
        self.writersMax = writersMax
        self.waitingRequestersMax = waitingRequestersMax
        self.serverName = serverName
    }
}

/// One event on its way to a writer; `requestID` is what the writer's answer must echo.
struct WriterEventDelivery: Sendable, Hashable {
    var requestID: Int64
    var event: WriterEvent
    var params: WriterEventParams
}

typealias WriterSink = @Sendable (WriterEventDelivery) -> Void

/// A writer's answer to an event.
enum WriterAnswer: Sendable, Hashable {
    case success(metadata: JSONValue?)
    case veto(WriterFailure, message: String)
}

/// A requester connection, as the server numbers them.
struct RequesterID: Hashable, Sendable {
    var rawValue: UInt64
}

/// What the server needs from a coordinator, whatever its provider and clock.
protocol SetCoordinating: Actor {
    func registerWriter(
        _ hello: HelloParams,
        id: WriterID,
        confirm: (UUID) -> Void,
        sink: @escaping WriterSink
    ) throws -> UUID
    func writerAnswered(_ writer: WriterID, requestID: Int64, answer: WriterAnswer)
    func writerDisconnected(_ writer: WriterID)
    func createSet(_ params: CreateSetParams, requester: RequesterID) async throws -> SnapshotSetResult
    func completeSet(_ id: UUID, requester: RequesterID) async throws -> SnapshotSetResult
    func abortSet(_ id: UUID, requester: RequesterID) async throws
    func requesterDisconnected(_ requester: RequesterID)
    func listWriters() -> WriterList
    func shutdown() async
}

public actor ShadowCopyCoordinator<Provider: SnapshotProvider, C: Clock>: SetCoordinating
where C.Duration == Duration {
    typealias Machine = ShadowCopySetMachine<C.Instant>

    private struct WriterRecord {
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

    private struct ActiveSet {
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
    }

    private enum Slot {
        case free
        /// Handed to a waiting requester that has not started its set yet.
        case reserved
        case running(ActiveSet)
    }

    public nonisolated let serverName: String
    private let provider: Provider
    private let clock: C
    private let configuration: CoordinatorConfiguration
    private let logger: Logger
    private var writers: [WriterID: WriterRecord] = [:]
    private var slot = Slot.free
    private var waiting: [(requester: RequesterID, continuation: CheckedContinuation<Void, any Error>)] = []
    private var writerCountWaiters: [(count: Int, continuation: CheckedContinuation<Void, Never>)] = []
    /// `createSet` calls under way per requester, and the requesters among them whose connection closed.
    private var creating: [RequesterID: Int] = [:]
    private var departed: Set<RequesterID> = []
    private var isShuttingDown = false
    /// Early flushes still running (nobody waits for them, but shutdown lets them end first).
    private var flushes: [UUID: Task<Void, Never>] = [:]

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
            slot = .running(ActiveSet(machine: machine, requester: requester, createWaiter: continuation))
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

    // MARK: - Driving the machine

    private func validate(_ params: CreateSetParams) throws -> Duration {
        guard !params.volumes.isEmpty else {
            throw ShadowCopyError(.invalidParams, "A shadow copy set needs at least one volume.")
        }
        guard Set(params.volumes).count == params.volumes.count else {
            throw ShadowCopyError(.invalidParams, "A volume appears twice in the shadow copy set.")
        }
        guard !isShuttingDown else { throw ShadowCopyError(.shuttingDown, "The daemon is shutting down.") }
        guard let seconds = params.freezeTimeoutSeconds else { return configuration.freezeWindow }
        let secondsMax = Double(configuration.freezeWindowMax.components.seconds)
        // Range-checked before converting: a client's 1e300 must not trap the daemon.
        guard seconds.isFinite, seconds >= 0.001, seconds <= secondsMax else {
            throw ShadowCopyError(
                .invalidParams,
                "The freeze timeout must be more than 0 and at most"
                    + " \(Machine.seconds(configuration.freezeWindowMax)), not \(seconds) s."
            )
        }
        return .milliseconds(Int64((seconds * 1000).rounded()))
    }

    private func acquireSlot(for requester: RequesterID, wait: Bool) async throws {
        if case .free = slot, waiting.isEmpty {
            slot = .reserved
            return
        }
        guard wait else {
            let current = currentSetID.map { " (\($0.guidString))" } ?? ""
            throw ShadowCopyError(
                .busy,
                "Another shadow copy set\(current) is in progress; try again when it finishes, or ask to wait."
            )
        }
        guard waiting.count < configuration.waitingRequestersMax else {
            throw ShadowCopyError(
                .busy,
                "\(configuration.waitingRequestersMax) requesters are already waiting for the set slot, the limit."
            )
        }
        try await withCheckedThrowingContinuation { continuation in
            waiting.append((requester, continuation))
        }
        // The slot was handed over as `.reserved` by `releaseSlot`.
    }

    private func releaseSlot() {
        if waiting.isEmpty {
            slot = .free
        } else {
            slot = .reserved
            waiting.removeFirst().continuation.resume()
        }
    }

    private func update(_ body: (inout ActiveSet) -> Void) {
        guard case .running(var active) = slot else { return }
        body(&active)
        slot = .running(active)
    }

    /// Feeds one input to the machine of set `id` (if it is still the running one) and carries out the
    /// actions it returns.
    private func drive(set id: UUID, _ input: (inout Machine, C.Instant) -> [Machine.Action]) {
        guard case .running(var active) = slot, active.machine.id == id else { return }
        let actions = input(&active.machine, clock.now)
        slot = .running(active)
        syncStatuses()
        // The timer is armed before events go out, so a writer that sees an event knows its deadline runs.
        rearmTimer()
        for action in actions { perform(action, set: id) }
    }

    private func syncStatuses() {
        guard case .running(let active) = slot else { return }
        for participant in active.machine.participants {
            if let status = active.machine.status(of: participant.id) { writers[participant.id]?.status = status }
        }
    }

    private func perform(_ action: Machine.Action, set id: UUID) {
        guard case .running(let active) = slot else { return }
        let machine = active.machine
        switch action {
        case .send(let event, let targets):
            for target in targets { send(event, to: target, machine: machine) }
        case .flushProvider:
            flushes[id] = Task { [provider] in
                try? await provider.flushVolumes(machine.volumes)
                self.flushFinished(set: id)
            }
        case .prepareProvider(let flushingFirst):
            let task = Task { [provider] in
                do {
                    let token = try await provider.prepareSnapshotSet(
                        id: id, volumes: machine.volumes, flushingFirst: flushingFirst)
                    self.prepared(set: id, token: token)
                } catch {
                    self.drive(set: id) { machine, now in
                        machine.providerPrepareFailed(ShadowCopyError.wrapping(error, as: .providerFailed), now: now)
                    }
                }
            }
            update { $0.prepareTask = task }
        case .cancelPrepare:
            active.prepareTask?.cancel()
        case .commitProvider(let keep):
            guard let token = active.token else { preconditionFailure("commit without a hold") }
            Task { [provider] in
                do {
                    let committed = try await provider.commitSnapshotSet(token, keep: keep)
                    self.drive(set: id) { machine, now in machine.providerCommitted(committed, now: now) }
                } catch {
                    self.drive(set: id) { machine, now in
                        machine.providerCommitFailed(ShadowCopyError.wrapping(error, as: .providerFailed), now: now)
                    }
                }
            }
        case .keepSet:
            Task { [provider] in
                do {
                    try await provider.keepSnapshotSet(id: id)
                    self.drive(set: id) { machine, now in machine.providerKept(now: now) }
                } catch {
                    self.drive(set: id) { machine, now in
                        machine.providerKeepFailed(ShadowCopyError.wrapping(error, as: .providerFailed), now: now)
                    }
                }
            }
        case .releaseProvider:
            guard let token = active.token else { preconditionFailure("release without a hold") }
            Task { [provider] in
                await provider.abortSnapshotSet(token)
                self.drive(set: id) { machine, _ in machine.providerReleased() }
            }
        case .deleteSet:
            Task { [provider] in
                var failure: ShadowCopyError?
                do {
                    try await provider.deleteSnapshotSet(id: id)
                } catch {
                    failure = ShadowCopyError.wrapping(error, as: .providerFailed)
                }
                self.drive(set: id) { [failure] machine, _ in machine.setDeleted(error: failure) }
            }
        case .setOpen:
            guard let result = machine.result() else { preconditionFailure("open before commit") }
            update { $0.createWaiter?.resume(returning: result) }
            update { $0.createWaiter = nil }
        case .finish(let outcome):
            finish(active, outcome: outcome)
        }
    }

    private func flushFinished(set id: UUID) {
        flushes[id] = nil
    }

    private func prepared(set id: UUID, token: Provider.HoldToken) {
        update { if $0.machine.id == id { $0.token = token } }
        drive(set: id) { machine, now in machine.providerPrepared(now: now) }
    }

    private func send(_ event: WriterEvent, to writer: WriterID, machine: Machine) {
        guard var record = writers[writer] else { return }
        record.nextRequestID += 1
        let requestID = record.nextRequestID
        // Events of earlier sets that were never answered (a hung writer) are forgotten here.
        record.outstanding = record.outstanding.filter { $0.value.set == machine.id }
        record.outstanding[requestID] = (machine.id, event)
        writers[writer] = record
        // A writer must answer Freeze within the freeze window too, whichever ends first.
        let answerWithin =
            event == .freeze
            ? min(configuration.eventTimeout, machine.configuration.freezeWindow) : configuration.eventTimeout
        let params = WriterEventParams(
            set: machine.id,
            volumes: machine.volumes,
            timeoutMs: Self.milliseconds(answerWithin),
            freezeWindowMs: event == .freeze ? Self.milliseconds(machine.configuration.freezeWindow) : nil,
            snapshots: [.thaw, .postSnapshot, .backupComplete, .abort].contains(event)
                ? machine.committed?.snapshots : nil,
            reason: event == .abort ? machine.failure?.message : nil
        )
        record.sink(WriterEventDelivery(requestID: requestID, event: event, params: params))
    }

    private func finish(_ active: ActiveSet, outcome: Machine.Outcome) {
        active.timer?.cancel()
        defer { for waiter in active.finishWaiters { waiter.resume() } }
        switch outcome {
        case .created:
            let result = active.machine.result()!
            logger.debug("shadow copy set created", metadata: ["shadow.set": "\(result.set.guidString)"])
            active.createWaiter?.resume(returning: result)
            active.completeWaiter?.resume(returning: result)
            active.abortWaiter?.resume()
        case .failed(let error):
            logger.debug(
                "shadow copy set aborted",
                metadata: ["shadow.set": "\(active.machine.id.guidString)", "shadow.error": "\(error.message)"]
            )
            active.createWaiter?.resume(throwing: error)
            active.completeWaiter?.resume(throwing: error)
            active.abortWaiter?.resume()
        }
        releaseSlot()
    }

    private func rearmTimer() {
        guard case .running(let active) = slot else { return }
        let deadline = active.machine.nextDeadline
        guard deadline != active.timerDeadline else { return }
        active.timer?.cancel()
        let id = active.machine.id
        let timer = deadline.map { deadline in
            Task { [clock] in
                do {
                    try await clock.sleep(until: deadline, tolerance: nil)
                } catch {
                    return
                }
                self.timerFired(set: id, deadline: deadline)
            }
        }
        update {
            $0.timer = timer
            $0.timerDeadline = deadline
        }
    }

    private func timerFired(set id: UUID, deadline: C.Instant) {
        guard case .running(let active) = slot, active.machine.id == id, active.timerDeadline == deadline else {
            return
        }
        update {
            $0.timer = nil
            $0.timerDeadline = nil
        }
        drive(set: id) { machine, now in machine.deadlinePassed(now: now) }
    }

    static func milliseconds(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        return seconds * 1000 + attoseconds / 1_000_000_000_000_000
    }
}
