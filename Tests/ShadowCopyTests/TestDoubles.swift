// Test doubles: a provider that records every call and can be told to fail, a request handler with
// canned answers, and a fake writer that answers the coordinator directly by a policy.

import Foundation
import Synchronization

@testable import ShadowCopy

final class RecordingProvider: SnapshotProvider {
    enum Call: Hashable, Sendable {
        case validate([String])
        case flush([String])
        case prepare([String])
        case commit
        case keep(UUID)
        case abort
        case delete(UUID)
    }

    struct State {
        var calls: [Call] = []
        var nextToken = 0
        var holds: [Int: (id: UUID, volumes: [String])] = [:]
        var sets: [UUID: CommittedSnapshotSet] = [:]
        /// Sets committed and not (yet) kept: what a crash would roll back.
        var pending: Set<UUID> = []
        /// How each prepare was asked to flush, in order.
        var prepareFlushes: [Bool] = []
        var failValidate: ShadowCopyError?
        var failPrepare: (any Error & Sendable)?
        var failCommit: (any Error & Sendable)?
        var failKeep: (any Error & Sendable)?
        var failDelete: (any Error & Sendable)?
        /// While true, a prepare does not return (a stuck disk flush) until `releasePrepare()`; it
        /// ignores cancellation meanwhile, as a flush in the kernel would.
        var stallPrepare = false
        var prepareWaiters: [CheckedContinuation<Void, Never>] = []
        /// While true, validation waits for `releaseValidation()`.
        var holdValidation = false
        var validationWaiters: [CheckedContinuation<Void, Never>] = []
    }

    let state = Mutex(State())

    var calls: [Call] { state.withLock { $0.calls } }
    /// The calls other than the early flushes (which nobody waits for).
    var callsBesidesFlushes: [Call] {
        calls.filter {
            if case .flush = $0 { return false }
            return true
        }
    }
    /// True while some prepare has not been committed or aborted.
    var isHolding: Bool { state.withLock { !$0.holds.isEmpty } }
    /// Sets committed and not deleted.
    var liveSets: [UUID] { state.withLock { Array($0.sets.keys) } }
    /// Sets committed, not deleted and not kept.
    var pendingSets: Set<UUID> { state.withLock { $0.pending } }
    /// How each prepare was asked to flush, in order.
    var prepareFlushes: [Bool] { state.withLock { $0.prepareFlushes } }

    func configure(_ body: (inout State) -> Void) { state.withLock { body(&$0) } }

    func validateSnapshotSet(volumes: [String]) async throws {
        await withCheckedContinuation { continuation in
            let hold = state.withLock { state in
                state.calls.append(.validate(volumes))
                if state.holdValidation { state.validationWaiters.append(continuation) }
                return state.holdValidation
            }
            if !hold { continuation.resume() }
        }
        if let failure = state.withLock({ $0.failValidate }) { throw failure }
    }

    /// Lets every held validation go on, and stops holding new ones.
    func releaseValidation() {
        let waiters = state.withLock { state in
            state.holdValidation = false
            defer { state.validationWaiters = [] }
            return state.validationWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    func flushVolumes(_ volumes: [String]) async throws {
        state.withLock { $0.calls.append(.flush(volumes)) }
    }

    func prepareSnapshotSet(id: UUID, volumes: [String], flushingFirst: Bool) async throws -> Int {
        await withCheckedContinuation { continuation in
            let stall = state.withLock { state in
                state.calls.append(.prepare(volumes))
                state.prepareFlushes.append(flushingFirst)
                if state.stallPrepare { state.prepareWaiters.append(continuation) }
                return state.stallPrepare
            }
            if !stall { continuation.resume() }
        }
        if Task.isCancelled { throw CancellationError() }
        return try state.withLock { state in
            if let failure = state.failPrepare { throw failure }
            state.nextToken += 1
            state.holds[state.nextToken] = (id, volumes)
            return state.nextToken
        }
    }

    /// Lets stalled prepares return, and stops stalling new ones.
    func releasePrepare() {
        let waiters = state.withLock { state in
            state.stallPrepare = false
            defer { state.prepareWaiters = [] }
            return state.prepareWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    var stalledPrepares: Int { state.withLock { $0.prepareWaiters.count } }

    func commitSnapshotSet(_ token: Int, keep: Bool) async throws -> CommittedSnapshotSet {
        try state.withLock { state in
            state.calls.append(.commit)
            if let failure = state.failCommit { throw failure }
            let hold = state.holds.removeValue(forKey: token)!
            let snapshots = hold.volumes.map { volume in
                let id = UUID()
                return CreatedSnapshot(id: id, volume: volume, export: "\(volume)@\(id.guidString)")
            }
            let set = CommittedSnapshotSet(
                id: hold.id, createdAt: Date(timeIntervalSince1970: 1_800_000_000), snapshots: snapshots)
            state.sets[hold.id] = set
            if !keep { state.pending.insert(hold.id) }
            return set
        }
    }

    func keepSnapshotSet(id: UUID) async throws {
        try state.withLock { state in
            state.calls.append(.keep(id))
            if let failure = state.failKeep { throw failure }
            state.pending.remove(id)
        }
    }

    func abortSnapshotSet(_ token: Int) async {
        state.withLock { state in
            state.calls.append(.abort)
            state.holds.removeValue(forKey: token)
        }
    }

    func holdDuration(of token: Int) -> Duration? { .milliseconds(1) }

    func deleteSnapshotSet(id: UUID) async throws {
        try state.withLock { state in
            state.calls.append(.delete(id))
            if let failure = state.failDelete { throw failure }
            state.sets.removeValue(forKey: id)
            state.pending.remove(id)
        }
    }
}

struct PlainError: Error, Sendable, CustomStringConvertible {
    var description: String
}

/// Canned answers for the operations the daemon implements.
struct CannedHandler: ControlRequestHandler {
    static let snapshotID = UUID(uuidString: "0f0e0d0c-0b0a-0908-0706-050403020100")!

    func createVolume(_ params: CreateVolumeParams) async throws -> VolumeInfo {
        guard params.name != "taken" else { throw ShadowCopyError(.alreadyExists, "Volume 'taken' already exists.") }
        return VolumeInfo(name: params.name, size: params.size, chunkSize: params.chunkSize ?? 65536)
    }

    func listVolumes() async throws -> VolumeList {
        VolumeList(volumes: [VolumeInfo(name: "db", size: 1 << 30, chunkSize: 65536)])
    }

    func deleteVolume(name: String, deletingImage: Bool) async throws {
        throw ShadowCopyError(.notFound, "No volume named '\(name)'.")
    }

    func labelSet(_ params: LabelSetParams) async throws {}

    func backupSnapshot(_ params: BackupImageParams) async throws -> BackupImageResult {
        throw ShadowCopyError(.notFound, "No snapshot or snapshot set with id \(params.snapshot.guidString).")
    }

    func restoreVolume(_ params: RestoreParams) async throws -> RestoreResult {
        throw ShadowCopyError(.notFound, "No such file.")
    }

    func revertVolume(_ params: RevertParams) async throws -> RevertResultInfo {
        RevertResultInfo(volume: params.name, snapshot: params.snapshot, changedBytes: 0, seconds: 0)
    }

    func setVolume(_ params: SetVolumeParams) async throws -> VolumeInfo {
        VolumeInfo(
            name: params.name, size: 1 << 30, chunkSize: 65536, diffLimit: params.diffLimit, whenFull: params.whenFull)
    }

    func listSnapshots(volume: String?) async throws -> SnapshotList {
        SnapshotList(snapshots: [
            SnapshotInfo(
                id: Self.snapshotID,
                set: Self.snapshotID,
                volume: volume ?? "db",
                export: "db@\(Self.snapshotID.guidString)",
                createdAt: Date(timeIntervalSince1970: 1_800_000_000),
                diffBytes: 4096
            )
        ])
    }

    func deleteSnapshots(ids: [UUID]) async throws -> DeleteSnapshotsResult {
        DeleteSnapshotsResult(deleted: ids)
    }

    func status() async throws -> StatusResult {
        StatusResult(
            version: "test", uptimeSeconds: 1, listeners: [], connections: 0, writers: 0, writerStates: [:],
            reloads: 0, volumes: [])
    }

    func reload() async throws -> ReloadResult { ReloadResult(reloaded: []) }

    func verify(_ params: VerifyParams) async throws -> VerifyResult {
        VerifyResult(
            volumes: params.volumes.map {
                VerifyResult.Volume(name: $0, snapshotsChecked: 0, bytesChecked: 0, bytesUnchecked: 0, damaged: [])
            })
    }

    func changes(_ params: ChangesParams) async throws -> ChangeList {
        if params.until != nil { throw PlainError(description: "engine exploded") }
        return ChangeList(chunkSize: 65536, extents: [ByteExtent(offset: 0, length: 65536)])
    }
}

/// A writer wired straight to the coordinator (no socket), answering by a policy that tests can change.
final class FakeWriter: Sendable {
    enum Reply: Sendable {
        case succeed
        case veto(WriterFailure, String)
        case hang
        case disconnect
    }

    private struct State {
        var received: [WriterEventDelivery] = []
        var waiters: [(event: WriterEvent, count: Int, continuation: CheckedContinuation<Void, Never>)] = []
        var policy: @Sendable (WriterEvent) -> Reply
    }

    let id: WriterID
    let name: String
    private let coordinator: any SetCoordinating
    private let state: Mutex<State>

    init(
        _ id: UInt64,
        name: String,
        coordinator: any SetCoordinating,
        policy: @escaping @Sendable (WriterEvent) -> Reply = { _ in .succeed }
    ) {
        self.id = WriterID(rawValue: id)
        self.name = name
        self.coordinator = coordinator
        self.state = Mutex(State(policy: policy))
    }

    @discardableResult
    func register(volumes: [String] = ["db"], instance: UUID? = nil) async throws -> UUID {
        try await coordinator.registerWriter(
            HelloParams(role: .writer, name: name, instance: instance, volumes: volumes),
            id: id,
            confirm: { _ in },
            sink: { delivery in self.deliver(delivery) }
        )
    }

    func setPolicy(_ policy: @escaping @Sendable (WriterEvent) -> Reply) {
        state.withLock { $0.policy = policy }
    }

    var events: [WriterEvent] { state.withLock { $0.received.map(\.event) } }
    var deliveries: [WriterEventDelivery] { state.withLock { $0.received } }

    /// Suspends until `event` has been received `count` times in all.
    func waitFor(_ event: WriterEvent, count: Int = 1) async {
        await withCheckedContinuation { continuation in
            let ready = state.withLock { state in
                if state.received.filter({ $0.event == event }).count >= count { return true }
                state.waiters.append((event, count, continuation))
                return false
            }
            if ready { continuation.resume() }
        }
    }

    private func deliver(_ delivery: WriterEventDelivery) {
        let (reply, ready) = state.withLock { state in
            state.received.append(delivery)
            let counts = Dictionary(grouping: state.received, by: \.event).mapValues(\.count)
            let ready = state.waiters.filter { counts[$0.event, default: 0] >= $0.count }
            state.waiters.removeAll { counts[$0.event, default: 0] >= $0.count }
            return (state.policy(delivery.event), ready.map(\.continuation))
        }
        for continuation in ready { continuation.resume() }
        let coordinator = coordinator
        let id = id
        switch reply {
        case .succeed:
            let metadata: JSONValue? = delivery.event == .identify ? .object(["writer": .string(name)]) : nil
            Task {
                await coordinator.writerAnswered(
                    id, requestID: delivery.requestID, answer: .success(metadata: metadata))
            }
        case .veto(let failure, let message):
            Task {
                await coordinator.writerAnswered(
                    id, requestID: delivery.requestID, answer: .veto(failure, message: message))
            }
        case .hang:
            break
        case .disconnect:
            Task { await coordinator.writerDisconnected(id) }
        }
    }
}
