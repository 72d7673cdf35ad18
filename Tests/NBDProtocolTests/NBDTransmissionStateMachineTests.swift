import NBDProtocol
import Testing

private func session(_ export: NBDExportDescription, structured: Bool = true, contexts: [String] = ["base:allocation"])
    -> NBDSession
{
    NBDSession(
        export: export,
        transmissionFlags: export.transmissionFlags(structuredReplies: structured),
        structuredReplies: structured,
        metaContexts: structured
            ? contexts.enumerated().map { NBDMetaContext(id: UInt32($0.offset + 1), name: $0.element) } : []
    )
}

private func errno(
    _ command: NBDCommand,
    _ flags: NBDCommandFlags = [],
    offset: UInt64 = 0,
    length: UInt32 = 4096,
    in session: NBDSession = session(liveExport)
) -> NBDErrno? {
    NBDTransmissionStateMachine(session: session, limits: NBDLimits())
        .validate(NBDRequest(flags: flags, command: command, handle: 1, offset: offset, length: length))
}

@Suite struct NBDTransmissionStateMachineTests {
    /// Valid requests of every command pass validation.
    @Test func validRequestsPass() {
        #expect(errno(.read) == nil)
        #expect(errno(.read, [.fua, .dontFragment]) == nil)
        #expect(errno(.write, .fua, offset: (1 << 20) - 4096) == nil)
        #expect(errno(.flush, length: 0) == nil)
        #expect(errno(.trim, .fua, length: 1 << 20) == nil)
        #expect(errno(.cache) == nil)
        #expect(errno(.writeZeroes, [.noHole, .fua]) == nil)
        #expect(errno(.writeZeroes, .fastZero, length: 1 << 20) == nil)
        #expect(errno(.blockStatus, .requestOne, length: 1 << 20) == nil)
        #expect(errno(.read, length: 0) == nil)
    }

    /// Unknown commands, unknown flags and flags not documented for a command are EINVAL.
    @Test func unknownCommandsAndFlagsAreInvalid() {
        #expect(errno(NBDCommand(rawValue: 8)) == .einval)
        #expect(errno(NBDCommand(rawValue: 0xFFFF)) == .einval)
        #expect(errno(.read, NBDCommandFlags(rawValue: 1 << 5)) == .einval)
        #expect(errno(.read, .noHole) == .einval)
        #expect(errno(.read, .requestOne) == .einval)
        #expect(errno(.write, .dontFragment) == .einval)
        #expect(errno(.trim, .fastZero) == .einval)
        #expect(errno(.blockStatus, .dontFragment) == .einval)
    }

    /// Writes past the end are ENOSPC; reads, trims, caches and block status past the end are EINVAL.
    @Test func rangeChecks() {
        let end: UInt64 = 1 << 20
        #expect(errno(.write, offset: end - 4095) == .enospc)
        #expect(errno(.writeZeroes, offset: end) == .enospc)
        #expect(errno(.read, offset: end - 1) == .einval)
        #expect(errno(.trim, offset: end) == .einval)
        #expect(errno(.cache, offset: end) == .einval)
        #expect(errno(.blockStatus, offset: end) == .einval)
        #expect(errno(.read, offset: .max) == .einval)
        #expect(errno(.write, offset: .max - 10) == .enospc)
    }

    /// Lengths above the maximum block size: EINVAL, EOVERFLOW for DF reads, allowed for the commands
    /// without a payload (trim, block status, write zeroes).
    @Test func sizeChecks() {
        let big: UInt32 = (1 << 16) + 1
        #expect(errno(.read, length: big) == .einval)
        #expect(errno(.read, .dontFragment, length: big) == .eoverflow)
        #expect(errno(.write, length: big) == .einval)
        #expect(errno(.cache, length: big) == .einval)
        #expect(errno(.writeZeroes, length: big) == nil)
        #expect(errno(.writeZeroes, .fastZero, length: big) == nil)
        #expect(errno(.trim, length: big) == nil)
        #expect(errno(.blockStatus, length: big) == nil)
        #expect(errno(.blockStatus, length: 0) == .einval)
    }

    /// FLUSH must have zero offset and length.
    @Test func flushTakesNoRange() {
        #expect(errno(.flush, offset: 512, length: 0) == .einval)
        #expect(errno(.flush, offset: 0, length: 512) == .einval)
    }

    /// Writes, trims and zeroes on a read-only export are EPERM; the write-side flags were never advertised.
    @Test func readOnlyExportRefusesWrites() {
        let readOnly = session(snapshotExport)
        #expect(errno(.write, in: readOnly) == .eperm)
        #expect(errno(.trim, in: readOnly) == .eperm)
        #expect(errno(.writeZeroes, in: readOnly) == .eperm)
        #expect(errno(.read, .fua, in: readOnly) == .einval)
        #expect(errno(.read, in: readOnly) == nil)
        #expect(errno(.flush, length: 0, in: readOnly) == nil)
    }

    /// Requests not aligned to the minimum block size are EINVAL.
    @Test func alignmentChecks() {
        let readOnly = session(snapshotExport)
        #expect(errno(.read, offset: 256, length: 512, in: readOnly) == .einval)
        #expect(errno(.read, offset: 512, length: 100, in: readOnly) == .einval)
        #expect(errno(.read, offset: 512, length: 512, in: readOnly) == nil)
    }

    /// Without structured replies DF is not advertised and BLOCK_STATUS is not available.
    @Test func simpleRepliesSession() {
        let simple = session(liveExport, structured: false)
        #expect(errno(.read, .dontFragment, in: simple) == .einval)
        #expect(errno(.blockStatus, in: simple) == .einval)
        #expect(errno(.blockStatus, in: session(liveExport, contexts: [])) == .einval)
    }

    /// FAST_ZERO on an export that cannot zero fast is ENOTSUP, and only that is.
    @Test func fastZeroUnsupported() {
        var slow = liveExport
        slow.supportsFastZero = false
        #expect(errno(.writeZeroes, .fastZero, in: session(slow)) == .enotsup)
        #expect(errno(.writeZeroes, in: session(slow)) == nil)
    }

    /// Serving counts requests in flight; at the bound no more are accepted until one completes.
    @Test func inFlightBound() {
        var limits = NBDLimits()
        limits.maximumInFlightRequests = 2
        var machine = NBDTransmissionStateMachine(session: session(liveExport), limits: limits)
        let read = NBDRequest(command: .read, handle: 1, offset: 0, length: 4096)
        #expect(machine.receivedRequest(read) == .serve(read))
        #expect(machine.canAcceptRequest)
        #expect(machine.receivedRequest(read) == .serve(read))
        #expect(!machine.canAcceptRequest)
        #expect(machine.requestCompleted(read) == .none)
        #expect(machine.canAcceptRequest)
    }

    /// DISC closes at once when idle, else after the last request in flight is answered.
    @Test func disconnectWaitsForInFlight() {
        var machine = NBDTransmissionStateMachine(session: session(liveExport), limits: NBDLimits())
        let disc = NBDRequest(command: .disconnect, handle: 9, offset: 0, length: 0)
        var idle = machine
        #expect(idle.receivedRequest(disc) == .disconnect(closeNow: true))
        let read = NBDRequest(command: .read, handle: 1, offset: 0, length: 4096)
        _ = machine.receivedRequest(read)
        #expect(machine.receivedRequest(disc) == .disconnect(closeNow: false))
        #expect(!machine.canAcceptRequest)
        #expect(machine.requestCompleted(read) == .close)
    }

    /// Draining answers everything new with ESHUTDOWN and reports when the last request completes.
    @Test func drainingRefusesWithESHUTDOWN() {
        var machine = NBDTransmissionStateMachine(session: session(liveExport), limits: NBDLimits())
        let read = NBDRequest(command: .read, handle: 1, offset: 0, length: 4096)
        _ = machine.receivedRequest(read)
        #expect(machine.beginDraining() == .none)
        let write = NBDRequest(command: .write, handle: 2, offset: 0, length: 4096)
        #expect(machine.receivedRequest(write) == .reject(write, .eshutdown))
        #expect(machine.receivedRequest(read) == .reject(read, .eshutdown))
        #expect(machine.requestCompleted(read) == .drained)
        var idle = NBDTransmissionStateMachine(session: session(liveExport), limits: NBDLimits())
        #expect(idle.beginDraining() == .drained)
    }

    /// A refused WRITE too large to read past ends the session; a smaller one is refused normally.
    @Test func hugeRefusedWriteCloses() {
        var machine = NBDTransmissionStateMachine(session: session(liveExport), limits: NBDLimits())
        let huge = NBDRequest(command: .write, handle: 1, offset: 0, length: UInt32.max)
        guard case .close = machine.receivedRequest(huge) else {
            Issue.record("expected close")
            return
        }
        let large = NBDRequest(command: .write, handle: 1, offset: 0, length: 1 << 20)
        #expect(machine.receivedRequest(large) == .reject(large, .einval))
    }
}
