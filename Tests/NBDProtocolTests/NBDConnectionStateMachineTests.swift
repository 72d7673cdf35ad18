// The connection machine driven input by input: the handshake into transmission, the budget wait,
// WRITE payloads kept and read past, the byte bound, completions and their accounting, draining and
// closing. No channel, no task: what NBDConnectionHandler carries out is what these tests read.

import NBDProtocol
import NIOCore
import Testing
import UmbraTestSupport

private typealias Action = NBDConnectionStateMachine.Action

private func names(_ actions: [Action]) -> [String] {
    actions.map { action in
        switch action {
        case .send: "send"
        case .sendAndStartTLS: "startTLS"
        case .sendAndStartTransmission: "startTransmission"
        case .takeBudget(_, let bytes): "takeBudget(\(bytes))"
        case .releaseBudget(let bytes): "release(\(bytes))"
        case .serve(let request, let payload): "serve(\(request.handle), \(payload?.readableBytes ?? -1))"
        case .refuse(let request, let errno): "refuse(\(request.handle), \(errno))"
        case .reply(let request): "reply(\(request.handle))"
        case .releaseBudgetWhenSent(let bytes): "releaseWhenSent(\(bytes))"
        case .clientDisconnecting: "disconnecting"
        case .drained: "drained"
        case .closeAfterWrites: "closeAfterWrites"
        case .close: "close"
        }
    }
}

/// A machine in transmission with `live`, after the client's flags and GO.
private func transmitting(limits: NBDLimits = NBDLimits()) -> NBDConnectionStateMachine {
    var machine = NBDConnectionStateMachine(limits: limits, tlsMode: .disabled, allocator: ByteBufferAllocator())
    _ = machine.start()
    var bytes = ByteBuffer()
    bytes.writeInteger(UInt32(3))
    var go = ByteBuffer.option(.go, .infoRequest(name: "live"))
    bytes.writeBuffer(&go)
    machine.receive(bytes)
    #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == [])
    #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == ["startTransmission"])
    #expect(machine.session?.export.name == "live")
    return machine
}

@Suite struct NBDConnectionStateMachineTests {
    /// A READ waits for budget, is served once granted, replies on completion, and holds its bytes
    /// until the reply has gone to the socket.
    @Test func readHoldsItsBytesUntilSent() {
        var machine = transmitting()
        let read = NBDRequest(command: .read, handle: 1, offset: 0, length: 4096)
        machine.receive(.request(read))
        #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == ["takeBudget(4096)"])
        #expect(machine.nextMessage(catalog: testCatalog) == nil, "nothing more is read while the budget is awaited")
        #expect(machine.shouldHoldReads)
        #expect(names(machine.budgetGranted()) == ["serve(1, -1)"])
        #expect(machine.heldBytes == 4096)
        #expect(names(machine.requestCompleted(read)) == ["reply(1)", "releaseWhenSent(4096)"])
        #expect(machine.heldBytes == 4096)
        #expect(names(machine.replySent(bytes: 4096)) == ["release(4096)"])
        #expect(machine.heldBytes == 0)
    }

    /// A WRITE's payload is read once its budget is granted, then it is served with it; a refused
    /// WRITE's payload is read past and only then refused.
    @Test func writePayloadsAreKeptOrReadPast() {
        var machine = transmitting()
        let write = NBDRequest(command: .write, handle: 2, offset: 0, length: 512)
        machine.receive(.request(write, payload: [UInt8](repeating: 7, count: 512)))
        #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == ["takeBudget(512)"])
        #expect(names(machine.budgetGranted()) == [])
        #expect(!machine.shouldHoldReads, "the payload of a taken request must come in")
        #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == ["serve(2, 512)"])
        #expect(names(machine.requestCompleted(write)) == ["reply(2)", "release(512)"])

        let tooFar = NBDRequest(command: .write, handle: 3, offset: 1 << 20, length: 512)
        machine.receive(.request(tooFar, payload: [UInt8](repeating: 1, count: 512)))
        #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == [])
        #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == ["refuse(3, ENOSPC)"])
        #expect(machine.heldBytes == 0)
    }

    /// Payload bytes held bound the connection: at `maximumInFlightBytes` nothing more is read until
    /// bytes come back.
    @Test func heldBytesBoundTheConnection() {
        var limits = NBDLimits()
        limits.maximumInFlightBytes = 10000
        var machine = transmitting(limits: limits)
        let first = NBDRequest(command: .read, handle: 1, offset: 0, length: 8192)
        let second = NBDRequest(command: .read, handle: 2, offset: 0, length: 8192)
        machine.receive(.request(first))
        machine.receive(.request(second))
        _ = machine.nextMessage(catalog: testCatalog)
        _ = machine.budgetGranted()
        #expect(!machine.shouldHoldReads)
        _ = machine.nextMessage(catalog: testCatalog)
        _ = machine.budgetGranted()
        #expect(machine.heldBytes == 16384)
        #expect(machine.shouldHoldReads)
        _ = machine.requestCompleted(first)
        _ = machine.replySent(bytes: 8192)
        #expect(!machine.shouldHoldReads)
    }

    /// Closing with a WRITE payload still to come gives its bytes back at once; a budget wait is left
    /// to the shell to cancel, and a grant that raced the close gives its bytes back too; requests
    /// completing afterwards get no reply, only their bytes back.
    @Test func closingGivesEverythingBack() {
        var machine = transmitting()
        let write = NBDRequest(command: .write, handle: 2, offset: 0, length: 512)
        machine.receive(.request(write))
        _ = machine.nextMessage(catalog: testCatalog)
        _ = machine.budgetGranted()
        #expect(names(machine.closed()) == ["release(512)"])
        #expect(machine.isClosed)

        var waiting = transmitting()
        let read = NBDRequest(command: .read, handle: 1, offset: 0, length: 4096)
        waiting.receive(.request(read))
        _ = waiting.nextMessage(catalog: testCatalog)
        #expect(names(waiting.closed()) == [])
        #expect(names(waiting.budgetGranted()) == ["release(4096)"])

        var serving = transmitting()
        serving.receive(.request(read))
        _ = serving.nextMessage(catalog: testCatalog)
        _ = serving.budgetGranted()
        _ = serving.closed()
        #expect(names(serving.requestCompleted(read)) == ["release(4096)"])
        #expect(serving.heldBytes == 0)
    }

    /// Draining answers new requests with ESHUTDOWN and says when the last one in flight completed;
    /// closing when idle closes then.
    @Test func drainingThenClosing() {
        var machine = transmitting()
        let flush = NBDRequest(command: .flush, handle: 5, offset: 0, length: 0)
        machine.receive(.request(flush))
        #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == ["serve(5, -1)"])
        #expect(names(machine.drain(closingWhenIdle: true)) == [])
        machine.receive(.request(NBDRequest(command: .flush, handle: 6, offset: 0, length: 0)))
        #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == ["refuse(6, ESHUTDOWN)"])
        #expect(names(machine.requestCompleted(flush)) == ["reply(5)", "drained", "closeAfterWrites"])
        #expect(machine.isClosed)
    }

    /// A client that half-closes after its requests disconnects once they are answered (a header cut
    /// short counts as nothing sent); one that stops in the middle of a WRITE payload is closed at once.
    @Test func inputEndingDisconnects() {
        var machine = transmitting()
        let flush = NBDRequest(command: .flush, handle: 5, offset: 0, length: 0)
        machine.receive(.request(flush))
        _ = machine.nextMessage(catalog: testCatalog)
        machine.inputEnded()
        #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == ["disconnecting"])
        #expect(names(machine.requestCompleted(flush)) == ["reply(5)", "closeAfterWrites"])

        var cut = transmitting()
        var half = ByteBuffer.request(flush)
        cut.receive(half.readSlice(length: 10)!)
        cut.inputEnded()
        #expect(names(cut.nextMessage(catalog: testCatalog) ?? []) == ["disconnecting", "closeAfterWrites"])

        var midWrite = transmitting()
        let write = NBDRequest(command: .write, handle: 2, offset: 0, length: 512)
        midWrite.receive(.request(write, payload: [UInt8](repeating: 7, count: 100)))
        _ = midWrite.nextMessage(catalog: testCatalog)
        _ = midWrite.budgetGranted()
        midWrite.inputEnded()
        #expect(names(midWrite.nextMessage(catalog: testCatalog) ?? []) == ["release(512)", "close"])
    }

    /// Bytes that break the protocol close the connection.
    @Test func garbageCloses() {
        var machine = transmitting()
        machine.receive(ByteBuffer(bytes: [UInt8](repeating: 0xEE, count: 28)))
        #expect(names(machine.nextMessage(catalog: testCatalog) ?? []) == ["close"])
        #expect(machine.nextMessage(catalog: testCatalog) == nil)
    }
}
