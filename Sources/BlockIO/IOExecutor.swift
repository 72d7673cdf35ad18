// Where blocking storage calls run. The engine's logic is async and runs wherever its caller's task
// runs; each pread/pwrite/fdatasync goes through an `IOExecutor`. In production that is `IOThreadPool`,
// a fixed set of threads that may block (a cache miss, an fdatasync) without stalling an event loop
// or Swift's cooperative pool. The simulator runs the calls inline on its single deterministic
// executor instead, so that a seed replays the same interleaving.

import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

public protocol IOExecutor: Sendable {
    /// Runs blocking `work` and returns its result.
    func run<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T
}

/// Runs the work on the calling thread. For the simulator and for embedders that are already on a
/// thread that may block.
public struct InlineIOExecutor: IOExecutor {
    public init() {}

    public func run<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try work()
    }
}

/// A fixed pool of threads that run blocking calls, first come first served.
public final class IOThreadPool: IOExecutor {
    /// The most jobs that may wait for a thread; beyond it `run` still queues (callers are bounded
    /// by their own request limits) but this is the size the queue is built for.
    public static let queueCapacityHint = 1024

    private struct Queue {
        var jobs: [(@Sendable () -> Void)?] = []
        var head = 0
        var stopping = false

        mutating func pop() -> (@Sendable () -> Void)? {
            guard head < jobs.count else { return nil }
            let job = jobs[head]
            jobs[head] = nil
            head += 1
            if head == jobs.count {
                jobs.removeAll(keepingCapacity: true)
                head = 0
            }
            return job
        }
    }

    private let queue: Mutex<Queue>
    nonisolated(unsafe) private let available: UnsafeMutablePointer<sem_t>
    private let threadCount: Int
    private let threads: Mutex<[pthread_t]>

    public init(threadCount: Int) {
        precondition(threadCount > 0, "an IOThreadPool needs at least one thread")
        var initial = Queue()
        initial.jobs.reserveCapacity(Self.queueCapacityHint)
        queue = Mutex(initial)
        available = .allocate(capacity: 1)
        sem_init(available, 0, 0)
        self.threadCount = threadCount
        threads = Mutex([])
        var started: [pthread_t] = []
        for _ in 0..<threadCount {
            let box = Unmanaged.passRetained(self)
            var thread = pthread_t()
            let result = pthread_create(
                &thread, nil,
                { context in
                    let pool = Unmanaged<IOThreadPool>.fromOpaque(context!).takeRetainedValue()
                    pool.work()
                    return nil
                }, box.toOpaque())
            precondition(result == 0, "pthread_create failed: \(result)")
            started.append(thread)
        }
        threads.withLock { $0 = started }
    }

    deinit {
        sem_destroy(available)
        available.deallocate()
    }

    /// Stops the threads once the queued work is done, and waits for them.
    public func shutdown() {
        queue.withLock { $0.stopping = true }
        for _ in 0..<threadCount { sem_post(available) }
        let joined = threads.withLock { threads -> [pthread_t] in
            defer { threads.removeAll() }
            return threads
        }
        for thread in joined { pthread_join(thread, nil) }
    }

    private func work() {
        while true {
            while sem_wait(available) != 0 {}
            let (job, stop) = queue.withLock { queue in (queue.pop(), queue.stopping) }
            if let job {
                job()
            } else if stop {
                return
            }
        }
    }

    private func submit(_ job: @escaping @Sendable () -> Void) {
        queue.withLock { $0.jobs.append(job) }
        sem_post(available)
    }

    public func run<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<T, any Error>) in
            submit {
                do {
                    continuation.resume(returning: try work())
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }
}
