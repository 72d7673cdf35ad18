import NBDProtocol
import NIOCore

// One simulated server connection: the real `NBDConnectionStateMachine`, driven the way
// NBDConnectionHandler drives it (see NBDSessionFuzzer for the why). The invariants checked against
// each served request are restated here independently of `NBDTransmissionStateMachine.validate`, so a
// validation bug shows as a finding, not as agreement, and the machine's byte accounting is checked
// against a count kept here.

/// What a session sent and how it ended; two runs of one input must agree on all of it.
public struct NBDFuzzOutcome: Equatable, Sendable, CustomStringConvertible {
    /// FNV-1a of every byte the server sent (read data counted, not hashed).
    public var outputHash: UInt64 = 0xcbf2_9ce4_8422_2325
    public var outputBytes = 0
    /// Messages the machine acted on.
    public var messages = 0
    /// Requests served (not refused).
    public var served = 0
    /// How the session ended: "disconnected", "handshake closed", "protocol error ...", ...
    public var ending = "input ended"

    public var description: String {
        "\(messages) messages, \(served) served, \(outputBytes) bytes sent (hash \(outputHash)), \(ending)"
    }
}

final class NBDFuzzSession {
    private struct InFlight {
        var request: NBDRequest
        var messagesLeft: Int
    }

    private let limits = NBDSessionFuzzer.limits
    private let catalog = NBDFuzzCatalog()
    /// After this many messages the server starts shutting down (or never, if nil).
    private let shutdownAfterMessages: Int?
    /// Whether a request waiting for budget waits until the oldest request in flight completes.
    private let slowBudget: Bool
    private var machine: NBDConnectionStateMachine
    private var inFlight: [InFlight] = []
    /// The request the machine asked budget for, not yet granted.
    private var awaitingBudget: NBDRequest?
    /// A WRITE granted its budget whose payload is still being read.
    private var awaitingPayload: NBDRequest?
    /// The request last granted its budget (validated when it asked, perhaps before a drain began).
    private var granted: NBDRequest?
    /// Budget bytes granted and not yet released, counted here.
    private var heldBytes = 0
    private var closed = false
    private var inTransmission = false
    private var disconnecting = false
    private var outcome = NBDFuzzOutcome()
    private var output = ByteBuffer()

    init(seed: UInt64, tlsMode: NBDTLSMode) {
        shutdownAfterMessages = seed & 0x30 == 0 ? Int((seed >> 8) % 24) : nil
        slowBudget = seed & 0x40 != 0
        // An acknowledged STARTTLS is taken as a completed TLS handshake, and the rest of the input
        // as what came through it.
        machine = NBDConnectionStateMachine(limits: limits, tlsMode: tlsMode, allocator: ByteBufferAllocator())
    }

    /// Feeds `bytes` in pieces of the given sizes, then closes the client's side.
    func run(_ bytes: [UInt8], pieces: [Int]) throws(NBDFuzzFinding) -> NBDFuzzOutcome {
        try perform(machine.start())
        var start = 0
        for size in pieces where !closed {
            var buffer = ByteBuffer()
            buffer.writeBytes(bytes[start..<start + size])
            start += size
            machine.receive(buffer)
            try pump()
        }
        if !closed {
            machine.inputEnded()
            try pump()
        }
        // What is still in flight completes (a closed connection drops its replies).
        if awaitingBudget != nil { try grantBudget() }
        while !inFlight.isEmpty { try complete(at: 0) }
        if closed { try check(machine.heldBytes == 0, "a closed connection still holds \(machine.heldBytes) bytes") }
        return outcome
    }

    // MARK: - Inbound

    /// Acts on every message that can be acted on; where the machine waits (budget, bounds), makes
    /// the progress the server would: grants the budget or completes the oldest request.
    private func pump() throws(NBDFuzzFinding) {
        while !closed {
            if let actions = machine.nextMessage(catalog: catalog) {
                outcome.messages += 1
                try perform(actions)
                try advanceTime()
                continue
            }
            if awaitingBudget != nil {
                if slowBudget, !inFlight.isEmpty { try complete(at: 0) } else { try grantBudget() }
                continue
            }
            guard machine.shouldHoldReads else { return }
            // The connection stopped reading until something completes.
            try check(!inFlight.isEmpty, "reading stopped with nothing in flight")
            try complete(at: 0)
        }
    }

    private func perform(_ actions: [NBDConnectionStateMachine.Action]) throws(NBDFuzzFinding) {
        for action in actions { try perform(action) }
        try checkCounters()
    }

    private func perform(_ action: NBDConnectionStateMachine.Action) throws(NBDFuzzFinding) {
        switch action {
        case .send(let messages):
            send(messages)
        case .sendAndStartTLS(let messages):
            send(messages)
            try perform(machine.tlsEstablished())
        case .sendAndStartTransmission(let messages, let session):
            try checkSession(session)
            send(messages)
            inTransmission = true
        case .takeBudget(let request, let bytes):
            try check(awaitingBudget == nil, "budget asked for twice")
            try check(bytes == NBDTransmissionStateMachine.payloadBytes(of: request) && bytes > 0, "budget bytes off")
            try checkServable(request)
            awaitingBudget = request
        case .releaseBudget(let bytes):
            try check(bytes > 0 && bytes <= heldBytes, "released \(bytes) bytes with \(heldBytes) held")
            heldBytes -= bytes
        case .serve(let request, let payload):
            // A request that waited for budget was judged when it asked: a drain may have begun since.
            if request == granted {
                granted = nil
            } else {
                try checkServable(request)
            }
            if request.command == .write {
                try check(
                    awaitingPayload == request || request.length == 0,
                    "served a WRITE that was not awaiting its payload")
                try check(payload?.readableBytes == Int(request.length), "WRITE payload of the wrong length")
                if awaitingPayload == request { awaitingPayload = nil }
            } else {
                try check(payload == nil, "a payload for a request that has none")
            }
            try serve(request)
        case .refuse(let request, let errno):
            try check(errno.rawValue != 0, "a refusal without an error")
            writeError(for: request, errno, offset: nil)
        case .reply(let request):
            writeReply(to: request)
        case .releaseBudgetWhenSent(let bytes):
            // The socket takes everything at once here.
            try perform(machine.replySent(bytes: bytes))
        case .clientDisconnecting:
            disconnecting = true
        case .drained:
            try check(inFlight.isEmpty && machine.isDraining, "drained with requests in flight")
        case .closeAfterWrites:
            end(inTransmission ? (disconnecting ? "disconnected" : "closed after draining") : "handshake closed")
        case .close(let reason):
            end(reason)
        }
    }

    private func grantBudget() throws(NBDFuzzFinding) {
        guard let request = awaitingBudget else { return }
        awaitingBudget = nil
        heldBytes += NBDTransmissionStateMachine.payloadBytes(of: request)
        granted = request
        if request.command == .write && !closed { awaitingPayload = request }
        try perform(machine.budgetGranted())
    }

    // MARK: - Serving

    private func serve(_ request: NBDRequest) throws(NBDFuzzFinding) {
        outcome.served += 1
        inFlight.append(InFlight(request: request, messagesLeft: Int(request.handle % 4)))
        if request.handle % 4 == 0 { try complete(at: inFlight.count - 1) }
    }

    /// One message went by: requests whose delay is over complete, and the shutdown may begin.
    private func advanceTime() throws(NBDFuzzFinding) {
        if outcome.messages == shutdownAfterMessages {
            try perform(machine.drain(closingWhenIdle: false))
        }
        var index = 0
        while index < inFlight.count {
            inFlight[index].messagesLeft -= 1
            if inFlight[index].messagesLeft <= 0 {
                try complete(at: index)
            } else {
                index += 1
            }
        }
    }

    private func complete(at index: Int) throws(NBDFuzzFinding) {
        let request = inFlight.remove(at: index).request
        let actions = machine.requestCompleted(request)
        // A closed connection drops the outcome unanswered; its bytes still go back.
        let replies = actions.filter {
            if case .reply = $0 { return true }
            return false
        }
        try check(closed ? replies.isEmpty : replies.count == 1, "replies to one completion: \(replies.count)")
        try perform(actions)
    }

    // MARK: - Replies

    private func send(_ messages: [NBDHandshakeMessage]) {
        for message in messages { output.writeNBDHandshakeMessage(message) }
        flushOutput()
    }

    /// A reply chosen by the handle: data, a hole, data in segments, or an error with an offset.
    private func writeReply(to request: NBDRequest) {
        guard let session = machine.session else { return }
        let structured = session.structuredReplies
        let handle = request.handle
        let choice = (handle >> 2) % 5
        if choice == 4 {
            writeError(for: request, .eio, offset: request.offset + UInt64(request.length / 2))
            return flushOutput()
        }
        switch request.command {
        case .read where request.length == 0 && structured:
            output.writeNBDStructuredDone(handle: handle)
        case .read where !structured:
            output.writeNBDSimpleReply(handle: handle, error: nil)
            outcome.outputBytes += Int(request.length)
        case .read where choice == 1 && !request.flags.contains(.dontFragment):
            output.writeNBDOffsetHole(handle: handle, flags: .done, offset: request.offset, length: request.length)
        case .read where choice == 2 && request.length > 1 && !request.flags.contains(.dontFragment):
            let first = request.length / 2
            output.writeNBDOffsetDataHeader(handle: handle, flags: [], offset: request.offset, dataLength: first)
            output.writeNBDOffsetHole(
                handle: handle, flags: [], offset: request.offset + UInt64(first), length: request.length - first)
            output.writeNBDStructuredDone(handle: handle)
        case .read:
            output.writeNBDOffsetDataHeader(
                handle: handle, flags: .done, offset: request.offset, dataLength: request.length)
            outcome.outputBytes += Int(request.length)
        case .blockStatus:
            for (index, context) in session.metaContexts.enumerated() {
                let extents = NBDExtent.normalized(
                    Self.extents(length: request.length, seed: handle &+ UInt64(context.id)),
                    length: request.length, requestOne: request.flags.contains(.requestOne),
                    maximumCount: limits.maximumExtentsPerReply)
                let flags: NBDReplyFlags = index == session.metaContexts.count - 1 ? .done : []
                output.writeNBDBlockStatus(handle: handle, flags: flags, contextID: context.id, extents: extents)
            }
        default:
            output.writeNBDSimpleReply(handle: handle, error: nil)
        }
        flushOutput()
    }

    /// Extents an export might return: some empty, some too long, alternating flags.
    private static func extents(length: UInt32, seed: UInt64) -> [NBDExtent] {
        var extents: [NBDExtent] = []
        var random = seed
        for index in 0..<Int(seed % 24) {
            random = random &* 6_364_136_223_846_793_005 &+ 1
            let piece = UInt32(truncatingIfNeeded: random >> 40) % (length / 4 + 2)
            extents.append(NBDExtent(length: piece, flags: UInt32(index % 3)))
        }
        return extents
    }

    private func writeError(for request: NBDRequest, _ errno: NBDErrno, offset: UInt64?) {
        if machine.session?.structuredReplies == true {
            let message = String(repeating: "invalid request ", count: Int(request.handle % 300))
            output.writeNBDStructuredError(
                handle: request.handle, flags: .done, error: errno, message: message,
                offset: request.command == .flush ? nil : offset)
        } else {
            output.writeNBDSimpleReply(handle: request.handle, error: errno)
        }
        flushOutput()
    }

    private func flushOutput() {
        outcome.outputBytes += output.readableBytes
        output.withUnsafeReadableBytes { bytes in
            for byte in bytes { outcome.outputHash = (outcome.outputHash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        }
        output.clear()
    }

    private func end(_ reason: String) {
        guard !closed else { return }
        closed = true
        awaitingPayload = nil
        outcome.ending = reason
    }

    // MARK: - Invariants

    private func checkSession(_ session: NBDSession) throws(NBDFuzzFinding) {
        guard let export = catalog.exports.first(where: { $0.name == session.export.name }) else {
            return try fail("transmission with an export not in the catalog: \(session.export.name)")
        }
        let flags = session.transmissionFlags
        try check(session.export == export, "the session's export differs from the catalog's")
        try check(flags.contains(.readOnly) == export.isReadOnly, "read-only flag differs from the export")
        try check(!export.isReadOnly || !flags.contains(.sendTrim), "TRIM advertised on a read-only export")
        try check(flags.contains(.sendDF) == session.structuredReplies, "DF advertised without structured replies")
        try check(session.structuredReplies || session.metaContexts.isEmpty, "contexts without structured replies")
        let names = session.metaContexts.map(\.name)
        try check(Set(names).isSubset(of: export.allMetaContexts), "a context the export does not have")
        try check(Set(session.metaContexts.map(\.id)).count == names.count, "two contexts share an id")
    }

    /// The request must be one a correct server may serve, checked from first principles.
    private func checkServable(_ request: NBDRequest) throws(NBDFuzzFinding) {
        guard let session = machine.session, let maximumRequestBytes = machine.maximumRequestBytes else {
            return try fail("served outside transmission: \(request)")
        }
        let export = session.export
        let command = request.command
        let writes: Set<NBDCommand> = [.write, .trim, .writeZeroes]
        try check(!machine.isDraining, "served while draining: \(request)")
        try check(!(export.isReadOnly && writes.contains(command)), "served a write on a read-only export")
        try check(request.flags.rawValue & ~0x1f == 0, "served unknown flags: \(request)")
        switch command {
        case .flush:
            try check(request.offset == 0 && request.length == 0, "served a FLUSH with a range")
            return
        case .read, .write, .trim, .cache, .writeZeroes, .blockStatus:
            break
        default:
            return try fail("served an unknown command: \(request)")
        }
        let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
        try check(!overflow && end <= export.size, "served a request past the end: \(request)")
        let minimum = UInt64(export.blockSize.minimum)
        try check(request.offset % minimum == 0 && UInt64(request.length) % minimum == 0, "served misaligned")
        if command == .read || command == .write || command == .cache {
            try check(request.length <= maximumRequestBytes, "served an oversized \(command)")
        }
        if command == .blockStatus {
            try check(!session.metaContexts.isEmpty && request.length > 0, "served a BLOCK_STATUS without contexts")
        }
    }

    private func checkCounters() throws(NBDFuzzFinding) {
        try check(machine.heldBytes == heldBytes, "the machine holds \(machine.heldBytes) bytes, counted \(heldBytes)")
        guard !closed, machine.session != nil else { return }
        let expected = inFlight.count + (awaitingBudget == nil ? 0 : 1) + (awaitingPayload == nil ? 0 : 1)
        try check(
            machine.inFlightRequests == expected,
            "in-flight count \(machine.inFlightRequests), expected \(expected)")
        try check(machine.inFlightRequests <= limits.maximumInFlightRequests, "in-flight bound exceeded")
        try check(heldBytes <= limits.maximumInFlightBytes + Int(limits.maximumRequestBytes), "byte bound exceeded")
    }

    private func check(_ condition: Bool, _ what: @autoclosure () -> String) throws(NBDFuzzFinding) {
        if !condition { try fail(what()) }
    }

    private func fail(_ what: String) throws(NBDFuzzFinding) {
        throw NBDFuzzFinding(description: what)
    }
}
