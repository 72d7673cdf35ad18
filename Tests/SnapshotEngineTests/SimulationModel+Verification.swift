// The checks the crash simulation runs against its model: a snapshot's bytes as it is read, and the
// whole store after each recovery.

import BlockIO
import Foundation
import Logging
import Synchronization
import Testing
import UmbraTestSupport

@testable import SnapshotEngine

extension SimulationModel {
    /// Checks a snapshot's full contents against the model and, if they fit, remembers them as exact.
    func check(snapshot id: UUID, bytes: [UInt8]) throws {
        guard var snapshot = snapshots[id] else { return }
        if let exact = snapshot.exact {
            if !bytesEqual(exact, bytes) {
                throw SimulationFailure("snapshot \(id.guidString) of \(snapshot.volume) changed after it was verified")
            }
            return
        }
        var expected = snapshot.atStart
        for write in snapshot.maybe {
            if bytesEqual(bytes[write.range], write.bytes[...]) {
                overwrite(&expected, at: write.range.lowerBound, with: write.bytes)
            } else if !bytesEqual(bytes[write.range], snapshot.atStart[write.range]) {
                if ProcessInfo.processInfo.environment["UMBRA_SIMULATION_DEBUG"] != nil {
                    var line = ""
                    for start in stride(from: write.range.lowerBound, to: write.range.upperBound, by: 512) {
                        let end = min(start + 512, write.range.upperBound)
                        let isNew = bytesEqual(
                            bytes[start..<end],
                            write.bytes[(start - write.range.lowerBound)..<(end - write.range.lowerBound)])
                        let isOld = bytesEqual(bytes[start..<end], snapshot.atStart[start..<end])
                        line += isNew && isOld ? "=" : isNew ? "N" : isOld ? "o" : "?"
                    }
                    print("write \(write.range) started \(write.start) ended \(String(describing: write.end)): \(line)")
                }
                throw SimulationFailure(
                    "snapshot \(id.guidString) of \(snapshot.volume) holds part of a write at \(write.range)")
            }
        }
        if !bytesEqual(expected, bytes) {
            let first = zip(expected, bytes).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
            throw SimulationFailure(
                "snapshot \(id.guidString) of \(snapshot.volume) differs from the model at byte \(first)")
        }
        snapshot.exact = bytes
        snapshots[id] = snapshot
    }

    // MARK: - After a crash

    func verifyAfterRecovery(_ store: SnapshotStore) async throws {
        if ProcessInfo.processInfo.environment["UMBRA_SIMULATION_DEBUG"] != nil {
            let storage = try store.directory.openFile("catalog", mode: .existing)
            for record in try CatalogLog.read(storage).records { print("record: \(record)") }
        }
        if let violation = policyViolations.first { throw SimulationFailure(violation) }
        let problems = store.consistencyProblems()
        if !problems.isEmpty { throw SimulationFailure("inconsistent metadata after recovery: \(problems)") }
        var liveContents: [String: [UInt8]] = [:]
        for name in Simulation.volumeNames {
            let bytes = try await store.volume(named: name).read(at: 0, count: volumeSize)
            let model = volumes[name]!
            let differing = stride(from: 0, to: volumeSize, by: 512).filter {
                !bytesEqual(bytes[$0..<($0 + 512)], model.baseline[$0..<($0 + 512)])
            }
            for offset in differing.flatMap({ $0..<($0 + 512) }) where bytes[offset] != model.baseline[offset] {
                // A write older than the one that made this byte durable (a FUA write after it) cannot
                // explain it.
                let explained = model.writes.contains { write in
                    write.range.contains(offset) && write.start > model.baselineStart[offset]
                        && write.bytes[offset - write.range.lowerBound] == bytes[offset]
                }
                if !explained {
                    throw SimulationFailure(
                        "live \(name) byte \(offset) is \(bytes[offset]), neither its flushed value \(model.baseline[offset]) nor a later write's"
                    )
                }
            }
            liveContents[name] = bytes
        }
        let listed = try store.snapshots()
        var seen: Set<UUID> = []
        /// The whole snapshots read here, for the checks between two of them.
        var verified: [(id: UUID, volume: String, bytes: [UInt8])] = []
        for info in listed {
            seen.insert(info.id)
            if let known = snapshots[info.id], known.isPending, !known.keepBegan {
                throw SimulationFailure(
                    "snapshot \(info.id.guidString) of \(info.volume) belongs to a set that was never kept, yet recovery did not roll it back"
                )
            }
            if info.isPending {
                throw SimulationFailure("snapshot \(info.id.guidString) is still pending after recovery")
            }
            if case .failed = info.state {
                guard snapshotsMayFail else {
                    throw SimulationFailure(
                        "snapshot \(info.id.guidString) failed without a diff-store limit and the failSnapshot policy")
                }
                // A failed snapshot is still one the model knows, or one of a set in flight at the crash.
                guard
                    snapshots[info.id] != nil
                        || pendingSets.values.contains(where: { $0.volumes.contains(info.volume) && !$0.rollsBack })
                else {
                    throw SimulationFailure(
                        "snapshot \(info.id.guidString) of \(info.volume) is listed as failed but matches no snapshot or set"
                    )
                }
                snapshots[info.id]?.failed = true
                continue
            }
            let bytes = try await store.snapshot(id: info.id).read(at: 0, count: volumeSize)
            if snapshots[info.id] == nil {
                // A set whose creation was in flight at the crash may have made it; it must match one.
                let candidates = pendingSets.values.filter { $0.volumes.contains(info.volume) && !$0.rollsBack }
                var matched = false
                for pending in candidates where !matched {
                    snapshots[info.id] = SnapshotModel(
                        id: info.id, setID: info.setID, volume: info.volume, exact: nil,
                        atStart: pending.atStart[info.volume]!, maybe: pending.maybe[info.volume] ?? [],
                        setStart: pending.start)
                    do {
                        try check(snapshot: info.id, bytes: bytes)
                        matched = true
                    } catch {
                        if ProcessInfo.processInfo.environment["UMBRA_SIMULATION_DEBUG"] != nil {
                            print(
                                "candidate set started at \(pending.start) does not match: \(error); maybe writes \(pending.maybe[info.volume]?.map(\.range) ?? [])"
                            )
                        }
                    }
                }
                guard matched else {
                    snapshots[info.id] = nil
                    throw SimulationFailure(
                        "snapshot \(info.id.guidString) of \(info.volume) after recovery matches no set that was being taken"
                    )
                }
            }
            snapshots[info.id]!.mayBeGone = false
            snapshots[info.id]!.isPending = false
            // Seen failing before the crash, but the failure never became durable: it is whole again.
            snapshots[info.id]!.failed = false
            try check(snapshot: info.id, bytes: bytes)
            verified.append((info.id, info.volume, bytes))
            // Every chunk where the snapshot and the live volume differ must be reported as changed.
            let changed = try store.changes(volume: info.volume, since: info.id).extents
            let live = liveContents[info.volume]!
            for chunkStart in stride(from: 0, to: volumeSize, by: chunkSize) {
                let chunkRange = chunkStart..<min(chunkStart + chunkSize, volumeSize)
                if !bytesEqual(bytes[chunkRange], live[chunkRange]),
                    !changed.contains(where: {
                        Int($0.offset.rawValue) <= chunkStart && Int($0.end.rawValue) >= chunkRange.upperBound
                    })
                {
                    throw SimulationFailure("changes since \(info.id.guidString) miss the chunk at \(chunkStart)")
                }
            }
            // And nothing else: every chunk reported was written (or trimmed, or zeroed) since the set
            // began, by a write that may be after the snapshot. Reporting everything would pass the
            // check above, not this one.
            let model = snapshots[info.id]!
            let mayHaveChanged =
                (writeLog[info.volume] ?? []).filter { $0.start >= model.setStart }.map(\.range)
                + model.maybe.map(\.range)
            for extent in changed {
                for chunkStart in stride(from: Int(extent.offset.rawValue), to: Int(extent.end.rawValue), by: chunkSize)
                {
                    let chunkRange = chunkStart..<(chunkStart + chunkSize)
                    guard mayHaveChanged.contains(where: { $0.overlaps(chunkRange) }) else {
                        throw SimulationFailure(
                            "changes since \(info.id.guidString) report the chunk at \(chunkStart), which nothing wrote since"
                        )
                    }
                }
            }
        }
        try checkChangesBetweenSnapshots(store, verified)
        for (id, snapshot) in snapshots where !seen.contains(id) {
            if pendingDeletions.contains(id) || snapshotsMayVanish || snapshot.mayBeGone || snapshot.isPending {
                snapshots[id] = nil
            } else {
                throw SimulationFailure("snapshot \(id.guidString) of \(snapshot.volume) vanished after recovery")
            }
        }
        // The recovered state is the new certainty.
        for name in Simulation.volumeNames {
            volumes[name] = VolumeModel(
                content: liveContents[name]!, baseline: liveContents[name]!,
                baselineStart: Array(repeating: Int.min, count: volumeSize))
        }
        pendingSets = [:]
        pendingDeletions = []
        setPhases = [:]
        pendingSetIDs = [:]
        inFlightOwners = []
    }

    /// Changed-block tracking between two snapshots of a volume (`since` one, `until` a newer one), for
    /// each snapshot and the next one of its volume: every chunk where they differ is reported, and
    /// nothing that no write touched between the two sets.
    func checkChangesBetweenSnapshots(
        _ store: SnapshotStore, _ verified: [(id: UUID, volume: String, bytes: [UInt8])]
    ) throws {
        for name in Simulation.volumeNames {
            let chain = try verified.filter { $0.volume == name }
                .map { (snapshot: $0, sequence: try store.snapshot(id: $0.id).sequence) }
                .sorted { $0.sequence < $1.sequence }.map(\.snapshot)
            for (older, newer) in zip(chain, chain.dropFirst()) {
                let changed = try store.changes(volume: name, since: older.id, until: newer.id).extents
                func reported(_ chunk: Range<Int>) -> Bool {
                    changed.contains {
                        Int($0.offset.rawValue) < chunk.upperBound && Int($0.end.rawValue) > chunk.lowerBound
                    }
                }
                let (from, to) = (snapshots[older.id]!, snapshots[newer.id]!)
                // Written after the older set began (or in flight as it was taken), and before the
                // newer one began (or in flight as it was taken).
                let between = (writeLog[name] ?? []).filter { write in
                    let afterOlder =
                        write.start >= from.setStart || from.maybe.contains { $0.start == write.start }
                    let beforeNewer =
                        write.start < to.setStart || to.maybe.contains { $0.start == write.start }
                    return afterOlder && beforeNewer
                }.map(\.range)
                for chunkStart in stride(from: 0, to: volumeSize, by: chunkSize) {
                    let chunk = chunkStart..<min(chunkStart + chunkSize, volumeSize)
                    if !bytesEqual(older.bytes[chunk], newer.bytes[chunk]) && !reported(chunk) {
                        throw SimulationFailure(
                            "changes from \(older.id.guidString) until \(newer.id.guidString) miss the chunk at \(chunkStart)"
                        )
                    }
                    if reported(chunk) && !between.contains(where: { $0.overlaps(chunk) }) {
                        throw SimulationFailure(
                            "changes from \(older.id.guidString) until \(newer.id.guidString) report the chunk at \(chunkStart), which nothing wrote between them"
                        )
                    }
                }
            }
        }
    }
}
