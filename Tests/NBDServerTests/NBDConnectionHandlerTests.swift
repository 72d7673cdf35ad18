import Logging
import NBDProtocol
import NIOCore
import NIOEmbedded
import Testing
import UmbraTestSupport

@testable import NBDServer

/// A connection handler on an `EmbeddedChannel` serving in-memory exports (which complete
/// synchronously, so everything happens inside `writeInbound`).
private struct HandlerHarness {
    let channel: EmbeddedChannel

    init(exports: [MemoryExport], limits: NBDLimits = NBDLimits()) throws {
        let registry = NBDExportRegistry()
        for export in exports { try registry.add(export) }
        channel = EmbeddedChannel()
        var zeroes = ByteBuffer()
        zeroes.writeRepeatingByte(0, count: 4096)
        var logger = Logger(label: "nbd-handler-test")
        logger.logLevel = .critical
        let environment = NBDConnectionHandler.Environment(
            registry: registry,
            limits: limits,
            tls: nil,
            accessPolicy: nil,
            zeroes: zeroes
        )
        let handler = NBDConnectionHandler(
            environment: environment,
            executor: EventLoopTaskExecutor(eventLoop: channel.embeddedEventLoop),
            buffers: NBDBufferPool(),
            allocator: channel.allocator,
            logger: logger
        )
        handler.connection = NBDConnection(id: 1, channel: channel, handler: handler)
        try channel.pipeline.syncOperations.addHandler(handler)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
    }

    /// Feeds `chunks` and returns everything written back.
    func exchange(_ chunks: [ByteBuffer]) throws -> ByteBuffer {
        var output = ByteBuffer()
        for chunk in chunks {
            try channel.writeInbound(chunk)
            channel.embeddedEventLoop.run()
            while let data = try channel.readOutbound(as: IOData.self) {
                guard case .byteBuffer(var buffer) = data else {
                    Issue.record("unexpected file region")
                    continue
                }
                output.writeBuffer(&buffer)
            }
        }
        return output
    }
}

private func session(structured: Bool) -> ByteBuffer {
    var bytes = ByteBuffer()
    bytes.writeInteger(UInt32(3))
    if structured { bytes.writeImmutableBuffer(.option(.structuredReply)) }
    bytes.writeImmutableBuffer(.option(NBDOption(rawValue: 42), ByteBuffer(string: "?")))
    bytes.writeImmutableBuffer(.option(.go, .infoRequest(name: "live")))
    bytes.writeImmutableBuffer(
        .request(NBDRequest(command: .write, handle: 1, offset: 4096, length: 4), payload: [1, 2, 3, 4]))
    bytes.writeImmutableBuffer(.request(NBDRequest(command: .read, handle: 2, offset: 4094, length: 8)))
    bytes.writeImmutableBuffer(.request(NBDRequest(command: .read, handle: 3, offset: 1 << 20, length: 8)))
    bytes.writeImmutableBuffer(.request(NBDRequest(command: .read, handle: 4, offset: 0, length: 16)))
    bytes.writeImmutableBuffer(.request(NBDRequest(command: .flush, handle: 5, offset: 0, length: 0)))
    return bytes
}

@Suite struct NBDConnectionHandlerTests {
    /// A whole session produces the same bytes whether fed at once, byte by byte, or in random splits.
    @Test func outputIndependentOfSplitting() throws {
        for structured in [true, false] {
            let bytes = session(structured: structured)
            let whole = try HandlerHarness(exports: [MemoryExport(name: "live")]).exchange([bytes])
            let single = (0..<bytes.readableBytes).map { bytes.getSlice(at: $0, length: 1)! }
            #expect(try HandlerHarness(exports: [MemoryExport(name: "live")]).exchange(single) == whole)
            var random = SeededRandom(seed: 99)
            for _ in 0..<20 {
                var chunks: [ByteBuffer] = []
                var start = 0
                while start < bytes.readableBytes {
                    let length = min(bytes.readableBytes - start, Int.random(in: 1...40, using: &random))
                    chunks.append(bytes.getSlice(at: start, length: length)!)
                    start += length
                }
                #expect(try HandlerHarness(exports: [MemoryExport(name: "live")]).exchange(chunks) == whole)
            }
        }
    }

    /// Structured replies: data chunk, hole chunks, error chunk, simple reply for flush.
    @Test func structuredSessionReplies() throws {
        var output = try HandlerHarness(exports: [MemoryExport(name: "live")]).exchange([session(structured: true)])
        #expect(output.readSlice(length: 18) != nil)
        #expect(output.readOptionReplies().map(\.type) == [.ack, .errUnsupported, .info, .info, .ack])
        #expect(output.readSimpleReply() == SimpleReply(handle: 1, error: 0))
        // Read at 4094 for 8: a 2-byte hole then 6 bytes (4 written + 2 zero) of data, then NONE.
        #expect(output.readChunk()?.type == .offsetHole)
        let data = output.readChunk()
        #expect(data?.type == .offsetData)
        #expect(data.map { Array($0.payload.readableBytesView.dropFirst(8)) } == [1, 2, 3, 4, 0, 0])
        let done = output.readChunk()
        #expect(done?.type == NBDStructuredReplyType.none && done?.flags == .done)
        let error = output.readChunk()
        #expect(error?.type == .error)
        #expect(error?.handle == 3)
        #expect(error?.payload.getInteger(at: error!.payload.readerIndex, as: UInt32.self) == NBDErrno.einval.rawValue)
        let hole = output.readChunk()
        #expect(hole?.type == .offsetHole && hole?.flags == .done && hole?.handle == 4)
        #expect(output.readSimpleReply() == SimpleReply(handle: 5, error: 0))
        #expect(output.readableBytes == 0)
    }

    /// Simple replies: read data follows the header; an error carries no data.
    @Test func simpleSessionReplies() throws {
        var output = try HandlerHarness(exports: [MemoryExport(name: "live")]).exchange([session(structured: false)])
        #expect(output.readSlice(length: 18) != nil)
        #expect(output.readOptionReplies().map(\.type) == [.errUnsupported, .info, .info, .ack])
        #expect(output.readSimpleReply() == SimpleReply(handle: 1, error: 0))
        #expect(output.readSimpleReply() == SimpleReply(handle: 2, error: 0))
        #expect(output.readBytes(length: 8) == [0, 0, 1, 2, 3, 4, 0, 0])
        #expect(output.readSimpleReply() == SimpleReply(handle: 3, error: NBDErrno.einval.rawValue))
        #expect(output.readSimpleReply() == SimpleReply(handle: 4, error: 0))
        #expect(output.readBytes(length: 16) == [UInt8](repeating: 0, count: 16))
        #expect(output.readSimpleReply() == SimpleReply(handle: 5, error: 0))
        #expect(output.readableBytes == 0)
    }

    /// Unknown client flags close the connection after the greeting.
    @Test func unknownClientFlagsClose() throws {
        let harness = try HandlerHarness(exports: [MemoryExport(name: "live")])
        let output = try harness.exchange([ByteBuffer(bytes: [0, 0, 0, 8])])
        #expect(output.readableBytes == 18)
        #expect(!harness.channel.isActive)
    }
}

struct SimpleReply: Equatable {
    var handle: UInt64
    var error: UInt32
}

struct Chunk: Equatable {
    var flags: NBDReplyFlags
    var type: NBDStructuredReplyType
    var handle: UInt64
    var payload: ByteBuffer
}

extension ByteBuffer {
    mutating func readSimpleReply() -> SimpleReply? {
        guard let (magic, error, handle) = readMultipleIntegers(as: (UInt32, UInt32, UInt64).self),
            magic == NBDMagic.simpleReply
        else { return nil }
        return SimpleReply(handle: handle, error: error)
    }

    mutating func readChunk() -> Chunk? {
        guard
            let (magic, flags, type, handle, length) = readMultipleIntegers(
                as: (UInt32, UInt16, UInt16, UInt64, UInt32).self),
            magic == NBDMagic.structuredReply, let payload = readSlice(length: Int(length))
        else { return nil }
        return Chunk(
            flags: NBDReplyFlags(rawValue: flags), type: NBDStructuredReplyType(rawValue: type), handle: handle,
            payload: payload)
    }
}
