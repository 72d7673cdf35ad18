// The store's consistency checks (of its metadata, and of the preserved data against its checksums),
// and compaction: the catalog rewritten as the records of the current state when the appended log has
// grown well past that (or to upgrade its format).

import BlockIO
import Logging
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

extension SnapshotStore {
    // MARK: - Consistency and compaction

    /// Problems with the in-memory metadata's consistency (empty when all is well). Meaningful when no
    /// writes are in flight.
    public func consistencyProblems() -> [String] {
        allVolumes().flatMap { volume in volume.metadata.withLock { $0.consistencyProblems(volume: volume.name) } }
    }

    /// Reads everything the named volumes (all, if none is named) preserved and compares it with its
    /// checksums; see `Volume.verifyPreserved`. Unknown names fail before anything is read.
    public func verify(volumes names: [String], progress: (@Sendable (String, UInt64, UInt64) -> Void)? = nil)
        async throws -> [VerificationReport]
    {
        try checkOpen()
        let volumes = try names.isEmpty ? allVolumes() : names.map { try volume(named: $0) }
        var reports: [VerificationReport] = []
        for volume in volumes {
            let name = volume.name
            reports.append(try await volume.verifyPreserved { progress?(name, $0, $1) })
        }
        return reports
    }

    /// Rewrites the catalog as the records of the current state when the appended log has grown well
    /// past that. A failure is logged, not thrown: the operation that asked is already durable, and a
    /// rewrite that fails before its rename leaves the catalog in use as it was (one that fails at the
    /// rename stops the log, and later changes report that).
    func compactIfWorthIt(holdingOperations: Bool = false) async {
        guard context.catalog.appendedBytes > context.configuration.catalogCompactionThreshold.rawValue else { return }
        do {
            try await compact(force: false, holdingOperations: holdingOperations)
        } catch {
            context.logger.warning(
                "could not compact the catalog; it keeps its current file and grows until a later try",
                metadata: ["error": "\(error)"])
        }
    }

    /// Rewrites the catalog as the records of the current state: always when `force` (a format
    /// upgrade), else only if the appended log is over four times their size. All volumes' gates are
    /// held meanwhile, so no copy is between durable and applied, and no set's append is in flight.
    func compact(force: Bool, holdingOperations: Bool = false) async throws {
        if !holdingOperations { await operations.lock() }
        defer { if !holdingOperations { operations.unlock() } }
        await waitForPendingCommits()
        let appended = context.catalog.appendedBytes
        let volumes = allVolumes().sorted { $0.id < $1.id }
        var held: [Volume] = []
        defer { for volume in held { volume.gate.releaseExclusive() } }
        for volume in volumes {
            try await volume.gate.acquireExclusive()
            held.append(volume)
        }
        let (nextSequence, nextVolumeID) = state.withLock { ($0.nextSequence, $0.nextVolumeID) }
        let snapshot = volumes.map { volume in
            (
                definition: VolumeDefinition(
                    id: volume.id, guid: volume.guid, name: volume.name, size: volume.size.rawValue,
                    chunkShift: UInt8(volume.chunkShift), backing: volume.backing,
                    diffLimit: volume.diffLimit?.rawValue ?? 0, policy: volume.metadata.withLock { $0.policy }),
                metadata: volume.metadata.withLock { $0 }
            )
        }
        let records = CatalogReplay.records(
            volumes: snapshot, nextSequence: nextSequence, nextVolumeID: nextVolumeID,
            setPurposes: state.withLock { $0.setPurposes })
        var writer = BinaryWriter()
        for record in records { record.encode(into: &writer) }
        guard force || appended > 4 * UInt64(writer.bytes.count) else { return }
        try await context.catalog.rewrite(with: records, in: directory)
        context.logger.info(
            "compacted the catalog", metadata: ["bytes.before": "\(appended)", "bytes.after": "\(writer.bytes.count)"])
    }
}
