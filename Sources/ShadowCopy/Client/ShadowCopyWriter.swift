// The Swift writer SDK: an application implements `ShadowCopyWriterDelegate` (VSS's CVssWriter
// callbacks as async functions) and `ShadowCopyWriter.run()` keeps it registered with the daemon.
//
// Events are handled one at a time, in order, as the daemon sends them. Throwing from a callback
// vetoes the set: throw `WriterVeto` to choose the failure kind, anything else is non-retryable. The
// SDK never leaves an application frozen: if the connection drops while frozen, or the freeze window
// the daemon announced passes with no Thaw or Abort, it calls `onAbort` itself (and a Thaw that arrives
// after that is answered with a timeout veto, as VSS writers do).

import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// What the daemon said about the set with an event.
public struct WriterEventContext: Sendable, Hashable {
    public var event: WriterEvent
    public var set: UUID
    /// Every volume of the set.
    public var volumes: [String]
    /// How long the daemon waits for this answer.
    public var timeout: Duration
    /// Freeze only: how long the application may stay frozen.
    public var freezeWindow: Duration?
    /// Thaw, PostSnapshot, BackupComplete (and Abort after the commit): the snapshots taken.
    public var snapshots: [CreatedSnapshot]
    /// Abort only: why.
    public var reason: String?

    public init(
        event: WriterEvent,
        set: UUID,
        volumes: [String],
        timeout: Duration,
        freezeWindow: Duration? = nil,
        snapshots: [CreatedSnapshot] = [],
        reason: String? = nil
    ) {
        self.event = event
        self.set = set
        self.volumes = volumes
        self.timeout = timeout
        self.freezeWindow = freezeWindow
        self.snapshots = snapshots
        self.reason = reason
    }
}

/// Throw this from a callback to veto with a chosen failure kind.
public struct WriterVeto: Error, Sendable, Hashable {
    public var failure: WriterFailure
    public var message: String
    public init(_ failure: WriterFailure, _ message: String) {
        self.failure = failure
        self.message = message
    }
}

/// An application taking part in shadow copy sets. Every callback has a default that does nothing.
public protocol ShadowCopyWriterDelegate: Sendable {
    /// Report metadata (components, paths, anything JSON) for the requester; nil for none.
    func onIdentify(_ context: WriterEventContext) async throws -> JSONValue?
    func onPrepareForBackup(_ context: WriterEventContext) async throws
    func onPrepareForSnapshot(_ context: WriterEventContext) async throws
    /// Finish what is in flight, flush, and stop writing until Thaw or Abort.
    func onFreeze(_ context: WriterEventContext) async throws
    /// Resume writing.
    func onThaw(_ context: WriterEventContext) async throws
    func onPostSnapshot(_ context: WriterEventContext) async throws
    func onBackupComplete(_ context: WriterEventContext) async throws
    /// The set is off; if frozen, resume writing. Called by the SDK itself if the daemon goes away
    /// while frozen or the freeze window passes.
    func onAbort(_ context: WriterEventContext) async
}

extension ShadowCopyWriterDelegate {
    public func onIdentify(_ context: WriterEventContext) async throws -> JSONValue? { nil }
    public func onPrepareForBackup(_ context: WriterEventContext) async throws {}
    public func onPrepareForSnapshot(_ context: WriterEventContext) async throws {}
    public func onFreeze(_ context: WriterEventContext) async throws {}
    public func onThaw(_ context: WriterEventContext) async throws {}
    public func onPostSnapshot(_ context: WriterEventContext) async throws {}
    public func onBackupComplete(_ context: WriterEventContext) async throws {}
    public func onAbort(_ context: WriterEventContext) async {}
}

public final class ShadowCopyWriter<Delegate: ShadowCopyWriterDelegate>: Sendable {
    public let socketPath: String
    public let name: String
    public let volumes: [String]
    public let delegate: Delegate
    private let instanceRequest: UUID?
    private let group: any EventLoopGroup
    private let clock: any Clock<Duration>
    private let logger: Logger
    private let registered = Mutex<UUID?>(nil)

    /// - Parameters:
    ///   - volumes: the volumes the application writes to (`["*"]`: all).
    ///   - instance: a GUID to keep across reconnects; the daemon makes one up when nil.
    ///   - clock: times the freeze window for the self-thaw.
    public init(
        socketPath: String,
        name: String,
        volumes: [String],
        instance: UUID? = nil,
        delegate: Delegate,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        clock: any Clock<Duration> = ContinuousClock(),
        logger: Logger = Logger(label: "umbra.writer")
    ) {
        self.socketPath = socketPath
        self.name = name
        self.volumes = volumes
        self.instanceRequest = instance
        self.delegate = delegate
        self.group = group
        self.clock = clock
        self.logger = logger
    }

    /// The instance GUID the daemon confirmed, once registered.
    public var instance: UUID? { registered.withLock { $0 } }

    /// Connects, registers and answers events until the daemon closes the connection (returns) or the
    /// task is cancelled (returns, after closing). Throws if the daemon cannot be reached or refuses the
    /// registration.
    public func run() async throws {
        let connection = try await ControlConnection.connect(socketPath: socketPath, group: group)
        let session = WriterSession(delegate: delegate, clock: clock, logger: logger)
        do {
            let response = try await connection.request(
                method: "hello",
                params: HelloParams(
                    role: .writer,
                    client: "umbra-swift-writer",
                    name: name,
                    instance: instance ?? instanceRequest,
                    volumes: volumes
                )
            )
            if case .error(let error) = response.kind { throw error }
            let hello = try response.result(HelloResult.self)
            registered.withLock { $0 = hello.instance }
            if let unknown = hello.unknownVolumes, !unknown.isEmpty {
                logger.warning(
                    "the daemon has no volume named \(unknown.map { "'\($0)'" }.joined(separator: ", ")); this writer is told of sets of it once it exists",
                    metadata: ["shadow.writer": "\(name)"])
            }
            try await withTaskCancellationHandler {
                for await message in connection.requests {
                    let reply = await session.handle(message)
                    try await connection.send(reply)
                }
            } onCancel: {
                Task { await connection.close() }
            }
        } catch {
            await connection.close()
            await session.connectionLost()
            throw error
        }
        await connection.close()
        await session.connectionLost()
    }

    /// Runs the writer for good: connects again `retryDelay` after the daemon goes away or cannot be
    /// reached, keeping the same instance GUID, until the task is cancelled. Throws only when the daemon
    /// refuses the registration for a reason a retry cannot fix.
    public func runReconnecting(retryDelay: Duration = .seconds(2)) async throws {
        let permanent: Set<ControlErrorCode> = [.invalidParams, .unsupportedVersion, .badMessage, .wrongRole]
        while !Task.isCancelled {
            do {
                try await run()
            } catch let error as ShadowCopyError where permanent.contains(error.code) {
                throw error
            } catch {
                logger.debug("writer connection ended", metadata: ["shadow.error": "\(error)"])
            }
            try? await clock.sleep(for: retryDelay)
        }
    }
}

/// The event handling of one connection, apart from the socket so that it reads top to bottom.
actor WriterSession<Delegate: ShadowCopyWriterDelegate> {
    private let delegate: Delegate
    private let clock: any Clock<Duration>
    private let logger: Logger
    /// The set this writer is frozen for, from a successful Freeze until Thaw or Abort.
    private var frozen: WriterEventContext?
    private var selfThawTimer: Task<Void, Never>?

    init(delegate: Delegate, clock: any Clock<Duration>, logger: Logger) {
        self.delegate = delegate
        self.clock = clock
        self.logger = logger
    }

    /// Runs one event and returns the line that answers it.
    func handle(_ message: IncomingMessage) async -> ByteBuffer {
        guard case .request(let method) = message.kind else {
            return ControlEncoding.result(id: message.id, EmptyResult())
        }
        guard let event = WriterEvent(rawValue: method) else {
            // Events added in later revisions of this protocol version: acknowledge, as the page says.
            return ControlEncoding.result(id: message.id, EmptyResult())
        }
        let context: WriterEventContext
        do {
            let params = try message.params(WriterEventParams.self)
            context = WriterEventContext(
                event: event,
                set: params.set,
                volumes: params.volumes,
                timeout: .milliseconds(params.timeoutMs),
                freezeWindow: params.freezeWindowMs.map { .milliseconds($0) },
                snapshots: params.snapshots ?? [],
                reason: params.reason
            )
        } catch {
            return ControlEncoding.veto(id: message.id, failure: .nonRetryable, message: error.message)
        }
        do {
            switch event {
            case .identify:
                let metadata = try await delegate.onIdentify(context)
                return ControlEncoding.result(id: message.id, IdentifyResult(metadata: metadata))
            case .prepareForBackup: try await delegate.onPrepareForBackup(context)
            case .prepareForSnapshot: try await delegate.onPrepareForSnapshot(context)
            case .freeze:
                try await delegate.onFreeze(context)
                frozen = context
                armSelfThaw(context)
            case .thaw:
                guard takeFrozen(for: context.set) else {
                    throw WriterVeto(.timeout, "The freeze window passed before Thaw; the writer thawed by itself.")
                }
                try await delegate.onThaw(context)
            case .postSnapshot: try await delegate.onPostSnapshot(context)
            case .backupComplete: try await delegate.onBackupComplete(context)
            case .abort:
                _ = takeFrozen(for: context.set)
                await delegate.onAbort(context)
            }
            return ControlEncoding.result(id: message.id, EmptyResult())
        } catch let veto as WriterVeto {
            return ControlEncoding.veto(id: message.id, failure: veto.failure, message: veto.message)
        } catch {
            return ControlEncoding.veto(id: message.id, failure: .nonRetryable, message: "\(error)")
        }
    }

    /// The daemon is gone: an application still frozen is told to abort.
    func connectionLost() async {
        guard let context = frozen else { return }
        _ = takeFrozen(for: context.set)
        logger.debug("connection lost while frozen; aborting", metadata: ["shadow.set": "\(context.set.guidString)"])
        await delegate.onAbort(abortContext(context, reason: "The connection to the daemon was lost while frozen."))
    }

    private func takeFrozen(for set: UUID) -> Bool {
        guard frozen?.set == set else { return false }
        frozen = nil
        selfThawTimer?.cancel()
        selfThawTimer = nil
        return true
    }

    private func armSelfThaw(_ context: WriterEventContext) {
        guard let window = context.freezeWindow else { return }
        selfThawTimer = Task { [clock] in
            do {
                try await clock.sleep(for: window)
            } catch {
                return
            }
            await self.selfThaw(set: context.set)
        }
    }

    private func selfThaw(set: UUID) async {
        guard let context = frozen, context.set == set else { return }
        _ = takeFrozen(for: set)
        await delegate.onAbort(abortContext(context, reason: "The freeze window passed with no Thaw."))
    }

    private func abortContext(_ context: WriterEventContext, reason: String) -> WriterEventContext {
        var context = context
        context.event = .abort
        context.reason = reason
        return context
    }
}
