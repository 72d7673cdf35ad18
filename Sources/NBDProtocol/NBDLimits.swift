// Every size the server accepts from a client has a named bound here. Nothing is allocated from a
// client-supplied length before it has been checked against one of these.

/// The bounds a server connection enforces. The defaults follow the spec's guidance (strings of at
/// most 4096 bytes, 32 MiB requests are never a denial of service) and leave room for deep queues.
public struct NBDLimits: Hashable, Sendable {
    /// Longest string (export name, query, description) a client may send or the server will send.
    public static let maximumStringBytes = 4096

    /// Largest option payload buffered in memory; longer payloads are read and thrown away, then
    /// answered with `ERR_TOO_BIG` (or `ERR_UNSUP` for unknown options).
    public var maximumOptionPayloadBytes: Int = 64 * 1024

    /// Largest READ/WRITE/CACHE/WRITE_ZEROES length the server advertises and handles (the advertised
    /// maximum block size is the smaller of this and the export's own maximum).
    public var maximumRequestBytes: Int = 32 * 1024 * 1024

    /// Largest payload (refused WRITE or oversized option) read and thrown away instead of ending the
    /// session. Longer payloads are treated as a denial of service and the connection is dropped,
    /// as the spec allows; it must stay above 2^25, which the spec says is never one.
    public var maximumDiscardedPayloadBytes: Int = 64 * 1024 * 1024

    /// Requests of one connection being served at once; when reached the connection stops reading.
    public var maximumInFlightRequests: Int = 128

    /// Payload bytes (WRITE data held plus READ lengths being produced) of one connection at once;
    /// when reached the connection stops reading.
    public var maximumInFlightBytes: Int = 256 * 1024 * 1024

    /// Extents sent per metadata context in one BLOCK_STATUS reply.
    public var maximumExtentsPerReply: Int = 8192

    /// How long a connection whose export was removed stays open answering `ESHUTDOWN` (so requests
    /// the client already sent get an answer rather than a reset) before the server closes it.
    public var exportRemovalGraceMilliseconds: Int64 = 1000

    public init() {}
}
