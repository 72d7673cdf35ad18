// The writer side without a daemon: `CommandWriter` running real shell commands (its time limit on a
// manual clock), and the SDK's event session, including the self-thaw when the freeze window passes.

import Foundation
import NIOCore
import Testing
import UmbraTestSupport

@testable import ShadowCopy

private func context(_ event: WriterEvent, timeout: Duration = .seconds(30), freezeWindow: Duration? = nil)
    -> WriterEventContext
{
    let snapshot = UUID(uuidString: "00000000-0000-0000-0000-00000000000a")!
    return WriterEventContext(
        event: event,
        set: UUID(uuidString: "00000000-0000-0000-0000-0000000000ff")!,
        volumes: ["db", "logs"],
        timeout: timeout,
        freezeWindow: freezeWindow,
        snapshots: [CreatedSnapshot(id: snapshot, volume: "db", export: "db@\(snapshot.guidString)")]
    )
}

private func temporaryFile() -> String {
    FileManager.default.temporaryDirectory.appendingPathComponent("umbra-test-\(UUID().guidString)").path
}

private func read(_ path: String) -> String {
    (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
}

@Suite struct CommandWriterTests {
    /// A command sees the event, the set, the volumes and the snapshot exports in its environment.
    @Test func commandSeesTheEventInItsEnvironment() async throws {
        let out = temporaryFile()
        defer { try? FileManager.default.removeItem(atPath: out) }
        let writer = CommandWriter(commands: [
            .thaw: "echo \"$UMBRA_EVENT|$UMBRA_SET|$UMBRA_VOLUMES|$UMBRA_SNAPSHOTS\" > \(out)"
        ])
        try await writer.onThaw(context(.thaw))
        #expect(
            read(out) == "thaw|00000000-0000-0000-0000-0000000000ff|db logs|db@00000000-0000-0000-0000-00000000000a\n"
        )
    }

    /// Exit 75 vetoes as retryable, other statuses as non-retryable, with stdout and stderr in the
    /// message; events without a command succeed.
    @Test func exitStatusChoosesTheFailure() async throws {
        let writer = CommandWriter(commands: [
            .prepareForSnapshot: "echo busy; exit 75",
            .freeze: "echo out; echo err >&2; exit 3",
        ])
        await #expect(throws: WriterVeto(.retryable, "'echo busy; exit 75' exited with status 75: busy")) {
            try await writer.onPrepareForSnapshot(context(.prepareForSnapshot))
        }
        await #expect(
            throws: WriterVeto(.nonRetryable, "'echo out; echo err >&2; exit 3' exited with status 3: out\nerr")
        ) {
            try await writer.onFreeze(context(.freeze))
        }
        try await writer.onPostSnapshot(context(.postSnapshot))
        #expect(try await writer.onIdentify(context(.identify)) == nil)
    }

    /// Only the last `outputBytesMax` bytes of a chatty command's output are kept.
    @Test func outputIsBounded() async throws {
        let writer = CommandWriter(commands: [.freeze: "head -c 100000 /dev/zero | tr '\\0' x; echo END; exit 1"])
        do {
            try await writer.onFreeze(context(.freeze))
            Issue.record("expected a veto")
        } catch let veto as WriterVeto {
            #expect(veto.message.hasSuffix("xEND"))
            #expect(veto.message.utf8.count < CommandWriter.outputBytesMax + 200)
        }
    }

    /// A command still running when the event's time is up is stopped and vetoes as a timeout.
    @Test func slowCommandTimesOut() async throws {
        let clock = ManualClock()
        let writer = CommandWriter(commands: [.freeze: "echo started; sleep 30"], clock: clock)
        let freeze = Task { try await writer.onFreeze(context(.freeze, timeout: .seconds(5))) }
        await clock.waitForSleepers(count: 1)
        clock.advance(by: .seconds(5))
        do {
            try await freeze.value
            Issue.record("expected a veto")
        } catch let veto as WriterVeto {
            #expect(veto.failure == .timeout)
            #expect(veto.message.contains("stopped"))
        }
    }

    /// An Abort after a successful Freeze runs the thaw command before the abort command; an Abort with
    /// nothing frozen runs only the abort command.
    @Test func abortAfterFreezeThawsFirst() async throws {
        let log = temporaryFile()
        defer { try? FileManager.default.removeItem(atPath: log) }
        let writer = CommandWriter(commands: [
            .freeze: "echo freeze >> \(log)", .thaw: "echo thaw >> \(log)", .abort: "echo abort >> \(log)",
        ])
        try await writer.onFreeze(context(.freeze))
        await writer.onAbort(context(.abort))
        await writer.onAbort(context(.abort))
        #expect(read(log) == "freeze\nthaw\nabort\nabort\n")
    }
}

/// Feeds `WriterSession` the lines a daemon would send and decodes its answers.
private struct SessionHarness {
    let session: WriterSession<RecordingDelegate>

    func send(_ id: Int, _ method: String, _ params: String) async throws -> [String: Any] {
        let line = ByteBuffer(string: #"{"id":\#(id),"method":"\#(method)","params":\#(params)}"#)
        guard case .success(let message) = IncomingMessage.parse(line) else { throw PlainError(description: "parse") }
        var answer = await session.handle(message)
        let object = try JSONSerialization.jsonObject(with: Data(answer.readBytes(length: answer.readableBytes)!))
        return try #require(object as? [String: Any])
    }
}

private let setJSON = #""set":"00000000-0000-0000-0000-0000000000ff","volumes":["db"],"timeoutMs":30000"#

@Suite struct WriterSessionTests {
    /// Events reach the delegate's callbacks; a veto becomes an error answer with its failure kind;
    /// unknown events are acknowledged.
    @Test func eventsReachTheDelegate() async throws {
        let delegate = RecordingDelegate()
        await delegate.set(.freeze, .veto(.timeout, "flush too slow"))
        let harness = SessionHarness(
            session: WriterSession(delegate: delegate, clock: ManualClock(), logger: .init(label: "t")))
        let identify = try await harness.send(1, "identify", "{\(setJSON)}")
        #expect(((identify["result"] as? [String: Any])?["metadata"] as? [String: Any])?["components"] != nil)
        let veto = try await harness.send(2, "freeze", "{\(setJSON)}")
        let error = try #require(veto["error"] as? [String: Any])
        #expect(error["code"] as? String == "veto")
        #expect(error["failure"] as? String == "timeout")
        #expect(error["message"] as? String == "flush too slow")
        #expect(veto["id"] as? Int == 2)
        let unknown = try await harness.send(3, "rehearse", "{}")
        #expect(unknown["result"] != nil)
        let malformed = try await harness.send(4, "thaw", #"{"set":"nope"}"#)
        #expect((malformed["error"] as? [String: Any])?["failure"] as? String == "non-retryable")
        #expect(await delegate.events == [.identify, .freeze])
    }

    /// A frozen writer that hears nothing for the freeze window aborts by itself, and answers a late
    /// Thaw with a timeout veto.
    @Test func freezeWindowPassingThawsTheApplication() async throws {
        let clock = ManualClock()
        let delegate = RecordingDelegate()
        let harness = SessionHarness(
            session: WriterSession(delegate: delegate, clock: clock, logger: .init(label: "t")))
        _ = try await harness.send(1, "freeze", "{\(setJSON),\"freezeWindowMs\":60000}")
        await clock.waitForSleepers(count: 1)
        clock.advance(by: .seconds(60))
        await delegate.waitFor(.abort)
        let thaw = try await harness.send(2, "thaw", "{\(setJSON)}")
        #expect((thaw["error"] as? [String: Any])?["failure"] as? String == "timeout")
        #expect(await delegate.events == [.freeze, .abort])
    }

    /// Thaw in time cancels the self-thaw; losing the connection afterwards calls nothing more.
    @Test func thawInTimeCancelsTheSelfThaw() async throws {
        let clock = ManualClock()
        let delegate = RecordingDelegate()
        let session = WriterSession(delegate: delegate, clock: clock, logger: .init(label: "t"))
        let harness = SessionHarness(session: session)
        _ = try await harness.send(1, "freeze", "{\(setJSON),\"freezeWindowMs\":60000}")
        #expect(try await harness.send(2, "thaw", "{\(setJSON)}")["result"] != nil)
        #expect(clock.sleeperCount == 0)
        await session.connectionLost()
        #expect(await delegate.events == [.freeze, .thaw])
    }

    /// Losing the connection while frozen calls onAbort.
    @Test func connectionLostWhileFrozenAborts() async throws {
        let delegate = RecordingDelegate()
        let session = WriterSession(delegate: delegate, clock: ManualClock(), logger: .init(label: "t"))
        _ = try await SessionHarness(session: session).send(1, "freeze", "{\(setJSON)}")
        await session.connectionLost()
        #expect(await delegate.events == [.freeze, .abort])
    }
}
