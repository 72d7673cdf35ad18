// The I/O barrier of one volume. Writes pass through it shared; taking a snapshot, deleting one, or
// reclaiming diff space takes it exclusively: new writes wait at the gate, writes already past it
// drain, and only then does the exclusive holder proceed. An exclusive request that is waiting makes
// new writes wait too, so a steady stream of writes cannot starve it and the hold stays short.

import Synchronization

final class WriteGate: Sendable {
    private struct State {
        var activeWriters = 0
        var exclusiveHeld = false
        /// The exclusive holder waiting for active writers to drain.
        var drainWaiter: (id: UInt64, continuation: CheckedContinuation<Void, any Error>)?
        var exclusiveQueue: [(id: UInt64, continuation: CheckedContinuation<Void, any Error>)] = []
        var waitingWriters: [CheckedContinuation<Void, Never>] = []
        var nextWaiterID: UInt64 = 0

        var isOpen: Bool { !exclusiveHeld && exclusiveQueue.isEmpty }
    }

    private let state = Mutex(State())

    /// Passes the gate as a writer, waiting while it is held.
    func enter() async {
        let entered = state.withLock { state -> Bool in
            guard state.isOpen else { return false }
            state.activeWriters += 1
            return true
        }
        if entered { return }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let enteredNow = state.withLock { state -> Bool in
                if state.isOpen {
                    state.activeWriters += 1
                    return true
                }
                state.waitingWriters.append(continuation)
                return false
            }
            if enteredNow { continuation.resume() }
        }
    }

    /// Whether an exclusive holder is waiting or holds the gate (new writes wait).
    var hasExclusiveWaiter: Bool { state.withLock { !$0.isOpen } }

    /// Leaves the gate after `enter()`.
    func leave() {
        let drained = state.withLock { state -> CheckedContinuation<Void, any Error>? in
            assert(state.activeWriters > 0, "leave() without enter()")
            state.activeWriters -= 1
            guard state.activeWriters == 0, let waiter = state.drainWaiter else { return nil }
            state.drainWaiter = nil
            return waiter.continuation
        }
        drained?.resume()
    }

    /// Holds the gate: waits for other exclusive holders, then for active writers to drain. Throws
    /// `CancellationError` (holding nothing) if the task is cancelled while waiting.
    func acquireExclusive() async throws {
        let id = state.withLock { state -> UInt64 in
            state.nextWaiterID += 1
            return state.nextWaiterID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                enum Outcome { case acquired, waiting, cancelled }
                let outcome = state.withLock { state -> Outcome in
                    // Checked under the lock: a cancellation handler that ran before this found nothing
                    // to cancel, so this is where that cancellation is honoured.
                    if Task.isCancelled { return .cancelled }
                    if !state.exclusiveHeld {
                        state.exclusiveHeld = true
                        if state.activeWriters == 0 { return .acquired }
                        state.drainWaiter = (id, continuation)
                    } else {
                        state.exclusiveQueue.append((id, continuation))
                    }
                    return .waiting
                }
                switch outcome {
                case .acquired: continuation.resume()
                case .cancelled: continuation.resume(throwing: CancellationError())
                case .waiting: break
                }
            }
        } onCancel: {
            cancelWaiter(id)
        }
    }

    private func cancelWaiter(_ id: UInt64) {
        var cancelled: CheckedContinuation<Void, any Error>?
        var wake: (writers: [CheckedContinuation<Void, Never>], next: CheckedContinuation<Void, any Error>?) = ([], nil)
        state.withLock { state in
            if let waiter = state.drainWaiter, waiter.id == id {
                state.drainWaiter = nil
                cancelled = waiter.continuation
                wake = Self.handOver(&state)
            } else if let index = state.exclusiveQueue.firstIndex(where: { $0.id == id }) {
                cancelled = state.exclusiveQueue.remove(at: index).continuation
                if state.isOpen { wake.writers = Self.admitWaitingWriters(&state) }
            }
        }
        cancelled?.resume(throwing: CancellationError())
        for writer in wake.writers { writer.resume() }
        wake.next?.resume()
    }

    /// Releases the gate after `acquireExclusive()`.
    func releaseExclusive() {
        let wake = state.withLock { state in
            assert(state.exclusiveHeld && state.drainWaiter == nil, "releaseExclusive() without holding the gate")
            return Self.handOver(&state)
        }
        for writer in wake.writers { writer.resume() }
        wake.next?.resume()
    }

    /// Gives the gate to the next exclusive waiter, or opens it to writers.
    private static func handOver(_ state: inout State) -> (
        writers: [CheckedContinuation<Void, Never>], next: CheckedContinuation<Void, any Error>?
    ) {
        state.exclusiveHeld = false
        guard !state.exclusiveQueue.isEmpty else { return (admitWaitingWriters(&state), nil) }
        let next = state.exclusiveQueue.removeFirst()
        state.exclusiveHeld = true
        if state.activeWriters == 0 { return ([], next.continuation) }
        state.drainWaiter = next
        return ([], nil)
    }

    private static func admitWaitingWriters(_ state: inout State) -> [CheckedContinuation<Void, Never>] {
        let writers = state.waitingWriters
        state.waitingWriters.removeAll()
        state.activeWriters += writers.count
        return writers
    }
}
