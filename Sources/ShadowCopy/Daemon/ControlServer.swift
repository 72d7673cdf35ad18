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
    let serverName: String
    let coordinator: any SetCoordinating
    let handler: any ControlRequestHandler
    let logger: Logger
    let nextConnectionID = Atomic<UInt64>(0)
    let state = Mutex(State())

    struct Connection {
        var channel: any Channel
        /// The task reading its requests; cancelled at shutdown.
        var reading: Task<Void, Never>?
    }

    struct State {
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
    static func controlError(_ error: SocketFileError) -> ShadowCopyError {
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

    func waitUntilStopped() async {
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

    enum Role {
        case awaitingHello
        case requester(RequesterID)
        case writer(WriterID)
    }

    /// Called from the child channel's initializer: the connection is served from here on, whatever
    /// else happens, so it is always closed through `executeThenClose`.
    func accept(_ channel: NIOAsyncChannel<ControlFrame, ByteBuffer>) {
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
    func serve(_ channel: NIOAsyncChannel<ControlFrame, ByteBuffer>, number: UInt64) async {
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
}
