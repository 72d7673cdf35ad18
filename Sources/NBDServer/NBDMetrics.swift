import CoreMetrics
import NBDProtocol
import NIOCore
import Synchronization

// Design note. What the server counts, through swift-metrics (the application chooses the backend:
// `umbra serve --metrics` bootstraps Prometheus). Requests are counted per export group (an
// export's `metricsName`: a volume, for every export of its snapshots too, so that the series stay
// bounded however many snapshots come and go) and per operation; their latency per operation only.
// The handles of a group are made once and shared by its connections: a request costs two atomic
// increments and one histogram record, and nothing at all when the server does not record metrics.

/// The server's metric handles, made on first use of each export group. (`Benchmarks` SPI: the
/// metrics benchmark measures exactly what a request costs with them.)
@_spi(Benchmarks)
public final class NBDMetrics: Sendable {
    /// The operations requests are counted by (the `op` label).
    static let operations: [(command: NBDCommand, label: String)] = [
        (.read, "read"), (.write, "write"), (.flush, "flush"), (.trim, "trim"), (.writeZeroes, "zero"),
        (.blockStatus, "block_status"), (.cache, "cache"),
    ]

    /// Latency histograms, one per operation (they carry no export label).
    private let latency: [CoreMetrics.Timer]
    private let groups = Mutex<[String: NBDExportMetrics]>([:])

    public init() {
        latency = Self.operations.map {
            CoreMetrics.Timer(label: "umbra_nbd_request_seconds", dimensions: [("op", $0.label)])
        }
    }

    /// The handles requests to exports of group `name` count with.
    public func export(_ name: String) -> NBDExportMetrics {
        groups.withLock { groups in
            if let metrics = groups[name] { return metrics }
            let metrics = NBDExportMetrics(group: name, latency: latency)
            groups[name] = metrics
            return metrics
        }
    }

    /// A connection was refused: `connection-limit`, or `access` (an export the client may not use).
    static func refused(_ reason: String) {
        Counter(label: "umbra_nbd_refusals_total", dimensions: [("reason", reason)]).increment()
    }

    /// A TLS handshake ended: `ok` or `failed`.
    static func tlsHandshake(_ result: String) {
        Counter(label: "umbra_tls_handshakes_total", dimensions: [("result", result)]).increment()
    }
}

/// Request counters of one export group, indexed like `NBDMetrics.operations`.
@_spi(Benchmarks)
public final class NBDExportMetrics: Sendable {
    private let requests: [Counter]
    private let bytes: [Counter]
    private let errors: [Counter]
    private let latency: [CoreMetrics.Timer]

    init(group: String, latency: [CoreMetrics.Timer]) {
        func counters(_ label: String) -> [Counter] {
            NBDMetrics.operations.map { Counter(label: label, dimensions: [("volume", group), ("op", $0.label)]) }
        }
        requests = counters("umbra_nbd_requests_total")
        bytes = counters("umbra_nbd_bytes_total")
        errors = counters("umbra_nbd_errors_total")
        self.latency = latency
    }

    private static func index(of command: NBDCommand) -> Int? {
        switch command {
        case .read: 0
        case .write: 1
        case .flush: 2
        case .trim: 3
        case .writeZeroes: 4
        case .blockStatus: 5
        case .cache: 6
        default: nil
        }
    }

    /// A request was answered after `nanoseconds` in the export: `bytes` is the length it named
    /// (zero for FLUSH).
    public func record(_ command: NBDCommand, bytes count: UInt32, failed: Bool, nanoseconds: Int64) {
        guard let index = Self.index(of: command) else { return }
        requests[index].increment()
        if count > 0 { bytes[index].increment(by: count) }
        if failed { errors[index].increment() }
        latency[index].recordNanoseconds(nanoseconds)
    }
}
