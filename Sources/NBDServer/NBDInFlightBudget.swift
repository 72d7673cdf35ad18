import Synchronization

// Design note. One budget per server bounds the payload bytes held over all connections (READ data
// until its reply has gone to the socket, WRITE data until written), so memory stays bounded when
// many clients stop reading, not just per connection. Taking is all or nothing per request. Waiters
// are served first come, first served, and a grant is made under the lock that saw the bytes freed,
// so a release can never slip between a waiter's check and its wait (no lost wake-up). A request
// bigger than the whole budget is granted once nothing else is held, so it cannot wait forever.

/// Payload bytes in flight over all connections of a server, with a capacity.
final class NBDInFlightBudget: Sendable {
    /// A queued request for bytes, to cancel it.
    struct Ticket: Hashable, Sendable {
        fileprivate let id: UInt64
    }

    private struct Waiter {
        var id: UInt64
        var bytes: Int
        var granted: @Sendable () -> Void
    }

    private struct State {
        var heldBytes = 0
        var waiters: [Waiter] = []
        var nextID: UInt64 = 0
    }

    let capacityBytes: Int
    private let state = Mutex(State())

    init(capacityBytes: Int) {
        assert(capacityBytes > 0, "a budget needs room")
        self.capacityBytes = capacityBytes
    }

    /// Bytes currently taken.
    var heldBytes: Int { state.withLock { $0.heldBytes } }

    /// Takes `bytes` and returns nil if they are free and nobody waits before; otherwise queues the
    /// request and returns its ticket: `granted` is called (on any thread, outside the lock) once the
    /// bytes have been taken for it.
    func take(_ bytes: Int, orWhenFree granted: @escaping @Sendable () -> Void) -> Ticket? {
        assert(bytes > 0, "take some bytes")
        return state.withLock { state -> Ticket? in
            if state.waiters.isEmpty, fits(bytes, state) {
                state.heldBytes += bytes
                return nil
            }
            state.nextID += 1
            state.waiters.append(Waiter(id: state.nextID, bytes: bytes, granted: granted))
            return Ticket(id: state.nextID)
        }
    }

    /// Withdraws a queued request. False if it was already granted (its `granted` runs or has run,
    /// and the bytes must be given back).
    func cancel(_ ticket: Ticket) -> Bool {
        let (found, granted) = state.withLock { state -> (Bool, [Waiter]) in
            guard let index = state.waiters.firstIndex(where: { $0.id == ticket.id }) else { return (false, []) }
            state.waiters.remove(at: index)
            // The first in line may have been holding up smaller requests behind it.
            return (true, index == 0 ? grantWaiting(&state) : [])
        }
        for waiter in granted { waiter.granted() }
        return found
    }

    /// Gives `bytes` back and grants what now fits to the waiters, in order.
    func give(back bytes: Int) {
        guard bytes > 0 else { return }
        let granted = state.withLock { state -> [Waiter] in
            assert(state.heldBytes >= bytes, "more bytes given back than taken")
            state.heldBytes -= bytes
            return grantWaiting(&state)
        }
        for waiter in granted { waiter.granted() }
    }

    private func fits(_ bytes: Int, _ state: State) -> Bool {
        state.heldBytes == 0 || bytes <= capacityBytes - state.heldBytes
    }

    private func grantWaiting(_ state: inout State) -> [Waiter] {
        var granted: [Waiter] = []
        while let first = state.waiters.first, fits(first.bytes, state) {
            state.heldBytes += first.bytes
            granted.append(state.waiters.removeFirst())
        }
        return granted
    }
}
