// Design note. The transmission phase as a value: it validates every request against what this
// session negotiated (one function, `validate`, in the order nbdkit uses: state, command,
// read-only, advertised, flags, range, alignment, size), and counts the requests in flight so the
// connection can stop reading at a bound and close once drained (their payload bytes are counted by
// `NBDConnectionStateMachine`, once). Serving and replying are the
// caller's job; the machine only says serve, reject with an errno, or close.

/// The server side of one session's transmission phase.
public struct NBDTransmissionStateMachine {
    public enum RequestAction: Hashable {
        /// Serve the request. For a WRITE, keep its payload and serve it once the payload is in.
        case serve(NBDRequest)
        /// Answer with this error without serving. For a WRITE, read past its payload.
        case reject(NBDRequest, NBDErrno)
        /// `NBD_CMD_DISC`: read nothing more and close once `inFlightRequests` is zero
        /// (`closeNow` if it already is).
        case disconnect(closeNow: Bool)
        /// A WRITE whose payload is too large even to read past: hard disconnect.
        case close(reason: String)
    }

    public enum CompletionAction: Hashable {
        case none
        /// Draining, and the last request in flight was answered.
        case drained
        /// A disconnect was requested, and the last request in flight was answered.
        case close
    }

    private enum State: Hashable {
        case active
        /// Export removed or server shutting down: everything new gets `ESHUTDOWN`.
        case draining
        case disconnecting
    }

    /// What the negotiation fixed, behind one immutable reference: the machine is copied on every
    /// transition of the connection machine that holds it, and a copy should cost one retain, not one
    /// per string and array of the session (immutable, so copies still behave as values).
    private final class Negotiated: Sendable {
        let session: NBDSession
        let limits: NBDLimits
        init(session: NBDSession, limits: NBDLimits) {
            self.session = session
            self.limits = limits
        }
    }

    private let negotiated: Negotiated
    private var state: State = .active
    public private(set) var inFlightRequests = 0

    public var session: NBDSession { negotiated.session }
    public var limits: NBDLimits { negotiated.limits }

    public init(session: NBDSession, limits: NBDLimits) {
        self.negotiated = Negotiated(session: session, limits: limits)
    }

    /// Whether the connection may read more requests now (the in-flight request bound is not reached).
    public var canAcceptRequest: Bool {
        state != .disconnecting && inFlightRequests < negotiated.limits.maximumInFlightRequests
    }

    public var isDraining: Bool { state == .draining }

    /// The largest READ/WRITE/CACHE/WRITE_ZEROES length this session accepts.
    public var maximumRequestBytes: UInt32 {
        Swift.min(negotiated.session.export.blockSize.maximum, UInt32(clamping: negotiated.limits.maximumRequestBytes))
    }

    public mutating func receivedRequest(_ request: NBDRequest) -> RequestAction {
        if request.command == .disconnect {
            state = .disconnecting
            return .disconnect(closeNow: inFlightRequests == 0)
        }
        if let error = validate(request) {
            if request.command == .write && Int(request.length) > negotiated.limits.maximumDiscardedPayloadBytes {
                return .close(reason: "refused WRITE of \(request.length) bytes is too large to read past")
            }
            return .reject(request, error)
        }
        inFlightRequests += 1
        return .serve(request)
    }

    /// A request returned by `.serve` has been answered.
    public mutating func requestCompleted(_ request: NBDRequest) -> CompletionAction {
        assert(inFlightRequests > 0, "more completions than requests served")
        inFlightRequests -= 1
        guard inFlightRequests == 0 else { return .none }
        switch state {
        case .active: return .none
        case .draining: return .drained
        case .disconnecting: return .close
        }
    }

    /// The export went away or the server is shutting down. Returns `.drained` if nothing is in
    /// flight, `.close` if a disconnect was already pending and nothing is in flight.
    public mutating func beginDraining() -> CompletionAction {
        if state == .active { state = .draining }
        guard inFlightRequests == 0 else { return .none }
        return state == .draining ? .drained : .close
    }

    /// Why `request` must be refused in this session, or nil if it may be served.
    public func validate(_ request: NBDRequest) -> NBDErrno? {
        if state == .draining { return .eshutdown }

        let command = request.command
        let flags = negotiated.session.transmissionFlags
        let export = negotiated.session.export
        switch command {
        case .read, .write, .flush, .trim, .cache, .writeZeroes, .blockStatus: break
        default: return .einval
        }
        let isWrite = command == .write || command == .trim || command == .writeZeroes
        if isWrite && export.isReadOnly { return .eperm }

        let advertised: Bool
        switch command {
        case .flush: advertised = flags.contains(.sendFlush)
        case .trim: advertised = flags.contains(.sendTrim)
        case .writeZeroes: advertised = flags.contains(.sendWriteZeroes)
        case .cache: advertised = flags.contains(.sendCache)
        case .blockStatus: advertised = !negotiated.session.metaContexts.isEmpty
        default: advertised = true
        }
        if !advertised { return .einval }

        var allowedFlags: NBDCommandFlags = flags.contains(.sendFUA) ? .fua : []
        switch command {
        case .read where flags.contains(.sendDF): allowedFlags.insert(.dontFragment)
        case .writeZeroes:
            allowedFlags.insert(.noHole)
            if flags.contains(.sendFastZero) { allowedFlags.insert(.fastZero) }
        case .blockStatus: allowedFlags.insert(.requestOne)
        default: break
        }
        if !allowedFlags.isSuperset(of: request.flags) { return .einval }

        if command == .flush {
            return request.offset == 0 && request.length == 0 ? nil : .einval
        }

        let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
        if overflow || end > export.size {
            return command == .write || command == .writeZeroes ? .enospc : .einval
        }

        let minimum = UInt64(export.blockSize.minimum)
        if request.offset % minimum != 0 || UInt64(request.length) % minimum != 0 { return .einval }

        let tooLarge = request.length > maximumRequestBytes
        switch command {
        case .read where tooLarge:
            return request.flags.contains(.dontFragment) ? .eoverflow : .einval
        case .write where tooLarge, .cache where tooLarge:
            return .einval
        case .writeZeroes:
            // Like TRIM, no payload: any length inside the export (nbdcopy zeroes whole holes at once).
            if request.flags.contains(.fastZero) && !export.supportsFastZero { return .enotsup }
        case .blockStatus where request.length == 0:
            return .einval
        default:
            break
        }
        return nil
    }

    /// Memory a served request holds: its WRITE payload or the READ data being produced.
    public static func payloadBytes(of request: NBDRequest) -> Int {
        request.command == .write || request.command == .read ? Int(request.length) : 0
    }
}
