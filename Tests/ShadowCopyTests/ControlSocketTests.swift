// The control protocol over real Unix sockets: the requester operations through `ControlClient`,
// Swift SDK writers that veto, hang, crash and come back, and bad input that must not hurt the server.

import Foundation
import Glibc
import NIOCore
import NIOPosix
import Testing
import UmbraTestSupport

@testable import ShadowCopy

@Suite(.timeLimit(.minutes(1))) struct ControlSocketTests {
    /// Every plain requester operation reaches the handler and comes back typed; handler errors keep
    /// their code, and errors that are not `ShadowCopyError` arrive as `internal`.
    @Test func requesterOperationsReachTheHandler() async throws {
        try await ServerFixture.with { fixture in
            let client = try await fixture.client()
            #expect(try await client.createVolume(name: "db", size: 1 << 20).chunkSize == 65536)
            await #expect(throws: ShadowCopyError(.alreadyExists, "Volume 'taken' already exists.")) {
                try await client.createVolume(name: "taken", size: 1)
            }
            #expect(try await client.listVolumes().volumes.map(\.name) == ["db"])
            await #expect(throws: ShadowCopyError(.notFound, "No volume named 'x'.")) {
                try await client.deleteVolume(name: "x")
            }
            let snapshots = try await client.listSnapshots(volume: "logs")
            #expect(snapshots.snapshots.first?.volume == "logs")
            #expect(snapshots.snapshots.first?.createdAt == Date(timeIntervalSince1970: 1_800_000_000))
            let ids = [UUID(), UUID()]
            #expect(try await client.deleteSnapshots(ids: ids).deleted == ids)
            let since = UUID()
            #expect(
                try await client.changes(volume: "db", since: since).extents == [ByteExtent(offset: 0, length: 65536)])
            await #expect(throws: ShadowCopyError(.internal, "engine exploded")) {
                try await client.changes(volume: "db", since: since, until: UUID())
            }
            #expect(try await client.listWriters().writers.isEmpty)
            try await client.ping()
            await client.close()
        }
    }

    /// The JSON on the wire has INTERFACE.md's shapes: lowercase GUIDs, RFC 3339 times, `snapshots`.
    @Test func wireShapesMatchTheInterface() async throws {
        try await ServerFixture.with { fixture in
            try await RawConnection.with(fixture.socketPath) { raw in
                try await raw.helloAsRequester()
                let list = try await raw.call(#"{"id":"a","method":"snapshot.list","params":{}}"#)
                #expect(list["id"] as? String == "a")
                let snapshot = try #require(
                    ((list["result"] as? [String: Any])?["snapshots"] as? [[String: Any]])?.first)
                #expect(Set(snapshot.keys) == ["id", "set", "volume", "export", "createdAt", "diffBytes", "state"])
                #expect(snapshot["id"] as? String == "0f0e0d0c-0b0a-0908-0706-050403020100")
                #expect(snapshot["createdAt"] as? String == "2027-01-15T08:00:00Z")

                let created = try await raw.call(#"{"id":2,"method":"snapshot.create","params":{"volumes":["db"]}}"#)
                let result = try #require(created["result"] as? [String: Any])
                #expect(Set(result.keys) == ["set", "createdAt", "snapshots", "writers", "crashConsistent", "state"])
                #expect(result["crashConsistent"] as? Bool == true)
                let set = try #require(result["set"] as? String)
                #expect(set == set.lowercased())
                let first = try #require((result["snapshots"] as? [[String: Any]])?.first)
                #expect(Set(first.keys) == ["id", "volume", "export"])
                #expect(first["export"] as? String == "db@\(first["id"] as! String)")
            }
        }
    }

    /// Malformed, oversized, out-of-order and unknown requests each get a clear error, the connection
    /// stays usable, and another connection notices nothing.
    @Test func badInputGetsErrorsAndHurtsNoOne() async throws {
        try await ServerFixture.with { fixture in
            let bystander = try await fixture.client()
            try await RawConnection.with(fixture.socketPath) { raw in
                #expect(try await raw.call("this is not json").errorCode == "bad-message")
                #expect(try await raw.call("[1,2,3]").errorCode == "bad-message")
                #expect(try await raw.call(#"{"method":"ping"}"#).errorCode == "bad-message")
                let early = try await raw.call(#"{"id":1,"method":"volume.list"}"#)
                #expect(early.errorCode == "hello-required")
                #expect(early["id"] as? Int == 1)

                let huge = String(repeating: "x", count: ControlProtocol.requestLineBytesMax + 10)
                let oversized = try await raw.call(#"{"id":2,"method":"ping","params":{"pad":""# + huge + #""}}"#)
                #expect(oversized.errorCode == "message-too-large")
                #expect(oversized.keys.contains("id"))
                try await bystander.ping()

                let old = try await raw.call(#"{"id":3,"method":"hello","params":{"version":0,"role":"requester"}}"#)
                #expect(old.errorCode == "unsupported-version")
                let future = try await raw.call(#"{"id":4,"method":"hello","params":{"version":9,"role":"requester"}}"#)
                #expect((future["result"] as? [String: Any])?["version"] as? Int == 1)
                #expect(
                    try await raw.call(#"{"id":5,"method":"hello","params":{"version":1,"role":"requester"}}"#)
                        .errorCode == "bad-message")
                #expect(try await raw.call(#"{"id":6,"method":"snapshot.explode"}"#).errorCode == "unknown-method")
                let badParams = try await raw.call(#"{"id":7,"method":"snapshot.create","params":{"volumes":"db"}}"#)
                #expect(badParams.errorCode == "invalid-params")
                let message = (badParams["error"] as? [String: Any])?["message"] as? String
                #expect(message?.contains("volumes") == true)
                #expect(
                    try await raw.call(
                        #"{"id":8,"method":"set.complete","params":{"set":"00000000-0000-0000-0000-000000000000"}}"#
                    ).errorCode == "unknown-set")
                // Half a line, then the rest: framing waits for the newline.
                try await raw.send(#"{"id":9,"meth"#)
                #expect(try await raw.call(#"od":"ping"}"#)["result"] != nil)
                // CRLF line ends are accepted.
                try await raw.send("{\"id\":10,\"method\":\"ping\"}\r\n")
                #expect(try await raw.receive()["id"] as? Int == 10)
            }
            try await RawConnection.with(fixture.socketPath) { raw in
                let hello = try await raw.call(
                    #"{"id":1,"method":"hello","params":{"version":1,"role":"writer","name":"w","volumes":["db"]}}"#)
                #expect(((hello["result"] as? [String: Any])?["instance"] as? String)?.count == 36)
                #expect((hello["result"] as? [String: Any])?["unknownVolumes"] == nil)
                #expect(
                    try await raw.call(#"{"id":2,"method":"snapshot.create","params":{"volumes":["db"]}}"#).errorCode
                        == "wrong-role")
                #expect(try await raw.call(#"{"id":3,"method":"ping"}"#)["result"] != nil)
                let missing = try await raw.call(#"{"id":4,"method":"hello","params":{"version":1,"role":"writer"}}"#)
                #expect(missing.errorCode == "bad-message")
            }
            try await RawConnection.with(fixture.socketPath) { raw in
                let nameless = try await raw.call(
                    #"{"id":1,"method":"hello","params":{"version":1,"role":"writer","volumes":["db"]}}"#)
                #expect(nameless.errorCode == "invalid-params")
            }
            try await RawConnection.with(fixture.socketPath) { raw in
                // A role that does not exist: the message says what would do, in the protocol's words.
                let admin = try await raw.call(#"{"id":1,"method":"hello","params":{"version":1,"role":"admin"}}"#)
                #expect(admin.errorCode == "invalid-params")
                let message = try #require((admin["error"] as? [String: Any])?["message"] as? String)
                #expect(message.contains(#""requester" or "writer""#) && message.contains(#""admin""#), "\(message)")
                #expect(!message.contains("ControlRole") && !message.contains("Cannot initialize"), "\(message)")
            }
            try await bystander.ping()
            #expect(try await bystander.createSnapshotSet(CreateSetParams(volumes: ["db"])).crashConsistent)
            await bystander.close()
        }
    }

    /// A writer naming a volume that does not exist is registered with a warning naming it (a typo
    /// must not go unnoticed); "*" and existing volumes are not warned about.
    @Test func writerHelloWarnsOfUnknownVolumes() async throws {
        try await ServerFixture.with { fixture in
            try await RawConnection.with(fixture.socketPath) { raw in
                let hello = try await raw.call(
                    #"{"id":1,"method":"hello","params":{"version":1,"role":"writer","name":"w","volumes":["db","dbx","*"]}}"#
                )
                let result = try #require(hello["result"] as? [String: Any])
                #expect(result["unknownVolumes"] as? [String] == ["dbx"])
                #expect((result["instance"] as? String)?.count == 36)
            }
        }
    }

    /// A stale socket file is replaced; a live daemon's socket or a regular file is left alone.
    @Test func staleSocketIsReplacedLiveOneIsNot() async throws {
        try await ServerFixture.with { fixture in
            let coordinator = ShadowCopyCoordinator(provider: RecordingProvider(), clock: ManualClock())
            await #expect(throws: ShadowCopyError.self) {
                _ = try await ControlServer.bind(
                    socketPath: fixture.socketPath, coordinator: coordinator, handler: CannedHandler())
            }
            try await fixture.client().ping()

            let stalePath = fixture.directory.appendingPathComponent("stale.sock").path
            try makeStaleSocket(at: stalePath)
            #expect(FileManager.default.fileExists(atPath: stalePath))
            let server = try await ControlServer.bind(
                socketPath: stalePath, coordinator: coordinator, handler: CannedHandler())
            let task = Task { await server.run() }
            let client = try await ControlClient.connect(socketPath: stalePath)
            try await client.ping()
            await client.close()
            task.cancel()
            await task.value
            #expect(!FileManager.default.fileExists(atPath: stalePath))

            let regular = fixture.directory.appendingPathComponent("file").path
            _ = FileManager.default.createFile(atPath: regular, contents: Data("keep".utf8))
            await #expect(throws: ShadowCopyError.self) {
                _ = try await ControlServer.bind(
                    socketPath: regular, coordinator: coordinator, handler: CannedHandler())
            }
            #expect(FileManager.default.contents(atPath: regular) == Data("keep".utf8))
        }
    }

    /// A client with no daemon behind the path gets `connection-failed` with the path in the sentence.
    @Test func noDaemonIsAClearError() async throws {
        let path = "/tmp/umbra-none-\(UUID().guidString.prefix(8)).sock"
        await #expect {
            try await ControlClient.connect(socketPath: path)
        } throws: { error in
            (error as? ShadowCopyError)?.code == .connectionFailed && "\(error)".contains(path)
        }
    }

    /// A Swift SDK writer takes part in a set end to end and `writer list` shows it.
    @Test func swiftWriterTakesPartInASet() async throws {
        try await ServerFixture.with { fixture in
            let delegate = RecordingDelegate()
            let writerTask = try await startWriter(fixture, name: "pg", delegate: delegate, expectedWriters: 1)
            let client = try await fixture.client()
            let listed = try await client.listWriters().writers
            #expect(listed.map(\.name) == ["pg"])
            #expect(listed.first?.state == .stable)
            let result = try await client.createSnapshotSet(CreateSetParams(volumes: ["db", "logs"]))
            #expect(!result.crashConsistent)
            #expect(result.writers.first?.metadata == .object(["components": .array([.string("main")])]))
            #expect(
                await delegate.events == [
                    .identify, .prepareForBackup, .prepareForSnapshot, .freeze, .thaw, .postSnapshot, .backupComplete,
                ])
            await client.close()
            writerTask.cancel()
            try? await writerTask.value
        }
    }

    /// A veto from the SDK reaches the requester naming writer and step; the hold is released and the
    /// next set, without the veto, succeeds.
    @Test func swiftWriterVetoFailsTheSetCleanly() async throws {
        try await ServerFixture.with { fixture in
            let delegate = RecordingDelegate()
            await delegate.set(.prepareForSnapshot, .veto(.retryable, "checkpoint running"))
            let writerTask = try await startWriter(fixture, name: "pg", delegate: delegate, expectedWriters: 1)
            let client = try await fixture.client()
            await #expect {
                try await client.createSnapshotSet(CreateSetParams(volumes: ["db"]))
            } throws: { error in
                guard let error = error as? ShadowCopyError else { return false }
                return error.code == .writerFailed && error.message.contains("'pg'")
                    && error.message.contains("prepare-for-snapshot") && error.message.contains("checkpoint running")
                    && error.details?.failedWriters?.first?.failure == .retryable
            }
            await delegate.waitFor(.abort)
            #expect(!fixture.provider.isHolding)
            let listed = try await client.listWriters().writers.first
            #expect(listed?.state == .failedAtPrepareSnapshot && listed?.failure == .retryable)
            await delegate.set(.prepareForSnapshot, .succeed)
            #expect(try await client.createSnapshotSet(CreateSetParams(volumes: ["db"])).state == .complete)
            #expect(try await client.listWriters().writers.first?.state == .stable)
            await client.close()
            writerTask.cancel()
            try? await writerTask.value
        }
    }

    /// A writer that hangs in Freeze fails the set when the (manual) clock passes the timeout; the hung
    /// writer gets Abort once it comes back, and the next set succeeds.
    @Test func hangingSwiftWriterTimesOut() async throws {
        try await ServerFixture.with { fixture in
            let delegate = RecordingDelegate()
            await delegate.set(.freeze, .block)
            let writerTask = try await startWriter(fixture, name: "slow", delegate: delegate, expectedWriters: 1)
            let client = try await fixture.client()
            let set = Task { try await client.createSnapshotSet(CreateSetParams(volumes: ["db"])) }
            await delegate.waitFor(.freeze)
            await fixture.clock.waitForSleepers(count: 1)
            fixture.clock.advance(by: .seconds(30))
            await #expect {
                try await set.value
            } throws: { error in
                let error = error as? ShadowCopyError
                return error?.code == .writerFailed && error?.details?.failedWriters?.first?.failure == .timeout
                    && error?.details?.failedWriters?.first?.step == .freeze
            }
            #expect(fixture.provider.callsBesidesFlushes == [.validate(["db"])])
            await delegate.set(.freeze, .succeed)
            await delegate.release()
            await delegate.waitFor(.abort)
            #expect(try await client.createSnapshotSet(CreateSetParams(volumes: ["db"])).state == .complete)
            await client.close()
            writerTask.cancel()
            try? await writerTask.value
        }
    }

    /// A writer that dies while frozen (its connection drops) fails the set as retryable; its SDK thaws
    /// the application by calling onAbort; it reconnects with the same instance and the next set works.
    @Test func writerCrashingWhileFrozenAndReconnecting() async throws {
        try await ServerFixture.with { fixture in
            let instance = UUID()
            let crashing = RecordingDelegate()
            let slow = RecordingDelegate()
            await slow.set(.freeze, .block)
            let crashingTask = try await startWriter(
                fixture, name: "pg", instance: instance, delegate: crashing, expectedWriters: 1)
            let slowTask = try await startWriter(fixture, name: "redis", delegate: slow, expectedWriters: 2)
            let client = try await fixture.client()
            let set = Task { try await client.createSnapshotSet(CreateSetParams(volumes: ["db"])) }
            await crashing.waitFor(.freeze)
            await slow.waitFor(.freeze)
            crashingTask.cancel()  // the connection drops with the writer frozen
            try? await crashingTask.value
            await #expect {
                try await set.value
            } throws: { error in
                let error = error as? ShadowCopyError
                return error?.code == .writerFailed && error?.message.contains("'pg'") == true
                    && error?.details?.failedWriters?.first?.failure == .retryable
            }
            await crashing.waitFor(.abort)
            await slow.set(.freeze, .succeed)
            await slow.release()
            await slow.waitFor(.abort)
            #expect(!fixture.provider.isHolding)

            let again = try await startWriter(
                fixture, name: "pg", instance: instance, delegate: RecordingDelegate(), expectedWriters: 2)
            let result = try await client.createSnapshotSet(CreateSetParams(volumes: ["db"]))
            #expect(Set(result.writers.map(\.instance)).contains(instance))
            await client.close()
            for task in [slowTask, again] {
                task.cancel()
                try? await task.value
            }
        }
    }

    /// `runReconnecting` comes back, with the same instance GUID, to a daemon restarted on the same path,
    /// after the retry delay measured on its clock.
    @Test func swiftWriterReconnectsToARestartedDaemon() async throws {
        let path = "/tmp/umbra-\(UUID().guidString.prefix(8)).sock"
        func serve() async throws -> (ShadowCopyCoordinator<RecordingProvider, ManualClock>, Task<Void, Never>) {
            let coordinator = ShadowCopyCoordinator(provider: RecordingProvider(), clock: ManualClock())
            let server = try await ControlServer.bind(
                socketPath: path, coordinator: coordinator, handler: CannedHandler())
            return (coordinator, Task { await server.run() })
        }
        let writerClock = ManualClock()
        let writer = ShadowCopyWriter(
            socketPath: path,
            name: "pg",
            volumes: ["db"],
            delegate: RecordingDelegate(),
            clock: writerClock
        )
        let (first, firstServer) = try await serve()
        let writerTask = Task { try await writer.runReconnecting(retryDelay: .seconds(5)) }
        await first.waitForWriters(count: 1)
        let instance = try #require(await first.listWriters().writers.first?.instance)
        while writer.instance == nil { await Task.yield() }  // the writer has read hello's answer
        #expect(writer.instance == instance)
        firstServer.cancel()
        await firstServer.value

        await writerClock.waitForSleepers(count: 1)
        let (second, secondServer) = try await serve()
        writerClock.advance(by: .seconds(5))
        await second.waitForWriters(count: 1)
        #expect(await second.listWriters().writers.first?.instance == instance)
        writerTask.cancel()
        try? await writerTask.value
        secondServer.cancel()
        await secondServer.value
    }

    /// A kept-open set completes over the socket; a second kept-open set is deleted when its requester's
    /// connection closes.
    @Test func keptOpenSetsOverTheSocket() async throws {
        try await ServerFixture.with { fixture in
            let delegate = RecordingDelegate()
            let writerTask = try await startWriter(fixture, name: "pg", delegate: delegate, expectedWriters: 1)
            let client = try await fixture.client()
            let open = try await client.createSnapshotSet(CreateSetParams(volumes: ["db"], keepOpen: true))
            #expect(open.state == .open)
            #expect(try await client.listWriters().writers.first?.state == .waitingForBackupComplete)
            #expect(try await client.completeSet(open.set).state == .complete)
            #expect(await delegate.events.last == .backupComplete)

            let leaving = try await fixture.client()
            let second = try await leaving.createSnapshotSet(CreateSetParams(volumes: ["db"], keepOpen: true))
            await leaving.close()
            await delegate.waitFor(.abort)
            while await fixture.coordinator.currentSetID != nil { await Task.yield() }
            #expect(fixture.provider.liveSets == [open.set])
            #expect(fixture.provider.calls.last == .delete(second.set))

            let third = try await client.createSnapshotSet(CreateSetParams(volumes: ["db"], keepOpen: true))
            try await client.abortSet(third.set)
            #expect(fixture.provider.liveSets == [open.set])
            await client.close()
            writerTask.cancel()
            try? await writerTask.value
        }
    }
}

/// What a daemon killed with SIGKILL leaves behind: a socket file nobody listens on.
private func makeStaleSocket(at path: String) throws {
    let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard descriptor >= 0 else { throw PlainError(description: "socket() failed") }
    defer { close(descriptor) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { buffer in
        buffer.copyBytes(from: path.utf8.prefix(buffer.count - 1))
    }
    let result = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
    }
    guard result == 0 else { throw PlainError(description: "bind() failed") }
}
