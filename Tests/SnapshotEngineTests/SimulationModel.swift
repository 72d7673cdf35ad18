// The crash simulation's reference model: what every snapshot and every live byte may hold, given
// the operations that completed, promoted by flushes, and checked after each recovery.

import BlockIO
import Foundation
import Logging
import Synchronization
import Testing
import UmbraTestSupport

@testable import SnapshotEngine

/// The reference model. Only the simulation's single thread touches it (every task runs on the
/// simulation executor), hence the unchecked Sendable.
final class SimulationModel: @unchecked Sendable {
    struct Write {
        var range: Range<Int>
        var bytes: [UInt8]
        var start: Int
        var end: Int?
    }

    struct VolumeModel {
        /// The contents as of every completed write.
        var content: [UInt8]
        /// The contents that are certainly durable.
        var baseline: [UInt8]
        /// For each byte of `baseline`, when the write that made it durable started: a FUA write is
        /// durable before the older writes a later flush or set makes durable, which must not
        /// overwrite its bytes in the baseline.
        var baselineStart: [Int]
        /// Writes since the baseline (completed or not), oldest first.
        var writes: [Write] = []
        /// Ranges that a write or read in flight owns (concurrent writes stay disjoint so the model is exact).
        var busy: [(range: Range<Int>, owner: Int)] = []
    }

    struct SnapshotModel {
        var id: UUID
        var setID: UUID
        var volume: String
        /// Exactly known contents, once verified.
        var exact: [UInt8]?
        /// Otherwise: the contents when the set began, and the writes that may or may not be in it.
        var atStart: [UInt8]
        var maybe: [Write]
        /// The tick its set began at: writes starting from then on may be reported as changed since it.
        var setStart: Int
        /// A deletion of it began (by the diff-store policy) but may not have become durable.
        var mayBeGone = false
        /// Failed by the `failSnapshot` policy: still listed, no longer readable.
        var failed = false
        /// Its set was taken pending and `keepSnapshotSet` has not returned: recovery rolls it back,
        /// unless the keep had begun (then it may go either way).
        var isPending = false
        var keepBegan = false
    }

    struct PendingSet {
        var volumes: [String]
        var start: Int
        /// Taken pending (`commitPending`): never kept yet, so recovery must roll it back.
        var rollsBack: Bool
        var atStart: [String: [UInt8]]
        /// Writes in flight when the set began or started while it was being taken, per volume.
        var maybe: [String: [Write]]
    }

    let chunkSize: Int
    let volumeSize: Int
    let diffLimit: Int?
    let policy: DiffStorePolicy
    let seed: UInt64
    var volumes: [String: VolumeModel]
    var snapshots: [UUID: SnapshotModel] = [:]
    var pendingSets: [Int: PendingSet] = [:]
    var pendingDeletions: Set<UUID> = []
    /// Where each set being taken is in its life, by the tick it started at; what a crash finds here
    /// is counted, to show the simulation crashes sets in every phase.
    var setPhases: [Int: SetPhase] = [:]
    /// The sets taken pending and not yet finished, by the same key.
    var pendingSetIDs: [Int: UUID] = [:]
    /// The store the workload runs on (for the crash observer).
    var store: SnapshotStore?

    /// The phase of every set in flight; a pending set whose record is not yet durable is still
    /// committing.
    func phasesOfSetsInFlight() -> [SetPhase] {
        setPhases.map { key, phase in
            guard phase == .pending, let id = pendingSetIDs[key], let store else { return phase }
            return store.state.withLock { $0.pendingCommits[id] != nil } ? .committing : phase
        }
    }
    var clock = 0
    var nextOwner = 0
    /// Every write, trim and zeroing ever started, per volume (across crashes): what changed-block
    /// tracking may report.
    var writeLog: [String: [(range: Range<Int>, start: Int)]] = [:]

    init(chunkSize: Int, volumeSize: Int, diffLimit: Int?, policy: DiffStorePolicy, names: [String], seed: UInt64) {
        self.chunkSize = chunkSize
        self.volumeSize = volumeSize
        self.diffLimit = diffLimit
        self.policy = policy
        self.seed = seed
        let zeros = [UInt8](repeating: 0, count: volumeSize)
        volumes = Dictionary(
            uniqueKeysWithValues: names.map {
                (
                    $0,
                    VolumeModel(
                        content: zeros, baseline: zeros, baselineStart: Array(repeating: Int.min, count: volumeSize))
                )
            })
    }

    func tick() -> Int {
        clock += 1
        return clock
    }

    static let debugging = ProcessInfo.processInfo.environment["UMBRA_SIMULATION_DEBUG"] != nil

    func trace(_ message: @autoclosure () -> String) {
        if Self.debugging { print("model[\(clock)]: \(message())") }
    }

    /// Failures by the `failSnapshot` policy that were not of the snapshot needing the space.
    var policyViolations: [String] = []

    /// Told of every snapshot the `failSnapshot` policy failed (durably): it must have been the
    /// volume's newest snapshot, the one a copy was for; no readable snapshot of the volume is newer.
    func noteFailure(of id: UUID) {
        guard let store else { return }
        for volume in store.allVolumes() {
            volume.metadata.withLock { metadata in
                guard let failed = metadata.failed.first(where: { $0.id == id }) else { return }
                let newer = metadata.chain.filter { $0.sequence > failed.sequence }.map(\.id.guidString)
                if !newer.isEmpty {
                    policyViolations.append(
                        "snapshot \(id.guidString) of \(volume.name) failed for space while newer snapshots \(newer) were ready"
                    )
                }
            }
        }
    }

    /// Only `deleteOldest` deletes snapshots by itself; `failSnapshot` fails them and keeps them listed.
    var snapshotsMayVanish: Bool { diffLimit != nil && policy == .deleteOldest }
    var snapshotsMayFail: Bool { diffLimit != nil && policy == .failSnapshot }

    // MARK: - Operations

    func performRandomOperation(_ store: SnapshotStore, random: inout SeededRandom, sets: Bool = true) async throws {
        let name = Simulation.volumeNames.randomElement(using: &random)!
        switch Int.random(in: 0..<(sets ? 100 : 60), using: &random) {
        case 0..<38: try await write(store, name, random: &random, kind: .data)
        case 38..<45: try await write(store, name, random: &random, kind: .discard)
        case 45..<50: try await write(store, name, random: &random, kind: .zeroes)
        case 50..<60: try await flush(store, name)
        case 60..<72: try await createSet(store, random: &random)
        case 72..<80: try await deleteSnapshot(store, random: &random)
        case 80..<90: try await readLive(store, name, random: &random)
        default: try await readSnapshot(store, random: &random)
        }
    }

    enum WriteKind { case data, discard, zeroes }

    /// A free range on `name` (not overlapping any in-flight write or read), or nil.
    func claimRange(_ name: String, random: inout SeededRandom) -> (Range<Int>, Int)? {
        for _ in 0..<4 {
            let length = Int.random(in: 1...(chunkSize * 2 + chunkSize / 2), using: &random)
            let start = Int.random(in: 0...(volumeSize - length), using: &random)
            let range = start..<(start + length)
            if !volumes[name]!.busy.contains(where: { $0.range.overlaps(range) }) {
                nextOwner += 1
                volumes[name]!.busy.append((range, nextOwner))
                inFlightOwners.insert(nextOwner)
                return (range, nextOwner)
            }
        }
        return nil
    }

    /// Releases a claimed range, unless a set creation in flight on the volume must keep writes
    /// it overlaps disjoint (then the range stays claimed until the set is done).
    func release(_ name: String, owner: Int, keepForSets: Bool) {
        inFlightOwners.remove(owner)
        if keepForSets && pendingSets.values.contains(where: { $0.volumes.contains(name) }) { return }
        volumes[name]!.busy.removeAll { $0.owner == owner }
    }

    func write(_ store: SnapshotStore, _ name: String, random: inout SeededRandom, kind: WriteKind) async throws {
        guard let (range, owner) = claimRange(name, random: &random) else { return }
        var bytes = [UInt8](repeating: 0, count: range.count)
        if kind == .data { bytes.withUnsafeMutableBytes { random.fill($0) } }
        let fua = random.chance(1, in: 8)
        let index = volumes[name]!.writes.count
        let start = tick()
        trace("\(kind) \(name) \(range) fua=\(fua) starts")
        let write = Write(range: range, bytes: bytes, start: start, end: nil)
        volumes[name]!.writes.append(write)
        writeLog[name, default: []].append((range, start))
        for key in pendingSets.keys where pendingSets[key]!.volumes.contains(name) {
            pendingSets[key]!.maybe[name, default: []].append(write)
        }
        let volume = try store.volume(named: name)
        switch kind {
        case .data: try await volume.write(at: ByteOffset(range.lowerBound), bytes, fua: fua)
        case .discard:
            try await volume.discard(at: ByteOffset(range.lowerBound), count: ByteCount(range.count), fua: fua)
        case .zeroes:
            try await volume.writeZeroes(
                at: ByteOffset(range.lowerBound), count: ByteCount(range.count), mayDiscard: random.chance(1, in: 2),
                fua: fua)
        }
        let end = tick()
        trace("\(kind) \(name) \(range) started at \(start) ends")
        let position = volumes[name]!.writes.firstIndex { $0.start == start } ?? index
        volumes[name]!.writes[position].end = end
        overwrite(&volumes[name]!.content, at: range.lowerBound, with: bytes)
        if fua {
            // A FUA write is durable by itself; it does not wait for writes answered early to other
            // bytes, so it vouches for nothing else.
            promote(name, completedBefore: Int.min, including: start)
        }
        release(name, owner: owner, keepForSets: true)
    }

    /// Makes durable, in the model, the writes to `name` completed before `start` (and the write that
    /// started at `including`, a FUA write).
    func promote(_ name: String, completedBefore start: Int, including: Int? = nil) {
        var volume = volumes[name]!
        func isDurable(_ write: Write) -> Bool {
            guard let end = write.end else { return false }
            return end < start || write.start == including
        }
        let done = volume.writes.filter(isDurable).sorted { $0.end! < $1.end! }
        for write in done {
            for (index, byte) in write.bytes.enumerated()
            where volume.baselineStart[write.range.lowerBound + index] < write.start {
                volume.baseline[write.range.lowerBound + index] = byte
                volume.baselineStart[write.range.lowerBound + index] = write.start
            }
        }
        volume.writes.removeAll(where: isDurable)
        volumes[name] = volume
    }

    func flush(_ store: SnapshotStore, _ name: String) async throws {
        let start = tick()
        trace("flush \(name) starts")
        try await store.volume(named: name).flush()
        trace("flush \(name) started at \(start) ends")
        promote(name, completedBefore: start)
    }

    func createSet(_ store: SnapshotStore, random: inout SeededRandom) async throws {
        var names = Simulation.volumeNames.filter { _ in random.chance(1, in: 2) }
        if names.isEmpty { names = [Simulation.volumeNames.randomElement(using: &random)!] }
        let pending = random.chance(1, in: 2)
        let start = tick()
        trace("set \(names) starts\(pending ? " (pending)" : "")")
        let key = start
        pendingSets[key] = PendingSet(
            volumes: names, start: start, rollsBack: pending,
            atStart: Dictionary(uniqueKeysWithValues: names.map { ($0, volumes[$0]!.content) }),
            maybe: Dictionary(
                uniqueKeysWithValues: names.map { name in (name, volumes[name]!.writes.filter { $0.end == nil }) }))
        let set: SnapshotSetInfo
        if pending {
            setPhases[key] = .preparing
            let prepared = try await store.prepareSnapshotSet(volumes: names)
            setPhases[key] = .held
            for _ in 0..<Int.random(in: 1...4, using: &random) { await Task.yield() }
            if random.chance(1, in: 8) {
                prepared.abort()
                trace("set \(names) started at \(start) aborted before its commit")
                setPhases[key] = nil
                pendingSets[key] = nil
                releaseSetClaims()
                return
            }
            setPhases[key] = .committing
            set = try await prepared.commitPending()
        } else {
            set = try await store.createSnapshotSet(volumes: names)
        }
        let taking = pendingSets.removeValue(forKey: key)!
        trace("set \(names) started at \(start) ends: \(set.snapshots.map(\.id.guidString))")
        for snapshot in set.snapshots {
            snapshots[snapshot.id] = SnapshotModel(
                id: snapshot.id, setID: set.id, volume: snapshot.volume, exact: nil,
                atStart: taking.atStart[snapshot.volume]!,
                maybe: taking.maybe[snapshot.volume] ?? [], setStart: start, isPending: pending)
            if !pending { promote(snapshot.volume, completedBefore: start) }
        }
        releaseSetClaims()
        guard pending else { return }
        try await finishPendingSet(set, key: key, start: start, store: store, random: &random)
    }

    /// What the coordinator does with a pending set: other I/O goes on while writers thaw and a
    /// requester copies, then the set is kept (BackupComplete) or deleted (an abort).
    func finishPendingSet(
        _ set: SnapshotSetInfo, key: Int, start: Int, store: SnapshotStore, random: inout SeededRandom
    ) async throws {
        setPhases[key] = .pending
        pendingSetIDs[key] = set.id
        defer { pendingSetIDs[key] = nil }
        for _ in 0..<Int.random(in: 0...2, using: &random) {
            try await performRandomOperation(store, random: &random, sets: false)
        }
        let ids = set.snapshots.map(\.id)
        if random.chance(1, in: 4) {
            setPhases[key] = .aborting
            trace("set \(set.id.guidString) is aborted")
            pendingDeletions.formUnion(ids)
            do {
                try await store.deleteSnapshots(ids: [set.id])
            } catch EngineError.snapshotNotFound where snapshotsMayVanish {
                // The diff-store policy got there first.
            }
            pendingDeletions.subtract(ids)
            for id in ids { snapshots[id] = nil }
        } else {
            setPhases[key] = .keeping
            trace("set \(set.id.guidString) is kept")
            for id in ids { snapshots[id]?.keepBegan = true }
            do {
                try await store.keepSnapshotSet(id: set.id)
            } catch EngineError.snapshotNotFound where snapshotsMayVanish {
            }
            for id in ids { snapshots[id]?.isPending = false }
            // Keeping waits for the set's record, which waited for the live volumes to be durable.
            for name in Set(set.snapshots.map(\.volume)) { promote(name, completedBefore: start) }
        }
        setPhases[key] = nil
    }

    /// Frees ranges kept claimed for set creations that are no longer in flight.
    func releaseSetClaims() {
        for name in volumes.keys where !pendingSets.values.contains(where: { $0.volumes.contains(name) }) {
            // Keep only claims of operations still running (their owners are in `inFlightOwners`).
            volumes[name]!.busy.removeAll { !inFlightOwners.contains($0.owner) }
        }
    }

    var inFlightOwners: Set<Int> = []

    func deleteSnapshot(_ store: SnapshotStore, random: inout SeededRandom) async throws {
        // A pending set is kept or deleted by the worker that took it.
        let candidates = snapshots.values.filter { !$0.isPending }.sorted { $0.id.uuidString < $1.id.uuidString }
        guard let target = candidates.randomElement(using: &random) else { return }
        let useSet = random.chance(1, in: 3)
        let ids = useSet ? snapshots.values.filter { $0.setID == target.setID }.map(\.id) : [target.id]
        guard ids.allSatisfy({ !pendingDeletions.contains($0) }) else { return }
        pendingDeletions.formUnion(ids)
        do {
            try await store.deleteSnapshots(ids: [useSet ? target.setID : target.id])
        } catch EngineError.snapshotNotFound where snapshotsMayVanish {
            // The diff-store policy got there first.
        }
        pendingDeletions.subtract(ids)
        for id in ids { snapshots[id] = nil }
    }

    func readLive(_ store: SnapshotStore, _ name: String, random: inout SeededRandom) async throws {
        guard let (range, owner) = claimRange(name, random: &random) else { return }
        inFlightOwners.insert(owner)
        let bytes = try await store.volume(named: name).read(at: ByteOffset(range.lowerBound), count: range.count)
        if !bytesEqual(bytes[...], volumes[name]!.content[range]) {
            throw SimulationFailure("live read of \(name) \(range) differs from the model")
        }
        release(name, owner: owner, keepForSets: false)
    }

    func readSnapshot(_ store: SnapshotStore, random: inout SeededRandom) async throws {
        let candidates = snapshots.values.filter { !pendingDeletions.contains($0.id) && !$0.mayBeGone && !$0.failed }
            .sorted { $0.id.uuidString < $1.id.uuidString }
        guard let target = candidates.randomElement(using: &random) else { return }
        let bytes: [UInt8]
        do {
            bytes = try await store.snapshot(id: target.id).read(at: 0, count: volumeSize)
        } catch let error as EngineError {
            // A deletion (by a worker, or by the diff-store policy) may overtake the read.
            let deletable = snapshots[target.id] == nil || pendingDeletions.contains(target.id) || snapshotsMayVanish
            switch error {
            case .snapshotFailed where snapshotsMayFail && !deletable:
                // The policy failed it, or is failing it (a copy for it did not fit); it stays listed.
                snapshots[target.id]?.failed = true
                return
            case .snapshotNotFound, .snapshotDeleted, .snapshotFailed:
                guard deletable else { throw error }
                if snapshotsMayVanish {
                    // Not found or failed: the policy's record is durable. Being deleted: it may not be.
                    if case .snapshotDeleted = error {
                        snapshots[target.id]?.mayBeGone = true
                    } else {
                        snapshots[target.id] = nil
                    }
                }
                return
            default: throw error
            }
        }
        guard snapshots[target.id] != nil else { return }
        try check(snapshot: target.id, bytes: bytes)
    }
}
