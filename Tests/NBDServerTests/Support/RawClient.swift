import NBDProtocol
import NIOCore
import NIOPosix

/// A client that speaks raw bytes: sends what it is given, closes its sending side, and collects
/// everything the server sends until the server closes the connection.
enum RawClient {
    private final class Collector: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        var received = ByteBuffer()
        let done: EventLoopPromise<ByteBuffer>

        init(done: EventLoopPromise<ByteBuffer>) { self.done = done }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var buffer = unwrapInboundIn(data)
            received.writeBuffer(&buffer)
        }

        func channelInactive(context: ChannelHandlerContext) {
            done.succeed(received)
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case ChannelEvent.inputClosed = event { context.close(promise: nil) }
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }
    }

    /// Sends `bytes` (then, if `halfClose`, end-of-file) and returns all the server sent before
    /// closing.
    static func exchange(_ bytes: ByteBuffer, socketPath: String, halfClose: Bool = true) async throws -> ByteBuffer {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let done = loop.makePromise(of: ByteBuffer.self)
        let channel = try await ClientBootstrap(group: loop)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Collector(done: done))
                }
            }
            .connect(unixDomainSocketPath: socketPath)
            .get()
        try? await channel.writeAndFlush(bytes).get()
        if halfClose { try? await channel.close(mode: .output).get() }
        return try await done.futureResult.get()
    }
}

extension ByteBuffer {
    /// Reads option replies until the buffer ends or something else starts.
    mutating func readOptionReplies() -> [(option: NBDOption, type: NBDOptionReplyType, data: ByteBuffer)] {
        var replies: [(option: NBDOption, type: NBDOptionReplyType, data: ByteBuffer)] = []
        while let (magic, option, type, length) = getMultipleIntegers(
            at: readerIndex, as: (UInt64, UInt32, UInt32, UInt32).self),
            magic == NBDMagic.optionReply, readableBytes >= 20 + Int(length)
        {
            moveReaderIndex(forwardBy: 20)
            replies.append(
                (NBDOption(rawValue: option), NBDOptionReplyType(rawValue: type), readSlice(length: Int(length))!))
        }
        return replies
    }
}
