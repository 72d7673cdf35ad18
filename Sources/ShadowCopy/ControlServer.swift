// The daemon's end of the control socket.
//
// NIO does only framing (`ControlLineDecoder`); each connection is then a task reading frames. A
// connection starts with `hello` and becomes a requester or a writer for good. A requester's requests
// each run in their own child task, so a long `snapshot.create` does not stop the read loop from seeing
// the connection close (which aborts the requester's set). A writer's lines are answers to events and go
// straight to the coordinator. Everything the daemon sends on a connection goes through one ordered
// stream, so an event and an answer never interleave or overtake each other. Nothing a client sends is
// asserted on: every bad line gets an error answer and the connection carries on.

import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization

public final class ControlServer: Sendable {
    public let socketPath: String
    private let serverName: String
    private let serverChannel: NIOAsyncChannel<NIOAsyncChannel<ControlFrame, ByteBuffer>, Never>
    private let coordinator: any SetCoordinating
    private let handler: any ControlRequestHandler
    private let logger: Logger
    private let nextConnectionID = Atomic<UInt64>(0)

    private init(
        socketPath: String,
        serverName: String,
        serverChannel: NIOAsyncChannel<NIOAsyncChannel<ControlFrame, ByteBuffer>, Never>,
        coordinator: any SetCoordinating,
        handler: any ControlRequestHandler,
        logger: Logger
    ) {
        self.socketPath = socketPath
        self.serverName = serverName
        self.serverChannel = serverChannel
        self.coordinator = coordinator
        self.handler = handler
        self.logger = logger
    }

    /// Binds the control socket at `socketPath`. A socket file left by a daemon that is gone is
    /// replaced; a live daemon on it, or a file that is not a socket, is an error.
    public static func bind<Provider: SnapshotProvider, C: Clock>(
        socketPath: String,
        coordinator: ShadowCopyCoordinator<Provider, C>,
        handler: any ControlRequestHandler,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "umbra.control")
    ) async throws -> ControlServer {
        try await ControlSocketFile.prepare(path: socketPath) { path in
            guard let live = try? await ClientBootstrap(group: group).connect(unixDomainSocketPath: path).get() else {
                return false
            }
            try? await live.close()
            return true
        }
        let channel: NIOAsyncChannel<NIOAsyncChannel<ControlFrame, ByteBuffer>, Never>
        do {
            channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 64)
                .bind(unixDomainSocketPath: socketPath) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            ByteToMessageHandler(ControlLineDecoder(lineBytesMax: ControlProtocol.requestLineBytesMax))
                        )
                        return try NIOAsyncChannel<ControlFrame, ByteBuffer>(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            throw ShadowCopyError(.internal, "Cannot listen on the control socket '\(socketPath)': \(error).")
        }
        do {
            try ControlSocketFile.restrict(path: socketPath)
        } catch {
            try? await channel.channel.close()
            throw error
        }
        return ControlServer(
            socketPath: socketPath,
            serverName: coordinator.serverName,
            serverChannel: channel,
            coordinator: coordinator,
            handler: handler,
            logger: logger
        )
    }

    /// Serves connections until the calling task is cancelled; then aborts any set in progress, closes
    /// every connection and removes the socket file.
    public func run() async throws {
        defer { try? FileManager.default.removeItem(atPath: socketPath) }
        let coordinator = self.coordinator
        try await withTaskCancellationHandler {
            try await serverChannel.executeThenClose { inbound in
                try await withThrowingDiscardingTaskGroup { group in
                    for try await connection in inbound {
                        group.addTask { await self.serve(connection) }
                    }
                }
            }
        } onCancel: {
            Task { await coordinator.shutdown() }
        }
    }

    // MARK: - One connection

    private enum Role {
        case awaitingHello
        case requester(RequesterID)
        case writer(WriterID)
    }

    private func serve(_ channel: NIOAsyncChannel<ControlFrame, ByteBuffer>) async {
        let number = nextConnectionID.add(1, ordering: .relaxed).newValue
        var logger = logger
        logger[metadataKey: "control.connection"] = "\(number)"
        let (replies, replyContinuation) = AsyncStream.makeStream(of: ByteBuffer.self)
        do {
            try await channel.executeThenClose { inbound, outbound in
                await withTaskGroup(of: Void.self) { pump in
                    pump.addTask {
                        for await line in replies { try? await outbound.write(line) }
                    }
                    var role = Role.awaitingHello
                    await withTaskGroup(of: Void.self) { requests in
                        do {
                            for try await frame in inbound {
                                await self.received(
                                    frame,
                                    role: &role,
                                    number: number,
                                    reply: replyContinuation,
                                    requests: &requests,
                                    logger: logger
                                )
                            }
                        } catch {
                            logger.debug("control connection failed", metadata: ["control.error": "\(error)"])
                        }
                        switch role {
                        case .awaitingHello: break
                        case .requester(let id): await self.coordinator.requesterDisconnected(id)
                        case .writer(let id): await self.coordinator.writerDisconnected(id)
                        }
                        await requests.waitForAll()
                    }
                    replyContinuation.finish()
                }
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
        requests: inout TaskGroup<Void>,
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
            requests.addTask {
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
            _ = try await coordinator.registerWriter(params, id: id) { instance in
                reply.yield(
                    ControlEncoding.result(
                        id: message.id,
                        HelloResult(version: version, server: serverName, instance: instance)
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
