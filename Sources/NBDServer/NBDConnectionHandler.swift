import Logging
import NBDProtocol
import NIOCore
import NIOSSL
import NIOTLS

// Design note. One handler per connection drives the decoder and the two state machines of
// NBDProtocol and does nothing else protocol-wise. Requests are served by `Task.immediate` tasks
// preferring this connection's event loop (see EventLoopTaskExecutor), so completions arrive on
// the loop, possibly synchronously from inside `channelRead`; every path that can be re-entered
// that way reads `self`'s state afresh and never holds a copy across a call that can complete a
// request. Replies are encoded in NBDConnectionHandler+Replies.swift. Flushes happen at
// `channelReadComplete` or, for completions outside a read, once per loop tick.
// Backpressure: reads are held while the in-flight bounds are reached or the channel is not
// writable, and resumed as soon as neither holds. READ and WRITE payload bytes are counted from the
// request until the reply has gone to the socket (or the data is written), against this
// connection's bound and the server-wide budget; a request the budget cannot take yet waits, with
// reads held, until other connections give bytes back. Timeouts (handshake, idle) are one task
// scheduled on the connection's event loop.
// TLS: on STARTTLS the ACK is flushed in plain text, then a TLS handler goes first in the pipeline;
// its handshake-completed event names the client, whose access (`environment.accessPolicy`) then
// filters every export lookup: an export it may not use does not exist for it.

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
    }

    enum Outcome: Sendable {
        case done
        case read(NBDReadResult)
        case blockStatus([(NBDMetaContext, [NBDExtent])])
        case failed(any Error)
    }

    /// WRITE payloads at least this big are kept in the receive buffers instead of copied.
    static let inPlacePayloadBytes = 64 * 1024

    let environment: Environment
    private let executor: EventLoopTaskExecutor
    let buffers: NBDBufferPool
    let allocator: ByteBufferAllocator
    var logger: Logger
    private var decoder: NBDServerDecoder
    private var handshake: NBDHandshakeStateMachine?
    var transmission: NBDTransmissionStateMachine?
    private(set) var export: (any NBDExport)?
    private var binding: (exportName: String, id: UInt64)?
    /// This connection as the registry and server see it; set right after creation.
    var connection: NBDConnection?

    var context: ChannelHandlerContext?
    /// A served WRITE whose payload is still being read.
    private var pendingWrite: NBDRequest?
    /// A refused WRITE whose payload is still being read past; answered once it has been, since
    /// clients (libnbd) do not expect a reply to a request they are still sending.
    private var pendingRefusal: (request: NBDRequest, errno: NBDErrno)?
    private var started = false
    private var isProcessingInbound = false
    private var inChannelRead = false
    private var inputClosed = false
    private var readHeld = false
    private var isClosing = false
    var outbound: ByteBuffer?
    var needsFlush = false
    var flushScheduled = false
    private var closeWhenDrained = false
    /// Whether this session negotiated structured replies (cached off the hot path's way).
    var structuredReplies = false
    /// Whether read data may go out as file regions (`sendfile`): not once TLS wraps the
    /// connection, nor over a pipe.
    var sendsFileRegions = true
    private var drainPromise: EventLoopPromise<Void>?
    /// A request accepted by the transmission machine, waiting for bytes from the server's budget.
    private var budgetWait: (request: NBDRequest, ticket: NBDInFlightBudget.Ticket)?
    /// Payload bytes this connection holds from the server's budget.
    private var budgetHeldBytes = 0
    /// The handshake or idle timeout, whichever applies now.
    private var timeout: Scheduled<Void>?
    /// When the last request came in or the last reply went out (kept only with an idle timeout).
    private var lastActivity = NIODeadline.uptimeNanoseconds(0)
    /// Who the client proved to be: unauthenticated until a TLS handshake says otherwise.
    private(set) var clientIdentity = NBDClientIdentity.unauthenticated
    /// The TLS handler once STARTTLS was acknowledged.
    private var tlsSession: (handler: NIOSSLServerHandler, pskRecord: NBDTLSConfiguration.PSKIdentityRecord?)?

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
        self.allocator = allocator
        self.logger = logger
        self.decoder = NBDServerDecoder(limits: environment.limits, allocator: allocator)
        self.handshake = NBDHandshakeStateMachine(
            configuration: .init(limits: environment.limits, tlsMode: environment.tls?.mode ?? .disabled)
        )
    }

    // MARK: - Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { start() }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        connection = nil  // it holds this handler: break the cycle
    }

    func channelActive(context: ChannelHandlerContext) {
        start()
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        isClosing = true
        timeout?.cancel()
        timeout = nil
        if let wait = budgetWait, environment.budget.cancel(wait.ticket) { budgetWait = nil }
        if let request = pendingWrite {
            // Its payload will never come.
            pendingWrite = nil
            giveBack(NBDTransmissionStateMachine.payloadBytes(of: request))
        }
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
        decoder.receive(unwrapInboundIn(data))
        inChannelRead = true
        processInbound()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        inChannelRead = false
        flushIfNeeded()
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        resumeReadsIfPossible()
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            inputClosed = true
            processInbound()
        } else if case TLSUserEvent.handshakeCompleted = event {
            tlsHandshakeCompleted()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
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

    // MARK: - Inbound

    private func start() {
        guard !started, handshake != nil, !isClosing else { return }
        started = true
        logger.debug("NBD connection opened")
        scheduleTimeout(after: environment.limits.handshakeTimeoutMilliseconds) { handler in
            handler.logger.debug("NBD handshake timed out, disconnecting")
            handler.closeNow()
        }
        apply(self.handshake!.start())
        flushIfNeeded()
    }

    private func processInbound() {
        guard !isProcessingInbound else { return }
        isProcessingInbound = true
        defer { isProcessingInbound = false }
        while !isClosing {
            if budgetWait != nil { return }
            if !isWaitingForPayload, let transmission, !transmission.canAcceptRequest || isOverConnectionBudget {
                return
            }
            let message: NBDServerDecoder.Message?
            do {
                message = try decoder.next()
            } catch {
                logger.debug("NBD protocol violation, disconnecting", metadata: ["nbd.error": "\(error)"])
                closeNow()
                return
            }
            guard let message else {
                if inputClosed { clientStoppedSending() }
                return
            }
            handle(message)
        }
    }

    private func handle(_ message: NBDServerDecoder.Message) {
        switch message {
        case .clientFlags(let flags):
            guard handshake != nil else { return invariantBroken("client flags outside the handshake") }
            apply(handshake!.receivedClientFlags(flags))
        case .option(let option, let payload):
            guard handshake != nil else { return invariantBroken("option outside the handshake") }
            logger.trace("NBD option", metadata: ["nbd.option": "\(option)"])
            apply(handshake!.receivedOption(option, payload: payload, catalog: self))
        case .oversizedOption(let option, let length):
            guard handshake != nil else { return invariantBroken("option outside the handshake") }
            apply(handshake!.receivedOversizedOption(option, length: length))
        case .request(let request):
            handleRequest(request)
        case .writePayload(let payload):
            guard let request = pendingWrite else { return invariantBroken("WRITE payload without a request") }
            pendingWrite = nil
            serve(request, payload: payload)
        case .discardedWritePayload:
            guard let refusal = pendingRefusal else { return invariantBroken("discarded payload without a refusal") }
            pendingRefusal = nil
            refuse(refusal.request, refusal.errno)
        }
    }

    private func apply(_ action: NBDHandshakeStateMachine.Action) {
        switch action {
        case .none:
            break
        case .send(let messages):
            writeHandshake(messages)
        case .sendAndClose(let messages):
            writeHandshake(messages)
            closeAfterWrites()
        case .sendAndStartTransmission(let messages, let session):
            writeHandshake(messages)
            decoder.startTransmission()
            handshake = nil
            transmission = NBDTransmissionStateMachine(session: session, limits: environment.limits)
            timeout?.cancel()
            timeout = nil
            noteActivity()
            scheduleIdleCheck(after: environment.limits.idleTimeoutMilliseconds)
            structuredReplies = session.structuredReplies
            logger[metadataKey: "nbd.export"] = "\(session.export.name)"
            logger.debug(
                "NBD transmission started",
                metadata: ["nbd.structured_replies": "\(session.structuredReplies)"]
            )
        case .sendAndStartTLS(let messages):
            writeHandshake(messages)
            startTLS()
        }
    }

    // MARK: - TLS

    /// STARTTLS was acknowledged: flush the ACK in plain text, then put TLS in front of this handler.
    private func startTLS() {
        guard let context, let tls = environment.tls else { return invariantBroken("STARTTLS without TLS") }
        // The client must wait for the ACK before it starts TLS: bytes already here are a violation.
        guard decoder.queuedBytes == 0 else {
            logger.debug("NBD client sent more after STARTTLS before its ACK, disconnecting")
            return closeNow()
        }
        flushIfNeeded()
        do {
            let session = try tls.makeServerHandler()
            try context.pipeline.syncOperations.addHandler(session.handler, position: .first)
            tlsSession = session
            // NIOSSL encrypts bytes only: exports are asked for data instead of file ranges.
            sendsFileRegions = false
            // TLS ends with close_notify, not a TCP half-close; a client that just closes its side
            // (libnbd after NBD_CMD_DISC) must close the connection, or NIOSSL, waiting for the
            // client's close_notify, would hold it open until its shutdown timeout.
            try context.channel.syncOptions?.setOption(.allowRemoteHalfClosure, value: false)
        } catch {
            logger.error("NBD connection cannot start TLS, disconnecting", metadata: ["nbd.error": "\(error)"])
            closeNow()
        }
    }

    private func tlsHandshakeCompleted() {
        guard let tlsSession, let tls = environment.tls, handshake != nil else {
            return invariantBroken("TLS handshake completed outside STARTTLS")
        }
        clientIdentity = tls.identity(of: tlsSession.handler, record: tlsSession.pskRecord)
        logger[metadataKey: "nbd.client"] = "\(clientIdentity)"
        logger.debug("NBD connection upgraded to TLS")
        apply(handshake!.tlsEstablished())
        processInbound()
    }

    private func handleRequest(_ request: NBDRequest) {
        guard transmission != nil, let context else { return invariantBroken("request outside transmission") }
        noteActivity()
        switch transmission!.receivedRequest(request) {
        case .serve(let request):
            let bytes = NBDTransmissionStateMachine.payloadBytes(of: request)
            if bytes > 0 {
                let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
                let loop = context.eventLoop
                let ticket = environment.budget.take(bytes) { loop.execute { handler.value.budgetGranted() } }
                if let ticket {
                    budgetWait = (request, ticket)
                    return
                }
                budgetHeldBytes += bytes
            }
            accept(request)
        case .reject(let request, let errno):
            if request.command == .write {
                decoder.discardWritePayload()
                pendingRefusal = (request, errno)
            } else {
                refuse(request, errno)
            }
        case .disconnect(let closeNow):
            logger.debug("NBD client disconnecting")
            if closeNow { closeAfterWrites() }
        case .close(let reason):
            logger.debug("NBD client sent an unreadable request, disconnecting", metadata: ["nbd.reason": "\(reason)"])
            closeNow()
        }
    }

    /// Serves a request that has its bytes, or starts reading its WRITE payload.
    private func accept(_ request: NBDRequest) {
        guard request.command == .write else { return serve(request, payload: nil) }
        // Big payloads stay in the receive buffers they arrived in (no copy); small ones are
        // copied out so a slow write does not keep a whole receive buffer alive.
        let length = Int(request.length)
        decoder.keepWritePayload(
            length >= Self.inPlacePayloadBytes ? .inPlace : .copy(into: allocator.buffer(capacity: length))
        )
        pendingWrite = request
    }

    /// The server's budget took the bytes of the request waiting for them.
    private func budgetGranted() {
        guard let wait = budgetWait else { return invariantBroken("budget granted to nobody") }
        budgetWait = nil
        let bytes = NBDTransmissionStateMachine.payloadBytes(of: wait.request)
        guard !isClosing else { return environment.budget.give(back: bytes) }
        budgetHeldBytes += bytes
        accept(wait.request)
        processInbound()
        resumeReadsIfPossible()
    }

    private func refuse(_ request: NBDRequest, _ errno: NBDErrno) {
        if logger.logLevel <= .debug {
            logger.debug("NBD request refused", metadata: ["nbd.request": "\(request)", "nbd.errno": "\(errno)"])
        }
        writeError(for: request, errno: errno, message: Self.rejectionMessage(errno), offset: nil)
    }

    /// The client half-closed its side: nothing more will come, so behave as after `NBD_CMD_DISC`.
    private func clientStoppedSending() {
        guard transmission != nil, pendingWrite == nil, pendingRefusal == nil else { return closeNow() }
        handleRequest(NBDRequest(command: .disconnect, handle: 0, offset: 0, length: 0))
    }

    // MARK: - Serving

    private func serve(_ request: NBDRequest, payload: NBDWritePayload?) {
        guard let export, let context, transmission != nil else { return invariantBroken("serving without an export") }
        if request.length == 0 && request.command != .flush {
            // Zero-length requests are legal and need no export call.
            finish(request, request.command == .read ? .read(.data(allocator.buffer(capacity: 0))) : .done)
            return
        }
        let contexts = request.command == .blockStatus ? transmission!.session.metaContexts : []
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let buffers = self.buffers
        let allowsFiles = sendsFileRegions
        Self.launch(on: executor) {
            let outcome = await Self.perform(
                request, payload: payload, contexts: contexts, on: export, buffers: buffers, allowsFiles: allowsFiles)
            handler.value.finish(request, outcome)
        }
    }

    private static func launch(on executor: EventLoopTaskExecutor, _ operation: @Sendable @escaping () async -> Void) {
        Task.immediate(executorPreference: executor, operation: operation)
    }

    private static func perform(
        _ request: NBDRequest,
        payload: NBDWritePayload?,
        contexts: [NBDMetaContext],
        on export: any NBDExport,
        buffers: NBDBufferPool,
        allowsFiles: Bool
    ) async -> Outcome {
        let fua = request.flags.contains(.fua)
        do {
            switch request.command {
            case .read:
                let result = try await export.read(
                    offset: request.offset, length: request.length, buffers: buffers, allowsFileSegments: allowsFiles)
                return .read(allowsFiles ? result : try result.copyingFileSegments(buffers: buffers))
            case .write:
                try await export.write(offset: request.offset, data: payload ?? NBDWritePayload(ByteBuffer()), fua: fua)
            case .flush:
                try await export.flush()
            case .trim:
                try await export.trim(offset: request.offset, length: request.length, fua: fua)
            case .cache:
                try await export.cache(offset: request.offset, length: request.length)
            case .writeZeroes:
                try await export.writeZeroes(
                    offset: request.offset,
                    length: request.length,
                    mayTrim: !request.flags.contains(.noHole),
                    fast: request.flags.contains(.fastZero),
                    fua: fua
                )
            case .blockStatus:
                var chunks: [(NBDMetaContext, [NBDExtent])] = []
                chunks.reserveCapacity(contexts.count)
                for context in contexts {
                    let extents = try await export.blockStatus(
                        context: context.name,
                        offset: request.offset,
                        length: request.length
                    )
                    chunks.append((context, extents))
                }
                return .blockStatus(chunks)
            default:
                return .failed(NBDError(.einval, "\(request.command) is not served"))
            }
            return .done
        } catch {
            return .failed(error)
        }
    }

    /// A served request has its outcome: reply, account, and resume whatever was waiting on it.
    private func finish(_ request: NBDRequest, _ outcome: Outcome) {
        let bytes = NBDTransmissionStateMachine.payloadBytes(of: request)
        guard let context, transmission != nil, !isClosing else {
            // Closed meanwhile: nobody to answer, but file segments must still be let go.
            if case .read(let result) = outcome { Self.releaseFiles(of: result) }
            giveBack(bytes)
            return
        }
        writeReply(to: request, outcome)
        noteActivity()
        if bytes > 0, request.command == .read {
            // The reply's data is held until the socket has taken it: writes complete in order,
            // so an empty write behind it says when.
            let sent = context.eventLoop.makePromise(of: Void.self)
            writePayload(.byteBuffer(ByteBuffer()), promise: sent)
            sent.futureResult.assumeIsolated().whenComplete { _ in self.gaveBackAfterSending(bytes) }
        } else {
            giveBack(bytes)
        }
        apply(transmission!.requestCompleted(request))
        if inChannelRead {
            // channelReadComplete flushes.
        } else {
            scheduleFlush()
        }
        processInbound()
        resumeReadsIfPossible()
    }

    private func giveBack(_ bytes: Int) {
        guard bytes > 0 else { return }
        assert(budgetHeldBytes >= bytes, "more bytes given back than held")
        budgetHeldBytes -= bytes
        environment.budget.give(back: bytes)
    }

    /// A READ reply has gone to the socket (or the connection failed): its bytes are free, which
    /// may let this connection read on.
    private func gaveBackAfterSending(_ bytes: Int) {
        giveBack(bytes)
        guard !isClosing else { return }
        noteActivity()
        processInbound()
        resumeReadsIfPossible()
    }

    private func apply(_ action: NBDTransmissionStateMachine.CompletionAction) {
        switch action {
        case .none:
            break
        case .drained:
            drainPromise?.succeed(())
            drainPromise = nil
            if closeWhenDrained { closeAfterWrites() }
        case .close:
            closeAfterWrites()
        }
    }

    private static func releaseFiles(of result: NBDReadResult) {
        switch result {
        case .file(let file): file.release?()
        case .segments(let segments): for case .file(let file) in segments { file.release?() }
        case .data, .zeroes: break
        }
    }

    // MARK: - Draining

    /// Refuses new requests with `ESHUTDOWN`; once nothing is in flight, closes (`closeWhenIdle`)
    /// or completes `drainPromise`.
    func drain(closeWhenIdle: Bool) {
        closeWhenDrained = closeWhenDrained || closeWhenIdle
        guard transmission != nil, !isClosing else {
            if closeWhenIdle { closeAfterWrites() }
            return
        }
        apply(transmission!.beginDraining())
        flushIfNeeded()
    }

    /// The export went away: answer what is in flight, then `ESHUTDOWN` to everything until the client
    /// disconnects or the grace period passes. Closing as soon as idle would reset requests the client
    /// had already sent but this side had not read yet.
    func drainForRemoval(on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        guard let context, !isClosing, transmission != nil else {
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
        drain(closeWhenIdle: false)
        return promise.futureResult
    }

    func drainForShutdown(on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        guard let context, !isClosing else { return eventLoop.makeSucceededVoidFuture() }
        if handshake != nil {
            handshake!.beginShutdown()
            return context.eventLoop.makeSucceededVoidFuture()
        }
        let promise = drainPromise ?? context.eventLoop.makePromise()
        drainPromise = promise
        drain(closeWhenIdle: false)
        return promise.futureResult
    }

    // MARK: - NBDExportCatalog

    func listExports() -> [NBDExportListing] {
        environment.registry.exports.filter { access(to: $0.name) != .none }.map {
            NBDExportListing(name: $0.name, description: $0.description)
        }
    }

    func lookUpExport(named name: String, forTransmission: Bool) -> NBDExportDescription? {
        // The default export ("") is resolved first, so the rules judge the export it stands for.
        guard let resolved = environment.registry.export(named: name) else { return nil }
        let access = access(to: resolved.name)
        guard access != .none else { return nil }
        guard forTransmission else { return describe(resolved, access: access) }
        guard let connection, let (export, id) = environment.registry.bind(resolved.name, connection) else {
            return nil
        }
        self.export = export
        self.binding = (export.name, id)
        return describe(export, access: access)
    }

    private func access(to exportName: String) -> NBDExportAccess {
        environment.accessPolicy?(clientIdentity, exportName) ?? .readWrite
    }

    private func describe(_ export: any NBDExport, access: NBDExportAccess) -> NBDExportDescription {
        NBDExportDescription(
            name: export.name,
            description: export.description,
            size: export.size,
            isReadOnly: export.isReadOnly || access < .readWrite,
            blockSize: export.blockSize.capped(atMaximum: environment.limits.maximumRequestBytes),
            metaContexts: export.metaContexts,
            supportsFastZero: export.supportsFastZero
        )
    }

    // MARK: - Backpressure and closing

    private var shouldHoldReads: Bool {
        guard let context, !isClosing else { return true }
        if !context.channel.isWritable || budgetWait != nil { return true }
        // The payload of a request already taken must still come in, or it could never complete.
        if isWaitingForPayload { return false }
        if let transmission, !transmission.canAcceptRequest || isOverConnectionBudget { return true }
        return false
    }

    /// A WRITE's payload (kept or read past) is being read.
    private var isWaitingForPayload: Bool { pendingWrite != nil || pendingRefusal != nil }

    private var isOverConnectionBudget: Bool { budgetHeldBytes >= environment.limits.maximumInFlightBytes }

    private func resumeReadsIfPossible() {
        guard readHeld, !shouldHoldReads, let context else { return }
        readHeld = false
        context.read()
    }

    /// Closes once everything written so far has been sent.
    private func closeAfterWrites() {
        // Mid TLS handshake NIOSSL holds writes back until it completes, which it may never do.
        if tlsSession != nil, handshake?.isTLSEstablished == false { return closeNow() }
        guard !isClosing, let context else { return }
        isClosing = true
        let promise = context.eventLoop.makePromise(of: Void.self)
        if let pending = outbound {
            outbound = nil
            context.write(wrapOutboundOut(.byteBuffer(pending)), promise: nil)
        }
        context.writeAndFlush(wrapOutboundOut(.byteBuffer(ByteBuffer())), promise: promise)
        needsFlush = false
        promise.futureResult.assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    /// Hard disconnect: sends what is already written (replies to earlier requests), drops the rest.
    private func closeNow() {
        guard let context, !isClosing else { return }
        isClosing = true
        flushIfNeeded()
        context.close(promise: nil)
    }

    // MARK: - Timeouts

    /// Schedules `fire` on this loop in `milliseconds` (none if 0), replacing the current timeout.
    private func scheduleTimeout(after milliseconds: Int64, _ fire: @escaping (NBDConnectionHandler) -> Void) {
        timeout?.cancel()
        timeout = nil
        guard milliseconds > 0, let context else { return }
        timeout = context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(milliseconds)) {
            self.timeout = nil
            fire(self)
        }
    }

    private func noteActivity() {
        guard environment.limits.idleTimeoutMilliseconds > 0, let context else { return }
        lastActivity = context.eventLoop.now
    }

    /// Closes the connection if it has been idle for the idle timeout by the time this fires, or
    /// checks again when it would be: nothing is scheduled per request.
    private func scheduleIdleCheck(after milliseconds: Int64) {
        scheduleTimeout(after: milliseconds) { handler in
            guard let context = handler.context, let transmission = handler.transmission else { return }
            let limit = TimeAmount.milliseconds(handler.environment.limits.idleTimeoutMilliseconds)
            let busy =
                transmission.inFlightRequests > 0 || handler.isWaitingForPayload || handler.budgetWait != nil
                || handler.budgetHeldBytes > 0
            let idleSince = busy ? context.eventLoop.now : handler.lastActivity
            let remaining = idleSince + limit - context.eventLoop.now
            guard remaining <= .zero else {
                return handler.scheduleIdleCheck(after: max(1, remaining.nanoseconds / 1_000_000))
            }
            handler.logger.debug("NBD connection idle too long, disconnecting")
            handler.closeNow()
        }
    }

    private func invariantBroken(_ what: String) {
        assertionFailure(what)
        logger.error("NBD connection invariant broken, disconnecting: \(what)")
        closeNow()
    }
}
