// Writes answered before their copies are durable (Volume+WritePath.swift). A write without FUA is
// volatile until a flush, so a write that must first preserve chunks for the newest snapshot may be
// answered as soon as its place is taken here: its copy and then its live write go on in the
// background, holding the volume's gate, while the client sends more. This file keeps their byte
// ranges, so that a read or a later write of those bytes waits for them (nothing ever sees the bytes
// from before a write that was answered), and a flush waits for all of them.
//
// If one fails after its answer (an I/O error, no space for the copy), its data never reaches the
// volume: the failure is latched, every later write and flush of the volume fails with it, and a
// read of the lost bytes fails too, until the data directory is reopened. Nothing is silently lost.

import Synchronization

final class HeldWrites: Sendable {
    private struct Entry {
        var range: Range<UInt64>
        var bytes: Int
    }

    private struct Waiter {
        /// The bytes waited for; nil for every held write (a flush).
        var range: Range<UInt64>?
        /// Only writes held before the wait began count (a flush does not wait for later ones).
        var before: UInt64
        var continuation: CheckedContinuation<Void, Never>
        /// Identifies a cancellable wait, to take it out when its task is cancelled.
        var token: UInt64
    }

    private struct State {
        var entries: [UInt64: Entry] = [:]
        var heldBytes = 0
        var nextID: UInt64 = 1
        var waiters: [Waiter] = []
        var nextToken: UInt64 = 0
        var failure: EngineError?
        /// The byte ranges of writes answered and then lost.
        var lost: [Range<UInt64>] = []

        func blocks(_ waiter: Waiter) -> Bool {
            entries.contains { id, entry in
                id < waiter.before && (waiter.range.map { entry.range.overlaps($0) } ?? true)
            }
        }
    }

    private let state = Mutex(State())
    /// Writes held, plus one once a write was lost: zero is the common case, checked without the lock.
    private let active = Atomic<Int>(0)

    /// The failure of a write lost after its answer, if any.
    var failure: EngineError? {
        guard active.load(ordering: .acquiring) > 0 else { return nil }
        return state.withLock { $0.failure }
    }

    /// Takes a place for a write of `range` (`bytes` of memory kept until it lands), unless that would
    /// hold more than `limit` bytes or a write was lost. Returns the place to give back with `release`.
    func hold(_ range: Range<UInt64>, bytes: Int, limit: Int) -> UInt64? {
        state.withLock { state -> UInt64? in
            guard state.failure == nil, state.heldBytes + bytes <= limit else { return nil }
            let id = state.nextID
            state.nextID += 1
            state.entries[id] = Entry(range: range, bytes: bytes)
            state.heldBytes += bytes
            active.add(1, ordering: .releasing)
            return id
        }
    }

    /// The write held at `id` landed, or (with `failure`) was lost.
    func release(_ id: UInt64, failure: EngineError? = nil) {
        let woken = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            guard let entry = state.entries.removeValue(forKey: id) else { return [] }
            state.heldBytes -= entry.bytes
            if let failure {
                if state.failure == nil {
                    state.failure = failure
                    active.add(1, ordering: .releasing)
                }
                state.lost.append(entry.range)
            }
            active.subtract(1, ordering: .releasing)
            var woken: [CheckedContinuation<Void, Never>] = []
            var waiting: [Waiter] = []
            for waiter in state.waiters {
                if state.blocks(waiter) {
                    waiting.append(waiter)
                } else {
                    woken.append(waiter.continuation)
                }
            }
            state.waiters = waiting
            return woken
        }
        for continuation in woken { continuation.resume() }
    }

    /// Whether a held write covers any of `range` (for callers that cannot wait).
    func overlaps(_ range: Range<UInt64>) -> Bool {
        guard active.load(ordering: .acquiring) > 0 else { return false }
        return state.withLock { state in
            state.entries.values.contains { $0.range.overlaps(range) } || state.lost.contains { $0.overlaps(range) }
        }
    }

    /// The byte ranges of the writes held now and of those lost: changed, as far as change tracking
    /// goes, though no copy records it yet.
    func ranges() -> [Range<UInt64>] {
        guard active.load(ordering: .acquiring) > 0 else { return [] }
        return state.withLock { $0.entries.values.map(\.range) + $0.lost }
    }

    /// Waits until the writes held now that overlap `range` (every one, if nil) have landed. Throws
    /// the latched failure if one of them, or an earlier one, was lost in those bytes (in any bytes,
    /// for nil).
    func wait(for range: Range<UInt64>?) async throws(EngineError) {
        guard active.load(ordering: .acquiring) > 0 else { return }
        await waitUntilLanded(range, token: nil)
        try checkLost(range)
    }

    /// The same, but a cancellation of the calling task ends the wait at once with
    /// `CancellationError` (a set that is aborted does not wait for the disk).
    func waitCancellably(for range: Range<UInt64>?) async throws {
        guard active.load(ordering: .acquiring) > 0 else { return }
        let token = state.withLock { state -> UInt64 in
            state.nextToken += 1
            return state.nextToken
        }
        await withTaskCancellationHandler {
            await waitUntilLanded(range, token: token)
        } onCancel: {
            let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                guard let index = state.waiters.firstIndex(where: { $0.token == token }) else { return nil }
                return state.waiters.remove(at: index).continuation
            }
            waiter?.resume()
        }
        try Task.checkCancellation()
        try checkLost(range)
    }

    private func waitUntilLanded(_ range: Range<UInt64>?, token: UInt64?) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let blocked = state.withLock { state -> Bool in
                // Checked under the lock: a cancellation handler that ran before this found nothing.
                if token != nil && Task.isCancelled { return false }
                let waiter = Waiter(range: range, before: state.nextID, continuation: continuation, token: token ?? 0)
                guard state.blocks(waiter) else { return false }
                state.waiters.append(waiter)
                return true
            }
            if !blocked { continuation.resume() }
        }
    }

    private func checkLost(_ range: Range<UInt64>?) throws(EngineError) {
        let failure = state.withLock { state -> EngineError? in
            guard let failure = state.failure else { return nil }
            guard let range else { return failure }
            return state.lost.contains { $0.overlaps(range) } ? failure : nil
        }
        if let failure { throw failure }
    }
}
