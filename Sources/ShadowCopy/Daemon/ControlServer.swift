// The daemon's end of the control socket.
//
// NIO does only framing (`ControlLineDecoder`); each connection is then a task reading frames. A
// connection starts with `hello` and becomes a requester or a writer for good. A requester's requests
// each run in their own child task, so a long `snapshot.create` does not stop the read loop from seeing
// the connection close (which aborts the requester's set). A writer's lines are answers to events and go
// straight to the coordinator. Everything the daemon sends on a connection goes through one ordered
// stream, so an event and an answer never interleave or overtake each other. Nothing a client sends is
// asserted on: every bad line gets an error answer and the connection carries on.
//
// Each accepted connection gets its serving task inside the child channel's initializer, not through
// the server channel's async sequence: a connection accepted while that sequence is being torn down
// would otherwise be dropped unserved, which NIO turns into a trap (swift-nio#2813). Stopping is
// `shutdown()`: stop accepting, let the coordinator answer requesters (`shutting-down`) and send writers
// Abort, then end each connection's reading, finish its requests, write out everything it was sent
// and only then close it.

import BlockIO
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization

public final class ControlServer: Sendable {
    public let socketPath: String
    private let serverName: String
    private let coordinator: any SetCoordinating
    private let handler: any ControlRequestHandler
    private let logger: Logger
    private let nextConnectionID = Atomic<UInt64>(0)
    private let state = Mutex(State())

    private struct Connection {
        var channel: any Channel
        /// The task reading its requests; cancelled at shutdown.
        var reading: Task<Void, Never>?
    }

    private struct State {
        var serverChannel: (any Channel)?
        var isStopping = false
        /// Every connection being served, by number (to end it at shutdown).
        var connections: [UInt64: Connection] = [:]
        var connectionsGone: [CheckedContinuation<Void, Never>] = []
        var stopped = false
        var stopWaiters: [CheckedContinuation<Void, Never>] = []
    }

    /// The longest shutdown waits for a client to take what it was sent before closing anyway.
    static let drainTimeout = TimeAmount.seconds(2)

    private init(
        socketPath: String,
        serverName: String,
        coordinator: any SetCoordinating,
        handler: any ControlRequestHandler,
        logger: Logger
    ) {
        self.socketPath = socketPath
        self.serverName = serverName
        self.coordinator = coordinator
        self.handler = handler
        self.logger = logger
    }

    /// Binds the control socket at `socketPath` and starts serving connections. A socket file left by
    /// a daemon that is gone is replaced; a live daemon on it, or a file that is not a socket, is an
    /// error. Give it an event loop group of its own in a daemon whose other loops may block (the
    /// NBD server's buffered writes can), so writers hear Thaw and Abort on time.
    public static func bind<Provider: SnapshotProvider, C: Clock>(
        socketPath: String,
        coordinator: ShadowCopyCoordinator<Provider, C>,
        handler: any ControlRequestHandler,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "umbra.control")
    ) async throws -> ControlServer {
        do {
            try SocketFile.prepare(path: socketPath)
        } catch {
            throw Self.controlError(error)
        }
        let server = ControlServer(
            socketPath: socketPath,
            serverName: coordinator.serverName,
            coordinator: coordinator,
            handler: handler,
            logger: logger
        )
        let channel: any Channel
        do {
            channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 64)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            ByteToMessageHandler(ControlLineDecoder(lineBytesMax: ControlProtocol.requestLineBytesMax))
                        )
                        let connection = try NIOAsyncChannel<ControlFrame, ByteBuffer>(
                            wrappingChannelSynchronously: channel)
                        server.accept(connection)
                    }
                }
                .bind(unixDomainSocketPath: socketPath)
                .get()
        } catch {
            throw ShadowCopyError(.internal, "Cannot listen on the control socket '\(socketPath)': \(error).")
        }
        do {
            try SocketFile.restrict(path: socketPath)
        } catch {
            try? await channel.close()
            throw Self.controlError(error)
        }
        server.state.withLock { $0.serverChannel = channel }
        return server
    }

    /// A socket file that cannot be used, as the control protocol says it: someone else's file is
    /// `already-exists`, a bad place for it `invalid-argument`, anything else `internal`.
    private static func controlError(_ error: SocketFileError) -> ShadowCopyError {
        let code: ControlErrorCode
        switch error {
        case .symbolicLink, .notASocket, .socketOfAnotherUser, .inUse: code = .alreadyExists
        case .unusableDirectory, .directoryIsNotADirectory, .directoryOfAnotherUser, .directoryWritableByEveryone:
            code = .invalidArgument
        case .unreadable, .cannotCheck, .cannotRemove, .cannotRestrict, .changedWhileBinding: code = .internal
        }
        let text = error.description
        return ShadowCopyError(code, "The control socket cannot be used: \(text).")
    }

    /// Waits until the server has stopped. Cancelling the waiting task stops it (`shutdown()`).
    public func run() async {
        await withTaskCancellationHandler {
            await waitUntilStopped()
        } onCancel: {
            Task { await self.shutdown() }
        }
    }

    private func waitUntilStopped() async {
        await withCheckedContinuation { continuation in
            let stopped = state.withLock { state in
                if !state.stopped { state.stopWaiters.append(continuation) }
                return state.stopped
            }
            if stopped { continuation.resume() }
        }
    }

    /// Stops: no new connections; the set in progress is aborted (its requester answered with
    /// `shutting-down`, its writers sent Abort) and rolled back; every connection stops reading,
    /// finishes what it was asked, is sent everything it was sent (a client that takes none of it for
    /// `drainTimeout` is closed anyway) and is closed; the socket file is removed. Safe to call more
    /// than once; every call returns once the server has stopped.
    public func shutdown() async {
        let (first, serverChannel) = state.withLock { state in
            defer { state.isStopping = true }
            return (!state.isStopping, state.serverChannel)
        }
        guard first else { return await waitUntilStopped() }
        try? await serverChannel?.close()
        await coordinator.shutdown()
        let connections = state.withLock { Array($0.connections.values) }
        for connection in connections {
            let channel = connection.channel
            channel.eventLoop.scheduleTask(in: Self.drainTimeout) { channel.close(promise: nil) }
            connection.reading?.cancel()
        }
        await withCheckedContinuation { continuation in
            let none = state.withLock { state in
                if !state.connections.isEmpty { state.connectionsGone.append(continuation) }
                return state.connections.isEmpty
            }
            if none { continuation.resume() }
        }
        try? FileManager.default.removeItem(atPath: socketPath)
        let waiters = state.withLock { state in
            state.stopped = true
            defer { state.stopWaiters = [] }
            return state.stopWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    // MARK: - One connection

    private enum Role {
        case awaitingHello
        case requester(RequesterID)
        case writer(WriterID)
    }

    /// Called from the child channel's initializer: the connection is served from here on, whatever
    /// else happens, so it is always closed through `executeThenClose`.
    private func accept(_ channel: NIOAsyncChannel<ControlFrame, ByteBuffer>) {
        let number = nextConnectionID.add(1, ordering: .relaxed).newValue
        let stopping = state.withLock { state in
            if !state.isStopping { state.connections[number] = Connection(channel: channel.channel) }
            return state.isStopping
        }
        Task {
            if stopping {
                try? await channel.executeThenClose { _, _ in }
                return
            }
            await self.serve(channel, number: number)
            let gone = self.state.withLock { state -> [CheckedContinuation<Void, Never>] in
                state.connections[number] = nil
                guard state.connections.isEmpty else { return [] }
                defer { state.connectionsGone = [] }
                return state.connectionsGone
            }
            for waiter in gone { waiter.resume() }
        }
    }

    /// Reads lines in a task of its own (shutdown cancels it to stop reading), runs requests in tasks
    /// of their own (never cancelled: each is answered), and writes replies in order; once reading has
    /// stopped and every request is answered, writes out the replies and closes.
    private func serve(_ channel: NIOAsyncChannel<ControlFrame, ByteBuffer>, number: UInt64) async {
        var logger = logger
        logger[metadataKey: "control.connection"] = "\(number)"
        let (replies, reply) = AsyncStream.makeStream(of: ByteBuffer.self)
        do {
            try await channel.executeThenClose { inbound, outbound in
                let requests = RequestTasks()
                let reading = Task { [logger] in
                    var role = Role.awaitingHello
                    do {
                        for try await frame in inbound {
                            await self.received(
                                frame, role: &role, number: number, reply: reply, requests: requests, logger: logger)
                        }
                    } catch {
                        logger.debug("control connection failed", metadata: ["control.error": "\(error)"])
                    }
                    switch role {
                    case .awaitingHello: break
                    case .requester(let id): await self.coordinator.requesterDisconnected(id)
                    case .writer(let id): await self.coordinator.writerDisconnected(id)
                    }
                }
                let stopping = state.withLock { state in
                    state.connections[number]?.reading = reading
                    return state.isStopping
                }
                if stopping { reading.cancel() }
                async let written: Void = {
                    for await line in replies { try? await outbound.write(line) }
                }()
                await reading.value
                await requests.waitUntilDone()
                reply.finish()
                await written
                // Closing the output waits for what NIO still holds to reach the socket.
                try? await channel.channel.close(mode: .output).get()
            }
        } catch {
            logger.debug("control connection ended", metadata: ["control.error": "\(error)"])
        }
    }

    private func received(
        _ frame: ControlFrame,
        role: inout Role,
        number: UInt64,
        reply: AsyncStream<ByteBuffer>.Continuation,
        requests: RequestTasks,
        logger: Logger
    ) async {
        guard case .line(let line) = frame else {
            let error = ShadowCopyError(
                .messageTooLarge,
                "A message was longer than \(ControlProtocol.requestLineBytesMax) bytes and was discarded."
            )
            reply.yield(ControlEncoding.error(ErrorReply(id: nil, error: error)))
            return
        }
        let message: IncomingMessage
        switch IncomingMessage.parse(line) {
        case .success(let parsed): message = parsed
        case .failure(let errorReply):
            reply.yield(ControlEncoding.error(errorReply))
            return
        }
        switch (role, message.kind) {
        case (.awaitingHello, .request(let method)):
            guard method == "hello" else {
                let error = ShadowCopyError(.helloRequired, "The first request on a connection must be hello.")
                reply.yield(ControlEncoding.error(ErrorReply(id: message.id, error: error)))
                return
            }
            do {
                role = try await hello(message, number: number, reply: reply)
            } catch {
                reply.yield(
                    ControlEncoding.error(
                        ErrorReply(id: message.id, error: ShadowCopyError.wrapping(error, as: .internal))
                    )
                )
            }
        case (.requester(let requester), .request(let method)):
            requests.run {
                let line: ByteBuffer
                do {
                    line = try await self.requesterRequest(method, message, requester: requester)
                } catch {
                    line = ControlEncoding.error(
                        ErrorReply(id: message.id, error: ShadowCopyError.wrapping(error, as: .internal))
                    )
                }
                reply.yield(line)
            }
        case (.writer, .request(let method)):
            let line: ByteBuffer
            switch method {
            case "ping": line = ControlEncoding.result(id: message.id, EmptyResult())
            case "hello":
                line = ControlEncoding.error(
                    ErrorReply(id: message.id, error: ShadowCopyError(.badMessage, "hello was already sent."))
                )
            case let method where Self.requesterMethods.contains(method):
                line = ControlEncoding.error(
                    ErrorReply(
                        id: message.id,
                        error: ShadowCopyError(.wrongRole, "\(method) is for requesters; this connection is a writer.")
                    )
                )
            default:
                line = ControlEncoding.error(
                    ErrorReply(id: message.id, error: ShadowCopyError(.unknownMethod, "There is no method \(method)."))
                )
            }
            reply.yield(line)
        case (.writer(let writer), .result), (.writer(let writer), .error):
            guard case .number(let requestID) = message.id else { return }
            await coordinator.writerAnswered(writer, requestID: requestID, answer: Self.answer(from: message))
        case (.awaitingHello, .result), (.awaitingHello, .error), (.requester, .result), (.requester, .error):
            logger.debug("unrequested response ignored", metadata: ["control.id": "\(message.id)"])
        }
    }

    /// Answers hello (itself, so that a writer's answer is queued before its first event) and returns
    /// the connection's role.
    private func hello(
        _ message: IncomingMessage,
        number: UInt64,
        reply: AsyncStream<ByteBuffer>.Continuation
    ) async throws -> Role {
        let params = try message.params(HelloParams.self)
        guard let version = ControlProtocol.supportedVersions.last(where: { $0 <= params.version }) else {
            throw ShadowCopyError(
                .unsupportedVersion,
                "The daemon speaks control protocol versions \(ControlProtocol.supportedVersions), not"
                    + " \(params.version).",
                details: ControlErrorDetails(supportedVersions: ControlProtocol.supportedVersions)
            )
        }
        switch params.role {
        case .requester:
            reply.yield(ControlEncoding.result(id: message.id, HelloResult(version: version, server: serverName)))
            return .requester(RequesterID(rawValue: number))
        case .writer:
            let id = WriterID(rawValue: number)
            let serverName = serverName
            // A volume that does not exist is accepted with a warning: the writer may start before
            // its volume is created, but a typo must not go unnoticed.
            let known = try? await handler.listVolumes().volumes.map(\.name)
            let unknown = (params.volumes ?? []).filter { name in name != "*" && known.map { !$0.contains(name) } == true }
            _ = try await coordinator.registerWriter(params, id: id) { instance in
                reply.yield(
                    ControlEncoding.result(
                        id: message.id,
                        HelloResult(
                            version: version, server: serverName, instance: instance,
                            unknownVolumes: unknown.isEmpty ? nil : unknown)
                    )
                )
            } sink: { delivery in
                reply.yield(
                    ControlEncoding.request(
                        id: .number(delivery.requestID),
                        method: delivery.event.rawValue,
                        params: delivery.params
                    )
                )
            }
            if !unknown.isEmpty {
                logger.warning(
                    "a writer named volumes that do not exist; it is told of sets of them once they do",
                    metadata: ["shadow.writer": "\(params.name ?? "")", "volumes": "\(unknown.joined(separator: ","))"])
            }
            return .writer(id)
        }
    }

    static let requesterMethods: Set<String> = [
        "volume.create", "volume.list", "volume.delete", "snapshot.create", "snapshot.list", "snapshot.delete",
        "snapshot.changes", "set.complete", "set.abort", "writer.list",
    ]

    /// The one dispatch of requester methods: decode params, call the coordinator or the handler,
    /// encode the result.
    private func requesterRequest(_ method: String, _ message: IncomingMessage, requester: RequesterID)
        async throws -> ByteBuffer
    {
        let id = message.id
        switch method {
        case "ping":
            return ControlEncoding.result(id: id, EmptyResult())
        case "hello":
            throw ShadowCopyError(.badMessage, "hello was already sent.")
        case "volume.create":
            let params = try message.params(CreateVolumeParams.self)
            return ControlEncoding.result(id: id, try await handler.createVolume(params))
        case "volume.list":
            return ControlEncoding.result(id: id, try await handler.listVolumes())
        case "volume.delete":
            let params = try message.params(VolumeNameParams.self)
            try await handler.deleteVolume(name: params.name)
            return ControlEncoding.result(id: id, EmptyResult())
        case "snapshot.list":
            let params = try message.params(ListSnapshotsParams.self)
            return ControlEncoding.result(id: id, try await handler.listSnapshots(volume: params.volume))
        case "snapshot.delete":
            let params = try message.params(DeleteSnapshotsParams.self)
            return ControlEncoding.result(id: id, try await handler.deleteSnapshots(ids: params.ids))
        case "snapshot.changes":
            let params = try message.params(ChangesParams.self)
            return ControlEncoding.result(id: id, try await handler.changes(params))
        case "snapshot.create":
            let params = try message.params(CreateSetParams.self)
            return ControlEncoding.result(id: id, try await coordinator.createSet(params, requester: requester))
        case "set.complete":
            let params = try message.params(SetParams.self)
            return ControlEncoding.result(id: id, try await coordinator.completeSet(params.set, requester: requester))
        case "set.abort":
            let params = try message.params(SetParams.self)
            try await coordinator.abortSet(params.set, requester: requester)
            return ControlEncoding.result(id: id, EmptyResult())
        case "writer.list":
            return ControlEncoding.result(id: id, await coordinator.listWriters())
        default:
            throw ShadowCopyError(.unknownMethod, "There is no method \(method).")
        }
    }

    /// A writer's answer: any `error` is a veto; an unknown or missing failure kind is non-retryable.
    static func answer(from message: IncomingMessage) -> WriterAnswer {
        switch message.kind {
        case .error(let error):
            struct Veto: Decodable {
                struct Body: Decodable { var failure: String? }
                var error: Body
            }
            let kind = (try? ControlJSON.makeDecoder().decode(Veto.self, from: message.json))?.error.failure
            let failure = kind.flatMap(WriterFailure.init(rawValue:)) ?? .nonRetryable
            return .veto(failure, message: error.message.isEmpty ? "vetoed without saying why" : error.message)
        default:
            let result = try? message.result(IdentifyResult.self)
            return .success(metadata: result?.metadata)
        }
    }
}

/// A connection's requests in flight, each in a task of its own, and a way to wait for all of them.
private final class RequestTasks: Sendable {
    private struct State {
        var running = 0
        var idle: [CheckedContinuation<Void, Never>] = []
    }

    private let state = Mutex(State())

    func run(_ body: @escaping @Sendable () async -> Void) {
        state.withLock { $0.running += 1 }
        Task {
            await body()
            let idle = state.withLock { state -> [CheckedContinuation<Void, Never>] in
                state.running -= 1
                guard state.running == 0 else { return [] }
                defer { state.idle = [] }
                return state.idle
            }
            for waiter in idle { waiter.resume() }
        }
    }

    func waitUntilDone() async {
        await withCheckedContinuation { continuation in
            let done = state.withLock { state in
                if state.running > 0 { state.idle.append(continuation) }
                return state.running == 0
            }
            if done { continuation.resume() }
        }
    }
}
