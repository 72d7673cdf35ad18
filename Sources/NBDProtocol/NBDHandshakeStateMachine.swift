import NIOCore

// Design note. The server side of fixed-newstyle option haggling, as a value: every input returns
// an action saying what to send and whether the session goes on, ends, or enters transmission.
// Export lookups go through an `NBDExportCatalog` passed in per call, so the machine is pure and
// the server can bind a connection to its export atomically with the lookup for GO/EXPORT_NAME:
// the machine asks `forTransmission: true` only once nothing else can fail.
//
// TLS (proto.md, "TLS support"): STARTTLS is answered ACK with `.sendAndStartTLS`; the caller then
// upgrades the connection and reports `tlsEstablished()`, which starts the negotiation afresh
// (structured replies and meta contexts chosen in plain text could have been injected by a
// man in the middle, CVE-2021-3716). Until then any option is a protocol violation. A second
// STARTTLS gets `NBD_REP_ERR_INVALID`. In `.required` mode every option but STARTTLS and ABORT gets
// `NBD_REP_ERR_TLS_REQD` before the upgrade, and EXPORT_NAME (which cannot be refused) closes.

/// How the server treats `NBD_OPT_STARTTLS`.
public enum NBDTLSMode: Hashable, Sendable {
    /// No TLS (proto.md's NOTLS mode): STARTTLS is refused with `NBD_REP_ERR_POLICY`.
    case disabled
    /// TLS at the client's choice (SELECTIVETLS): plain-text clients may negotiate too.
    case optional
    /// TLS before anything else (FORCEDTLS): other options get `NBD_REP_ERR_TLS_REQD` until then.
    case required
}

/// The server side of the handshake phase.
public struct NBDHandshakeStateMachine {
    public struct Configuration: Hashable, Sendable {
        public var limits: NBDLimits
        public var tlsMode: NBDTLSMode

        public init(limits: NBDLimits = NBDLimits(), tlsMode: NBDTLSMode = .disabled) {
            self.limits = limits
            self.tlsMode = tlsMode
        }
    }

    public enum Action: Hashable {
        /// Nothing to send; wait for the next input.
        case none
        /// Send these and wait for the next option.
        case send([NBDHandshakeMessage])
        /// Send these (possibly none), then close the connection.
        case sendAndClose([NBDHandshakeMessage])
        /// Send these, then switch to the transmission phase of `NBDSession`.
        case sendAndStartTransmission([NBDHandshakeMessage], NBDSession)
        /// Send these (the STARTTLS ACK), then start the TLS handshake and report `tlsEstablished()`.
        case sendAndStartTLS([NBDHandshakeMessage])
    }

    private struct Negotiation {
        var clientFlags: NBDClientFlags
        var structuredReplies = false
        /// The export a SET_META_CONTEXT named and the contexts it selected.
        var metaContextExport: String?
        var metaContexts: [NBDMetaContext] = []
    }

    private enum State {
        case initial
        case awaitingClientFlags
        case negotiating(Negotiation)
        /// STARTTLS was acknowledged; the TLS handshake has not completed yet.
        case upgradingToTLS(NBDClientFlags)
        case finished
    }

    /// The handshake flags this server advertises.
    public static let handshakeFlags: NBDHandshakeFlags = [.fixedNewstyle, .noZeroes]

    public let configuration: Configuration
    private var state: State = .initial
    private var isShuttingDown = false
    /// Whether the connection is encrypted (TLS was established).
    public private(set) var isTLSEstablished = false

    public init(configuration: Configuration = Configuration()) {
        self.configuration = configuration
    }

    /// The connection is up: greet the client.
    public mutating func start() -> Action {
        guard case .initial = state else { return unexpected("start") }
        state = .awaitingClientFlags
        return .send([.greeting(Self.handshakeFlags)])
    }

    /// The server is shutting down: further options (but ABORT) get `NBD_REP_ERR_SHUTDOWN`.
    public mutating func beginShutdown() {
        isShuttingDown = true
    }

    public mutating func receivedClientFlags(_ rawFlags: UInt32) -> Action {
        guard case .awaitingClientFlags = state else { return unexpected("client flags") }
        let known: NBDClientFlags = [.fixedNewstyle, .noZeroes]
        let flags = NBDClientFlags(rawValue: rawFlags)
        // proto.md: the server MUST drop the connection on an unknown flag or one not advertised.
        guard known.isSuperset(of: flags) else {
            state = .finished
            return .sendAndClose([])
        }
        state = .negotiating(Negotiation(clientFlags: flags))
        return .none
    }

    /// The TLS handshake that followed `.sendAndStartTLS` completed: negotiate afresh, encrypted.
    public mutating func tlsEstablished() -> Action {
        guard case .upgradingToTLS(let clientFlags) = state else { return unexpected("TLS established") }
        isTLSEstablished = true
        // Nothing negotiated in plain text survives the upgrade (proto.md; CVE-2021-3716).
        state = .negotiating(Negotiation(clientFlags: clientFlags))
        return .none
    }

    /// An option whose payload was within the limit.
    public mutating func receivedOption(
        _ option: NBDOption,
        payload: ByteBuffer,
        catalog: some NBDExportCatalog
    ) -> Action {
        if case .upgradingToTLS = state { return clientSentDuringUpgrade() }
        guard case .negotiating(var negotiation) = state else { return unexpected("option \(option)") }
        var payload = payload
        let action: Action
        if isShuttingDown && option != .abort {
            action = shutdownReply(option)
        } else if requiresTLSFirst && option != .startTLS && option != .abort {
            action = tlsRequiredReply(option)
        } else {
            switch option {
            case .exportName:
                action = exportName(payload: &payload, negotiation: negotiation, catalog: catalog)
            case .abort:
                // The spec says to ignore any data sent with ABORT.
                action = .sendAndClose([.optionReply(.ack(.abort))])
            case .list:
                action = list(payload: payload, catalog: catalog)
            case .startTLS:
                action = startTLS(payload: payload, clientFlags: negotiation.clientFlags)
            case .info, .go:
                action = infoOrGo(option, payload: &payload, negotiation: negotiation, catalog: catalog)
            case .structuredReply:
                action = structuredReply(payload: payload, negotiation: &negotiation)
            case .listMetaContext, .setMetaContext:
                action = metaContext(option, payload: &payload, negotiation: &negotiation, catalog: catalog)
            default:
                action = reply(.error(option, .errUnsupported, "\(option) is not supported"))
            }
        }
        if case .negotiating = state { state = .negotiating(negotiation) }
        return action
    }

    /// An option whose payload exceeded `maximumOptionPayloadBytes`; the payload was read past.
    public mutating func receivedOversizedOption(_ option: NBDOption, length: UInt32) -> Action {
        if case .upgradingToTLS = state { return clientSentDuringUpgrade() }
        guard case .negotiating(var negotiation) = state else { return unexpected("option \(option)") }
        switch option {
        case .exportName:
            // EXPORT_NAME cannot be refused with an error; the name is too long to be valid anyway.
            state = .finished
            return .sendAndClose([])
        case .abort:
            state = .finished
            return .sendAndClose([.optionReply(.ack(.abort))])
        case _ where isShuttingDown:
            return shutdownReply(option)
        case _ where requiresTLSFirst && option != .startTLS:
            return tlsRequiredReply(option)
        case .setMetaContext:
            negotiation.metaContextExport = nil
            negotiation.metaContexts = []
            state = .negotiating(negotiation)
            return reply(.error(option, .errTooBig, "\(option) payload of \(length) bytes is too large"))
        case .list, .startTLS, .info, .go, .structuredReply, .listMetaContext:
            return reply(.error(option, .errTooBig, "\(option) payload of \(length) bytes is too large"))
        default:
            return reply(.error(option, .errUnsupported, "\(option) is not supported"))
        }
    }

    // MARK: - Options

    private mutating func exportName(
        payload: inout ByteBuffer,
        negotiation: Negotiation,
        catalog: some NBDExportCatalog
    ) -> Action {
        // EXPORT_NAME has no error reply: an invalid or unknown name ends the session.
        guard let name = try? payload.readNBDString(length: payload.readableBytes, what: "export name"),
            let export = catalog.lookUpExport(named: name, forTransmission: true)
        else {
            state = .finished
            return .sendAndClose([])
        }
        let session = makeSession(export: export, negotiation: negotiation)
        state = .finished
        let zeroPadding = !negotiation.clientFlags.contains(.noZeroes)
        return .sendAndStartTransmission(
            [.exportNameReply(size: export.size, flags: session.transmissionFlags, zeroPadding: zeroPadding)],
            session
        )
    }

    private func list(payload: ByteBuffer, catalog: some NBDExportCatalog) -> Action {
        guard payload.readableBytes == 0 else {
            return reply(.error(.list, .errInvalid, "LIST takes no data"))
        }
        var messages = catalog.listExports().map {
            NBDHandshakeMessage.optionReply(.init(option: .list, body: .server($0)))
        }
        messages.append(.optionReply(.ack(.list)))
        return .send(messages)
    }

    private mutating func startTLS(payload: ByteBuffer, clientFlags: NBDClientFlags) -> Action {
        guard payload.readableBytes == 0 else {
            return reply(.error(.startTLS, .errInvalid, "STARTTLS takes no data"))
        }
        switch configuration.tlsMode {
        case .disabled:
            return reply(.error(.startTLS, .errPolicy, "TLS is not enabled on this server"))
        case .optional, .required:
            guard !isTLSEstablished else {
                return reply(.error(.startTLS, .errInvalid, "TLS is already established"))
            }
            state = .upgradingToTLS(clientFlags)
            return .sendAndStartTLS([.optionReply(.ack(.startTLS))])
        }
    }

    private mutating func infoOrGo(
        _ option: NBDOption,
        payload: inout ByteBuffer,
        negotiation: Negotiation,
        catalog: some NBDExportCatalog
    ) -> Action {
        let request: NBDExportInfoRequest
        do {
            request = try payload.readNBDExportInfoRequest()
        } catch {
            return reply(.error(option, .errInvalid, error.message))
        }
        let forTransmission = option == .go
        guard let export = catalog.lookUpExport(named: request.exportName, forTransmission: forTransmission) else {
            return reply(.error(option, .errUnknown, "no export named \"\(request.exportName)\""))
        }
        let session = makeSession(export: export, negotiation: negotiation)
        var messages: [NBDHandshakeMessage] = []
        if request.infoTypes.contains(.name) {
            messages.append(.optionReply(.init(option: option, body: .info(.name(export.name)))))
        }
        if request.infoTypes.contains(.description) && !export.description.isEmpty {
            messages.append(.optionReply(.init(option: option, body: .info(.description(export.description)))))
        }
        // Sent whether asked for or not: the maximum is not the default, so clients must learn it.
        messages.append(.optionReply(.init(option: option, body: .info(.blockSize(export.blockSize)))))
        messages.append(
            .optionReply(
                .init(option: option, body: .info(.export(size: export.size, flags: session.transmissionFlags))))
        )
        messages.append(.optionReply(.ack(option)))
        guard forTransmission else { return .send(messages) }
        state = .finished
        return .sendAndStartTransmission(messages, session)
    }

    private func structuredReply(payload: ByteBuffer, negotiation: inout Negotiation) -> Action {
        guard payload.readableBytes == 0 else {
            return reply(.error(.structuredReply, .errInvalid, "STRUCTURED_REPLY takes no data"))
        }
        negotiation.structuredReplies = true
        return reply(.ack(.structuredReply))
    }

    private func metaContext(
        _ option: NBDOption,
        payload: inout ByteBuffer,
        negotiation: inout Negotiation,
        catalog: some NBDExportCatalog
    ) -> Action {
        let isSet = option == .setMetaContext
        if isSet {
            // A SET replaces the previous selection even when it fails.
            negotiation.metaContextExport = nil
            negotiation.metaContexts = []
        }
        guard negotiation.structuredReplies else {
            return reply(.error(option, .errInvalid, "\(option) needs structured replies first"))
        }
        let request: NBDMetaContextRequest
        do {
            request = try payload.readNBDMetaContextRequest()
        } catch {
            return reply(.error(option, .errInvalid, error.message))
        }
        guard let export = catalog.lookUpExport(named: request.exportName, forTransmission: false) else {
            return reply(.error(option, .errUnknown, "no export named \"\(request.exportName)\""))
        }
        var messages: [NBDHandshakeMessage] = []
        if isSet {
            let names = NBDMetaContextQuery.select(queries: request.queries, available: export.allMetaContexts)
            let contexts = names.enumerated().map { NBDMetaContext(id: UInt32($0.offset + 1), name: $0.element) }
            negotiation.metaContextExport = export.name
            negotiation.metaContexts = contexts
            messages = contexts.map { .optionReply(.init(option: option, body: .metaContext($0))) }
        } else {
            let names = NBDMetaContextQuery.list(queries: request.queries, available: export.allMetaContexts)
            // The id in a LIST reply is reserved and set to zero.
            messages = names.map { .optionReply(.init(option: option, body: .metaContext(.init(id: 0, name: $0)))) }
        }
        messages.append(.optionReply(.ack(option)))
        return .send(messages)
    }

    // MARK: - Helpers

    /// FORCEDTLS before the upgrade: only STARTTLS and ABORT are served.
    private var requiresTLSFirst: Bool { configuration.tlsMode == .required && !isTLSEstablished }

    private mutating func tlsRequiredReply(_ option: NBDOption) -> Action {
        if option == .exportName {
            // EXPORT_NAME cannot be refused with an error: the session must end.
            state = .finished
            return .sendAndClose([])
        }
        return reply(.error(option, .errTLSRequired, "this server requires TLS: send STARTTLS first"))
    }

    /// The client must wait for the TLS handshake after the STARTTLS ACK; anything else is a violation.
    private mutating func clientSentDuringUpgrade() -> Action {
        state = .finished
        return .sendAndClose([])
    }

    private mutating func shutdownReply(_ option: NBDOption) -> Action {
        if option == .exportName {
            state = .finished
            return .sendAndClose([])
        }
        return reply(.error(option, .errShutdown, "the server is shutting down"))
    }

    private func makeSession(export: NBDExportDescription, negotiation: Negotiation) -> NBDSession {
        var contexts: [NBDMetaContext] = []
        if negotiation.structuredReplies, negotiation.metaContextExport == export.name {
            let available = export.allMetaContexts
            contexts = negotiation.metaContexts.filter { available.contains($0.name) }
        }
        return NBDSession(
            export: export,
            transmissionFlags: export.transmissionFlags(structuredReplies: negotiation.structuredReplies),
            structuredReplies: negotiation.structuredReplies,
            metaContexts: contexts
        )
    }

    private func reply(_ reply: NBDOptionReply) -> Action {
        .send([.optionReply(reply)])
    }

    private mutating func unexpected(_ input: String) -> Action {
        assertionFailure("handshake received \(input) in state \(state)")
        state = .finished
        return .sendAndClose([])
    }
}
