// The daemon's flags for the NBD server's limits against hostile or broken clients (connections,
// timeouts, memory held for replies). Defaults are NBDLimits' own; each flag says what it bounds.
// Thousands of connections need thousands of descriptors, so the daemon raises its soft
// RLIMIT_NOFILE to the hard limit at start and says so if the connection limit still does not fit.

import ArgumentParser
import BlockIO
import Logging
import NBDProtocol
import NBDServer

struct ServeLimitOptions: ParsableArguments {
    private static let defaults = NBDLimits()

    @Option(help: "Open NBD connections at most, over all listeners; more are closed at once.")
    var maxConnections: Int = defaults.maximumConnections

    @Option(help: "Open NBD connections at most from one TCP client address (Unix-socket clients are not counted).")
    var maxConnectionsPerClient: Int = defaults.maximumConnectionsPerClient

    @Option(help: "Seconds a client may take to reach transmission (0: no limit).")
    var handshakeTimeout: Double = Double(defaults.handshakeTimeoutMilliseconds) / 1000

    @Option(help: "Seconds a connection may stay without requests before it is closed (0: never).")
    var idleTimeout: Double = Double(defaults.idleTimeoutMilliseconds) / 1000

    @Option(
        help:
            "Seconds a connection's replies may wait on a client that takes none of them before it is closed (0: never)."
    )
    var replyTimeout: Double = Double(defaults.replyProgressTimeoutMilliseconds) / 1000

    @Option(help: "READ and WRITE payload bytes in flight over all connections (memory held for them).")
    var maxInflightBytes: Size = Size(bytes: UInt64(defaults.maximumServerInFlightBytes))

    @Option(help: "READ and WRITE payload bytes in flight on one connection.")
    var maxInflightBytesPerConnection: Size = Size(bytes: UInt64(defaults.maximumInFlightBytes))

    @Option(help: "Requests in flight on one connection.")
    var maxInflightRequests: Int = defaults.maximumInFlightRequests

    @Option(help: "The largest NBD read or write accepted (advertised to clients as the maximum block size).")
    var maxRequest: Size = Size(bytes: UInt64(defaults.maximumRequestBytes))

    @Option(
        help: """
            The send buffer (SO_SNDBUF) of each NBD connection over a Unix socket; 0 keeps the kernel's \
            default. Linux caps it at net.core.wmem_max.
            """)
    var unixSendBuffer: Size = Size(bytes: UInt64(NBDServer.Configuration().unixSocketSendBufferBytes))

    func validate() throws {
        guard unixSendBuffer.bytes <= 1 << 30 else {
            throw ValidationError("--unix-send-buffer must be at most 1G (got \(unixSendBuffer)).")
        }
        guard (1...1_000_000).contains(maxConnections) else {
            throw ValidationError("--max-connections must be from 1 to 1000000.")
        }
        guard (1...maxConnections).contains(maxConnectionsPerClient) else {
            throw ValidationError(
                "--max-connections-per-client must be from 1 to --max-connections (\(maxConnections)).")
        }
        for (name, value) in [
            ("--handshake-timeout", handshakeTimeout), ("--idle-timeout", idleTimeout),
            ("--reply-timeout", replyTimeout),
        ]
        where !(value >= 0 && value <= 86400) {
            throw ValidationError("\(name) must be from 0 (no limit) to 86400 seconds.")
        }
        guard replyTimeout == 0 || replyTimeout >= 0.001 else {
            throw ValidationError("--reply-timeout must be 0 (no limit) or at least 0.001 seconds.")
        }
        let range = UInt64(1 << 20)...UInt64(1 << 40)
        for (name, size) in [
            ("--max-inflight-bytes", maxInflightBytes),
            ("--max-inflight-bytes-per-connection", maxInflightBytesPerConnection),
        ] where !range.contains(size.bytes) {
            throw ValidationError("\(name) must be from 1M to 1T (got \(size)).")
        }
        guard maxInflightBytesPerConnection.bytes <= maxInflightBytes.bytes else {
            throw ValidationError("--max-inflight-bytes-per-connection cannot be more than --max-inflight-bytes.")
        }
        guard (1...65536).contains(maxInflightRequests) else {
            throw ValidationError("--max-inflight-requests must be from 1 to 65536.")
        }
        guard (UInt64(64 << 10)...UInt64(1 << 30)).contains(maxRequest.bytes), maxRequest.bytes % 4096 == 0 else {
            throw ValidationError("--max-request must be a multiple of 4K from 64K to 1G (got \(maxRequest)).")
        }
    }

    /// The server's limits with these flags applied.
    func apply(to limits: inout NBDLimits) {
        limits.maximumConnections = maxConnections
        limits.maximumConnectionsPerClient = maxConnectionsPerClient
        limits.handshakeTimeoutMilliseconds = Int64((handshakeTimeout * 1000).rounded())
        limits.idleTimeoutMilliseconds = Int64((idleTimeout * 1000).rounded())
        limits.replyProgressTimeoutMilliseconds = Int64((replyTimeout * 1000).rounded())
        limits.maximumServerInFlightBytes = Int(maxInflightBytes.bytes)
        limits.maximumInFlightBytes = Int(maxInflightBytesPerConnection.bytes)
        limits.maximumInFlightRequests = maxInflightRequests
        limits.maximumRequestBytes = Int(maxRequest.bytes)
        // A refused WRITE of the largest size is read past, not a reason to drop the session.
        limits.maximumDiscardedPayloadBytes = max(limits.maximumDiscardedPayloadBytes, Int(maxRequest.bytes))
    }

    /// Raises the soft descriptor limit to the hard one and warns if the connection limit still
    /// cannot be reached (each connection is one descriptor; the store and listeners need some).
    func raiseDescriptorLimit(logger: Logger) {
        let reserved: UInt64 = 64
        if let limit = LocalSystem.raiseOpenFileLimit(), UInt64(maxConnections) + reserved > limit {
            logger.warning(
                "--max-connections is \(maxConnections) but only \(limit) descriptors are allowed (RLIMIT_NOFILE); the system's limit is reached first"
            )
        }
    }
}
