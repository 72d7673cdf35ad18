import NIOCore

// Design note. Requests are served by Swift tasks started with `Task.immediate` and this executor
// as their preference: the task begins synchronously inside `channelRead` (no enqueue, no thread
// hop), and whenever it resumes after a suspension it resumes on the connection's own event loop,
// where the reply is written. An export that completes without suspending therefore costs no hop
// at all; one that hands I/O to other threads costs exactly one hop back. (Measured against one
// plain `Task` per request, which starts on the global pool and hops back to the loop: see the
// server's benchmark notes.)

/// Runs jobs of tasks that prefer it on one event loop.
final class EventLoopTaskExecutor: TaskExecutor {
    let eventLoop: any EventLoop

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        eventLoop.execute {
            job.runSynchronously(on: self.asUnownedTaskExecutor())
        }
    }
}
