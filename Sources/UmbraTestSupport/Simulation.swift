// Deterministic concurrency for simulation tests. `SimulationExecutor` is a task executor that runs
// every job on the thread that calls `run(_:)`, picking the next ready job with a seeded generator, so
// concurrent tasks interleave differently per seed and identically per replay. `SimulationIOExecutor`
// runs storage calls inline, after a seeded number of yields, so that I/O is where interleavings
// change. Code under test must create its tasks with this executor as their preference (the engine
// takes it as `StoreConfiguration.taskExecutor`); child tasks and continuations follow on their own.

import BlockIO
import Synchronization

public final class SimulationExecutor: TaskExecutor, Sendable {
    private struct State {
        var jobs: [UnownedJob] = []
        var random: SeededRandom
    }

    private let state: Mutex<State>

    public init(seed: UInt64) {
        state = Mutex(State(random: SeededRandom(seed: seed)))
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        state.withLock { $0.jobs.append(unowned) }
    }

    private func nextJob() -> UnownedJob? {
        state.withLock { state in
            guard !state.jobs.isEmpty else { return nil }
            let index = Int.random(in: 0..<state.jobs.count, using: &state.random)
            return state.jobs.swapRemoveAt(index)
        }
    }

    /// Runs `body` as a task on this executor and drives it, on the calling thread, until no job is
    /// ready. Returns the body's result, or nil if it never finished (every remaining task is waiting
    /// for something that will not happen: a deadlock).
    public func run<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) -> Result<T, any Error>? {
        let outcome = Mutex<Result<T, any Error>?>(nil)
        Task(executorPreference: self) {
            do {
                let value = try await body()
                outcome.withLock { $0 = .success(value) }
            } catch {
                outcome.withLock { $0 = .failure(error) }
            }
        }
        while let job = nextJob() {
            job.runSynchronously(on: asUnownedTaskExecutor())
        }
        return outcome.withLock { $0 }
    }
}

extension Array {
    fileprivate mutating func swapRemoveAt(_ index: Int) -> Element {
        swapAt(index, count - 1)
        return removeLast()
    }
}

/// Runs storage calls inline after a seeded number of `Task.yield()`s.
public final class SimulationIOExecutor: IOExecutor {
    private let random: Mutex<SeededRandom>
    private let maximumYields: Int

    public init(seed: UInt64, maximumYields: Int = 3) {
        random = Mutex(SeededRandom(seed: seed))
        self.maximumYields = maximumYields
    }

    public func run<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        let yields = random.withLock { Int.random(in: 0...maximumYields, using: &$0) }
        for _ in 0..<yields { await Task.yield() }
        return try work()
    }
}
