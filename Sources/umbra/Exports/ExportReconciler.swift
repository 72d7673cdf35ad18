// Keeps the NBD export registry in step with the store: an export for every volume and every ready
// snapshot, and none for what was deleted.

import BlockIO
import Logging
import NBDProtocol
import NBDServer
import NIOCore
import SnapshotEngine
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Keeps the NBD export registry in step with the store.
final class ExportReconciler: Sendable {
    private let registry: NBDExportRegistry
    private let store = Mutex<SnapshotStore?>(nil)
    private let logger: Logger
    /// The one export to keep (`umbra serve --stdio`), or nil for all of them.
    private let only: String?

    init(registry: NBDExportRegistry, logger: Logger, only: String? = nil) {
        self.registry = registry
        self.logger = logger
        self.only = only
    }

    func attach(_ store: SnapshotStore) {
        self.store.withLock { $0 = store }
    }

    func storeChanged(_ event: StoreEvent) {
        if case .snapshotFailed(let id, let reason) = event {
            logger.warning("snapshot failed", metadata: ["snapshot.id": "\(id.guidString)", "reason": "\(reason)"])
        }
        reconcile()
    }

    /// Adds an export for every volume and readable snapshot that lacks one, and starts removing the
    /// exports whose volume or snapshot is gone (their connections are ended with ESHUTDOWN).
    func reconcile() {
        let stale = update()
        if !stale.isEmpty {
            let registry = self.registry
            Task {
                for name in stale { await registry.remove(named: name) }
            }
        }
    }

    /// Reconciles and waits until the exports that went away are removed and their connections
    /// closed: a request that deletes something answers only once its exports are gone.
    func settle() async {
        for name in update() { await registry.remove(named: name) }
    }

    /// Adds the missing exports; returns the names of those to remove.
    private func update() -> Set<String> {
        guard let store = store.withLock({ $0 }) else { return [] }
        var wanted: [String: any NBDExport] = [:]
        for info in store.volumes() {
            guard let volume = try? store.volume(named: info.name) else { continue }
            wanted[info.name] = LiveVolumeExport(volume: volume, store: store)
        }
        for info in (try? store.snapshots()) ?? [] where info.state == .ready {
            guard let view = try? store.snapshot(id: info.id) else { continue }
            wanted[info.exportName] = SnapshotExport(snapshot: view, store: store)
        }
        if let only { wanted = wanted.filter { $0.key == only } }
        let present = Set(registry.names)
        for (name, export) in wanted where !present.contains(name) {
            do {
                try registry.add(export)
            } catch {
                logger.error("could not add an export", metadata: ["nbd.export": "\(name)", "error": "\(error)"])
            }
        }
        return present.subtracting(wanted.keys)
    }
}
