import BlockIO
import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import Synchronization

// Design note. The server owns listeners and the set of live connections; everything per request
// lives in the connection handlers. Shutdown follows proto.md's advice: stop accepting, let every
// connection answer what is in flight while refusing new requests (`ESHUTDOWN`, and
// `NBD_REP_ERR_SHUTDOWN` to options), flush every export, then close. Each event loop gets one
// task executor, shared by the connections on that loop.

/// An NBD server (fixed newstyle) serving the exports of a registry on TCP and Unix sockets.
public final class NBDServer: Sendable {
    public struct Configuration: Sendable {
        public var limits = NBDLimits()
        /// TLS (NBD_OPT_STARTTLS); nil serves plain text only.
        public var tls: NBDTLSConfiguration?
        /// Which clients may see, open and write which exports; nil allows everything to everyone.
        public var accessPolicy: NBDAccessPolicy?
        /// Outbound bytes queued per connection above which it stops reading requests.
        public var writeBufferHighWaterMark = 4 * 1024 * 1024
        /// Largest buffer one socket read fills.
        public var maximumReadBytes = 1024 * 1024
        /// SO_SNDBUF of each connection over a Unix socket (0: the kernel's default, 208 KiB on
        /// Linux). Big reads then go out in fewer, longer `sendfile` calls with fewer wake-ups: one
        /// connection's 1 MiB reads measured 1.7 times faster with 4 MiB (docs/performance.md).
        /// Linux caps it at net.core.wmem_max. TCP keeps the kernel's own tuning. (A bigger receive
        /// buffer did not speed writes up, and would let each connection park more of a client's
        /// bytes in the kernel.)
        public var unixSocketSendBufferBytes = 4 * 1024 * 1024
        /// Idle big buffers kept for reuse, per event loop (see `NBDBufferPool`).
        public var maximumPooledBytesPerEventLoop = 64 * 1024 * 1024
        /// Count requests, bytes, latency, refusals and TLS handshakes through swift-metrics
        /// (`NBDMetrics`); off, requests cost nothing extra.
        public var recordsMetrics = false

        public init() {}
    }

    private struct Listener: Sendable {
        var channel: any Channel
        var address: NBDListenAddress
        var unixSocket: SocketFile.Identity?
    }

    private struct State {
        var listeners: [Listener] = []
        var connections: [UInt64: NBDConnection] = [:]
        var nextConnectionID: UInt64 = 0
        var isShuttingDown = false
        var admission: NBDConnectionAdmission
        /// What new connections get: TLS and access rules can be replaced by `reload`.
        var environment: NBDConnectionHandler.Environment
    }

    public let registry: NBDExportRegistry
    public let configuration: Configuration
    private let group: any EventLoopGroup
    private let logger: Logger
    private let executors: [ObjectIdentifier: EventLoopTaskExecutor]
    private let bufferPools: [ObjectIdentifier: NBDBufferPool]
    private let state: Mutex<State>

    /// Zero bytes shared by all connections for holes that must be sent as data.
    private static let zeroBytes = 1024 * 1024

    public init(
        registry: NBDExportRegistry,
        configuration: Configuration = Configuration(),
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "umbra.nbd")
    ) {
        self.registry = registry
        self.configuration = configuration
        self.group = group
        self.logger = logger
        var zeroes = ByteBufferAllocator().buffer(capacity: Self.zeroBytes)
        zeroes.writeRepeatingByte(0, count: Self.zeroBytes)
        self.state = Mutex(
            State(
                admission: NBDConnectionAdmission(limits: configuration.limits),
                environment: .init(
                    registry: registry,
                    limits: configuration.limits,
                    tls: configuration.tls,
                    accessPolicy: configuration.accessPolicy,
                    zeroes: zeroes,
                    budget: NBDInFlightBudget(capacityBytes: configuration.limits.maximumServerInFlightBytes),
                    metrics: configuration.recordsMetrics ? NBDMetrics() : nil
                )))
        var executors: [ObjectIdentifier: EventLoopTaskExecutor] = [:]
        var bufferPools: [ObjectIdentifier: NBDBufferPool] = [:]
        for loop in group.makeIterator() {
            executors[ObjectIdentifier(loop)] = EventLoopTaskExecutor(eventLoop: loop)
            bufferPools[ObjectIdentifier(loop)] = NBDBufferPool(
                maximumPooledBytes: configuration.maximumPooledBytesPerEventLoop)
        }
        self.executors = executors
        self.bufferPools = bufferPools
    }

    /// Starts listening on `address` and returns the address actually bound (with the port chosen
    /// by the system for `tcp://HOST:0`). Throws `NBDError` saying why it cannot.
    @discardableResult
    public func listen(on address: NBDListenAddress) async throws -> SocketAddress {
        guard !state.withLock({ $0.isShuttingDown }) else {
            throw NBDError(.eshutdown, "the server is shutting down")
        }
        let channel: any Channel
        var unixSocket: SocketFile.Identity?
        do {
            switch address {
            case .tcp(let host, let port):
                channel = try await bootstrap(tcp: true).bind(host: host, port: port).get()
            case .unix(let path):
                try SocketFile.prepare(path: path)
                channel = try await bootstrap(tcp: false).bind(unixDomainSocketPath: path).get()
                unixSocket = SocketFile.identity(of: path)
            }
        } catch let error as SocketFileError {
            throw NBDError(.einval, "cannot listen on \(address): \(error)")
        } catch let error as NBDError {
            throw error
        } catch {
            throw NBDError(.eio, "cannot listen on \(address): \(error)")
        }
        try await track(Listener(channel: channel, address: address, unixSocket: unixSocket))
        guard let bound = channel.localAddress else { throw NBDError(.eio, "no local address for \(address)") }
        return bound
    }

    /// Serves connections accepted on `descriptor`, a Unix socket already bound and listening (systemd
    /// socket activation passes one as descriptor 3), taking ownership of it.
    public func listen(onListeningDescriptor descriptor: CInt) async throws {
        guard !state.withLock({ $0.isShuttingDown }) else {
            throw NBDError(.eshutdown, "the server is shutting down")
        }
        let channel: any Channel
        do {
            channel = try await bootstrap(tcp: false).withBoundSocket(descriptor).get()
        } catch {
            throw NBDError(.eio, "cannot listen on descriptor \(descriptor): \(error)")
        }
        let address = NBDListenAddress.unix(path: channel.localAddress?.pathname ?? "descriptor \(descriptor)")
        try await track(Listener(channel: channel, address: address, unixSocket: nil))
    }

    private func track(_ listener: Listener) async throws {
        let accepted = state.withLock { state in
            guard !state.isShuttingDown else { return false }
            state.listeners.append(listener)
            return true
        }
        guard accepted else {
            await close(listener)
            throw NBDError(.eshutdown, "the server is shutting down")
        }
        logger.debug("NBD server listening", metadata: ["nbd.listen": "\(listener.address)"])
    }

    /// Parses each address and listens on all of them; on failure, closes the ones already bound.
    @discardableResult
    public func listen(on addresses: [String]) async throws -> [SocketAddress] {
        let parsed = try addresses.map { text throws(NBDError) in try NBDListenAddress(parsing: text) }
        var bound: [SocketAddress] = []
        do {
            for address in parsed {
                bound.append(try await listen(on: address))
            }
        } catch {
            await stopListening(on: bound)
            throw error
        }
        return bound
    }

    /// Closes every listener: no new connections, while those already open go on being served (the
    /// first step of a daemon's shutdown; `shutdown` ends the rest).
    public func stopAccepting() async {
        let listeners = state.withLock { state in
            defer { state.listeners = [] }
            return state.listeners
        }
        for listener in listeners { await close(listener) }
    }

    /// Closes the listeners bound to `addresses`.
    private func stopListening(on addresses: [SocketAddress]) async {
        let closing = state.withLock { state -> [Listener] in
            let (matching, others) = state.listeners.reduce(into: ([Listener](), [Listener]())) { split, listener in
                if let local = listener.channel.localAddress, addresses.contains(local) {
                    split.0.append(listener)
                } else {
                    split.1.append(listener)
                }
            }
            state.listeners = others
            return matching
        }
        for listener in closing { await close(listener) }
    }

    /// Serves exactly one connection over `input` and `output` (two pipes or one socket twice, such
    /// as stdin and stdout when a client spawned this process, like `nbdkit -s`), taking ownership of
    /// both descriptors. Returns once the connection has closed and its export has been flushed.
    /// A pipe cannot carry file regions, so read data goes out as buffers.
    public func serveConnection(input: CInt, output: CInt) async throws {
        let made = ConnectionSlot()
        let channel: any Channel
        do {
            channel = try await NIOPipeBootstrap(group: group)
                .channelInitializer { [self] channel in
                    channel.eventLoop.makeCompletedFuture {
                        let connection = try self.initialize(channel, sendsFileRegions: false)
                        made.connection.withLock { $0 = connection }
                    }
                }
                .takingOwnershipOfDescriptors(input: input, output: output).get()
        } catch let error as NBDError {
            throw error
        } catch {
            throw NBDError(.eio, "cannot serve over descriptors \(input) and \(output): \(error)")
        }
        try? await channel.closeFuture.get()
        guard let connection = made.connection.withLock({ $0 }),
            let export = try? await connection.boundExport().get()
        else { return }
        do {
            try await export.flush()
        } catch {
            throw NBDError(.eio, "flushing export \"\(export.name)\" failed: \(error)")
        }
    }

    /// Replaces the TLS configuration (certificates, keys) and the access rules that connections
    /// accepted from now on get; open connections keep what they negotiated with. TLS cannot be
    /// switched on or off this way (that would change what a listener promises): it throws instead.
    public func reload(tls: NBDTLSConfiguration?, accessPolicy: NBDAccessPolicy?) throws {
        try state.withLock { state in
            guard (tls == nil) == (state.environment.tls == nil) else {
                throw NBDReloadError(
                    description: tls == nil
                        ? "TLS cannot be switched off by a reload (restart the daemon for that)"
                        : "TLS cannot be switched on by a reload (restart the daemon for that)")
            }
            state.environment.tls = tls
            state.environment.accessPolicy = accessPolicy
        }
    }

    /// How many NBD connections are open.
    public var openConnections: Int {
        state.withLock { $0.admission.openConnections }
    }

    /// The addresses listened on.
    public var localAddresses: [SocketAddress] {
        state.withLock { $0.listeners.compactMap(\.channel.localAddress) }
    }

    /// Stops accepting, answers what is in flight (refusing new requests with `ESHUTDOWN`),
    /// flushes every export, closes every connection and removes the Unix socket files.
    ///
    /// - Parameter gracePeriod: how long to wait for requests in flight (a client can stall in the
    ///   middle of a WRITE payload); connections still busy after it are closed anyway, after the
    ///   flush.
    public func shutdown(gracePeriod: Duration = .seconds(30)) async {
        let shutdown = await beginShutdown()
        await finishShutdown(shutdown, gracePeriod: gracePeriod)
    }

    /// A shutdown under way: every connection has been told to drain.
    struct Shutdown {
        var connections: [NBDConnection]
        var drained: [EventLoopFuture<Void>]
    }

    /// Stops accepting and makes every connection refuse new requests; returns once they do.
    func beginShutdown() async -> Shutdown {
        let (listeners, connections) = state.withLock { state in
            state.isShuttingDown = true
            defer { state.listeners = [] }
            return (state.listeners, Array(state.connections.values))
        }
        logger.debug("NBD server shutting down", metadata: ["nbd.connections": "\(connections.count)"])
        for listener in listeners { await close(listener) }
        var drained: [EventLoopFuture<Void>] = []
        for connection in connections {
            if let future = try? await connection.drainForShutdown().get() { drained.append(future) }
        }
        return Shutdown(connections: connections, drained: drained)
    }

    /// Waits for what is in flight, flushes every export, closes every connection.
    func finishShutdown(_ shutdown: Shutdown, gracePeriod: Duration = .seconds(30)) async {
        let connections = shutdown.connections
        if !(await Self.waitForAll(shutdown.drained, atMost: gracePeriod)) {
            logger.debug("NBD shutdown grace period over with requests still in flight")
        }

        var exports: [String: any NBDExport] = [:]
        for export in registry.exports { exports[export.name] = export }
        for connection in connections {
            if let export = try? await connection.boundExport().get(), exports[export.name] == nil {
                exports[export.name] = export
            }
        }
        await withTaskGroup(of: Void.self) { group in
            for export in exports.values {
                group.addTask { [logger] in
                    do {
                        try await export.flush()
                    } catch {
                        logger.error("NBD export flush failed at shutdown", metadata: ["nbd.export": "\(export.name)"])
                    }
                }
            }
        }

        for connection in connections { _ = connection.close() }
        for connection in connections { try? await connection.closed.get() }
        logger.debug("NBD server stopped")
    }

    /// Waits until every future has completed or `limit` has passed; true if they all completed.
    private static func waitForAll(_ futures: [EventLoopFuture<Void>], atMost limit: Duration) async -> Bool {
        guard let loop = futures.first?.eventLoop else { return true }
        let all = EventLoopFuture.andAllComplete(futures, on: loop)
        return await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let resumed = Mutex(false)
            let resumeOnce = { @Sendable (completed: Bool) in
                let first = resumed.withLock { resumed in
                    defer { resumed = true }
                    return !resumed
                }
                if first { continuation.resume(returning: completed) }
            }
            let timer = Task {
                try? await Task.sleep(for: limit)
                resumeOnce(false)
            }
            all.whenComplete { _ in
                timer.cancel()
                resumeOnce(true)
            }
        }
    }

    // MARK: - Internals

    private func bootstrap(tcp: Bool) -> ServerBootstrap {
        var bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture { try self.initialize(channel) }
            }
        if tcp {
            bootstrap =
                bootstrap
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
        }
        return bootstrap
    }

    private final class ConnectionSlot: Sendable {
        let connection = Mutex<NBDConnection?>(nil)
    }

    @discardableResult
    private func initialize(_ channel: any Channel, sendsFileRegions: Bool = true) throws -> NBDConnection {
        let high = configuration.writeBufferHighWaterMark
        guard let options = channel.syncOptions else { throw NBDError(.eio, "the channel has no options to set") }
        try options.setOption(.allowRemoteHalfClosure, value: true)
        // Also the number of receive buffers NIO keeps for reuse; big WRITE payloads hold theirs
        // until the export is done, so keep several.
        try options.setOption(.maxMessagesPerRead, value: 16)
        try options.setOption(.writeBufferWaterMark, value: .init(low: high / 2, high: high))
        if configuration.unixSocketSendBufferBytes > 0, case .unixDomainSocket = channel.localAddress {
            try options.setOption(.socketOption(.so_sndbuf), value: configuration.unixSocketSendBufferBytes)
        }
        try options.setOption(
            .recvAllocator,
            value: AdaptiveRecvByteBufferAllocator(
                minimum: 1024, initial: 64 * 1024, maximum: configuration.maximumReadBytes)
        )
        let client = NBDConnectionAdmission.client(of: channel.remoteAddress)
        let (id, decision) = state.withLock { state in
            let decision = state.admission.admit(client: client)
            state.nextConnectionID += 1
            return (state.nextConnectionID, decision)
        }
        var logger = self.logger
        logger[metadataKey: "nbd.connection"] = "\(id)"
        if let peer = channel.remoteAddress { logger[metadataKey: "nbd.peer"] = "\(peer)" }
        switch decision {
        case .refuse(let reason, let firstOfBurst):
            if configuration.recordsMetrics { NBDMetrics.refused("connection-limit") }
            // Throwing makes the bootstrap close the channel before anything is sent.
            if firstOfBurst {
                logger.warning("NBD connection refused: \(reason); more refusals are logged at debug level")
            } else {
                logger.debug("NBD connection refused: \(reason)")
            }
            throw NBDError(.eio, "NBD connection refused: \(reason)")
        case .admit(let refusedBefore) where refusedBefore > 0:
            logger.notice("NBD connection accepted again after refusing \(refusedBefore) over a connection limit")
        case .admit:
            break
        }
        channel.closeFuture.whenComplete { [self] _ in
            state.withLock { state in
                state.connections.removeValue(forKey: id)
                state.admission.closed(client: client)
            }
        }
        guard let executor = executors[ObjectIdentifier(channel.eventLoop)],
            let buffers = bufferPools[ObjectIdentifier(channel.eventLoop)]
        else {
            throw NBDError(.eio, "the channel's event loop is not in the server's group")
        }
        let handler = NBDConnectionHandler(
            environment: state.withLock { $0.environment },
            executor: executor,
            buffers: buffers,
            allocator: channel.allocator,
            logger: logger
        )
        handler.sendsFileRegions = sendsFileRegions
        let connection = NBDConnection(id: id, channel: channel, handler: handler)
        handler.connection = connection
        let tracked = state.withLock { state in
            guard !state.isShuttingDown else { return false }
            state.connections[id] = connection
            return true
        }
        guard tracked else { throw NBDError(.eshutdown, "the server is shutting down") }
        try channel.pipeline.syncOperations.addHandler(handler)
        return connection
    }

    private func close(_ listener: Listener) async {
        try? await listener.channel.close()
        if case .unix(let path) = listener.address, let identity = listener.unixSocket {
            SocketFile.remove(path: path, ifStill: identity)
        }
    }
}

/// Why `NBDServer.reload` refused a new configuration (the old one stays).
public struct NBDReloadError: Error, CustomStringConvertible {
    public let description: String
}
