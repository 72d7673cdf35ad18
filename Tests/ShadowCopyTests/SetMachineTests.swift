// The set state machine, driven input by input with explicit instants: every transition, veto,
// timeout, disconnect and abort path, without a clock, a task or a socket.

import Foundation
import Testing
import UmbraTestSupport

@testable import ShadowCopy

typealias Machine = ShadowCopySetMachine<ManualClock.Instant>

private func at(_ seconds: Double) -> ManualClock.Instant {
    ManualClock.Instant(offset: .milliseconds(Int64(seconds * 1000)))
}

private let w1 = WriterID(rawValue: 1)
private let w2 = WriterID(rawValue: 2)
private let setID = UUID()

private func makeMachine(writers: [WriterID] = [w1, w2], keepOpen: Bool = false, freezeWindow: Double = 60)
    -> Machine
{
    Machine(
        id: setID,
        volumes: ["db", "logs"],
        participants: writers.map {
            SetParticipant(id: $0, name: "writer\($0.rawValue)", instance: UUID(), volumes: ["db"])
        },
        configuration: .init(
            eventTimeout: .seconds(30),
            freezeWindow: .milliseconds(Int64(freezeWindow * 1000)),
            keepOpen: keepOpen
        )
    )
}

private func committedSet() -> CommittedSnapshotSet {
    let first = UUID()
    let second = UUID()
    return CommittedSnapshotSet(
        id: setID,
        createdAt: Date(timeIntervalSince1970: 1_800_000_000),
        snapshots: [
            CreatedSnapshot(id: first, volume: "db", export: "db@\(first.guidString)"),
            CreatedSnapshot(id: second, volume: "logs", export: "logs@\(second.guidString)"),
        ]
    )
}

/// Answers `event` for every writer in `writers`, returning the actions of the last answer.
@discardableResult
private func answer(_ machine: inout Machine, _ event: WriterEvent, _ writers: [WriterID] = [w1, w2], now: Double = 0)
    -> [Machine.Action]
{
    var actions: [Machine.Action] = []
    for writer in writers {
        actions = machine.writerSucceeded(writer, event: event, metadata: nil, now: at(now))
    }
    return actions
}

/// Runs a fresh machine up to the point where `event` has just been sent.
private func machineWaiting(for event: WriterEvent, keepOpen: Bool = false) -> Machine {
    var machine = makeMachine(keepOpen: keepOpen)
    _ = machine.start(now: at(0))
    let order: [WriterEvent] = [.identify, .prepareForBackup, .prepareForSnapshot, .freeze]
    for step in order {
        if step == event { return machine }
        answer(&machine, step)
    }
    _ = machine.providerPrepared(now: at(0))
    _ = machine.providerCommitted(committedSet(), now: at(0))
    for step: WriterEvent in [.thaw, .postSnapshot] {
        if step == event { return machine }
        answer(&machine, step)
    }
    if keepOpen { _ = machine.requesterCompleted(now: at(0)) }
    _ = machine.providerKept(now: at(0))
    precondition(event == .backupComplete)
    return machine
}

private func failure(of actions: [Machine.Action]) -> ShadowCopyError? {
    for case .finish(.failed(let error)) in actions { return error }
    return nil
}

@Suite struct SetMachineTests {
    /// A set with two writers walks every VSS step in order, and each answer moves the writer's state.
    @Test func fullSetWalksEveryStepInOrder() {
        var machine = makeMachine()
        #expect(machine.start(now: at(0)) == [.send(.identify, to: [w1, w2])])
        #expect(machine.writerSucceeded(w1, event: .identify, metadata: .string("m"), now: at(1)) == [])
        #expect(answer(&machine, .identify, [w2]) == [.send(.prepareForBackup, to: [w1, w2])])
        #expect(answer(&machine, .prepareForBackup) == [.flushProvider, .send(.prepareForSnapshot, to: [w1, w2])])
        #expect(machine.status(of: w1)?.state == .stable)
        #expect(answer(&machine, .prepareForSnapshot) == [.send(.freeze, to: [w1, w2])])
        #expect(machine.status(of: w1)?.state == .waitingForFreeze)
        #expect(answer(&machine, .freeze) == [.prepareProvider(flushingFirst: false)])
        #expect(machine.status(of: w2)?.state == .waitingForThaw)
        #expect(machine.providerPrepared(now: at(1)) == [.commitProvider(keep: false)])
        #expect(machine.providerCommitted(committedSet(), now: at(1)) == [.send(.thaw, to: [w1, w2])])
        #expect(answer(&machine, .thaw) == [.send(.postSnapshot, to: [w1, w2])])
        #expect(machine.status(of: w1)?.state == .waitingForPostSnapshot)
        #expect(answer(&machine, .postSnapshot) == [.keepSet])
        #expect(!machine.kept)
        #expect(machine.providerKept(now: at(2)) == [.send(.backupComplete, to: [w1, w2])])
        #expect(machine.kept)
        #expect(machine.status(of: w1)?.state == .waitingForBackupComplete)
        #expect(answer(&machine, .backupComplete) == [.finish(.created)])
        #expect(machine.status(of: w1)?.state == .stable)
        #expect(machine.status(of: w1)?.metadata == .string("m"))
        let result = machine.result()
        #expect(result?.state == .complete)
        #expect(result?.crashConsistent == false)
        #expect(result?.snapshots.count == 2)
        #expect(machine.nextDeadline == nil)
    }

    /// With no writer taking part the machine goes straight to the provider and says crash-consistent.
    @Test func noWritersGoesStraightToTheProvider() {
        var machine = makeMachine(writers: [])
        #expect(machine.start(now: at(0)) == [.prepareProvider(flushingFirst: true)])
        #expect(machine.providerPrepared(now: at(0)) == [.commitProvider(keep: true)])
        #expect(machine.providerCommitted(committedSet(), now: at(0)) == [.finish(.created)])
        #expect(machine.kept)
        #expect(machine.result()?.crashConsistent == true)
    }

    /// A veto before the provider is called aborts at once: Abort to both writers, the set fails naming
    /// the writer, the step and the failure kind, and the vetoing writer is failed-at that step.
    @Test(
        arguments: [WriterEvent.identify, .prepareForBackup, .prepareForSnapshot, .freeze],
        [WriterFailure.retryable, .nonRetryable, .timeout]
    )
    func vetoBeforeCommitAborts(event: WriterEvent, kind: WriterFailure) throws {
        var machine = machineWaiting(for: event)
        let actions = machine.writerVetoed(w1, event: event, failure: kind, message: "not now", now: at(1))
        #expect(actions.first == .send(.abort, to: [w1, w2]))
        let error = try #require(failure(of: actions))
        #expect(error.code == .writerFailed)
        #expect(error.message.contains("writer1") && error.message.contains("\(event)"))
        #expect(error.details?.failedWriters?.first?.step == event)
        #expect(error.details?.failedWriters?.first?.failure == kind)
        #expect(machine.status(of: w1)?.state == .failed(at: event))
        #expect(machine.status(of: w1)?.failure == kind)
        #expect(machine.status(of: w1)?.message == "not now")
        #expect(machine.status(of: w2)?.state == .stable)
        #expect(machine.isFinished)
    }

    /// A veto at Thaw or PostSnapshot deletes the committed set before the requester hears of it.
    @Test(arguments: [WriterEvent.thaw, .postSnapshot])
    func vetoAfterCommitDeletesTheSet(event: WriterEvent) throws {
        var machine = machineWaiting(for: event)
        let actions = machine.writerVetoed(w2, event: event, failure: .nonRetryable, message: "bad", now: at(1))
        #expect(actions == [.send(.abort, to: [w1, w2]), .deleteSet])
        #expect(!machine.isFinished)
        let finish = machine.setDeleted(error: nil)
        let error = try #require(failure(of: finish))
        #expect(error.code == .writerFailed && error.message.contains("writer2"))
        #expect(machine.status(of: w2)?.state == .failed(at: event))
        #expect(machine.status(of: w1)?.state == .stable)
    }

    /// A writer that does not answer an event in time fails it with a timeout, naming that writer only.
    @Test(arguments: [WriterEvent.identify, .prepareForBackup, .prepareForSnapshot, .freeze, .thaw, .postSnapshot])
    func eventTimeoutFailsTheSilentWriter(event: WriterEvent) throws {
        var machine = machineWaiting(for: event)
        _ = machine.writerSucceeded(w1, event: event, metadata: nil, now: at(1))
        #expect(machine.nextDeadline == at(30))
        #expect(machine.deadlinePassed(now: at(29.999)) == [])
        var actions = machine.deadlinePassed(now: at(30))
        if [.thaw, .postSnapshot].contains(event) {
            #expect(actions == [.send(.abort, to: [w1, w2]), .deleteSet])
            actions = machine.setDeleted(error: nil)
        }
        let error = try #require(failure(of: actions))
        #expect(error.details?.failedWriters?.map(\.writer) == ["writer2"])
        #expect(error.details?.failedWriters?.first?.failure == .timeout)
        #expect(machine.status(of: w2)?.state == .failed(at: event))
        #expect(machine.status(of: w2)?.failure == .timeout)
        #expect(machine.status(of: w1)?.state == .stable)
    }

    /// An answer that arrives after its deadline counts as a timeout, even if the timer has not fired.
    @Test func lateAnswerIsATimeout() throws {
        var machine = machineWaiting(for: .identify)
        _ = machine.writerSucceeded(w1, event: .identify, metadata: nil, now: at(10))
        let actions = machine.writerSucceeded(w2, event: .identify, metadata: nil, now: at(31))
        #expect(failure(of: actions)?.details?.failedWriters?.first?.failure == .timeout)
    }

    /// The freeze window is shorter than the event timeout here, so it decides when Freeze times out.
    @Test func freezeWindowBoundsTheFreezeAnswer() throws {
        var machine = makeMachine(freezeWindow: 5)
        _ = machine.start(now: at(0))
        for event: WriterEvent in [.identify, .prepareForBackup, .prepareForSnapshot] { answer(&machine, event) }
        #expect(machine.nextDeadline == at(5))
        let actions = machine.deadlinePassed(now: at(5))
        let error = try #require(failure(of: actions))
        #expect(error.code == .writerFailed)
        #expect(error.details?.failedWriters?.count == 2)
        #expect(error.message.contains("freeze window"))
    }

    /// The freeze window running out while the provider holds writes releases the hold once prepare
    /// returns, instead of committing.
    @Test func freezeWindowExpiringDuringPrepareReleasesTheHold() throws {
        var machine = makeMachine(freezeWindow: 5)
        _ = machine.start(now: at(0))
        for event: WriterEvent in [.identify, .prepareForBackup, .prepareForSnapshot] { answer(&machine, event) }
        #expect(answer(&machine, .freeze, now: 1) == [.prepareProvider(flushingFirst: false)])
        #expect(machine.nextDeadline == at(5))
        #expect(machine.deadlinePassed(now: at(5)) == [.send(.abort, to: [w1, w2]), .cancelPrepare])
        #expect(machine.providerPrepared(now: at(6)) == [.releaseProvider])
        let error = try #require(failure(of: machine.providerReleased()))
        #expect(error.code == .freezeWindowExpired)
        #expect(machine.status(of: w1)?.state == .stable)

        // A prepare that gives up when cancelled ends the set with the same reason.
        var cancelled = makeMachine(freezeWindow: 5)
        _ = cancelled.start(now: at(0))
        for event: WriterEvent in [.identify, .prepareForBackup, .prepareForSnapshot, .freeze] {
            answer(&cancelled, event)
        }
        _ = cancelled.deadlinePassed(now: at(5))
        let gaveUp = cancelled.providerPrepareFailed(ShadowCopyError(.aborted, "gave up"), now: at(5))
        #expect(failure(of: gaveUp)?.code == .freezeWindowExpired)
    }

    /// A commit that returns after the freeze window is undone: the set is deleted, not kept.
    @Test func commitAfterTheFreezeWindowIsDeleted() throws {
        var machine = makeMachine(freezeWindow: 5)
        _ = machine.start(now: at(0))
        for event: WriterEvent in [.identify, .prepareForBackup, .prepareForSnapshot, .freeze] {
            answer(&machine, event)
        }
        #expect(machine.providerPrepared(now: at(1)) == [.commitProvider(keep: false)])
        #expect(machine.providerCommitted(committedSet(), now: at(7)) == [.send(.abort, to: [w1, w2]), .deleteSet])
        #expect(failure(of: machine.setDeleted(error: nil))?.code == .freezeWindowExpired)
    }

    /// A writer whose connection drops mid-freeze fails the set as retryable; Abort goes only to the
    /// writers still connected.
    @Test func disconnectDuringFreezeAborts() throws {
        var machine = machineWaiting(for: .freeze)
        let actions = machine.writerDisconnected(w1, now: at(1))
        #expect(actions.first == .send(.abort, to: [w2]))
        let error = try #require(failure(of: actions))
        #expect(error.details?.failedWriters?.first?.step == .freeze)
        #expect(error.details?.failedWriters?.first?.failure == .retryable)
        #expect(machine.status(of: w1)?.state == .failedAtFreeze)
    }

    /// A writer dropping while the provider holds writes fails the set at freeze and the hold is released.
    @Test func disconnectWhileProviderPreparesReleasesTheHold() throws {
        var machine = machineWaiting(for: .freeze)
        answer(&machine, .freeze)
        #expect(machine.writerDisconnected(w2, now: at(1)) == [.send(.abort, to: [w1]), .cancelPrepare])
        #expect(machine.providerPrepared(now: at(1)) == [.releaseProvider])
        let error = try #require(failure(of: machine.providerReleased()))
        #expect(error.code == .writerFailed && error.message.contains("writer2"))
    }

    /// A writer dropping while the provider commits gets the fresh set deleted.
    @Test func disconnectWhileProviderCommitsDeletesTheSet() throws {
        var machine = machineWaiting(for: .freeze)
        answer(&machine, .freeze)
        _ = machine.providerPrepared(now: at(1))
        #expect(machine.writerDisconnected(w1, now: at(1)) == [.send(.abort, to: [w2])])
        #expect(machine.providerCommitted(committedSet(), now: at(1)) == [.deleteSet])
        #expect(failure(of: machine.setDeleted(error: nil))?.code == .writerFailed)
    }

    /// A provider that cannot prepare aborts the frozen writers and reports provider-failed.
    @Test func providerPrepareFailureAbortsTheWriters() throws {
        var machine = machineWaiting(for: .freeze)
        answer(&machine, .freeze)
        let actions = machine.providerPrepareFailed(ShadowCopyError(.internal, "disk on fire"), now: at(1))
        #expect(actions.first == .send(.abort, to: [w1, w2]))
        let error = try #require(failure(of: actions))
        #expect(error.code == .providerFailed && error.message.contains("disk on fire"))
    }

    /// A provider error with its own code (an unknown volume) reaches the requester with that code.
    @Test func providerErrorCodeIsKept() throws {
        var machine = makeMachine(writers: [])
        _ = machine.start(now: at(0))
        let actions = machine.providerPrepareFailed(ShadowCopyError(.notFound, "No volume 'x'."), now: at(0))
        #expect(failure(of: actions)?.code == .notFound)
    }

    /// A commit that throws (the hold limit passed) still releases the hold, then fails the set.
    @Test func providerCommitFailureReleasesTheHold() throws {
        var machine = machineWaiting(for: .freeze)
        answer(&machine, .freeze)
        _ = machine.providerPrepared(now: at(1))
        let actions = machine.providerCommitFailed(ShadowCopyError(.internal, "hold limit passed"), now: at(12))
        #expect(actions == [.send(.abort, to: [w1, w2]), .releaseProvider])
        #expect(failure(of: machine.providerReleased())?.code == .providerFailed)
    }

    /// A kept-open set stops after PostSnapshot; BackupComplete goes out only when the requester says so.
    @Test func keptOpenSetWaitsForTheRequester() {
        var machine = machineWaiting(for: .postSnapshot, keepOpen: true)
        #expect(answer(&machine, .postSnapshot) == [.setOpen])
        #expect(machine.result()?.state == .open)
        #expect(machine.nextDeadline == nil)
        #expect(machine.requesterCompleted(now: at(3600)) == [.keepSet])
        #expect(machine.providerKept(now: at(3600)) == [.send(.backupComplete, to: [w1, w2])])
        #expect(answer(&machine, .backupComplete, now: 3601) == [.finish(.created)])
        #expect(machine.result()?.state == .complete)
    }

    /// A requester aborting an open set deletes it and tells the writers.
    @Test func requesterAbortOfAnOpenSetDeletesIt() throws {
        var machine = machineWaiting(for: .postSnapshot, keepOpen: true)
        answer(&machine, .postSnapshot)
        let actions = machine.requesterAborted(reason: "copy failed", now: at(10))
        #expect(actions == [.send(.abort, to: [w1, w2]), .deleteSet])
        #expect(failure(of: machine.setDeleted(error: nil))?.code == .aborted)
        #expect(machine.status(of: w1)?.state == .stable)
    }

    /// A requester going away mid-freeze aborts the set like any other failure.
    @Test func requesterAbortMidSetAborts() {
        var machine = machineWaiting(for: .freeze)
        let actions = machine.requesterAborted(reason: "gone", now: at(1))
        #expect(actions.first == .send(.abort, to: [w1, w2]))
        #expect(failure(of: actions)?.code == .aborted)
    }

    /// A veto, a timeout or a disconnect at BackupComplete marks the writer but keeps the set.
    @Test func backupCompleteFailuresKeepTheSet() {
        var machine = machineWaiting(for: .backupComplete)
        #expect(machine.writerVetoed(w1, event: .backupComplete, failure: .retryable, message: "x", now: at(1)) == [])
        #expect(machine.deadlinePassed(now: at(30)) == [.finish(.created)])
        #expect(machine.status(of: w1)?.state == .failedAtBackupComplete)
        #expect(machine.status(of: w2)?.state == .failedAtBackupComplete)
        #expect(machine.status(of: w2)?.failure == .timeout)
        #expect(machine.result()?.writers.map(\.state) == [.failedAtBackupComplete, .failedAtBackupComplete])

        var other = machineWaiting(for: .backupComplete)
        answer(&other, .backupComplete, [w1])
        #expect(other.writerDisconnected(w2, now: at(1)) == [.finish(.created)])
    }

    /// A writer dropping while its set is open misses BackupComplete but does not undo the set.
    @Test func disconnectWhileOpenSkipsThatWriter() {
        var machine = machineWaiting(for: .postSnapshot, keepOpen: true)
        answer(&machine, .postSnapshot)
        #expect(machine.writerDisconnected(w1, now: at(5)) == [])
        #expect(machine.requesterCompleted(now: at(6)) == [.keepSet])
        #expect(machine.providerKept(now: at(6)) == [.send(.backupComplete, to: [w2])])
        #expect(machine.status(of: w1)?.state == .failedAtBackupComplete)
    }

    /// Answers to another event, from an unknown writer or repeated, change nothing.
    @Test func staleAnswersAreIgnored() {
        var machine = machineWaiting(for: .prepareForBackup)
        #expect(machine.writerSucceeded(w1, event: .identify, metadata: nil, now: at(1)) == [])
        #expect(
            machine.writerSucceeded(WriterID(rawValue: 9), event: .prepareForBackup, metadata: nil, now: at(1)) == [])
        #expect(machine.writerSucceeded(w1, event: .prepareForBackup, metadata: nil, now: at(1)) == [])
        #expect(machine.writerSucceeded(w1, event: .prepareForBackup, metadata: nil, now: at(1)) == [])
        #expect(machine.writerVetoed(w1, event: .prepareForBackup, failure: .retryable, message: "", now: at(1)) == [])
        #expect(machine.pendingWriters == [w2])
    }

    /// After an abort, later inputs (late answers, timers, disconnects) do nothing.
    @Test func finishedSetIgnoresEverything() {
        var machine = machineWaiting(for: .identify)
        _ = machine.writerVetoed(w1, event: .identify, failure: .retryable, message: "", now: at(1))
        #expect(machine.writerSucceeded(w2, event: .identify, metadata: nil, now: at(2)) == [])
        #expect(machine.deadlinePassed(now: at(100)) == [])
        #expect(machine.writerDisconnected(w2, now: at(3)) == [])
        #expect(machine.providerPrepared(now: at(3)) == [])
        #expect(machine.requesterAborted(reason: "", now: at(3)) == [])
    }

    /// A keep that fails (the disk) aborts the writers and deletes the set: BackupComplete never goes
    /// out for a set a crash could still take back.
    @Test func keepFailureDeletesTheSet() throws {
        var machine = machineWaiting(for: .postSnapshot)
        #expect(answer(&machine, .postSnapshot) == [.keepSet])
        let actions = machine.providerKeepFailed(ShadowCopyError(.internal, "fdatasync failed"), now: at(2))
        #expect(actions == [.send(.abort, to: [w1, w2]), .deleteSet])
        let error = try #require(failure(of: machine.setDeleted(error: nil)))
        #expect(error.code == .providerFailed && error.message.contains("fdatasync failed"))
    }

    /// Once the set is being kept nothing aborts it (a keep made durable just before a crash could
    /// not be undone): a requester that goes away then still gets a complete set, and a shutdown lets
    /// the set finish as created as soon as the keep returns.
    @Test func nothingAbortsASetBeingKept() throws {
        var machine = machineWaiting(for: .postSnapshot, keepOpen: true)
        answer(&machine, .postSnapshot)
        #expect(machine.requesterCompleted(now: at(3)) == [.keepSet])
        #expect(machine.requesterAborted(reason: "gone", now: at(3)) == [])
        #expect(!machine.abortsOnShutdown)
        #expect(machine.shuttingDown(now: at(3)) == [])
        let actions = machine.providerKept(now: at(4))
        #expect(actions == [.send(.backupComplete, to: [w1, w2]), .finish(.created)])
        #expect(machine.result()?.writers.map(\.state) == [.failedAtBackupComplete, .failedAtBackupComplete])

        // A set without writers is kept by its commit: an abort while it commits changes nothing.
        var plain = makeMachine(writers: [])
        _ = plain.start(now: at(0))
        #expect(plain.providerPrepared(now: at(0)) == [.commitProvider(keep: true)])
        #expect(plain.requesterAborted(reason: "gone", now: at(0)) == [])
        #expect(plain.providerCommitted(committedSet(), now: at(0)) == [.finish(.created)])
    }

    /// A set without writers has no freeze window (nobody is frozen): a slow commit is not aborted.
    @Test func noFreezeWindowWithoutWriters() {
        var machine = makeMachine(writers: [], freezeWindow: 1)
        _ = machine.start(now: at(0))
        #expect(machine.nextDeadline == nil)
        _ = machine.providerPrepared(now: at(0))
        #expect(machine.providerCommitted(committedSet(), now: at(120)) == [.finish(.created)])
    }

    /// Shutting down aborts a set anywhere before BackupComplete with `shutting-down` (deleting what was
    /// committed), and lets a set at BackupComplete finish as created, its silent writers failed there.
    @Test(arguments: [WriterEvent.identify, .freeze, .thaw, .postSnapshot])
    func shutdownAbortsUnfinishedSets(event: WriterEvent) throws {
        var machine = machineWaiting(for: event)
        var actions = machine.shuttingDown(now: at(1))
        #expect(actions.first == .send(.abort, to: [w1, w2]))
        if [.thaw, .postSnapshot].contains(event) {
            #expect(actions.last == .deleteSet)
            actions = machine.setDeleted(error: nil)
        }
        #expect(failure(of: actions)?.code == .shuttingDown)
    }

    @Test func shutdownAtBackupCompleteKeepsTheSet() {
        var machine = machineWaiting(for: .backupComplete)
        answer(&machine, .backupComplete, [w1])
        #expect(machine.shuttingDown(now: at(1)) == [.finish(.created)])
        #expect(machine.status(of: w1)?.state == .stable)
        #expect(machine.status(of: w2)?.state == .failedAtBackupComplete)
        #expect(machine.result()?.state == .complete)
    }

    /// A set whose snapshots cannot be deleted says so in its error, after the original reason.
    @Test func failedDeleteIsReported() throws {
        var machine = machineWaiting(for: .thaw)
        _ = machine.writerVetoed(w1, event: .thaw, failure: .retryable, message: "x", now: at(1))
        let error = try #require(failure(of: machine.setDeleted(error: ShadowCopyError(.internal, "io error"))))
        #expect(error.message.contains("writer1") && error.message.contains("io error"))
    }
}
