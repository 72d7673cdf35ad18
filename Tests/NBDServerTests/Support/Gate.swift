import Synchronization

/// A one-shot rendezvous between the code under test and a test: the code calls `pass()`, which
/// records that it got there and suspends until the test calls `open()`; the test can wait for the
/// arrival with `waitUntilReached()`. No sleeping anywhere.
final class Gate: Sendable {
    private struct State {
        var reached = false
        var opened = false
        var reachedWaiters: [CheckedContinuation<Void, Never>] = []
        var passers: [CheckedContinuation<Void, Never>] = []
    }

    private let state = Mutex(State())

    init() {}

    /// Called by the code under test: marks the gate reached, then waits until it is opened.
    func pass() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let (waiters, resumeNow) = state.withLock { state -> ([CheckedContinuation<Void, Never>], Bool) in
                state.reached = true
                let waiters = state.reachedWaiters
                state.reachedWaiters = []
                if state.opened { return (waiters, true) }
                state.passers.append(continuation)
                return (waiters, false)
            }
            for waiter in waiters { waiter.resume() }
            if resumeNow { continuation.resume() }
        }
    }

    /// Suspends until some code has called `pass()`.
    func waitUntilReached() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let ready = state.withLock { state -> Bool in
                if state.reached { return true }
                state.reachedWaiters.append(continuation)
                return false
            }
            if ready { continuation.resume() }
        }
    }

    /// Lets every current and future `pass()` through.
    func open() {
        let passers = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.opened = true
            defer { state.passers = [] }
            return state.passers
        }
        for passer in passers { passer.resume() }
    }
}
