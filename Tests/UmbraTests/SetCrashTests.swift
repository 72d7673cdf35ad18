// Shadow copy sets against a real daemon that dies or stops mid-set. A set whose writers had not
// reached BackupComplete is not a consistent backup (a writer that fails Thaw says so), so after a
// kill -9 the restarted daemon rolls it back and says so; from BackupComplete on it is kept. SIGTERM
// answers the requester with `shutting-down`, sends the writers Abort and rolls the set back.

import Foundation
import ShadowCopy
import Synchronization
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// A writer that stops inside one event until released (or forever), recording what it was told.
actor StallingWriter: ShadowCopyWriterDelegate {
    let stallAt: WriterEvent?
    private(set) var events: [WriterEvent] = []
    private(set) var abortReasons: [String] = []
    private var waiters: [(WriterEvent, CheckedContinuation<Void, Never>)] = []
    private var stalled: [CheckedContinuation<Void, Never>] = []

    init(stallingAt event: WriterEvent?) { stallAt = event }

    /// Suspends until `event` has been delivered.
    func waitFor(_ event: WriterEvent) async {
        if events.contains(event) { return }
        await withCheckedContinuation { waiters.append((event, $0)) }
    }

    private func record(_ context: WriterEventContext) async {
        events.append(context.event)
        if context.event == .abort { abortReasons.append(context.reason ?? "") }
        for waiter in waiters where waiter.0 == context.event { waiter.1.resume() }
        waiters.removeAll { $0.0 == context.event }
        if context.event == stallAt { await withCheckedContinuation { stalled.append($0) } }
    }

    func onIdentify(_ context: WriterEventContext) async throws -> JSONValue? {
        await record(context)
        return nil
    }
    func onPrepareForBackup(_ context: WriterEventContext) async throws { await record(context) }
    func onPrepareForSnapshot(_ context: WriterEventContext) async throws { await record(context) }
    func onFreeze(_ context: WriterEventContext) async throws { await record(context) }
    func onThaw(_ context: WriterEventContext) async throws { await record(context) }
    func onPostSnapshot(_ context: WriterEventContext) async throws { await record(context) }
    func onBackupComplete(_ context: WriterEventContext) async throws { await record(context) }
    func onAbort(_ context: WriterEventContext) async { await record(context) }
}

@Suite(.serialized, .timeLimit(.minutes(2))) struct SetCrashTests {
    enum Phase: String, CaseIterable, Sendable {
        /// The writer is still thawing.
        case thaw
        case postSnapshot
        /// A kept-open set waits for its requester to copy it.
        case open
        /// The snapshots are kept; the writer has not answered BackupComplete.
        case backupComplete
    }

    /// kill -9 at each phase of a set with a writer: before BackupComplete the restarted daemon rolls
    /// the set back (and logs which set and why); from BackupComplete on the set is kept.
    @Test(arguments: Phase.allCases)
    func killNineMidSet(phase: Phase) async throws {
        let daemon = try DaemonFixture.start(volumes: ["db:16M"])
        let writer = StallingWriter(
            stallingAt: [.thaw: .thaw, .postSnapshot: .postSnapshot, .backupComplete: .backupComplete][phase])
        let sdk = ShadowCopyWriter(socketPath: daemon.controlSocket, name: "pg", volumes: ["db"], delegate: writer)
        let writerTask = Task { try await sdk.run() }
        let requester = try await daemon.control()
        while try await requester.listWriters().writers.isEmpty { await Task.yield() }
        let create = Task {
            try await requester.createSnapshotSet(CreateSetParams(volumes: ["db"], keepOpen: phase == .open))
        }
        let setID: UUID
        switch phase {
        case .open:
            setID = try await create.value.set
        case .thaw, .postSnapshot, .backupComplete:
            await writer.waitFor(
                [.thaw: .thaw, .postSnapshot: .postSnapshot, .backupComplete: .backupComplete][phase]!)
            setID = try #require(try await requester.listSnapshots().snapshots.first?.set)
        }
        let listed = try await requester.listSnapshots().snapshots
        #expect(listed.map(\.state) == [phase == .backupComplete ? "ready" : "pending"])
        if phase == .open {
            // A pending set's record is made durable while the writers thaw; the answer does not wait
            // for it. Any later record waits for it (the log is written in order), so once this
            // volume exists the set's record is on the disk, and the restart must roll it back.
            _ = try await requester.createVolume(name: "marker", size: 1 << 20)
        }

        daemon.killNine()
        writerTask.cancel()
        await requester.close()
        let restarted = try DaemonFixture.start(volumes: ["db:16M"], in: daemon.directory, capturingLog: true)
        let client = try await restarted.control()
        let after = try await client.listSnapshots().snapshots
        await client.close()
        #expect(restarted.stop() == 0)
        if phase == .backupComplete {
            #expect(after.map(\.set) == [setID], "a set at BackupComplete is kept")
            #expect(after.map(\.state) == ["ready"])
        } else {
            #expect(after.isEmpty, "a set killed at \(phase) must not survive as if it were whole")
            // A pending set's record is made durable while the writers thaw (the answer does not wait
            // for it); killed before that, the set left nothing to roll back. When it did reach the
            // disk, the restart says which set it rolled back.
            // Killed at thaw or post-snapshot, the record may not have reached the disk yet (then there
            // is nothing to roll back); at `open` it has (see above). When it has, the restart says
            // which set it rolled back.
            if phase == .open || restarted.log.contains("rolled back") {
                #expect(restarted.log.contains("rolled back"), "the restart says it rolled a set back")
                #expect(restarted.log.contains(setID.uuidString.lowercased()), "and which one")
            } else {
                print("killNineMidSet(\(phase)): the set's record had not reached the disk; nothing to roll back")
            }
        }
    }

    /// SIGTERM while a set is in progress: the requester hears `shutting-down`, a writer gets Abort
    /// before its connection closes, the daemon exits 0, and the set is gone after a restart. (One
    /// writer stalls in PostSnapshot to keep the set in progress; the other answers at once, so it is
    /// free to take the Abort.)
    @Test func sigtermMidSetAbortsAndRollsBack() async throws {
        let daemon = try DaemonFixture.start(volumes: ["db:16M"])
        let stalling = StallingWriter(stallingAt: .postSnapshot)
        let prompt = StallingWriter(stallingAt: nil)
        let writers = [("slow", stalling), ("quick", prompt)].map { name, delegate in
            let sdk = ShadowCopyWriter(
                socketPath: daemon.controlSocket, name: name, volumes: ["db"], delegate: delegate)
            return Task { try await sdk.run() }
        }
        let requester = try await daemon.control()
        while try await requester.listWriters().writers.count < 2 { await Task.yield() }
        let create = Task { try await requester.createSnapshotSet(CreateSetParams(volumes: ["db"])) }
        await stalling.waitFor(.postSnapshot)

        kill(daemon.process.processIdentifier, SIGTERM)
        await #expect {
            _ = try await create.value
        } throws: { error in
            (error as? ShadowCopyError)?.code == .shuttingDown
        }
        await prompt.waitFor(.abort)
        #expect(await prompt.abortReasons.first?.contains("shutting down") == true)
        #expect(daemon.process.finish() == 0)
        for writer in writers { writer.cancel() }
        await requester.close()

        let restarted = try DaemonFixture.start(volumes: ["db:16M"], in: daemon.directory)
        let client = try await restarted.control()
        #expect(try await client.listSnapshots().snapshots.isEmpty)
        await client.close()
        #expect(restarted.stop() == 0)
    }
}
