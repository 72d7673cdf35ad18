import NBDProtocol
import NIOCore

// How a connection ends besides the client leaving: draining when its export goes away or the server
// stops, the handshake and idle timeouts (one task on the connection's loop at a time), and the
// reply-progress timeout for a client that stops taking its replies (a task of its own, scheduled
// only while replies wait on the client, never per request).

/// Replies waiting on the client: READ replies whose data the socket has not taken yet, and whether
/// the socket is behind (not writable); `since` is when they last moved.
struct ReplyProgress {
    var sendsAwaited = 0
    var since = NIODeadline.uptimeNanoseconds(0)
    var check: Scheduled<Void>?
}

extension NBDConnectionHandler {
    // MARK: - Draining

    /// The export went away: answer what is in flight, then `ESHUTDOWN` to everything until the client
    /// disconnects or the grace period passes. Closing as soon as idle would reset requests the client
    /// had already sent but this side had not read yet.
    func drainForRemoval(on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        guard let context, !channelClosing, machine.session != nil else {
            closeAfterWrites()
            return eventLoop.makeSucceededVoidFuture()
        }
        let promise = drainPromise ?? context.eventLoop.makePromise()
        drainPromise = promise
        let grace = TimeAmount.milliseconds(environment.limits.exportRemovalGraceMilliseconds)
        let loop = context.eventLoop
        promise.futureResult.assumeIsolated().whenSuccess {
            loop.assumeIsolated().scheduleTask(in: grace) { self.closeAfterWrites() }
        }
        run(machine.drain(closingWhenIdle: false))
        replies.flushIfNeeded()
        return promise.futureResult
    }

    /// The server is stopping: a handshake refuses to start transmission; a session answers what is
    /// in flight and `ESHUTDOWN` to anything new. The future completes once nothing is in flight.
    func drainForShutdown(on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        guard let context, !channelClosing else { return eventLoop.makeSucceededVoidFuture() }
        if machine.session == nil {
            run(machine.drain(closingWhenIdle: false))
            return context.eventLoop.makeSucceededVoidFuture()
        }
        let promise = drainPromise ?? context.eventLoop.makePromise()
        drainPromise = promise
        run(machine.drain(closingWhenIdle: false))
        replies.flushIfNeeded()
        return promise.futureResult
    }

    // MARK: - Timeouts

    /// Schedules `fire` on this loop in `milliseconds` (none if 0), replacing the current timeout.
    func scheduleTimeout(after milliseconds: Int64, _ fire: @escaping (NBDConnectionHandler) -> Void) {
        timeout?.cancel()
        timeout = nil
        guard milliseconds > 0, let context else { return }
        timeout = context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(milliseconds)) {
            self.timeout = nil
            fire(self)
        }
    }

    func noteActivity() {
        guard environment.limits.idleTimeoutMilliseconds > 0, let context else { return }
        lastActivity = context.eventLoop.now
    }

    /// Closes the connection if it has been idle for the idle timeout by the time this fires, or
    /// checks again when it would be: nothing is scheduled per request.
    func scheduleIdleCheck(after milliseconds: Int64) {
        scheduleTimeout(after: milliseconds) { handler in
            guard let context = handler.context, handler.machine.session != nil else { return }
            let limit = TimeAmount.milliseconds(handler.environment.limits.idleTimeoutMilliseconds)
            let idleSince = handler.machine.isBusy ? context.eventLoop.now : handler.lastActivity
            let remaining = idleSince + limit - context.eventLoop.now
            guard remaining <= .zero else {
                return handler.scheduleIdleCheck(after: max(1, remaining.nanoseconds / 1_000_000))
            }
            handler.logger.debug("NBD connection idle too long, disconnecting")
            handler.closeNow()
        }
    }

    // MARK: - Replies the client does not take

    private var isWaitingOnClient: Bool {
        replyProgress.sendsAwaited > 0 || !(context?.channel.isWritable ?? true)
    }

    /// A READ reply was written; its data now waits for the socket to take it.
    /// Whether the reply timeout is on; with it off, READ replies cost no bookkeeping at all.
    private var watchesReplies: Bool { environment.limits.replyProgressTimeoutMilliseconds > 0 }

    func sendAwaited() {
        guard watchesReplies else { return }
        if !isWaitingOnClient, let context { replyProgress.since = context.eventLoop.now }
        replyProgress.sendsAwaited += 1
        watchReplyProgress()
    }

    /// A READ reply's data has gone to the socket (or the connection failed first).
    func sendCompleted() {
        guard watchesReplies else { return }
        replyProgress.sendsAwaited -= 1
        if let context { replyProgress.since = context.eventLoop.now }
    }

    func repliesWritabilityChanged(isWritable: Bool) {
        guard watchesReplies, let context else { return }
        // Writable again: the socket took bytes. Not writable: waiting starts now, unless it had already.
        if isWritable || replyProgress.sendsAwaited == 0 { replyProgress.since = context.eventLoop.now }
        if !isWritable { watchReplyProgress() }
    }

    private func watchReplyProgress() {
        guard replyProgress.check == nil else { return }
        scheduleReplyProgressCheck(after: environment.limits.replyProgressTimeoutMilliseconds)
    }

    private func scheduleReplyProgressCheck(after milliseconds: Int64) {
        guard let context else { return }
        replyProgress.check = context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(milliseconds)) {
            self.replyProgress.check = nil
            self.checkReplyProgress()
        }
    }

    /// Closes the connection if its replies have waited on the client, unmoved, for the limit; else
    /// looks again when they would have (nothing is left scheduled once nothing waits).
    private func checkReplyProgress() {
        // Also during a graceful close: a client that sent DISC (or half-closed) after a big READ and
        // reads nothing would otherwise hold the close, and the READ's bytes, for ever.
        guard let context, isWaitingOnClient else { return }
        let limit = TimeAmount.milliseconds(environment.limits.replyProgressTimeoutMilliseconds)
        let remaining = replyProgress.since + limit - context.eventLoop.now
        guard remaining <= .zero else {
            return scheduleReplyProgressCheck(after: max(1, remaining.nanoseconds / 1_000_000))
        }
        logger.info(
            "NBD client took none of its replies for the reply timeout, disconnecting",
            metadata: ["nbd.replies.awaited": "\(replyProgress.sendsAwaited)"])
        if channelClosing {
            // The graceful close waits for writes that will never go; close under it.
            context.close(promise: nil)
        } else {
            closeNow()
        }
    }
}
