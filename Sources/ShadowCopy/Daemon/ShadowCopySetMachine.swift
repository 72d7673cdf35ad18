// The life of one shadow copy set, as a value.
//
// The coordinator feeds it what happened (a writer answered, a connection dropped, a deadline passed,
// the provider returned) and carries out the actions it returns (send an event, call the provider,
// answer the requester). It holds no clock and does no I/O: time comes in as `now`, and the driver asks
// `nextDeadline` when to call `deadlinePassed`. Every input re-checks the deadlines against `now`, so an
// answer that races a timer is judged the same way whichever arrives first.
//
// Steps: identify → prepare-for-backup → prepare-for-snapshot (the provider flushes meanwhile) →
// freeze → provider prepare → provider commit → thaw → post-snapshot → (open, for a requester that
// copies first) → provider keep → backup-complete. The commit takes the set *pending*: the provider
// rolls it back after a crash unless the keep made it durable, so a set is kept exactly from
// backup-complete on (a set without writers that nobody keeps open is kept by its commit). Any failure
// before backup-complete aborts: every writer still connected gets Abort at once, then a held
// provider is released (a prepare still draining is cancelled), a committed set is deleted, and only
// then does the requester hear why. A failure at backup-complete is recorded on the writer but the set
// stands: the backup is already done. Nothing between Freeze and Thaw or Abort waits for a disk
// flush that the machine could avoid: the commit answers once writes are released.

import Foundation

struct ShadowCopySetMachine<Instant: InstantProtocol>: Sendable where Instant.Duration == Duration {
    let id: UUID
    let volumes: [String]
    let configuration: Configuration
    let participants: [SetParticipant]

    private(set) var step: Step = .notStarted
    private(set) var statuses: [WriterID: WriterStatus]
    private(set) var committed: CommittedSnapshotSet?
    /// The provider keeps the set: a crash no longer rolls it back.
    private(set) var kept = false
    /// The daemon began shutting down while the set was being kept: it finishes as soon as it is.
    private var shutdownRequested = false
    /// Set once the set is being aborted; the requester hears this when the provider is clean.
    private(set) var failure: ShadowCopyError?
    private var pending: Set<WriterID> = []
    private var disconnected: Set<WriterID> = []
    private var eventDeadline: Instant?
    private var freezeDeadline: Instant?

    init(id: UUID, volumes: [String], participants: [SetParticipant], configuration: Configuration) {
        assert(Set(participants.map(\.id)).count == participants.count, "participants are distinct")
        self.id = id
        self.volumes = volumes
        self.participants = participants
        self.configuration = configuration
        self.statuses = Dictionary(uniqueKeysWithValues: participants.map { ($0.id, WriterStatus()) })
    }

    /// With no writer taking part the snapshots are only crash-consistent.
    var isCrashConsistent: Bool { participants.isEmpty }

    /// Nothing can fail between the commit and BackupComplete of a set without writers that nobody
    /// keeps open, so its commit keeps it at once.
    private var keepsAtCommit: Bool { participants.isEmpty && !configuration.keepOpen }

    /// The provider is making the set durable for good, or has: from here on nothing aborts it (an
    /// abort could not undo a keep that a crash interrupts after it became durable).
    var isBeingKept: Bool {
        switch step {
        case .keeping, .event(.backupComplete): true
        case .committing: keepsAtCommit
        default: false
        }
    }

    /// Whether `shuttingDown` aborts the set (rather than letting it finish or leaving it to the
    /// clean-up already under way).
    var abortsOnShutdown: Bool {
        switch step {
        case .notStarted, .releasing, .deleting, .finished: false
        default: !isBeingKept
        }
    }

    /// When the driver must call `deadlinePassed` next, if ever.
    var nextDeadline: Instant? {
        switch (eventDeadline, freezeDeadline) {
        case (let event?, let freeze?): min(event, freeze)
        case (let event?, nil): event
        case (nil, let freeze?): freeze
        case (nil, nil): nil
        }
    }

    var isFinished: Bool { step == .finished }

    /// The writers that still owe an answer to the current event.
    var pendingWriters: Set<WriterID> { pending }

    // MARK: - Inputs

    mutating func start(now: Instant) -> [Action] {
        precondition(step == .notStarted, "a set starts once")
        for index in statuses.keys { statuses[index]!.reset() }
        return begin(.identify, now: now)
    }

    mutating func writerSucceeded(_ writer: WriterID, event: WriterEvent, metadata: JSONValue?, now: Instant)
        -> [Action]
    {
        if let actions = checkDeadlines(now: now) { return actions }
        guard step == .event(event), pending.remove(writer) != nil else { return [] }
        statuses[writer]!.succeeded(event, metadata: metadata)
        return pending.isEmpty ? advance(after: event, now: now) : []
    }

    mutating func writerVetoed(
        _ writer: WriterID,
        event: WriterEvent,
        failure: WriterFailure,
        message: String,
        now: Instant
    ) -> [Action] {
        if let actions = checkDeadlines(now: now) { return actions }
        guard step == .event(event), pending.contains(writer) else { return [] }
        return fail([writer], at: event, failure, message: message, now: now)
    }

    mutating func writerDisconnected(_ writer: WriterID, now: Instant) -> [Action] {
        guard statuses[writer] != nil, disconnected.insert(writer).inserted else { return [] }
        if let actions = checkDeadlines(now: now) { return actions }
        let message = "its connection closed"
        switch step {
        case .event(.backupComplete), .open, .keeping:
            // The snapshots are taken (and about to be kept); the writer just misses BackupComplete.
            pending.remove(writer)
            statuses[writer]!.failed(at: .backupComplete, .retryable, message: message)
            return step == .event(.backupComplete) && pending.isEmpty ? advance(after: .backupComplete, now: now) : []
        case .event(let event):
            return fail([writer], at: event, .retryable, message: message, now: now)
        case .preparing, .committing:
            return fail([writer], at: .freeze, .retryable, message: message, now: now)
        case .notStarted, .releasing, .deleting, .finished:
            return []
        }
    }

    mutating func deadlinePassed(now: Instant) -> [Action] {
        checkDeadlines(now: now) ?? []
    }

    mutating func providerPrepared(now: Instant) -> [Action] {
        guard step == .preparing else { return [] }
        let actions = checkDeadlines(now: now) ?? []
        if failure != nil {
            step = .releasing
            return actions + [.releaseProvider]
        }
        step = .committing
        return [.commitProvider(keep: keepsAtCommit)]
    }

    mutating func providerPrepareFailed(_ error: ShadowCopyError, now: Instant) -> [Action] {
        guard step == .preparing else { return [] }
        let actions = failure == nil ? abort(with: providerError(error, doing: "prepare"), now: now) : []
        return actions + finish(.failed(failure!))
    }

    mutating func providerCommitted(_ set: CommittedSnapshotSet, now: Instant) -> [Action] {
        guard step == .committing else { return [] }
        committed = set
        kept = keepsAtCommit
        let actions = checkDeadlines(now: now) ?? []
        if failure != nil {
            step = .deleting
            return actions + [.deleteSet]
        }
        freezeDeadline = nil
        return begin(.thaw, now: now)
    }

    mutating func providerKept(now: Instant) -> [Action] {
        guard step == .keeping else { return [] }
        if failure != nil {
            step = .deleting
            return [.deleteSet]
        }
        kept = true
        let actions = begin(.backupComplete, now: now)
        return shutdownRequested ? actions + shuttingDown(now: now) : actions
    }

    mutating func providerKeepFailed(_ error: ShadowCopyError, now: Instant) -> [Action] {
        guard step == .keeping else { return [] }
        let actions = failure == nil ? abort(with: providerError(error, doing: "keep"), now: now) : []
        step = .deleting
        return actions + [.deleteSet]
    }

    mutating func providerCommitFailed(_ error: ShadowCopyError, now: Instant) -> [Action] {
        guard step == .committing else { return [] }
        let actions = failure == nil ? abort(with: providerError(error, doing: "commit"), now: now) : []
        step = .releasing
        return actions + [.releaseProvider]
    }

    mutating func providerReleased() -> [Action] {
        guard step == .releasing, let failure else { return [] }
        return finish(.failed(failure))
    }

    mutating func setDeleted(error: ShadowCopyError?) -> [Action] {
        guard step == .deleting, var failure else { return [] }
        if let error {
            failure.message += " Deleting its snapshots failed too: \(error.message)"
        }
        return finish(.failed(failure))
    }

    /// The requester of a kept-open set says the backup is done: the set is kept, then BackupComplete
    /// goes out.
    mutating func requesterCompleted(now: Instant) -> [Action] {
        guard step == .open else { return [] }
        return keepThenComplete(now: now)
    }

    /// The requester aborts the set (or went away). Ignored once the set is being kept.
    mutating func requesterAborted(reason: String, now: Instant) -> [Action] {
        guard !isBeingKept else { return [] }
        switch step {
        case .notStarted, .event(.backupComplete), .keeping, .releasing, .deleting, .finished:
            return []
        case .event, .preparing, .committing, .open:
            return abort(with: ShadowCopyError(.aborted, reason, details: details()), now: now)
        }
    }

    /// The daemon is stopping. A set whose snapshots are kept (BackupComplete under way) finishes
    /// as created, its unanswered writers failed at backup-complete; a set being kept finishes so as
    /// soon as the keep returns; any other set is aborted and rolled back.
    mutating func shuttingDown(now: Instant) -> [Action] {
        switch step {
        case .notStarted, .releasing, .deleting, .finished:
            return []
        case .event(.backupComplete):
            for writer in pending.sorted() {
                statuses[writer]!.failed(
                    at: .backupComplete, .retryable, message: "the daemon shut down before it answered")
            }
            return finish(.created)
        case _ where isBeingKept:
            shutdownRequested = true
            return []
        case .event, .preparing, .committing, .open, .keeping:
            let error = ShadowCopyError(
                .shuttingDown, "The daemon is shutting down; the shadow copy set was aborted.", details: details())
            return abort(with: error, now: now)
        }
    }

    // MARK: - Results

    func writerInfos() -> [WriterInfo] {
        participants.map { participant in
            let status = statuses[participant.id]!
            return WriterInfo(
                name: participant.name,
                instance: participant.instance,
                volumes: participant.volumes,
                state: status.state,
                failure: status.failure,
                message: status.message,
                metadata: status.metadata
            )
        }
    }

    func status(of writer: WriterID) -> WriterStatus? { statuses[writer] }

    /// The result to give the requester; nil until the provider committed.
    func result() -> SnapshotSetResult? {
        guard let committed else { return nil }
        return SnapshotSetResult(
            set: committed.id,
            createdAt: committed.createdAt,
            snapshots: committed.snapshots,
            writers: writerInfos(),
            crashConsistent: isCrashConsistent,
            state: step == .finished ? .complete : .open
        )
    }

    // MARK: - Transitions

    /// Sends `event` to every writer still in the set, or moves straight on when there is none.
    private mutating func begin(_ event: WriterEvent, now: Instant) -> [Action] {
        let targets = participants.map(\.id).filter { !disconnected.contains($0) && !statuses[$0]!.state.isFailed }
        step = .event(event)
        // The window protects frozen writers; with none, the engine's own hold limit is the bound.
        if event == .freeze && !targets.isEmpty { freezeDeadline = now.advanced(by: configuration.freezeWindow) }
        guard !targets.isEmpty else {
            eventDeadline = nil
            return advance(after: event, now: now)
        }
        pending = Set(targets)
        eventDeadline = now.advanced(by: configuration.eventTimeout)
        return [.send(event, to: targets)]
    }

    private mutating func advance(after event: WriterEvent, now: Instant) -> [Action] {
        eventDeadline = nil
        switch event {
        case .identify: return begin(.prepareForBackup, now: now)
        case .prepareForBackup:
            // Writers that prepare give the provider time to flush, so the hold after Freeze need not.
            let flush: [Action] = participants.isEmpty ? [] : [.flushProvider]
            return flush + begin(.prepareForSnapshot, now: now)
        case .prepareForSnapshot: return begin(.freeze, now: now)
        case .freeze:
            step = .preparing
            return [.prepareProvider(flushingFirst: participants.isEmpty)]
        case .thaw: return begin(.postSnapshot, now: now)
        case .postSnapshot:
            if configuration.keepOpen {
                step = .open
                return [.setOpen]
            }
            return keepThenComplete(now: now)
        case .backupComplete: return finish(.created)
        case .abort: preconditionFailure("abort is never a step")
        }
    }

    /// Keeps the set (unless its commit did), then sends BackupComplete.
    private mutating func keepThenComplete(now: Instant) -> [Action] {
        if kept { return begin(.backupComplete, now: now) }
        step = .keeping
        return [.keepSet]
    }

    /// The deadline checks every input starts with; nil when none has passed.
    private mutating func checkDeadlines(now: Instant) -> [Action]? {
        if let freezeDeadline, now >= freezeDeadline {
            let window = configuration.freezeWindow
            switch step {
            case .event(.freeze):
                return fail(
                    pending.sorted(),
                    at: .freeze,
                    .timeout,
                    message: "it did not answer freeze within the \(Self.seconds(window)) freeze window",
                    now: now
                )
            case .preparing, .committing:
                let error = ShadowCopyError(
                    .freezeWindowExpired,
                    "The \(Self.seconds(window)) freeze window ran out before the snapshots were taken;"
                        + " the shadow copy set was aborted.",
                    details: details()
                )
                return abort(with: error, now: now)
            default:
                break
            }
        }
        if let eventDeadline, now >= eventDeadline, case .event(let event) = step {
            let message = "it did not answer \(event) within \(Self.seconds(configuration.eventTimeout))"
            if event == .backupComplete {
                for writer in pending { statuses[writer]!.failed(at: event, .timeout, message: message) }
                pending = []
                return advance(after: event, now: now)
            }
            return fail(pending.sorted(), at: event, .timeout, message: message, now: now)
        }
        return nil
    }

    /// Writers failed at `event`. Before BackupComplete this aborts the set.
    private mutating func fail(
        _ writers: [WriterID],
        at event: WriterEvent,
        _ kind: WriterFailure,
        message: String,
        now: Instant
    ) -> [Action] {
        assert(!writers.isEmpty)
        for writer in writers { statuses[writer]!.failed(at: event, kind, message: message) }
        if event == .backupComplete {
            for writer in writers { pending.remove(writer) }
            return pending.isEmpty ? advance(after: event, now: now) : []
        }
        let failed = writers.map { writer -> WriterFailureDetails in
            let participant = participants.first { $0.id == writer }!
            return WriterFailureDetails(
                writer: participant.name,
                instance: participant.instance,
                step: event,
                failure: kind,
                message: message
            )
        }
        let first = failed[0]
        let others = failed.count > 1 ? " (and \(failed.count - 1) more)" : ""
        let error = ShadowCopyError(
            .writerFailed,
            "Writer '\(first.writer)'\(others) failed at \(event) (\(kind)): \(message); the shadow copy set was"
                + " aborted.",
            details: details(failedWriters: failed)
        )
        return abort(with: error, now: now)
    }

    /// Aborts the set: Abort to every writer still connected, then whatever the provider needs.
    private mutating func abort(with error: ShadowCopyError, now: Instant) -> [Action] {
        guard failure == nil, step != .finished else { return [] }
        var error = error
        for index in statuses.keys { statuses[index]!.aborted() }
        error.details = details(failedWriters: error.details?.failedWriters)
        failure = error
        pending = []
        eventDeadline = nil
        freezeDeadline = nil
        let targets = participants.map(\.id).filter { !disconnected.contains($0) }
        let notify: [Action] = targets.isEmpty ? [] : [.send(.abort, to: targets)]
        switch step {
        case .preparing:
            // Writes may be held while the prepare drains: stop it; its answer leads to release.
            return notify + [.cancelPrepare]
        case .committing, .keeping:
            // The provider call in flight decides: its answer leads to release or delete.
            return notify
        case .open, .event(.thaw), .event(.postSnapshot):
            step = .deleting
            return notify + [.deleteSet]
        default:
            return notify + finish(.failed(error))
        }
    }

    private mutating func finish(_ outcome: Outcome) -> [Action] {
        step = .finished
        pending = []
        eventDeadline = nil
        freezeDeadline = nil
        return [.finish(outcome)]
    }

    private func providerError(_ error: ShadowCopyError, doing work: String) -> ShadowCopyError {
        if error.code != .internal && error.code != .providerFailed {
            return ShadowCopyError(error.code, error.message, details: details())
        }
        return ShadowCopyError(
            .providerFailed,
            "The snapshot provider could not \(work) the shadow copy set: \(error.message)",
            details: details()
        )
    }

    private func details(failedWriters: [WriterFailureDetails]? = nil) -> ControlErrorDetails {
        ControlErrorDetails(set: id, failedWriters: failedWriters, writers: writerInfos())
    }

    static func seconds(_ duration: Duration) -> String {
        let (seconds, attoseconds) = duration.components
        if attoseconds == 0 { return "\(seconds) s" }
        return "\(Double(seconds) + Double(attoseconds) / 1e18) s"
    }
}
