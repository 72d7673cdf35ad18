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
