// What a control connection's lines mean: hello, a requester's methods (one dispatch), a writer's
// answers to events; and the requests in flight on a connection.

import Foundation
import Logging
import NIOCore
import Synchronization

extension ControlServer {
    func received(
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
    func hello(
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
            let unknown = (params.volumes ?? []).filter { name in
                name != "*" && known.map { !$0.contains(name) } == true
            }
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
        "volume.create", "volume.list", "volume.set", "volume.revert", "volume.restore", "volume.delete",
        "snapshot.backup", "set.label", "snapshot.create",
        "snapshot.list",
        "snapshot.delete",
        "snapshot.changes", "set.complete", "set.abort", "writer.list", "verify", "status", "reload",
    ]

    /// The one dispatch of requester methods: decode params, call the coordinator or the handler,
    /// encode the result.
    func requesterRequest(_ method: String, _ message: IncomingMessage, requester: RequesterID)
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
        case "volume.set":
            let params = try message.params(SetVolumeParams.self)
            return ControlEncoding.result(id: id, try await handler.setVolume(params))
        case "volume.restore":
            let params = try message.params(RestoreParams.self)
            return ControlEncoding.result(id: id, try await handler.restoreVolume(params))
        case "set.label":
            let params = try message.params(LabelSetParams.self)
            try await handler.labelSet(params)
            return ControlEncoding.result(id: id, EmptyResult())
        case "snapshot.backup":
            let params = try message.params(BackupImageParams.self)
            return ControlEncoding.result(id: id, try await handler.backupSnapshot(params))
        case "volume.revert":
            let params = try message.params(RevertParams.self)
            return ControlEncoding.result(id: id, try await handler.revertVolume(params))
        case "volume.delete":
            let params = try message.params(VolumeNameParams.self)
            try await handler.deleteVolume(name: params.name, deletingImage: params.deleteImage ?? false)
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
        case "status":
            return ControlEncoding.result(id: id, try await handler.status())
        case "reload":
            return ControlEncoding.result(id: id, try await handler.reload())
        case "verify":
            let params = try message.params(VerifyParams.self)
            return ControlEncoding.result(id: id, try await handler.verify(params))
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
final class RequestTasks: Sendable {
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
