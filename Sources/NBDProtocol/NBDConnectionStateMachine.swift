import NIOCore

// Design note. One connection's whole protocol as a value: the decoder, the handshake machine, the
// transmission machine, the WRITE payload being read (kept or read past), the wait for the server's
// in-flight byte budget, and closing, in one `State`. The channel handler is a shell: it hands bytes
// in, pulls one message's worth of actions at a time (`nextMessage`), and carries them out; the fuzz
// driver does the same, so the fuzzer tests this machine, not a copy of it. Payload bytes are counted
// once, here (`heldBytes`): from the budget's grant until the WRITE is written or the READ reply has
// gone to the socket. They bound the connection (`maximumInFlightBytes`) and are what the server's
// budget gets back. Actions are returned, never performed, so a completion that re-enters the
// handler while it carries out an action finds this machine between calls.

/// The server side of one NBD connection.
public struct NBDConnectionStateMachine {
    public enum Action {
        /// Send these handshake messages.
        case send([NBDHandshakeMessage])
        /// Send these, then the TLS handshake starts; report `tlsEstablished()` when it completes.
        case sendAndStartTLS([NBDHandshakeMessage])
        /// Send these; transmission of this session has begun. (Boxed: a session is big, and every
        /// action of every request would be as big as it.)
        indirect case sendAndStartTransmission([NBDHandshakeMessage], NBDSession)
        /// Take `bytes` from the server's budget for `request`; call `budgetGranted()` once they are.
        case takeBudget(NBDRequest, bytes: Int)
        /// Give `bytes` back to the server's budget.
        case releaseBudget(Int)
        /// Serve the request (with its WRITE payload) and report `requestCompleted` when done.
        case serve(NBDRequest, payload: NBDWritePayload?)
        /// Answer with this error without serving.
        case refuse(NBDRequest, NBDErrno)
        /// Write the reply to this served request now.
        case reply(NBDRequest)
        /// The READ reply just written holds `bytes` until it has gone to the socket: report
        /// `replySent(bytes:)` then.
        case releaseBudgetWhenSent(Int)
        /// The client sent NBD_CMD_DISC: nothing more is read.
        case clientDisconnecting
        /// Draining (`drain`) and nothing is in flight any more.
        case drained
        /// Close once what was written has been sent.
        case closeAfterWrites
        /// Close now (a protocol violation or a broken invariant).
        case close(reason: String)
    }

    private enum PendingInput {
        case none
        /// A served WRITE whose payload is being read.
        case writePayload(NBDRequest)
        /// A refused WRITE whose payload is being read past; answered once it has been, since
        /// clients (libnbd) do not expect a reply to a request they are still sending.
        case refusedPayload(NBDRequest, NBDErrno)
        /// A request waiting for bytes from the server's budget.
        case budget(NBDRequest)
    }

    private struct Transmission {
        var machine: NBDTransmissionStateMachine
        var pending = PendingInput.none
        var closeWhenDrained = false
    }

    private enum State {
        case idle
        // Boxed: the handshake machine is big, and every transition of every request moves the state.
        indirect case handshake(NBDHandshakeStateMachine)
        case transmission(Transmission)
        /// Closing or closed: nothing more is read; requests still in flight give their bytes back.
        case closed(pendingBudget: NBDRequest?)
    }

    /// WRITE payloads at least this big are kept in the receive buffers instead of copied.
    public static let inPlacePayloadBytes = 64 * 1024

    public let limits: NBDLimits
    private let allocator: ByteBufferAllocator
    private var decoder: NBDServerDecoder
    private var state: State
    private var pendingHandshake: NBDHandshakeStateMachine?
    private var inputClosed = false
    /// Payload bytes this connection holds from the server's budget.
    public private(set) var heldBytes = 0

    public init(limits: NBDLimits, tlsMode: NBDTLSMode, allocator: ByteBufferAllocator) {
        self.limits = limits
        self.allocator = allocator
        self.decoder = NBDServerDecoder(limits: limits, allocator: allocator)
        self.state = .idle
        self.pendingHandshake = NBDHandshakeStateMachine(configuration: .init(limits: limits, tlsMode: tlsMode))
    }

    // MARK: - What the shell asks

    /// The session once transmission has begun.
    public var session: NBDSession? {
        if case .transmission(let transmission) = state { return transmission.machine.session }
        return nil
    }

    public var isInHandshake: Bool {
        if case .handshake = state { return true }
        return false
    }

    /// Bytes received and not yet acted on (after STARTTLS's ACK there must be none: the client
    /// waits for the ACK before it starts TLS).
    public var queuedInputBytes: Int { decoder.queuedBytes }

    public var isClosed: Bool {
        if case .closed = state { return true }
        return false
    }

    /// Whether the TLS handshake of a STARTTLS completed (false before and without one).
    public var isTLSEstablished: Bool {
        if case .handshake(let handshake) = state { return handshake.isTLSEstablished }
        return true
    }

    /// Requests served and not yet completed.
    public var inFlightRequests: Int {
        if case .transmission(let transmission) = state { return transmission.machine.inFlightRequests }
        return 0
    }

    /// Whether anything is going on that an idle timeout must wait for.
    public var isBusy: Bool {
        guard case .transmission(let transmission) = state else { return false }
        if case .none = transmission.pending {
            return transmission.machine.inFlightRequests > 0 || heldBytes > 0
        }
        return true
    }

    public var isDraining: Bool {
        if case .transmission(let transmission) = state { return transmission.machine.isDraining }
        return false
    }

    /// Whether the shell should stop reading from the socket now. The payload of a request already
    /// taken must still come in, or it could never complete.
    public var shouldHoldReads: Bool {
        switch state {
        case .idle, .handshake: return false
        case .closed: return true
        case .transmission(let transmission):
            switch transmission.pending {
            case .writePayload, .refusedPayload: return false
            case .budget: return true
            case .none: return !canTakeRequest(transmission)
            }
        }
    }

    /// The largest request this session accepts (the export's limit and the server's).
    public var maximumRequestBytes: UInt32? {
        if case .transmission(let transmission) = state { return transmission.machine.maximumRequestBytes }
        return nil
    }

    private func canTakeRequest(_ transmission: Transmission) -> Bool {
        transmission.machine.canAcceptRequest && heldBytes < limits.maximumInFlightBytes
    }

    // MARK: - Inputs

    /// The connection is up: the handshake begins.
    public mutating func start() -> [Action] {
        guard case .idle = state, var handshake = pendingHandshake else { return [] }
        pendingHandshake = nil
        let action = handshake.start()
        state = .handshake(handshake)
        return handshakeActions(action)
    }

    /// Bytes arrived.
    public mutating func receive(_ bytes: ByteBuffer) {
        decoder.receive(bytes)
    }

    /// The client half-closed its side: nothing more will come.
    public mutating func inputEnded() {
        inputClosed = true
    }

    /// The actions for the next message received, or nil when there is none to act on now (it is
    /// incomplete, the in-flight bounds are reached, the budget is awaited, or the connection closes).
    public mutating func nextMessage(catalog: some NBDExportCatalog) -> [Action]? {
        switch state {
        case .idle, .closed:
            return nil
        case .transmission(let transmission):
            if case .budget = transmission.pending { return nil }
            if case .none = transmission.pending, !canTakeRequest(transmission) { return nil }
        case .handshake:
            break
        }
        let message: NBDServerDecoder.Message?
        do {
            message = try decoder.next()
        } catch {
            return close("protocol violation: \(error)")
        }
        guard let message else {
            return inputClosed ? clientStoppedSending() : nil
        }
        return actions(for: message, catalog: catalog)
    }

    /// The server's budget gave the bytes of the request waiting for them.
    public mutating func budgetGranted() -> [Action] {
        switch state {
        case .transmission(var transmission):
            guard case .budget(let request) = transmission.pending else {
                return invariantBroken("budget granted to nobody")
            }
            transmission.pending = .none
            heldBytes += NBDTransmissionStateMachine.payloadBytes(of: request)
            state = .transmission(transmission)
            return serveOrReadPayload(of: request)
        case .closed(let pending?):
            state = .closed(pendingBudget: nil)
            return [.releaseBudget(NBDTransmissionStateMachine.payloadBytes(of: pending))]
        case .idle, .handshake, .closed:
            return invariantBroken("budget granted outside transmission")
        }
    }

    /// STARTTLS's handshake completed.
    public mutating func tlsEstablished() -> [Action] {
        guard case .handshake(var handshake) = state else {
            return invariantBroken("TLS established outside the handshake")
        }
        let action = handshake.tlsEstablished()
        state = .handshake(handshake)
        return handshakeActions(action)
    }

    /// A served request is done: reply (unless the connection is closing), account its bytes, and
    /// say what follows.
    public mutating func requestCompleted(_ request: NBDRequest) -> [Action] {
        let bytes = NBDTransmissionStateMachine.payloadBytes(of: request)
        guard case .transmission(var transmission) = state else {
            // Closed meanwhile: nobody to answer, but the bytes go back.
            return release(bytes)
        }
        let completion = transmission.machine.requestCompleted(request)
        state = .transmission(transmission)
        var actions: [Action] = [.reply(request)]
        if bytes > 0 && request.command == .read {
            actions.append(.releaseBudgetWhenSent(bytes))
        } else if bytes > 0 {
            actions += release(bytes)
        }
        if case .none = completion { return actions }
        return actions + completionActions(completion, transmission)
    }

    /// A READ reply has gone to the socket (or the connection failed first).
    public mutating func replySent(bytes: Int) -> [Action] {
        release(bytes)
    }

    /// The export went away or the server is stopping: new requests get ESHUTDOWN; with
    /// `closingWhenIdle`, the connection closes once nothing is in flight. A handshake still under
    /// way refuses to start transmission.
    public mutating func drain(closingWhenIdle: Bool) -> [Action] {
        switch state {
        case .idle:
            return closingWhenIdle ? closeAfterWrites() : []
        case .handshake(var handshake):
            if closingWhenIdle { return closeAfterWrites() }
            handshake.beginShutdown()
            state = .handshake(handshake)
            return []
        case .transmission(var transmission):
            transmission.closeWhenDrained = transmission.closeWhenDrained || closingWhenIdle
            let completion = transmission.machine.beginDraining()
            state = .transmission(transmission)
            return completionActions(completion, transmission)
        case .closed:
            return []
        }
    }

    /// The shell closes the connection (a timeout, an error, the channel went away). Returns the
    /// budget bytes to give back now; a budget wait still queued must be cancelled by the shell, and
    /// if it was granted already `budgetGranted()` gives its bytes back.
    public mutating func closed() -> [Action] {
        guard case .transmission(let transmission) = state else {
            if case .closed = state { return [] }
            state = .closed(pendingBudget: nil)
            return []
        }
        switch transmission.pending {
        case .budget(let request):
            state = .closed(pendingBudget: request)
            return []
        case .writePayload(let request):
            // Its payload will never come.
            state = .closed(pendingBudget: nil)
            return release(NBDTransmissionStateMachine.payloadBytes(of: request))
        case .none, .refusedPayload:
            state = .closed(pendingBudget: nil)
            return []
        }
    }

    /// The budget wait was cancelled before it was granted: nothing is owed for it.
    public mutating func budgetWaitCancelled() {
        if case .closed(.some) = state { state = .closed(pendingBudget: nil) }
    }

    // MARK: - Messages

    private mutating func actions(for message: NBDServerDecoder.Message, catalog: some NBDExportCatalog) -> [Action] {
        switch message {
        case .clientFlags(let flags):
            guard case .handshake(var handshake) = state else {
                return invariantBroken("client flags outside the handshake")
            }
            let action = handshake.receivedClientFlags(flags)
            state = .handshake(handshake)
            return handshakeActions(action)
        case .option(let option, let payload):
            guard case .handshake(var handshake) = state else { return invariantBroken("option outside the handshake") }
            let action = handshake.receivedOption(option, payload: payload, catalog: catalog)
            state = .handshake(handshake)
            return handshakeActions(action)
        case .oversizedOption(let option, let length):
            guard case .handshake(var handshake) = state else { return invariantBroken("option outside the handshake") }
            let action = handshake.receivedOversizedOption(option, length: length)
            state = .handshake(handshake)
            return handshakeActions(action)
        case .request(let request):
            return actions(for: request)
        case .writePayload(let payload):
            guard case .transmission(var transmission) = state, case .writePayload(let request) = transmission.pending
            else { return invariantBroken("WRITE payload without a request") }
            transmission.pending = .none
            state = .transmission(transmission)
            return [.serve(request, payload: payload)]
        case .discardedWritePayload:
            guard case .transmission(var transmission) = state,
                case .refusedPayload(let request, let errno) = transmission.pending
            else { return invariantBroken("discarded payload without a refusal") }
            transmission.pending = .none
            state = .transmission(transmission)
            return [.refuse(request, errno)]
        }
    }

    private mutating func actions(for request: NBDRequest) -> [Action] {
        guard case .transmission(var transmission) = state else {
            return invariantBroken("request outside transmission")
        }
        let action = transmission.machine.receivedRequest(request)
        switch action {
        case .serve(let request):
            let bytes = NBDTransmissionStateMachine.payloadBytes(of: request)
            if bytes > 0 {
                transmission.pending = .budget(request)
                state = .transmission(transmission)
                return [.takeBudget(request, bytes: bytes)]
            }
            state = .transmission(transmission)
            return serveOrReadPayload(of: request)
        case .reject(let request, let errno):
            guard request.command == .write else {
                state = .transmission(transmission)
                return [.refuse(request, errno)]
            }
            decoder.discardWritePayload()
            transmission.pending = .refusedPayload(request, errno)
            state = .transmission(transmission)
            return []
        case .disconnect(let closeNow):
            state = .transmission(transmission)
            return [.clientDisconnecting] + (closeNow ? closeAfterWrites() : [])
        case .close(let reason):
            state = .transmission(transmission)
            return close("unreadable request: \(reason)")
        }
    }

    /// A request that has its bytes: served now, or once its WRITE payload is in.
    private mutating func serveOrReadPayload(of request: NBDRequest) -> [Action] {
        guard request.command == .write else { return [.serve(request, payload: nil)] }
        guard case .transmission(var transmission) = state else {
            return invariantBroken("accepting outside transmission")
        }
        // Big payloads stay in the receive buffers they arrived in (no copy); small ones are copied
        // out so a slow write does not keep a whole receive buffer alive.
        let length = Int(request.length)
        decoder.keepWritePayload(
            length >= Self.inPlacePayloadBytes ? .inPlace : .copy(into: allocator.buffer(capacity: length)))
        // An empty payload is complete at once: served in the same step, like any request without one.
        if length == 0, case .writePayload(let payload)? = try? decoder.next() {
            return [.serve(request, payload: payload)]
        }
        transmission.pending = .writePayload(request)
        state = .transmission(transmission)
        return []
    }

    /// The client's side ended: behave as after NBD_CMD_DISC, unless it ended mid-message.
    private mutating func clientStoppedSending() -> [Action] {
        guard case .transmission(let transmission) = state, case .none = transmission.pending else {
            return close("the client stopped sending mid-message")
        }
        return actions(for: NBDRequest(command: .disconnect, handle: 0, offset: 0, length: 0))
    }

    // MARK: - Helpers

    private mutating func handshakeActions(_ action: NBDHandshakeStateMachine.Action) -> [Action] {
        switch action {
        case .none:
            return []
        case .send(let messages):
            return [.send(messages)]
        case .sendAndClose(let messages):
            return [.send(messages)] + closeAfterWrites()
        case .sendAndStartTransmission(let messages, let session):
            decoder.startTransmission()
            state = .transmission(Transmission(machine: NBDTransmissionStateMachine(session: session, limits: limits)))
            return [.sendAndStartTransmission(messages, session)]
        case .sendAndStartTLS(let messages):
            return [.sendAndStartTLS(messages)]
        }
    }

    private mutating func completionActions(
        _ completion: NBDTransmissionStateMachine.CompletionAction, _ transmission: Transmission
    ) -> [Action] {
        switch completion {
        case .none: return []
        case .drained: return [.drained] + (transmission.closeWhenDrained ? closeAfterWrites() : [])
        case .close: return closeAfterWrites()
        }
    }

    private mutating func release(_ bytes: Int) -> [Action] {
        guard bytes > 0 else { return [] }
        assert(heldBytes >= bytes, "more bytes given back than held")
        heldBytes -= bytes
        return [.releaseBudget(bytes)]
    }

    private mutating func closeAfterWrites() -> [Action] {
        closed() + [.closeAfterWrites]
    }

    private mutating func close(_ reason: String) -> [Action] {
        closed() + [.close(reason: reason)]
    }

    private mutating func invariantBroken(_ what: String) -> [Action] {
        assertionFailure(what)
        return close("invariant broken: \(what)")
    }
}
