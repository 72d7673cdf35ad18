// The coordinator with a manual clock, a recording provider and writers wired straight in: timeouts
// happen only when a test advances the clock, after the writer has provably received the event it
// hangs on.

import Foundation
import Testing
import UmbraTestSupport

@testable import ShadowCopy

typealias TestCoordinator = ShadowCopyCoordinator<RecordingProvider, ManualClock>

private let requester = RequesterID(rawValue: 100)
private let allEvents: [WriterEvent] = [
    .identify, .prepareForBackup, .prepareForSnapshot, .freeze, .thaw, .postSnapshot, .backupComplete,
]

private struct Fixture {
    let clock = ManualClock()
    let provider = RecordingProvider()
    let coordinator: TestCoordinator

    init(eventTimeout: Duration = .seconds(30), freezeWindow: Duration = .seconds(60)) {
        coordinator = TestCoordinator(
            provider: provider,
            clock: clock,
            configuration: CoordinatorConfiguration(eventTimeout: eventTimeout, freezeWindow: freezeWindow)
        )
    }

    func writer(
        _ id: UInt64, _ name: String, policy: @escaping @Sendable (WriterEvent) -> FakeWriter.Reply = { _ in .succeed }
    )
        -> FakeWriter
    {
        FakeWriter(id, name: name, coordinator: coordinator, policy: policy)
    }

    func create(_ params: CreateSetParams = CreateSetParams(volumes: ["db", "logs"]), as who: RequesterID = requester)
        -> Task<SnapshotSetResult, any Error>
    {
        Task { [coordinator] in try await coordinator.createSet(params, requester: who) }
    }
}

private func expectError(_ task: Task<SnapshotSetResult, any Error>) async throws -> ShadowCopyError {
    do {
        let result = try await task.value
        Issue.record("expected an error, got \(result)")
        throw PlainError(description: "no error")
    } catch let error as ShadowCopyError {
        return error
    }
}

@Suite struct CoordinatorTests {
    /// Two writers see every event in VSS order; the result carries the snapshots, their outcomes and
    /// their Identify metadata, and the provider was called validate → prepare → commit.
    @Test func setWithTwoWritersRunsEveryEvent() async throws {
        let fixture = Fixture()
        let first = fixture.writer(1, "pg")
        let second = fixture.writer(2, "redis")
        try await first.register()
        try await second.register(volumes: ["logs"])
        let result = try await fixture.create().value
        #expect(first.events == allEvents)
        #expect(second.events == allEvents)
        #expect(
            fixture.provider.callsBesidesFlushes == [
                .validate(["db", "logs"]), .prepare(["db", "logs"]), .commit, .keep(result.set),
            ])
        #expect(fixture.provider.calls.contains(.flush(["db", "logs"])))
        #expect(fixture.provider.prepareFlushes == [false])
        #expect(fixture.provider.pendingSets.isEmpty)
        #expect(result.snapshots.map(\.volume) == ["db", "logs"])
        #expect(result.snapshots.allSatisfy { $0.export == "\($0.volume)@\($0.id.guidString)" })
        #expect(result.crashConsistent == false)
        #expect(result.state == .complete)
        #expect(result.writers.map(\.name) == ["pg", "redis"])
        #expect(result.writers.allSatisfy { $0.state == .stable && $0.failure == nil })
        #expect(result.writers.first?.metadata == .object(["writer": .string("pg")]))
        #expect(await fixture.coordinator.currentSetID == nil)
    }

    /// Events carry the set, the limits, and after the commit the snapshots.
    @Test func eventParamsDescribeTheSet() async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let result = try await fixture.create(CreateSetParams(volumes: ["db"], freezeTimeoutSeconds: 7)).value
        let byEvent = Dictionary(uniqueKeysWithValues: writer.deliveries.map { ($0.event, $0.params) })
        #expect(byEvent.values.allSatisfy { $0.set == result.set && $0.volumes == ["db"] })
        #expect(byEvent.filter { $0.key != .freeze }.values.allSatisfy { $0.timeoutMs == 30_000 })
        // Freeze must be answered within the freeze window when that is the shorter limit.
        #expect(byEvent[.freeze]?.timeoutMs == 7000)
        #expect(byEvent[.freeze]?.freezeWindowMs == 7000)
        #expect(byEvent[.prepareForSnapshot]?.freezeWindowMs == nil)
        #expect(byEvent[.freeze]?.snapshots == nil)
        #expect(byEvent[.thaw]?.snapshots == result.snapshots)
        #expect(byEvent[.backupComplete]?.snapshots == result.snapshots)
    }

    /// With no writer connected the set is crash-consistent and says so.
    @Test func noWritersIsCrashConsistent() async throws {
        let fixture = Fixture()
        let result = try await fixture.create().value
        #expect(result.crashConsistent)
        #expect(result.writers.isEmpty)
        // Kept by its commit: nothing can fail it after that.
        #expect(fixture.provider.calls.count == 3)
        #expect(fixture.provider.prepareFlushes == [true])
        #expect(fixture.provider.pendingSets.isEmpty)
    }

    /// `writers: false` (`--no-writers`) leaves connected writers alone and is crash-consistent.
    @Test func noWritersFlagSkipsWriters() async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let result = try await fixture.create(CreateSetParams(volumes: ["db"], writers: false)).value
        #expect(result.crashConsistent)
        #expect(writer.events.isEmpty)
    }

    /// A writer that cares about none of the set's volumes is not asked; one that cares about all is.
    @Test func writersThatDoNotCareAreNotAsked() async throws {
        let fixture = Fixture()
        let other = fixture.writer(1, "other")
        let everything = fixture.writer(2, "everything")
        try await other.register(volumes: ["mail"])
        try await everything.register(volumes: ["*"])
        let result = try await fixture.create().value
        #expect(other.events.isEmpty)
        #expect(everything.events == allEvents)
        #expect(result.writers.map(\.name) == ["everything"])
        #expect(!result.crashConsistent)
    }

    /// A writer that never answers an event fails the set when the clock passes its response time:
    /// the error names it and the step, the other writer gets Abort, and the provider was never held.
    @Test(arguments: [WriterEvent.identify, .prepareForBackup, .prepareForSnapshot, .freeze, .thaw, .postSnapshot])
    func hangingWriterTimesOut(event: WriterEvent) async throws {
        let fixture = Fixture()
        let hanging = fixture.writer(1, "hangs") { $0 == event ? .hang : .succeed }
        let fine = fixture.writer(2, "fine")
        try await hanging.register()
        try await fine.register()
        let task = fixture.create()
        await hanging.waitFor(event)
        await fixture.clock.waitForSleepers(count: 1)
        fixture.clock.advance(by: .seconds(29))
        await Task.yield()
        #expect(await fixture.coordinator.currentSetID != nil)
        fixture.clock.advance(by: .seconds(1))
        let error = try await expectError(task)
        #expect(error.code == .writerFailed)
        #expect(error.message.contains("'hangs'") && error.message.contains("\(event)"))
        #expect(error.details?.failedWriters?.first?.failure == .timeout)
        await fine.waitFor(.abort)
        #expect(!fixture.provider.isHolding)
        #expect(fixture.provider.liveSets.isEmpty)
        let writers = await fixture.coordinator.listWriters().writers
        #expect(writers.first { $0.name == "hangs" }?.state == .failed(at: event))
        #expect(writers.first { $0.name == "hangs" }?.failure == .timeout)
        #expect(writers.first { $0.name == "fine" }?.state == .stable)
    }

    /// The per-set freeze timeout bounds Freeze→Thaw: a writer slow to freeze fails the set when it
    /// passes, long before the event timeout, and the provider is never asked to hold writes.
    @Test func freezeTimeoutOverrideIsEnforced() async throws {
        let fixture = Fixture()
        let slow = fixture.writer(1, "slow") { $0 == .freeze ? .hang : .succeed }
        try await slow.register()
        let task = fixture.create(CreateSetParams(volumes: ["db"], freezeTimeoutSeconds: 2))
        await slow.waitFor(.freeze)
        await fixture.clock.waitForSleepers(count: 1)
        fixture.clock.advance(by: .seconds(2))
        let error = try await expectError(task)
        #expect(error.message.contains("2 s freeze window"))
        #expect(fixture.provider.callsBesidesFlushes == [.validate(["db"])])
        await slow.waitFor(.abort)
    }

    /// A veto at Freeze of each kind fails the set with that kind, and the provider is never held.
    @Test(arguments: [WriterFailure.retryable, .nonRetryable, .timeout])
    func vetoAtFreeze(kind: WriterFailure) async throws {
        let fixture = Fixture()
        let vetoing = fixture.writer(1, "pg") { $0 == .freeze ? .veto(kind, "locks held") : .succeed }
        try await vetoing.register()
        let error = try await expectError(fixture.create())
        #expect(error.code == .writerFailed)
        #expect(error.message.contains("locks held"))
        #expect(
            error.details?.failedWriters == [
                WriterFailureDetails(
                    writer: "pg",
                    instance: error.details!.failedWriters![0].instance,
                    step: .freeze,
                    failure: kind,
                    message: "locks held"
                )
            ])
        #expect(fixture.provider.callsBesidesFlushes == [.validate(["db", "logs"])])
        let listed = await fixture.coordinator.listWriters().writers[0]
        #expect(listed.state == .failedAtFreeze && listed.failure == kind && listed.message == "locks held")
    }

    /// A veto at Thaw, after the commit, deletes the set: no snapshot of it remains.
    @Test func vetoAtThawDeletesTheCommittedSet() async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg") { $0 == .thaw ? .veto(.nonRetryable, "thaw failed") : .succeed }
        try await writer.register()
        let error = try await expectError(fixture.create())
        #expect(error.code == .writerFailed)
        let setID = try #require(error.details?.set)
        #expect(fixture.provider.calls.last == .delete(setID))
        #expect(fixture.provider.liveSets.isEmpty)
        await writer.waitFor(.abort)
    }

    /// A writer whose connection drops mid-freeze fails the set (retryable); once it reconnects with the
    /// same instance GUID the next set succeeds.
    @Test func crashMidFreezeThenReconnect() async throws {
        let fixture = Fixture()
        let instance = UUID()
        let crashing = fixture.writer(1, "pg") { $0 == .freeze ? .disconnect : .succeed }
        let other = fixture.writer(2, "redis")
        try await crashing.register(instance: instance)
        try await other.register()
        let error = try await expectError(fixture.create())
        #expect(error.details?.failedWriters?.first?.failure == .retryable)
        #expect(error.details?.failedWriters?.first?.step == .freeze)
        #expect(error.message.contains("connection closed"))
        await other.waitFor(.abort)
        #expect(!crashing.events.contains(.abort))
        #expect(await fixture.coordinator.listWriters().writers.map(\.name) == ["redis"])

        let restarted = fixture.writer(3, "pg")
        #expect(try await restarted.register(instance: instance) == instance)
        let result = try await fixture.create().value
        #expect(result.writers.map(\.instance).contains(instance))
        #expect(fixture.provider.liveSets == [result.set])
    }

    /// A second requester is told "busy" at once, or, if it asked to wait, runs right after the first.
    @Test func secondRequesterIsBusyOrWaits() async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg") { $0 == .identify ? .hang : .succeed }
        try await writer.register()
        let first = fixture.create()
        await writer.waitFor(.identify)

        let busy = try await expectError(fixture.create(as: RequesterID(rawValue: 101)))
        #expect(busy.code == .busy)
        let current = try #require(await fixture.coordinator.currentSetID)
        #expect(busy.message.contains(current.guidString))

        let waiting = fixture.create(CreateSetParams(volumes: ["db"], wait: true), as: RequesterID(rawValue: 102))
        writer.setPolicy { _ in .succeed }
        await fixture.clock.waitForSleepers(count: 1)
        fixture.clock.advance(by: .seconds(30))
        #expect(try await expectError(first).code == .writerFailed)
        let result = try await waiting.value
        #expect(result.snapshots.map(\.volume) == ["db"])
    }

    /// A requester that gives up while waiting for the slot leaves the queue.
    @Test func waitingRequesterThatLeavesIsDropped() async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg") { $0 == .identify ? .hang : .succeed }
        try await writer.register()
        let first = fixture.create()
        await writer.waitFor(.identify)
        let leaver = RequesterID(rawValue: 7)
        let waiting = fixture.create(CreateSetParams(volumes: ["db"], wait: true), as: leaver)
        while await fixture.coordinator.waitingCount == 0 { await Task.yield() }
        await fixture.coordinator.requesterDisconnected(leaver)
        #expect(try await expectError(waiting).code == .connectionClosed)
        #expect(await fixture.coordinator.waitingCount == 0)
        await fixture.coordinator.requesterDisconnected(requester)
        #expect(try await expectError(first).code == .aborted)
    }

    /// A requester that leaves while its kept-open set is still being validated gets no set: the slot
    /// is free again, rather than held by a set nobody can close.
    @Test func requesterLeavingDuringValidationGetsNoSet() async throws {
        let fixture = Fixture()
        fixture.provider.configure { $0.holdValidation = true }
        let task = fixture.create(CreateSetParams(volumes: ["db"], keepOpen: true))
        while fixture.provider.calls.isEmpty { await Task.yield() }
        await fixture.coordinator.requesterDisconnected(requester)
        fixture.provider.releaseValidation()
        #expect(try await expectError(task).code == .connectionClosed)
        #expect(await fixture.coordinator.currentSetID == nil)
        #expect(try await fixture.create(CreateSetParams(volumes: ["db"])).value.state == .complete)
    }

    /// A kept-open set answers after PostSnapshot with writers waiting for BackupComplete, which they
    /// get when the requester completes the set.
    @Test func keptOpenSetCompletes() async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let open = try await fixture.create(CreateSetParams(volumes: ["db"], keepOpen: true)).value
        #expect(open.state == .open)
        #expect(open.writers.map(\.state) == [.waitingForBackupComplete])
        #expect(!writer.events.contains(.backupComplete))
        #expect(await fixture.coordinator.listWriters().writers.map(\.state) == [.waitingForBackupComplete])
        let busy = try await expectError(fixture.create(as: RequesterID(rawValue: 5)))
        #expect(busy.code == .busy)

        let other = RequesterID(rawValue: 6)
        await #expect(throws: ShadowCopyError.self) {
            try await fixture.coordinator.completeSet(open.set, requester: other)
        }
        let done = try await fixture.coordinator.completeSet(open.set, requester: requester)
        #expect(done.state == .complete)
        #expect(done.writers.map(\.state) == [.stable])
        #expect(writer.events.last == .backupComplete)
        #expect(fixture.provider.liveSets == [open.set])
    }

    /// Aborting a kept-open set deletes its snapshots and sends Abort; so does the requester vanishing.
    @Test(arguments: [false, true])
    func keptOpenSetAborts(byDisconnect: Bool) async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let open = try await fixture.create(CreateSetParams(volumes: ["db"], keepOpen: true)).value
        if byDisconnect {
            await fixture.coordinator.requesterDisconnected(requester)
        } else {
            try await fixture.coordinator.abortSet(open.set, requester: requester)
        }
        await writer.waitFor(.abort)
        while await fixture.coordinator.currentSetID != nil { await Task.yield() }
        #expect(fixture.provider.calls.last == .delete(open.set))
        #expect(fixture.provider.liveSets.isEmpty)
        #expect(try await fixture.create(CreateSetParams(volumes: ["db"])).value.state == .complete)
    }

    /// A commit that throws releases the provider's hold and aborts the writers.
    @Test func commitFailureReleasesTheHold() async throws {
        let fixture = Fixture()
        fixture.provider.configure { $0.failCommit = PlainError(description: "hold limit of 10 s passed") }
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let error = try await expectError(fixture.create())
        #expect(error.code == .providerFailed)
        #expect(error.message.contains("hold limit"))
        #expect(fixture.provider.calls.suffix(2) == [.commit, .abort])
        #expect(!fixture.provider.isHolding)
        await writer.waitFor(.abort)
    }

    /// A provider that rejects the volumes answers before any writer hears of the set, keeping its code.
    @Test func validationFailureReachesNoWriter() async throws {
        let fixture = Fixture()
        fixture.provider.configure { $0.failValidate = ShadowCopyError(.notFound, "No volume named 'nope'.") }
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let error = try await expectError(fixture.create(CreateSetParams(volumes: ["nope"])))
        #expect(error.code == .notFound)
        #expect(writer.events.isEmpty)
        #expect(await fixture.coordinator.currentSetID == nil)
    }

    /// Bad set requests are refused before anything happens.
    @Test func badSetRequestsAreRefused() async throws {
        let fixture = Fixture()
        for params in [
            CreateSetParams(volumes: []), CreateSetParams(volumes: ["db", "db"]),
            CreateSetParams(volumes: ["db"], freezeTimeoutSeconds: 0),
            CreateSetParams(volumes: ["db"], freezeTimeoutSeconds: 1e9),
            CreateSetParams(volumes: ["db"], freezeTimeoutSeconds: 1e300),
            CreateSetParams(volumes: ["db"], freezeTimeoutSeconds: -5),
        ] {
            #expect(try await expectError(fixture.create(params)).code == .invalidParams)
        }
        #expect(fixture.provider.calls.isEmpty)
    }

    /// Writer registration checks its name, volumes and uniqueness of its instance GUID.
    @Test func registrationIsValidated() async throws {
        let fixture = Fixture()
        let instance = UUID()
        try await fixture.writer(1, "pg").register(instance: instance)
        await #expect(
            throws: ShadowCopyError(
                .duplicateWriter, "Writer 'pg' with instance \(instance.guidString) is already connected.")
        ) {
            try await fixture.writer(2, "pg2").register(instance: instance)
        }
        await #expect(throws: ShadowCopyError.self) { try await fixture.writer(3, "").register() }
        await #expect(throws: ShadowCopyError.self) { try await fixture.writer(4, "x").register(volumes: []) }
    }

    /// Shutting down aborts the set in progress and turns new requesters away.
    @Test func shutdownAbortsTheSetInProgress() async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg") { $0 == .freeze ? .hang : .succeed }
        try await writer.register()
        let task = fixture.create()
        await writer.waitFor(.freeze)
        await fixture.coordinator.shutdown()
        let error = try await expectError(task)
        #expect(error.code == .shuttingDown)
        #expect(error.details?.set != nil)
        await writer.waitFor(.abort)
        #expect(try await expectError(fixture.create()).code == .shuttingDown)
    }
}
