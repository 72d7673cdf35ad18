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
    private let others = Mutex<[any VolumeProvider]>([])
    private let logger: Logger
    /// The one export to keep (`umbra serve --stdio`), or nil for all of them.
    private let only: String?
    /// Volumes whose live export is kept away (a revert runs on them), with how many callers keep it so.
    private let offline = Mutex<[String: Int]>([:])
    /// The last removal started: removals run one after another, each deciding what is stale when
    /// it runs, so a removal that was due when a volume went offline does not take away the export
    /// it got back meanwhile.
    private let lastRemoval = Mutex<Task<Void, Never>?>(nil)
    private let updating = Mutex<Void>(())

    init(registry: NBDExportRegistry, logger: Logger, only: String? = nil) {
        self.registry = registry
        self.logger = logger
        self.only = only
    }

    func attach(_ store: SnapshotStore) {
        self.store.withLock { $0 = store }
    }

    func attach(_ provider: any VolumeProvider) {
        others.withLock { $0.append(provider) }
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
        if !update().isEmpty { removeStale() }
    }

    /// Reconciles and waits until the exports that went away are removed and their connections
    /// closed: a request that deletes something answers only once its exports are gone.
    func settle() async {
        _ = update()
        await removeStale().value
    }

    /// Takes a volume's live export away (ending its connections with ESHUTDOWN) until `bringOnline`.
    func takeOffline(_ volume: String) async {
        offline.withLock { $0[volume, default: 0] += 1 }
        await settle()
    }

    func bringOnline(_ volume: String) {
        offline.withLock { offline in
            let count = offline[volume, default: 1] - 1
            offline[volume] = count > 0 ? count : nil
        }
        reconcile()
    }

    /// Queues a removal of whatever is stale when it runs, after the removals queued before it.
    @discardableResult
    private func removeStale() -> Task<Void, Never> {
        lastRemoval.withLock { last in
            let previous = last
            let task = Task { [self] in
                await previous?.value
                for name in update() { await registry.remove(named: name) }
            }
            last = task
            return task
        }
    }

    /// Adds the missing exports; returns the names of those to remove. One update at a time, so two
    /// never both add the same export.
    private func update() -> Set<String> {
        updating.withLock { _ in updateHoldingLock() }
    }

    private func updateHoldingLock() -> Set<String> {
        guard let store = store.withLock({ $0 }) else { return [] }
        var wanted: [String: any NBDExport] = [:]
        let offline = self.offline.withLock { $0 }
        for info in store.volumes() where offline[info.name] == nil {
            // A volume being reverted is offline: its export goes, ending connections with ESHUTDOWN.
            guard let volume = try? store.volume(named: info.name), !volume.isReverting else { continue }
            wanted[info.name] = LiveVolumeExport(volume: volume, store: store)
        }
        for info in (try? store.snapshots()) ?? [] where info.state == .ready {
            guard let view = try? store.snapshot(id: info.id) else { continue }
            wanted[info.exportName] = SnapshotExport(snapshot: view, store: store)
        }
        for export in others.withLock({ $0 }).flatMap({ $0.exports() }) where offline[export.name] == nil {
            wanted[export.name] = export
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
