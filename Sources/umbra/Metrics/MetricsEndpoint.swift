// `umbra serve --metrics tcp://HOST:PORT`: GET /metrics answers the Prometheus text format. The
// libraries count through swift-metrics as things happen; what is a state rather than an event
// (connections, writers, diff space, snapshots) is read at each scrape (`DaemonGauges`). The endpoint
// has an event loop of its own, like the control socket, so a scrape never waits behind NBD traffic.

import CoreMetrics
import Logging
import NBDServer
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus

final class MetricsEndpoint: Sendable {
    let address: String
    private let channel: NIOAsyncChannel<NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>, Never>
    private let group: MultiThreadedEventLoopGroup
    private let serving: Task<Void, Never>

    /// Makes swift-metrics count into `registry` (once per process, before anything counts:
    /// handles made before stay no-ops).
    static func bootstrap(_ registry: PrometheusCollectorRegistry) {
        MetricsSystem.bootstrap(PrometheusBackend(registry: registry))
    }

    /// `text` must be tcp://HOST:PORT; the error says what is wrong with it.
    static func parse(_ text: String) throws -> (host: String, port: Int) {
        guard case .tcp(let host, let port)? = try? NBDListenAddress(parsing: text) else {
            throw CLIError(message: "--metrics takes tcp://HOST:PORT, e.g. tcp://127.0.0.1:9109 (got '\(text)').")
        }
        return (host, port)
    }

    /// Listens on `text` and answers scrapes with `gauges` refreshed, then `registry`.
    static func start(
        on text: String, registry: PrometheusCollectorRegistry, gauges: DaemonGauges, logger: Logger
    ) async throws -> MetricsEndpoint {
        let (host, port) = try parse(text)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let channel: NIOAsyncChannel<NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>, Never>
        do {
            channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .bind(host: host, port: port) { child in
                    child.eventLoop.makeCompletedFuture {
                        try child.pipeline.syncOperations.configureHTTPServerPipeline()
                        return try NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>(
                            wrappingChannelSynchronously: child)
                    }
                }
        } catch {
            try? await group.shutdownGracefully()
            throw CLIError(message: "Cannot serve metrics on \(text): \(error).")
        }
        let bound = channel.channel.localAddress?.port.map { NBDListenAddress.tcp(host: host, port: $0).description }
        let serving = Task {
            await withDiscardingTaskGroup { connections in
                do {
                    try await channel.executeThenClose { inbound in
                        for try await connection in inbound {
                            connections.addTask {
                                await Self.answer(connection, registry: registry, gauges: gauges, logger: logger)
                            }
                        }
                    }
                } catch {
                    logger.debug("metrics endpoint stopped", metadata: ["error": "\(error)"])
                }
            }
        }
        return MetricsEndpoint(address: bound ?? text, channel: channel, group: group, serving: serving)
    }

    private init(
        address: String,
        channel: NIOAsyncChannel<NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>, Never>,
        group: MultiThreadedEventLoopGroup, serving: Task<Void, Never>
    ) {
        self.address = address
        self.channel = channel
        self.group = group
        self.serving = serving
    }

    /// Answers the requests of one HTTP connection (keep-alive: several, one after another).
    private static func answer(
        _ connection: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>,
        registry: PrometheusCollectorRegistry, gauges: DaemonGauges, logger: Logger
    ) async {
        do {
            try await connection.executeThenClose { inbound, outbound in
                var head: HTTPRequestHead?
                for try await part in inbound {
                    switch part {
                    case .head(let request):
                        head = request
                    case .body:
                        break
                    case .end:
                        guard let request = head else { continue }
                        head = nil
                        let (status, body) = await response(to: request, registry: registry, gauges: gauges)
                        var headers = HTTPHeaders()
                        headers.add(
                            name: "Content-Type",
                            value: status == .ok
                                ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain; charset=utf-8")
                        headers.add(name: "Content-Length", value: "\(body.count)")
                        if !request.isKeepAlive { headers.add(name: "Connection", value: "close") }
                        try await outbound.write(
                            .head(HTTPResponseHead(version: request.version, status: status, headers: headers)))
                        if request.method != .HEAD {
                            try await outbound.write(.body(.byteBuffer(ByteBuffer(bytes: body))))
                        }
                        try await outbound.write(.end(nil))
                        if !request.isKeepAlive { return }
                    }
                }
            }
        } catch {
            logger.debug("metrics connection ended", metadata: ["error": "\(error)"])
        }
    }

    private static func response(
        to request: HTTPRequestHead, registry: PrometheusCollectorRegistry, gauges: DaemonGauges
    ) async -> (HTTPResponseStatus, [UInt8]) {
        let path = request.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? request.uri
        guard path == "/metrics" else { return (.notFound, Array("Not found: metrics are at /metrics.\n".utf8)) }
        guard request.method == .GET || request.method == .HEAD else {
            return (.methodNotAllowed, Array("Only GET and HEAD are served.\n".utf8))
        }
        await gauges.refresh()
        return (.ok, registry.emitToBuffer())
    }

    /// Stops listening and closes every scrape connection.
    func shutdown() async {
        try? await channel.channel.close()
        serving.cancel()
        await serving.value
        try? await group.shutdownGracefully()
    }
}
