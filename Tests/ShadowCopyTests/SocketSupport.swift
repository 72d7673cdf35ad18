// Helpers for tests over real Unix sockets: a running server in a fresh temporary directory, and a raw
// line connection for sending exactly the bytes a test wants.

import Foundation
import NIOCore
import NIOPosix
import Testing
import UmbraTestSupport

@testable import ShadowCopy

struct ServerFixture: Sendable {
    let directory: URL
    let socketPath: String
    let clock: ManualClock
    let provider: RecordingProvider
    let coordinator: ShadowCopyCoordinator<RecordingProvider, ManualClock>

    /// Runs `body` against a fresh server, and always stops the server and removes the directory.
    static func with<T>(
        eventTimeout: Duration = .seconds(30),
        _ body: (ServerFixture) async throws -> T
    ) async throws -> T {
        // Short paths: a Unix socket path must fit in 108 bytes.
        let directory = URL(fileURLWithPath: "/tmp").appendingPathComponent("umbra-\(UUID().guidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let clock = ManualClock()
        let provider = RecordingProvider()
        let coordinator = ShadowCopyCoordinator(
            provider: provider,
            clock: clock,
            configuration: CoordinatorConfiguration(eventTimeout: eventTimeout)
        )
        let socketPath = directory.appendingPathComponent("control.sock").path
        let server = try await ControlServer.bind(
            socketPath: socketPath, coordinator: coordinator, handler: CannedHandler())
        let serverTask = Task { await server.run() }
        let fixture = ServerFixture(
            directory: directory,
            socketPath: socketPath,
            clock: clock,
            provider: provider,
            coordinator: coordinator
        )
        do {
            let result = try await body(fixture)
            serverTask.cancel()
            await serverTask.value
            return result
        } catch {
            serverTask.cancel()
            await serverTask.value
            throw error
        }
    }

    func client() async throws -> ControlClient {
        try await ControlClient.connect(socketPath: socketPath)
    }
}

/// A connection that sends raw lines and reads raw lines.
struct RawConnection {
    var inbound: NIOAsyncChannelInboundStream<ControlFrame>.AsyncIterator
    let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>

    static func with<T>(_ socketPath: String, _ body: (inout RawConnection) async throws -> T) async throws -> T {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(unixDomainSocketPath: socketPath) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(ControlLineDecoder(lineBytesMax: ControlProtocol.responseLineBytesMax))
                    )
                    return try NIOAsyncChannel<ControlFrame, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        return try await channel.executeThenClose { inbound, outbound in
            var connection = RawConnection(inbound: inbound.makeAsyncIterator(), outbound: outbound)
            return try await body(&connection)
        }
    }

    func send(_ text: String) async throws {
        try await outbound.write(ByteBuffer(string: text))
    }

    /// The next line from the daemon, as a JSON object.
    mutating func receive() async throws -> [String: Any] {
        guard case .line(let line) = try await inbound.next() else {
            throw PlainError(description: "connection closed")
        }
        let object = try JSONSerialization.jsonObject(with: Data(line.readableBytesView))
        return try #require(object as? [String: Any])
    }

    /// Sends one request line and returns the answer.
    mutating func call(_ line: String) async throws -> [String: Any] {
        try await send(line + "\n")
        return try await receive()
    }

    mutating func helloAsRequester() async throws {
        let answer = try await call(#"{"id":0,"method":"hello","params":{"version":1,"role":"requester"}}"#)
        #expect(answer["result"] != nil)
    }
}

extension [String: Any] {
    var errorCode: String? { (self["error"] as? [String: Any])?["code"] as? String }
}

/// A writer delegate that records what it was told and does what the test says for each event.
actor RecordingDelegate: ShadowCopyWriterDelegate {
    enum Behaviour: Sendable {
        case succeed
        case veto(WriterFailure, String)
        /// Wait until `release()` is called.
        case block
    }

    private(set) var events: [WriterEvent] = []
    private var behaviours: [WriterEvent: Behaviour] = [:]
    private var eventWaiters: [(WriterEvent, CheckedContinuation<Void, Never>)] = []
    private var blocked: [CheckedContinuation<Void, Never>] = []

    func set(_ event: WriterEvent, _ behaviour: Behaviour) { behaviours[event] = behaviour }

    /// Lets every blocked callback go on.
    func release() {
        for continuation in blocked { continuation.resume() }
        blocked = []
    }

    /// Suspends until `event` has been delivered (its callback entered).
    func waitFor(_ event: WriterEvent) async {
        if events.contains(event) { return }
        await withCheckedContinuation { eventWaiters.append((event, $0)) }
    }

    private func record(_ context: WriterEventContext) async throws {
        events.append(context.event)
        let ready = eventWaiters.filter { $0.0 == context.event }
        eventWaiters.removeAll { $0.0 == context.event }
        for waiter in ready { waiter.1.resume() }
        switch behaviours[context.event] ?? .succeed {
        case .succeed: return
        case .veto(let failure, let message): throw WriterVeto(failure, message)
        case .block: await withCheckedContinuation { blocked.append($0) }
        }
    }

    func onIdentify(_ context: WriterEventContext) async throws -> JSONValue? {
        try await record(context)
        return .object(["components": .array([.string("main")])])
    }
    func onPrepareForBackup(_ context: WriterEventContext) async throws { try await record(context) }
    func onPrepareForSnapshot(_ context: WriterEventContext) async throws { try await record(context) }
    func onFreeze(_ context: WriterEventContext) async throws { try await record(context) }
    func onThaw(_ context: WriterEventContext) async throws { try await record(context) }
    func onPostSnapshot(_ context: WriterEventContext) async throws { try await record(context) }
    func onBackupComplete(_ context: WriterEventContext) async throws { try await record(context) }
    func onAbort(_ context: WriterEventContext) async { try? await record(context) }
}

/// Starts a Swift SDK writer in its own task and waits until the daemon has registered it.
func startWriter(
    _ fixture: ServerFixture,
    name: String,
    volumes: [String] = ["db"],
    instance: UUID? = nil,
    delegate: RecordingDelegate,
    expectedWriters: Int
) async throws -> Task<Void, any Error> {
    let writer = ShadowCopyWriter(
        socketPath: fixture.socketPath,
        name: name,
        volumes: volumes,
        instance: instance,
        delegate: delegate
    )
    let task = Task { try await writer.run() }
    await fixture.coordinator.waitForWriters(count: expectedWriters)
    return task
}
