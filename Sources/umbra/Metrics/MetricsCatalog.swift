// Every series Umbra exports, with its help text and, for histograms, its buckets. The libraries
// count through swift-metrics by name alone; this table is where the daemon gives those names their
// meaning (Prometheus wants a HELP line for each, and promtool checks it). docs/operations.md lists
// the same series for people.

enum MetricsCatalog {
    enum Kind {
        case counter, gauge, histogram
    }

    struct Entry {
        let kind: Kind
        let help: String
        /// Upper bounds of a histogram's buckets: seconds for timers, plain numbers for values.
        var buckets: [Double] = []
    }

    /// Latency buckets from 50 µs to 10 s.
    static let requestSeconds: [Double] = [
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
    ]

    static let entries: [String: Entry] = [
        // The NBD server (NBDServer/NBDMetrics.swift).
        "umbra_nbd_requests_total": Entry(
            kind: .counter, help: "NBD requests served, by volume (a snapshot's count with its volume) and operation."),
        "umbra_nbd_bytes_total": Entry(
            kind: .counter, help: "Bytes named by the NBD requests served, by volume and operation."),
        "umbra_nbd_errors_total": Entry(
            kind: .counter, help: "NBD requests answered with an error, by volume and operation."),
        "umbra_nbd_request_seconds": Entry(
            kind: .histogram, help: "Time from a request's arrival to its answer being ready, by operation.",
            buckets: requestSeconds),
        "umbra_nbd_refusals_total": Entry(
            kind: .counter,
            help:
                "NBD clients refused, by reason: connection-limit (too many connections), access (an export the access rules hide)."
        ),
        "umbra_tls_handshakes_total": Entry(kind: .counter, help: "TLS handshakes on NBD connections, by result."),
        // The engine (SnapshotEngine).
        "umbra_cow_copies_total": Entry(
            kind: .counter, help: "Chunks preserved by copy-on-write before a write replaced them, by volume."),
        "umbra_cow_copied_bytes_total": Entry(
            kind: .counter, help: "Bytes written to the diff store by copy-on-write (all-zero chunks take none)."),
        "umbra_cow_cloned_bytes_total": Entry(
            kind: .counter,
            help: "Bytes copy-on-write put in the diff store as clones sharing the live data's blocks (reflink)."),
        "umbra_catalog_commit_appends": Entry(
            kind: .histogram, help: "Appends made durable together by one catalog group commit.",
            buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256]),
        "umbra_catalog_commit_seconds": Entry(
            kind: .histogram,
            help: "Time one catalog group commit takes: the diff-store syncs, then the catalog's write and sync.",
            buckets: requestSeconds),
        // The coordinator (ShadowCopy).
        "umbra_sets_total": Entry(
            kind: .counter,
            help:
                "Shadow copy sets by result: committed; aborted (by the requester or a shutdown); failed (a writer, a deadline or the engine)."
        ),
        "umbra_set_seconds": Entry(
            kind: .histogram, help: "Time from a set's request to its outcome, writers included.",
            buckets: requestSeconds),
        "umbra_set_hold_seconds": Entry(
            kind: .histogram, help: "Time writes to a set's volumes were held while it was taken.",
            buckets: requestSeconds),
        "umbra_writer_events_total": Entry(
            kind: .counter, help: "Events answered by writers, by event and outcome (ok or the failure)."),
        // The daemon, read at each scrape (DaemonGauges.swift).
        "umbra_connections": Entry(kind: .gauge, help: "Open NBD connections."),
        "umbra_writers": Entry(kind: .gauge, help: "Connected writers, by state."),
        "umbra_volume_size_bytes": Entry(kind: .gauge, help: "A volume's size."),
        "umbra_diff_bytes": Entry(kind: .gauge, help: "Bytes of a volume's diff store holding preserved chunks."),
        "umbra_diff_limit_bytes": Entry(
            kind: .gauge, help: "A volume's diff-store limit (absent when it has none)."),
        "umbra_diff_free_bytes": Entry(
            kind: .gauge,
            help:
                "Room left for copies in a volume's diff store: to its limit, and at most the file system's free space."
        ),
        "umbra_snapshots": Entry(kind: .gauge, help: "A volume's snapshots."),
        "umbra_oldest_snapshot_age_seconds": Entry(
            kind: .gauge, help: "Age of a volume's oldest snapshot (absent when it has none)."),
        "umbra_filesystem_free_bytes": Entry(
            kind: .gauge, help: "Free space on the file system of the data directory, for unprivileged users."),
        "umbra_catalog_bytes": Entry(kind: .gauge, help: "Length of the catalog file in use."),
        "umbra_uptime_seconds": Entry(kind: .gauge, help: "Time since the daemon started."),
        "umbra_build_info": Entry(kind: .gauge, help: "Always 1; the version label says which Umbra runs."),
        "umbra_reloads_total": Entry(
            kind: .counter, help: "Configuration reloads (SIGHUP or umbra reload), by result: ok or refused."),
    ]
}
