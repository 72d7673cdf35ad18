// The client end of a control connection, shared by `ControlClient` (requesters) and
// `ShadowCopyWriter` (writers).
//
// One task owns the channel: it reads frames, resolves the caller waiting for each response id, and
// hands requests from the daemon (a writer's events) to `requests`. Callers send from any task; the
// NIO outbound writer keeps their lines whole and in call order. When the connection ends, every
// caller still waiting gets `connection-closed`.

import Foundation
import NIOCore
import NIOPosix
import Synchronization

final class ControlConnection: Sendable {
    private struct State {
        var outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>?
        var waiting: [Int64: CheckedContinuation<IncomingMessage, any Error>] = [:]
        var nextID: Int64 = 0
        var isClosed = false
    }

    /// Requests from the daemon (events, for a writer), in arrival order; ends with the connection.
    let requests: AsyncStream<IncomingMessage>
    private let requestsContinuation: AsyncStream<IncomingMessage>.Continuation
    private let state = Mutex(State())
    private let reader = Mutex<Task<Void, Never>?>(nil)
    private let path: String

    private init(path: String) {
        self.path = path
        (requests, requestsContinuation) = AsyncStream.makeStream(of: IncomingMessage.self)
    }

    static func connect(socketPath: String, group: any EventLoopGroup) async throws -> ControlConnection {
        let channel: NIOAsyncChannel<ControlFrame, ByteBuffer>
        do {
            channel = try await ClientBootstrap(group: group).connect(unixDomainSocketPath: socketPath) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(ControlLineDecoder(lineBytesMax: ControlProtocol.responseLineBytesMax))
                    )
                    return try NIOAsyncChannel<ControlFrame, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        } catch {
            throw ShadowCopyError(
                .connectionFailed,
                "Cannot reach the Umbra daemon's control socket at '\(socketPath)' (\(error)); is `umbra serve`"
                    + " running?"
            )
        }
        let connection = ControlConnection(path: socketPath)
        let ready = AsyncStream.makeStream(of: Void.self)
        let task = Task {
            do {
                try await channel.executeThenClose { inbound, outbound in
                    connection.state.withLock { $0.outbound = outbound }
                    ready.continuation.finish()
                    for try await frame in inbound {
                        guard connection.received(frame) else { break }
                    }
                }
            } catch {
                // The connection failed; every waiter learns it below.
            }
            ready.continuation.finish()
            connection.closed()
        }
        connection.reader.withLock { $0 = task }
        for await _ in ready.stream {}
        return connection
    }

    /// Sends a request and waits for the response with its id (result or error, still undecoded).
    func request(method: String, params: some Encodable) async throws -> IncomingMessage {
        try await withCheckedThrowingContinuation { continuation in
            let (id, outbound) = state.withLock { state -> (Int64?, NIOAsyncChannelOutboundWriter<ByteBuffer>?) in
                guard !state.isClosed else { return (nil, nil) }
                state.nextID += 1
                state.waiting[state.nextID] = continuation
                return (state.nextID, state.outbound)
            }
            guard let id, let outbound else {
                continuation.resume(throwing: closedError())
                return
            }
            let line = ControlEncoding.request(id: .number(id), method: method, params: params)
            Task {
                do {
                    try await outbound.write(line)
                } catch {
                    state.withLock { $0.waiting.removeValue(forKey: id) }?.resume(throwing: closedError())
                }
            }
        }
    }

    /// Sends a line as it is (a writer's answer).
    func send(_ line: ByteBuffer) async throws {
        guard let outbound = state.withLock({ $0.isClosed ? nil : $0.outbound }) else { throw closedError() }
        do {
            try await outbound.write(line)
        } catch {
            throw closedError()
        }
    }

    /// Closes the connection; waiting callers get `connection-closed`.
    func close() async {
        let task = reader.withLock { $0 }
        task?.cancel()
        await task?.value
    }

    /// Suspends until the daemon closes the connection (or `close` is called).
    func waitUntilClosed() async {
        await reader.withLock { $0 }?.value
    }

    /// Handles one frame; false ends the connection.
    private func received(_ frame: ControlFrame) -> Bool {
        // A line too long to read may have been an answer someone waits for: give up on the connection
        // rather than leave them waiting.
        guard case .line(let line) = frame else { return false }
        guard case .success(let message) = IncomingMessage.parse(line) else {
            return true  // the daemon never sends these; nothing sensible to answer
        }
        switch message.kind {
        case .request:
            requestsContinuation.yield(message)
        case .result, .error:
            guard case .number(let id) = message.id else { return true }
            state.withLock { $0.waiting.removeValue(forKey: id) }?.resume(returning: message)
        }
        return true
    }

    private func closed() {
        let waiting = state.withLock { state in
            state.isClosed = true
            state.outbound = nil
            defer { state.waiting = [:] }
            return state.waiting
        }
        for continuation in waiting.values { continuation.resume(throwing: closedError()) }
        requestsContinuation.finish()
    }

    private func closedError() -> ShadowCopyError {
        ShadowCopyError(.connectionClosed, "The connection to the Umbra daemon at '\(path)' closed.")
    }
}
