import NBDProtocol
import NIOCore

// One simulated server connection, as NBDConnectionHandler runs it (see NBDSessionFuzzer for the
// why). The invariants checked against each served request are restated here independently of
// `NBDTransmissionStateMachine.validate`, so a validation bug shows as a finding, not as agreement.

/// What a session sent and how it ended; two runs of one input must agree on all of it.
public struct NBDFuzzOutcome: Equatable, Sendable, CustomStringConvertible {
    /// FNV-1a of every byte the server sent (read data counted, not hashed).
    public var outputHash: UInt64 = 0xcbf2_9ce4_8422_2325
    public var outputBytes = 0
    /// Messages the decoder returned.
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
    private let seed: UInt64
    /// After this many messages the server starts shutting down (or never, if nil).
    private let shutdownAfterMessages: Int?
    private var decoder: NBDServerDecoder
    private var handshake: NBDHandshakeStateMachine?
    private var transmission: NBDTransmissionStateMachine?
    private var pendingWrite: NBDRequest?
    private var pendingRefusal: (request: NBDRequest, errno: NBDErrno)?
    private var inFlight: [InFlight] = []
    private var received = 0
    private var closed = false
    private var disconnecting = false
    private var outcome = NBDFuzzOutcome()
    private var output = ByteBuffer()

    init(seed: UInt64, tlsMode: NBDTLSMode) {
        self.seed = seed
        shutdownAfterMessages = seed & 0x30 == 0 ? Int((seed >> 8) % 24) : nil
        decoder = NBDServerDecoder(limits: limits, allocator: ByteBufferAllocator())
        // An acknowledged STARTTLS is taken as a completed TLS handshake, and the rest of the input
        // as what came through it.
        handshake = NBDHandshakeStateMachine(configuration: .init(limits: limits, tlsMode: tlsMode))
    }

    /// Feeds `bytes` in pieces of the given sizes, then closes the client's side.
    func run(_ bytes: [UInt8], pieces: [Int]) throws(NBDFuzzFinding) -> NBDFuzzOutcome {
        try apply(handshake!.start())
        var start = 0
        for size in pieces where !closed {
            var buffer = ByteBuffer()
            buffer.writeBytes(bytes[start..<start + size])
            start += size
            received += size
            decoder.receive(buffer)
            try pump()
        }
        if !closed { try clientStoppedSending() }
        // What is still in flight completes (a closed connection drops its replies).
        while !inFlight.isEmpty { try complete(at: 0) }
        return outcome
    }

    // MARK: - Inbound

    private func pump() throws(NBDFuzzFinding) {
        while !closed {
            if pendingWrite == nil, pendingRefusal == nil, let transmission, !transmission.canAcceptRequest {
                // The connection would stop reading until something completes: complete the oldest.
                try check(!inFlight.isEmpty, "reading stopped with nothing in flight")
                try complete(at: 0)
                continue
            }
            let message: NBDServerDecoder.Message?
            do {
                message = try decoder.next()
            } catch {
                end("protocol error \(error.code)")
                return
            }
            try check(decoder.queuedBytes >= 0 && decoder.queuedBytes <= received, "queued byte count is off")
            guard let message else { return }
            outcome.messages += 1
            try handle(message)
            try advanceTime()
        }
    }

    private func handle(_ message: NBDServerDecoder.Message) throws(NBDFuzzFinding) {
        switch message {
        case .clientFlags(let flags):
            guard handshake != nil else { return try fail("client flags outside the handshake") }
            try apply(handshake!.receivedClientFlags(flags))
        case .option(let option, let payload):
            guard handshake != nil else { return try fail("option outside the handshake") }
            try check(payload.readableBytes <= limits.maximumOptionPayloadBytes, "option payload over the limit")
            try apply(handshake!.receivedOption(option, payload: payload, catalog: catalog))
        case .oversizedOption(let option, let length):
            guard handshake != nil else { return try fail("option outside the handshake") }
            try check(Int(length) > limits.maximumOptionPayloadBytes, "an option within the limit was dropped")
            try apply(handshake!.receivedOversizedOption(option, length: length))
        case .request(let request):
            try handleRequest(request)
        case .writePayload(let payload):
            guard let request = pendingWrite else { return try fail("WRITE payload without a request") }
            try check(payload.readableBytes == Int(request.length), "WRITE payload of the wrong length")
            pendingWrite = nil
            try serve(request)
        case .discardedWritePayload(let length):
            guard let refusal = pendingRefusal else { return try fail("discarded payload without a refusal") }
            try check(length == Int(refusal.request.length), "discarded payload of the wrong length")
            pendingRefusal = nil
            writeError(for: refusal.request, refusal.errno, offset: nil)
        }
    }

    private func apply(_ action: NBDHandshakeStateMachine.Action) throws(NBDFuzzFinding) {
        switch action {
        case .none:
            break
        case .send(let messages):
            send(messages)
        case .sendAndClose(let messages):
            send(messages)
            end("handshake closed")
        case .sendAndStartTransmission(let messages, let session):
            try checkSession(session)
            send(messages)
            decoder.startTransmission()
            handshake = nil
            transmission = NBDTransmissionStateMachine(session: session, limits: limits)
        case .sendAndStartTLS(let messages):
            send(messages)
            try apply(handshake!.tlsEstablished())
        }
    }

    private func handleRequest(_ request: NBDRequest) throws(NBDFuzzFinding) {
        guard transmission != nil else { return try fail("request outside transmission") }
        let before = transmission!.inFlightRequests
        switch transmission!.receivedRequest(request) {
        case .serve(let served):
            try check(served == request, "served a different request")
            try checkServable(request)
            try check(transmission!.inFlightRequests == before + 1, "a served request was not counted")
            if request.command == .write {
                let length = Int(request.length)
                decoder.keepWritePayload(
                    length >= 64 * 1024 ? .inPlace : .copy(into: ByteBufferAllocator().buffer(capacity: length)))
                pendingWrite = request
            } else {
                try serve(request)
            }
        case .reject(let rejected, let errno):
            try check(rejected == request && errno.rawValue != 0, "a rejection without an error")
            if request.command == .write {
                decoder.discardWritePayload()
                pendingRefusal = (request, errno)
            } else {
                writeError(for: request, errno, offset: nil)
            }
        case .disconnect(let closeNow):
            try check(closeNow == inFlight.isEmpty, "disconnect disagrees about what is in flight")
            disconnecting = true
            if closeNow { end("disconnected") }
        case .close:
            try check(request.command == .write, "only a WRITE too large to read past closes")
            end("closed on a huge WRITE")
        }
        try checkCounters()
    }

    private func clientStoppedSending() throws(NBDFuzzFinding) {
        guard transmission != nil, pendingWrite == nil, pendingRefusal == nil else {
            return end("input ended mid-message")
        }
        try handleRequest(NBDRequest(command: .disconnect, handle: 0, offset: 0, length: 0))
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
            if handshake != nil { handshake!.beginShutdown() }
            if transmission != nil { try completion(transmission!.beginDraining()) }
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
        guard transmission != nil else { return try fail("completion without a session") }
        // A closed connection drops the outcome unanswered and stops accounting, as the handler does.
        guard !closed else { return }
        writeReply(to: request)
        try completion(transmission!.requestCompleted(request))
        try checkCounters()
    }

    private func completion(_ action: NBDTransmissionStateMachine.CompletionAction) throws(NBDFuzzFinding) {
        switch action {
        case .none:
            try check(!(disconnecting && inFlight.isEmpty), "the last request after a disconnect did not close")
        case .drained:
            try check(inFlight.isEmpty && transmission!.isDraining, "drained with requests in flight")
        case .close:
            try check(inFlight.isEmpty && disconnecting, "closed without a disconnect")
            end("disconnected")
        }
    }

    // MARK: - Replies

    private func send(_ messages: [NBDHandshakeMessage]) {
        for message in messages { output.writeNBDHandshakeMessage(message) }
        flushOutput()
    }

    /// A reply chosen by the handle: data, a hole, data in segments, or an error with an offset.
    private func writeReply(to request: NBDRequest) {
        let structured = transmission!.session.structuredReplies
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
            let contexts = transmission!.session.metaContexts
            for (index, context) in contexts.enumerated() {
                let extents = NBDExtent.normalized(
                    Self.extents(length: request.length, seed: handle &+ UInt64(context.id)),
                    length: request.length, requestOne: request.flags.contains(.requestOne),
                    maximumCount: limits.maximumExtentsPerReply)
                let flags: NBDReplyFlags = index == contexts.count - 1 ? .done : []
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
        if transmission?.session.structuredReplies == true {
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
        let session = transmission!.session
        let export = session.export
        let command = request.command
        let writes: Set<NBDCommand> = [.write, .trim, .writeZeroes]
        try check(!transmission!.isDraining, "served while draining: \(request)")
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
            try check(request.length <= transmission!.maximumRequestBytes, "served an oversized \(command)")
        }
        if command == .blockStatus {
            try check(!session.metaContexts.isEmpty && request.length > 0, "served a BLOCK_STATUS without contexts")
        }
    }

    private func checkCounters() throws(NBDFuzzFinding) {
        guard let transmission else { return }
        let bytes = inFlight.reduce(0) { sum, entry in
            let request = entry.request
            return sum + (request.command == .write || request.command == .read ? Int(request.length) : 0)
        }
        let pending = pendingWrite.map { Int($0.length) } ?? 0
        try check(
            transmission.inFlightRequests == inFlight.count + (pendingWrite == nil ? 0 : 1),
            "in-flight count \(transmission.inFlightRequests), expected \(inFlight.count)")
        try check(transmission.inFlightBytes == bytes + pending, "in-flight bytes are off")
        try check(transmission.inFlightRequests <= limits.maximumInFlightRequests, "in-flight bound exceeded")
    }

    private func check(_ condition: Bool, _ what: @autoclosure () -> String) throws(NBDFuzzFinding) {
        if !condition { try fail(what()) }
    }

    private func fail(_ what: String) throws(NBDFuzzFinding) {
        throw NBDFuzzFinding(description: what)
    }
}
