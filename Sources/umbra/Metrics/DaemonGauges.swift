// The series that are states rather than events, read when Prometheus scrapes: what `umbra status`
// reports (connections, writers by state, each volume's size, diff space and snapshots), plus the
// free space of the data directory's file system and the catalog's length. A volume deleted since
// the last scrape loses its series.

import BlockIO
import CoreMetrics
import Logging
import ShadowCopy
import SnapshotEngine
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

final class DaemonGauges: Sendable {
    private let requests: DaemonRequests
    private let dataPath: String
    private let logger: Logger
    /// The labels of the per-volume gauges set by the last scrape, by volume (to drop what a
    /// volume no longer shows). Held while a scrape's values are set, so two scrapes never mix.
    private let shown = Mutex<[String: Set<String>]>([:])

    init(requests: DaemonRequests, dataPath: String, logger: Logger) {
        self.requests = requests
        self.dataPath = dataPath
        self.logger = logger
        Gauge(label: "umbra_build_info", dimensions: [("version", Umbra.version)]).record(1)
    }

    func refresh() async {
        let status: StatusResult
        do {
            status = try await requests.status()
        } catch {
            // The store is closing: the last values stay.
            logger.debug("metrics: no status to read", metadata: ["error": "\(error)"])
            return
        }
        let catalogBytes = requests.store.catalogBytes.rawValue
        let free = Self.freeBytes(at: dataPath)
        shown.withLock { shown in
            Gauge(label: "umbra_uptime_seconds").record(status.uptimeSeconds)
            Gauge(label: "umbra_connections").record(status.connections)
            for state in WriterState.allCases {
                Gauge(label: "umbra_writers", dimensions: [("state", state.rawValue)])
                    .record(status.writerStates[state.rawValue] ?? 0)
            }
            Gauge(label: "umbra_catalog_bytes").record(catalogBytes)
            if let free { Gauge(label: "umbra_filesystem_free_bytes").record(free) }
            var now: [String: Set<String>] = [:]
            for volume in status.volumes {
                var labels: Set<String> = []
                func set(_ label: String, _ value: Double) {
                    Gauge(label: label, dimensions: [("volume", volume.name)]).record(value)
                    labels.insert(label)
                }
                set("umbra_volume_size_bytes", Double(volume.size))
                set("umbra_snapshots", Double(volume.snapshots))
                if let age = volume.oldestSnapshotAgeSeconds { set("umbra_oldest_snapshot_age_seconds", age) }
                now[volume.name] = labels
                // An RBD volume has no diff store: RBD keeps its snapshots itself.
                guard volume.backend == "local" else { continue }
                set("umbra_diff_bytes", Double(volume.diffBytes))
                var room = free
                if let limit = volume.diffLimit {
                    set("umbra_diff_limit_bytes", Double(limit))
                    let left = limit > volume.diffBytes ? limit - volume.diffBytes : 0
                    room = min(room ?? left, left)
                }
                if let room { set("umbra_diff_free_bytes", Double(room)) }
                now[volume.name] = labels
            }
            // What a volume showed last time and not now (it was deleted, its limit lifted, its last
            // snapshot deleted) is dropped.
            for (name, labels) in shown {
                for label in labels.subtracting(now[name] ?? []) {
                    Gauge(label: label, dimensions: [("volume", name)]).destroy()
                }
            }
            shown = now
        }
    }

    /// Bytes free on the file system holding `path` for unprivileged users (`statvfs`'s f_bavail).
    static func freeBytes(at path: String) -> UInt64? {
        var info = statvfs()
        guard statvfs(path, &info) == 0 else { return nil }
        return UInt64(info.f_bavail) * UInt64(info.f_frsize)
    }
}
