import Logging
import NBDProtocol
import NIOCore
import NIOSSL
import NIOTLS

// Design note. One handler per connection: a shell around `NBDConnectionStateMachine` (which holds
// the whole protocol) that hands it bytes and carries out the actions it returns. It owns only what
// touches the channel: reading or holding reads, closing, TLS, timeouts, the budget ticket, and the
// export calls. Requests are served by `Task.immediate` tasks preferring this connection's event loop
// (see EventLoopTaskExecutor), so a completion can arrive synchronously from inside `channelRead`;
// the machine is never in the middle of a call then, because actions are carried out only after it
// returned them. Replies are written by `NBDReplyWriter`, flushed after each read burst or, for
// completions outside a read, once per loop tick. Timeouts (handshake, idle) are one task on the
// connection's loop. TLS: on STARTTLS the ACK is flushed in plain text, then a TLS handler goes first
// in the pipeline; its handshake-completed event names the client, whose access
// (`environment.accessPolicy`) then filters every export lookup: an export it may not use does not
// exist for it.

final class NBDConnectionHandler: ChannelDuplexHandler, NBDExportCatalog {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    /// What every connection of a server shares.
    struct Environment: Sendable {
        var registry: NBDExportRegistry
        var limits: NBDLimits
        var tls: NBDTLSConfiguration?
        var accessPolicy: NBDAccessPolicy?
        /// Zero bytes to send for holes where the reply cannot say "hole".
        var zeroes: ByteBuffer
        /// Payload bytes in flight over all the server's connections.
        var budget = NBDInFlightBudget(capacityBytes: NBDLimits().maximumServerInFlightBytes)
        /// Where requests are counted, if the server records metrics.
        var metrics: NBDMetrics?
    }

    let environment: Environment
    let executor: EventLoopTaskExecutor
    let buffers: NBDBufferPool
    var logger: Logger {
        didSet { replies.logger = logger }
    }
    var machine: NBDConnectionStateMachine
    let replies: NBDReplyWriter
    var export: (any NBDExport)? {
        didSet { exportMetrics = export.flatMap { export in environment.metrics?.export(export.metricsName) } }
    }
    /// The counters of `export`'s group, if the server records metrics.
    private(set) var exportMetrics: NBDExportMetrics?
    var binding: (exportName: String, id: UInt64)?
    /// This connection as the registry and server see it; set right after creation.
    var connection: NBDConnection?
    var context: ChannelHandlerContext?

    /// Re-entrancy guard: a completion inside `processInbound` must not start a second loop.
    private var isProcessingInbound = false
    /// Inside `channelRead`: `channelReadComplete` will flush.
    private var inChannelRead = false
    /// A read was held back and must be issued when reading may resume.
    private var readHeld = false
    /// The channel's close has been issued.
    var channelClosing = false
    var drainPromise: EventLoopPromise<Void>?
    /// The server's budget queued this connection's request (to cancel it if the connection closes).
    private var budgetTicket: NBDInFlightBudget.Ticket?
    /// The handshake or idle timeout, whichever applies now.
    var timeout: Scheduled<Void>?
    /// When the last request came in or the last reply went out (kept only with an idle timeout).
    var lastActivity = NIODeadline.uptimeNanoseconds(0)
    /// Whether replies are moving to a client that has them waiting (the reply-progress timeout).
    var replyProgress = ReplyProgress()
    /// Who the client proved to be: unauthenticated until a TLS handshake says otherwise.
    var clientIdentity = NBDClientIdentity.unauthenticated
    /// The TLS handler once STARTTLS was acknowledged, and whether its handshake completed.
    var tlsSession: (handler: NIOSSLServerHandler, pskRecord: NBDTLSConfiguration.PSKIdentityRecord?)?
    var tlsEstablished = false

    /// Whether read data may go out as file regions (`sendfile`).
    var sendsFileRegions: Bool {
        get { replies.sendsFileRegions }
        set { replies.sendsFileRegions = newValue }
    }

    init(
        environment: Environment,
        executor: EventLoopTaskExecutor,
        buffers: NBDBufferPool,
        allocator: ByteBufferAllocator,
        logger: Logger
    ) {
        self.environment = environment
        self.executor = executor
        self.buffers = buffers
        self.logger = logger
        self.machine = NBDConnectionStateMachine(
            limits: environment.limits, tlsMode: environment.tls?.mode ?? .disabled, allocator: allocator)
        self.replies = NBDReplyWriter(
            buffers: buffers, zeroes: environment.zeroes,
            maximumExtentsPerReply: environment.limits.maximumExtentsPerReply, logger: logger)
    }

    // MARK: - Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        replies.context = context
        if context.channel.isActive { start() }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        replies.context = nil
        connection = nil  // it holds this handler: break the cycle
    }

    func channelActive(context: ChannelHandlerContext) {
        start()
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        channelClosing = true
        timeout?.cancel()
        timeout = nil
        replyProgress.check?.cancel()
        replyProgress.check = nil
        run(machine.closed())
        cancelBudgetWait()
        if let binding {
            environment.registry.unbind(exportNamed: binding.exportName, id: binding.id)
            self.binding = nil
        }
        drainPromise?.succeed(())
        drainPromise = nil
        logger.debug("NBD connection closed")
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        machine.receive(unwrapInboundIn(data))
        inChannelRead = true
        processInbound()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        inChannelRead = false
        replies.flushIfNeeded()
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        repliesWritabilityChanged(isWritable: context.channel.isWritable)
        resumeReadsIfPossible()
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            machine.inputEnded()
            processInbound()
        } else if case TLSUserEvent.handshakeCompleted = event {
            tlsHandshakeCompleted()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if tlsSession != nil, !tlsEstablished, !channelClosing, environment.metrics != nil {
            NBDMetrics.tlsHandshake("failed")
        }
        logger.debug("NBD connection failed", metadata: ["nbd.error": "\(error)"])
        closeNow()
    }

    func read(context: ChannelHandlerContext) {
        if shouldHoldReads {
            readHeld = true
        } else {
            context.read()
        }
    }

    // MARK: - Driving the machine

    func start() {
        let actions = machine.start()
        guard !actions.isEmpty else { return }
        logger.debug("NBD connection opened")
        scheduleTimeout(after: environment.limits.handshakeTimeoutMilliseconds) { handler in
            handler.logger.debug("NBD handshake timed out, disconnecting")
            handler.closeNow()
        }
        run(actions)
        replies.flushIfNeeded()
    }

    /// Acts on every message received that can be acted on now.
    func processInbound() {
        guard !isProcessingInbound else { return }
        isProcessingInbound = true
        defer { isProcessingInbound = false }
        while let actions = machine.nextMessage(catalog: self) { run(actions) }
    }

    func run(_ actions: [NBDConnectionStateMachine.Action]) {
        for action in actions { carryOut(action) }
    }

    /// Carries out one action of the machine. `.reply` is carried out by `requestCompleted`, which
    /// has the outcome.
    private func carryOut(_ action: NBDConnectionStateMachine.Action) {
        switch action {
        case .send(let messages):
            replies.writeHandshake(messages)
        case .sendAndStartTLS(let messages):
            replies.writeHandshake(messages)
            // The client must wait for the ACK before it starts TLS: bytes already here are a violation.
            guard machine.queuedInputBytes == 0 else {
                logger.debug("NBD client sent more after STARTTLS before its ACK, disconnecting")
                return closeNow()
            }
            startTLS()
        case .sendAndStartTransmission(let messages, let session):
            replies.writeHandshake(messages)
            transmissionStarted(session)
        case .takeBudget(_, let bytes):
            takeBudget(bytes)
        case .releaseBudget(let bytes):
            environment.budget.give(back: bytes)
        case .serve(let request, let payload):
            serve(request, payload: payload)
        case .refuse(let request, let errno):
            if logger.logLevel <= .debug {
                logger.debug("NBD request refused", metadata: ["nbd.request": "\(request)", "nbd.errno": "\(errno)"])
            }
            replies.writeError(
                for: request, errno: errno, message: NBDReplyWriter.rejectionMessage(errno), offset: nil)
        case .reply, .releaseBudgetWhenSent:
            break
        case .clientDisconnecting:
            logger.debug("NBD client disconnecting")
        case .drained:
            drainPromise?.succeed(())
            drainPromise = nil
        case .closeAfterWrites:
            closeAfterWrites()
        case .close(let reason):
            logger.debug("NBD connection closing", metadata: ["nbd.reason": "\(reason)"])
            closeChannelNow()
        }
    }

    func transmissionStarted(_ session: NBDSession) {
        timeout?.cancel()
        timeout = nil
        noteActivity()
        scheduleIdleCheck(after: environment.limits.idleTimeoutMilliseconds)
        replies.structuredReplies = session.structuredReplies
        logger[metadataKey: "nbd.export"] = "\(session.export.name)"
        logger.debug("NBD transmission started", metadata: ["nbd.structured_replies": "\(session.structuredReplies)"])
    }

    /// Asks the server's budget for bytes; the machine hears when they are granted.
    private func takeBudget(_ bytes: Int) {
        guard let context else { return }
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let loop = context.eventLoop
        let ticket = environment.budget.take(bytes) { loop.execute { handler.value.budgetGranted() } }
        if let ticket {
            budgetTicket = ticket
        } else {
            budgetGranted()
        }
    }

    private func budgetGranted() {
        budgetTicket = nil
        run(machine.budgetGranted())
        processInbound()
        resumeReadsIfPossible()
    }

    private func cancelBudgetWait() {
        guard let ticket = budgetTicket else { return }
        budgetTicket = nil
        // If the grant already happened, its callback gives the bytes back through the machine.
        if environment.budget.cancel(ticket) { machine.budgetWaitCancelled() }
    }

    // MARK: - Serving

    private func serve(_ request: NBDRequest, payload: NBDWritePayload?) {
        // The export is set when transmission starts, so it stands for the session here: asking the
        // machine (another module's value) for its session on every request would copy it.
        guard let export, let context else {
            return closeNow(reason: "serving without an export")
        }
        if request.length == 0 && request.command != .flush {
            // Zero-length requests are legal and need no export call.
            let empty = NBDReadResult.data(context.channel.allocator.buffer(capacity: 0))
            requestCompleted(request, request.command == .read ? .read(empty) : .done)
            return
        }
        let contexts = request.command == .blockStatus ? machine.session?.metaContexts ?? [] : []
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let buffers = self.buffers
        let allowsFiles = replies.sendsFileRegions
        let metrics = exportMetrics
        let started = metrics == nil ? 0 : NIODeadline.now().uptimeNanoseconds
        Task.immediate(executorPreference: executor) {
            let outcome = await NBDExportCall.call(
                request, payload: payload, contexts: contexts, on: export, buffers: buffers, allowsFiles: allowsFiles)
            if let metrics {
                let failed: Bool
                if case .failed = outcome { failed = true } else { failed = false }
                metrics.record(
                    request.command, bytes: request.command == .flush ? 0 : request.length, failed: failed,
                    nanoseconds: Int64(truncatingIfNeeded: NIODeadline.now().uptimeNanoseconds &- started))
            }
            handler.value.requestCompleted(request, outcome)
        }
    }

    /// A served request has its outcome: reply, account, and resume whatever was waiting on it.
    private func requestCompleted(_ request: NBDRequest, _ outcome: NBDExportCall.Outcome) {
        let actions = machine.requestCompleted(request)
        var replied = false
        for action in actions {
            switch action {
            case .reply:
                replied = true
                replies.writeReply(to: request, outcome)
                noteActivity()
            case .releaseBudgetWhenSent(let bytes):
                holdUntilSent(bytes)
            default:
                carryOut(action)
            }
        }
        // Closed meanwhile: nobody to answer, but file segments must still be let go.
        if !replied { NBDExportCall.releaseFiles(of: outcome) }
        if !inChannelRead { replies.scheduleFlush() }
        processInbound()
        resumeReadsIfPossible()
    }

    /// The READ reply just written holds its bytes until the socket has taken it: writes complete in
    /// order, so an empty write behind it says when.
    private func holdUntilSent(_ bytes: Int) {
        guard let context else { return run(machine.replySent(bytes: bytes)) }
        let sent = context.eventLoop.makePromise(of: Void.self)
        replies.writePayload(.byteBuffer(ByteBuffer()), promise: sent)
        sendAwaited()
        sent.futureResult.assumeIsolated().whenComplete { _ in
            self.sendCompleted()
            self.run(self.machine.replySent(bytes: bytes))
            guard !self.channelClosing else { return }
            self.noteActivity()
            self.processInbound()
            self.resumeReadsIfPossible()
        }
    }

    // MARK: - Backpressure and closing

    private var shouldHoldReads: Bool {
        guard let context, !channelClosing else { return true }
        return !context.channel.isWritable || machine.shouldHoldReads
    }

    func resumeReadsIfPossible() {
        guard readHeld, !shouldHoldReads, let context else { return }
        readHeld = false
        context.read()
    }

    /// Closes once everything written so far has been sent.
    func closeAfterWrites() {
        // Mid TLS handshake NIOSSL holds writes back until it completes, which it may never do.
        if tlsSession != nil && !tlsEstablished { return closeChannelNow() }
        guard !channelClosing, let context else { return }
        channelClosing = true
        run(machine.closed())
        cancelBudgetWait()
        let promise = context.eventLoop.makePromise(of: Void.self)
        replies.writeEverything(promise: promise)
        promise.futureResult.assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    /// Hard disconnect (a timeout, an error): the machine stops, and the channel closes now.
    func closeNow(reason: String? = nil) {
        if let reason {
            assertionFailure(reason)
            logger.error("NBD connection invariant broken, disconnecting: \(reason)")
        }
        run(machine.closed())
        closeChannelNow()
    }

    /// Sends what is already written (replies to earlier requests), drops the rest.
    func closeChannelNow() {
        cancelBudgetWait()
        guard let context, !channelClosing else { return }
        channelClosing = true
        replies.flushIfNeeded()
        context.close(promise: nil)
    }
}
