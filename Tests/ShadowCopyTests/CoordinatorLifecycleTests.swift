// The coordinator when things go wrong around the snapshots themselves: a provider stuck on its
// disk, a keep that fails, and shutdown at every step. Time is a manual clock; the provider records
// which sets are pending (what a crash would roll back).

import Foundation
import Synchronization
import Testing
import UmbraTestSupport

@testable import ShadowCopy

private let requester = RequesterID(rawValue: 100)

private struct Fixture {
    let clock = ManualClock()
    let provider = RecordingProvider()
    let coordinator: TestCoordinator

    init(freezeWindow: Duration = .seconds(60)) {
        coordinator = TestCoordinator(
            provider: provider,
            clock: clock,
            configuration: CoordinatorConfiguration(eventTimeout: .seconds(30), freezeWindow: freezeWindow)
        )
    }

    func writer(
        _ id: UInt64, _ name: String, policy: @escaping @Sendable (WriterEvent) -> FakeWriter.Reply = { _ in .succeed }
    ) -> FakeWriter {
        FakeWriter(id, name: name, coordinator: coordinator, policy: policy)
    }

    func create(_ params: CreateSetParams) -> Task<SnapshotSetResult, any Error> {
        Task { [coordinator] in try await coordinator.createSet(params, requester: requester) }
    }
}

private func error(of task: Task<SnapshotSetResult, any Error>) async -> ShadowCopyError? {
    do {
        _ = try await task.value
        return nil
    } catch {
        return error as? ShadowCopyError
    }
}

@Suite struct CoordinatorLifecycleTests {
    /// A provider stuck draining or flushing (a slow disk) does not delay the writers' release: Abort
    /// goes out at the freeze deadline exactly, the prepare is cancelled, and only the requester's
    /// answer waits for the provider to come back.
    @Test func stuckProviderDoesNotDelayTheAbort() async throws {
        let fixture = Fixture(freezeWindow: .seconds(2))
        fixture.provider.configure { $0.stallPrepare = true }
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let task = fixture.create(CreateSetParams(volumes: ["db"]))
        await writer.waitFor(.freeze)
        while fixture.provider.stalledPrepares == 0 { await Task.yield() }
        await fixture.clock.waitForSleepers(count: 1)
        fixture.clock.advance(by: .milliseconds(1999))
        await Task.yield()
        #expect(!writer.events.contains(.abort))
        fixture.clock.advance(by: .milliseconds(1))
        await writer.waitFor(.abort)
        #expect(fixture.clock.now == ManualClock.Instant(offset: .seconds(2)), "Abort went out at the deadline")
        #expect(await fixture.coordinator.currentSetID != nil, "the requester waits for the provider")
        fixture.provider.releasePrepare()
        #expect(await error(of: task)?.code == .freezeWindowExpired)
        #expect(!fixture.provider.isHolding, "the cancelled prepare held nothing")
        #expect(fixture.provider.liveSets.isEmpty)
    }

    /// A set with writers is pending from its commit until BackupComplete: the provider keeps it only
    /// after PostSnapshot, and BackupComplete follows the keep.
    @Test func setIsKeptOnlyBeforeBackupComplete() async throws {
        let fixture = Fixture()
        let keptAtBackupComplete = RecordingProviderProbe()
        let writer = fixture.writer(1, "pg") { event in
            if event == .backupComplete { keptAtBackupComplete.note(fixture.provider.pendingSets.isEmpty) }
            if event == .postSnapshot { keptAtBackupComplete.note(fixture.provider.pendingSets.isEmpty) }
            return .succeed
        }
        try await writer.register()
        let result = try await fixture.create(CreateSetParams(volumes: ["db"])).value
        #expect(keptAtBackupComplete.notes == [false, true], "pending at post-snapshot, kept at backup-complete")
        #expect(fixture.provider.liveSets == [result.set])
        #expect(fixture.provider.pendingSets.isEmpty)
    }

    /// A keep that fails aborts the writers (after Thaw), deletes the set and reports provider-failed.
    @Test func keepFailureDeletesTheSet() async throws {
        let fixture = Fixture()
        fixture.provider.configure { $0.failKeep = PlainError(description: "fdatasync failed") }
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let failure = try #require(await error(of: fixture.create(CreateSetParams(volumes: ["db"]))))
        #expect(failure.code == .providerFailed && failure.message.contains("fdatasync failed"))
        await writer.waitFor(.abort)
        #expect(!writer.events.contains(.backupComplete))
        #expect(fixture.provider.liveSets.isEmpty)
    }

    /// Shutdown while a kept-open set waits for its requester: the requester hears `shutting-down`,
    /// writers get Abort, and the set is deleted before shutdown returns.
    @Test func shutdownDeletesAnOpenSet() async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let open = try await fixture.create(CreateSetParams(volumes: ["db"], keepOpen: true)).value
        #expect(fixture.provider.pendingSets == [open.set])
        let completing = Task { [coordinator = fixture.coordinator] in
            try await coordinator.completeSet(open.set, requester: requester)
        }
        _ = completing
        await fixture.coordinator.shutdown()
        #expect(fixture.provider.liveSets.isEmpty)
        #expect(writer.events.contains(.abort))
        #expect(await fixture.coordinator.currentSetID == nil)
    }

    /// Shutdown while writers have not answered BackupComplete: the set is already kept, so it stands
    /// and the requester gets it, the silent writer failed at backup-complete.
    @Test func shutdownAtBackupCompleteKeepsTheSet() async throws {
        let fixture = Fixture()
        let writer = fixture.writer(1, "pg") { $0 == .backupComplete ? .hang : .succeed }
        try await writer.register()
        let task = fixture.create(CreateSetParams(volumes: ["db"]))
        await writer.waitFor(.backupComplete)
        await fixture.coordinator.shutdown()
        let result = try await task.value
        #expect(result.state == .complete)
        #expect(result.writers.map(\.state) == [.failedAtBackupComplete])
        #expect(fixture.provider.liveSets == [result.set])
        #expect(fixture.provider.pendingSets.isEmpty)
    }

    /// Shutdown while the provider drains writes for the set: the requester is answered at once and
    /// the writers released; shutdown itself returns once the provider let go.
    @Test func shutdownDuringAStuckPrepare() async throws {
        let fixture = Fixture()
        fixture.provider.configure { $0.stallPrepare = true }
        let writer = fixture.writer(1, "pg")
        try await writer.register()
        let task = fixture.create(CreateSetParams(volumes: ["db"]))
        while fixture.provider.stalledPrepares == 0 { await Task.yield() }
        let shutdown = Task { [coordinator = fixture.coordinator] in await coordinator.shutdown() }
        #expect(await error(of: task)?.code == .shuttingDown)
        await writer.waitFor(.abort)
        fixture.provider.releasePrepare()
        await shutdown.value
        #expect(!fixture.provider.isHolding)
        #expect(await fixture.coordinator.currentSetID == nil)
    }
}

/// Collects what a writer policy saw, from whichever task runs it.
final class RecordingProviderProbe: Sendable {
    private let state = Mutex<[Bool]>([])
    func note(_ value: Bool) { state.withLock { $0.append(value) } }
    var notes: [Bool] { state.withLock { $0 } }
}
