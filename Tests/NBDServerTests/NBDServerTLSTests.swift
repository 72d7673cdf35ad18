import NBDProtocol
import NIOCore
import NIOPosix
import NIOSSL
import Testing
import UmbraTestSupport

@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

// Design note. STARTTLS is driven byte by byte by a NIO client that upgrades itself with NIOSSL
// (TLS-PSK, so no certificate files are needed; the interop test covers X.509 with real clients),
// which is what it takes to check what libnbd never does: options after the upgrade see nothing
// of what was negotiated before, a second STARTTLS is refused, and DISC ends TLS with close_notify.

private let pskIdentity = "client"
private let pskKey: [UInt8] = Array(0..<32)

private func tlsConfiguration(_ mode: NBDTLSMode) throws -> NBDServer.Configuration {
    var configuration = NBDServer.Configuration()
    // These tests step through handshakes; beside the crash simulation's threads on two cores a
    // step can wait seconds for the CPU, and the handshake timeout is not what they test.
    configuration.limits.handshakeTimeoutMilliseconds = 0
    configuration.tls = try NBDTLSConfiguration(
        mode: mode, certificateChain: [], privateKey: nil, preSharedKeys: [pskIdentity: pskKey])
    return configuration
}

/// Collects what the server sends; `receive(_:)` hands it out in pieces of a given size.
private final class Inbox: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private var buffer = ByteBuffer()
    private var waiter: (count: Int, promise: EventLoopPromise<ByteBuffer>)?
    private(set) var errors: [any Error] = []

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        buffer.writeBuffer(&bytes)
        deliver()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        errors.append(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        waiter?.promise.fail(ChannelError.eof)
        waiter = nil
        context.fireChannelInactive()
    }

    func receive(_ count: Int, on loop: any EventLoop) -> EventLoopFuture<ByteBuffer> {
        let promise = loop.makePromise(of: ByteBuffer.self)
        waiter = (count, promise)
        deliver()
        return promise.futureResult
    }

    private func deliver() {
        guard let waiter, buffer.readableBytes >= waiter.count else { return }
        self.waiter = nil
        waiter.promise.succeed(buffer.readSlice(length: waiter.count)!)
    }
}

/// An NBD client speaking raw bytes that can switch itself to TLS-PSK.
private struct StepClient: Sendable {
    let channel: any Channel
    private let inbox: NIOLoopBound<Inbox>

    static func connect(to socketPath: String) async throws -> StepClient {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let channel = try await ClientBootstrap(group: loop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Inbox()) }
            }
            .connect(unixDomainSocketPath: socketPath).get()
        let inbox = try await loop.submit {
            NIOLoopBound(try channel.pipeline.syncOperations.handler(type: Inbox.self), eventLoop: loop)
        }.get()
        return StepClient(channel: channel, inbox: inbox)
    }

    func send(_ bytes: ByteBuffer) async throws {
        try await channel.writeAndFlush(bytes).get()
    }

    func receive(_ count: Int) async throws -> ByteBuffer {
        try await channel.eventLoop.flatSubmit { [inbox, channel] in
            inbox.value.receive(count, on: channel.eventLoop)
        }.get()
    }

    /// Sends an option and returns its replies up to the final one (an ACK or an error).
    func option(_ option: NBDOption, _ payload: ByteBuffer = ByteBuffer()) async throws -> [NBDOptionReplyType] {
        try await send(.option(option, payload))
        return try await replies()
    }

    /// The replies to one option, up to the final one (an ACK or an error).
    func replies() async throws -> [NBDOptionReplyType] {
        var types: [NBDOptionReplyType] = []
        while true {
            var header = try await receive(20)
            let (_, _, rawType, length) = header.readMultipleIntegers(as: (UInt64, UInt32, UInt32, UInt32).self)!
            _ = try await receive(Int(length))
            let type = NBDOptionReplyType(rawValue: rawType)
            types.append(type)
            if type == .ack || type.isError { return types }
        }
    }

    func startTLS() async throws {
        var configuration = TLSConfiguration.makePreSharedKeyConfiguration()
        configuration.maximumTLSVersion = .tlsv12
        configuration.pskClientProvider = { _ in
            PSKClientIdentityResponse(key: NIOSSLSecureBytes(pskKey), identity: pskIdentity)
        }
        let context = try NIOSSLContext(configuration: configuration)
        try await channel.eventLoop.submit { [channel] in
            let handler = try NIOSSLClientHandler(context: context, serverHostname: nil)
            try channel.pipeline.syncOperations.addHandler(handler, position: .first)
        }.get()
    }

    /// Whether the server closes the connection within `limit` (if not, the client closes it).
    func closedByServer(within limit: TimeAmount) async throws -> Bool {
        let deadline = channel.eventLoop.scheduleTask(in: limit) { [channel] in channel.close(promise: nil) }
        try await channel.closeFuture.get()
        deadline.cancel()
        // The deadline's future succeeded if it ran, and failed if it was cancelled in time.
        return (try? await deadline.futureResult.get()) == nil
    }

    /// The errors the pipeline reported so far.
    var errors: [any Error] {
        get async throws { try await channel.eventLoop.submit { [inbox] in inbox.value.errors }.get() }
    }
}

@Suite struct NBDServerTLSTests {
    /// After STARTTLS the negotiation starts afresh (structured replies chosen in plain text are
    /// gone), a second STARTTLS is ERR_INVALID, the session works over TLS, and NBD_CMD_DISC ends
    /// TLS with close_notify (the client sees a clean TLS shutdown, not a bare end of file).
    @Test func startTLSUpgradesAndForgetsPlainTextNegotiation() async throws {
        try await ServerFixture.with([MemoryExport(name: "live")], configuration: tlsConfiguration(.optional)) {
            fixture in
            let client = try await StepClient.connect(to: fixture.socketPath)
            _ = try await client.receive(18)
            var flags = ByteBuffer()
            flags.writeInteger(UInt32(3))
            try await client.send(flags)
            #expect(try await client.option(.structuredReply) == [.ack])
            #expect(try await client.option(.startTLS) == [.ack])
            try await client.startTLS()

            let query = ByteBuffer.metaContextRequest(name: "live", queries: [])
            #expect(try await client.option(.listMetaContext, query) == [.errInvalid])
            #expect(try await client.option(.startTLS) == [.errInvalid])
            #expect(try await client.option(.structuredReply) == [.ack])
            #expect(try await client.option(.listMetaContext, query) == [.metaContext, .ack])
            #expect(try await client.option(.go, .infoRequest(name: "live")).last == .ack)

            try await client.send(
                .request(NBDRequest(command: .write, handle: 1, offset: 0, length: 3), payload: [7, 8, 9]))
            var reply = try await client.receive(16)
            #expect(reply.readInteger(as: UInt32.self) == NBDMagic.simpleReply)
            #expect(reply.readInteger(as: UInt32.self) == 0)
            try await client.send(.request(NBDRequest(command: .disconnect, handle: 2, offset: 0, length: 0)))
            try await client.channel.closeFuture.get()
            let errors = try await client.errors
            #expect(errors.isEmpty, "the client saw \(errors)")
        }
    }

    /// FORCEDTLS: options before STARTTLS get ERR_TLS_REQD, and a client that sends more right
    /// behind STARTTLS (instead of waiting for the ACK and starting TLS) is disconnected at once.
    @Test func requiredTLSRefusesPlainTextAndEagerClients() async throws {
        try await ServerFixture.with([MemoryExport(name: "live")], configuration: tlsConfiguration(.required)) {
            fixture in
            let client = try await StepClient.connect(to: fixture.socketPath)
            var bytes = ByteBuffer()
            bytes.writeInteger(UInt32(3))
            for option in [ByteBuffer.option(.list), .option(.go, .infoRequest(name: "live")), .option(.startTLS)] {
                bytes.writeImmutableBuffer(option)
            }
            // The start of another option, where the TLS ClientHello should come after the ACK.
            bytes.writeInteger(NBDMagic.option)
            try await client.send(bytes)
            _ = try await client.receive(18)
            #expect(try await client.replies() == [.errTLSRequired])
            #expect(try await client.replies() == [.errTLSRequired])
            #expect(try await client.replies() == [.ack])
            #expect(try await client.closedByServer(within: .seconds(10)))
        }
    }

    /// With a wrong pre-shared key the TLS handshake fails and the server closes the connection.
    @Test func wrongPreSharedKeyIsRefused() async throws {
        var configuration = ServerFixture.defaultConfiguration
        configuration.tls = try NBDTLSConfiguration(
            mode: .required, certificateChain: [], privateKey: nil, preSharedKeys: [pskIdentity: [1, 2, 3]])
        try await ServerFixture.with([MemoryExport(name: "live")], configuration: configuration) { fixture in
            let client = try await StepClient.connect(to: fixture.socketPath)
            _ = try await client.receive(18)
            var flags = ByteBuffer()
            flags.writeInteger(UInt32(3))
            try await client.send(flags)
            #expect(try await client.option(.startTLS) == [.ack])
            try await client.startTLS()
            try? await client.send(.option(.list))
            try await client.channel.closeFuture.get()
            #expect(try await client.errors.contains { $0 is NIOSSLError || $0 is BoringSSLError })
        }
    }

    /// Access rules: an export the client may not use is neither listed nor openable, also as the
    /// default export; read-only access makes writes fail with EPERM at the server.
    @Test func accessPolicyHidesAndLimitsExports() async throws {
        var configuration = ServerFixture.defaultConfiguration
        configuration.accessPolicy = { client, export in
            #expect(client == .unauthenticated)
            return export == "other" ? .readOnly : .none
        }
        try await ServerFixture.with(
            [MemoryExport(name: "live"), MemoryExport(name: "other")], configuration: configuration
        ) { fixture in
            let lister = try await fixture.negotiatingClient()
            #expect(try await blocking { try lister.optList() }.map(\.name) == ["other"])
            for name in ["live", ""] {
                #expect(
                    await clientErrno {
                        try lister.setExportName(name)
                        try lister.optInfo()
                    } != nil, "\(name)")
            }
            #expect(
                await clientErrno {
                    try lister.setExportName("live")
                    _ = try lister.optListMetaContext()
                } != nil)
            try await blocking { try lister.optAbort() }

            let client = try await fixture.connect("other", strict: false)
            #expect(try client.isReadOnly)
            #expect(await clientErrno { try client.pwrite([1], offset: 0) } == EPERM)
            #expect(try await blocking { try client.pread(count: 1, offset: 0) } == [0])
        }
    }
}
