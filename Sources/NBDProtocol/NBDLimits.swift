// Every size the server accepts from a client has a named bound here. Nothing is allocated from a
// client-supplied length before it has been checked against one of these.

/// The bounds a server connection enforces. The defaults follow the spec's guidance (strings of at
/// most 4096 bytes, 32 MiB requests are never a denial of service), take the 64 MiB requests that
/// nbdkit and nbd-server take, and leave room for deep queues.
public struct NBDLimits: Hashable, Sendable {
    /// Longest string (export name, query, description) a client may send or the server will send.
    public static let maximumStringBytes = 4096

    /// Largest option payload buffered in memory; longer payloads are read and thrown away, then
    /// answered with `ERR_TOO_BIG` (or `ERR_UNSUP` for unknown options).
    public var maximumOptionPayloadBytes: Int = 64 * 1024

    /// Largest READ/WRITE/CACHE/WRITE_ZEROES length the server advertises and handles (the advertised
    /// maximum block size is the smaller of this and the export's own maximum).
    public var maximumRequestBytes: Int = 64 * 1024 * 1024

    /// Largest payload (refused WRITE or oversized option) read and thrown away instead of ending the
    /// session. Longer payloads are treated as a denial of service and the connection is dropped,
    /// as the spec allows; it must stay above 2^25, which the spec says is never one, and at or
    /// above `maximumRequestBytes`, so that a WRITE of the advertised size refused by the export
    /// (a read-only snapshot) leaves the session going.
    public var maximumDiscardedPayloadBytes: Int = 128 * 1024 * 1024

    /// Requests of one connection being served at once; when reached the connection stops reading.
    public var maximumInFlightRequests: Int = 128

    /// Payload bytes of one connection at once: WRITE data held until written, READ data from the
    /// moment the request is accepted until its reply has gone to the socket. When reached the
    /// connection stops reading (a request is accepted while below it, so the bound can be passed by
    /// at most one request). 128 MiB is two maximum-sized requests or 256 requests of 512 KiB, deeper
    /// than qemu or the kernel client queue; it bounds what a client that stops reading replies
    /// makes the server hold.
    public var maximumInFlightBytes: Int = 128 * 1024 * 1024

    /// Payload bytes in flight over all connections of a server (counted as for
    /// `maximumInFlightBytes`). A connection that cannot get its request's bytes holds its reads until
    /// other connections' replies have gone out; a request alone bigger than this is served when
    /// nothing else is in flight. 1 GiB: sixteen connections at their own bound.
    public var maximumServerInFlightBytes: Int = 1024 * 1024 * 1024

    /// Open connections over all listeners; more are closed at once without a greeting. 1024 keeps
    /// the server well inside the descriptors a default hard `RLIMIT_NOFILE` (4096 and up) allows.
    public var maximumConnections: Int = 1024

    /// Open TCP connections from one peer IP address; more are closed at once. Unix-socket peers
    /// are not counted here (the socket file's permissions decide who may connect; they count
    /// toward `maximumConnections`). 64 leaves room for multi-queue clients (`nbd-client -C`) and
    /// several machines behind one address.
    public var maximumConnectionsPerClient: Int = 64

    /// How long a connection may take from accept to transmission (option haggling takes a real
    /// client a few round trips); past it the connection is closed. 0 turns it off.
    public var handshakeTimeoutMilliseconds: Int64 = 10_000

    /// How long a connection in transmission may stay with no request and nothing in flight before
    /// it is closed. 0 (the default) turns it off: the kernel client keeps an idle device's connection
    /// open for as long as the device is attached, and reconnecting is not free for it.
    public var idleTimeoutMilliseconds: Int64 = 0

    /// How long a connection may have replies waiting for the client (READ data not yet taken by the
    /// socket, or more queued than the socket takes) without any of them moving, before it is closed
    /// and the bytes it holds are given back. A client that stops reading would otherwise hold its
    /// share of the server's in-flight budget for ever. 0 turns it off.
    public var replyProgressTimeoutMilliseconds: Int64 = 60_000

    /// Extents sent per metadata context in one BLOCK_STATUS reply.
    public var maximumExtentsPerReply: Int = 8192

    /// How long a connection whose export was removed stays open answering `ESHUTDOWN` (so requests
    /// the client already sent get an answer rather than a reset) before the server closes it.
    public var exportRemovalGraceMilliseconds: Int64 = 1000

    public init() {}
}
