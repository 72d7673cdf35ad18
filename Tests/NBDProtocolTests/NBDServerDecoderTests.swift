import NBDProtocol
import NIOCore
import Testing
import UmbraTestSupport

/// A client session as raw bytes: flags, two options, GO, then requests including kept and
/// refused writes and a zero-length write.
private func sessionBytes() -> ByteBuffer {
    var bytes = ByteBuffer()
    bytes.writeInteger(UInt32(3))
    bytes.writeImmutableBuffer(.option(.structuredReply))
    bytes.writeImmutableBuffer(.option(NBDOption(rawValue: 99), ByteBuffer(bytes: [1, 2, 3, 4, 5])))
    bytes.writeImmutableBuffer(.option(.go, .infoRequest(name: "live", infos: [.blockSize])))
    bytes.writeImmutableBuffer(.request(NBDRequest(command: .read, handle: 1, offset: 0, length: 4096)))
    bytes.writeImmutableBuffer(
        .request(NBDRequest(command: .write, handle: 2, offset: 8, length: 5), payload: [9, 8, 7, 6, 5]))
    bytes.writeImmutableBuffer(
        .request(NBDRequest(command: .write, handle: 3, offset: 0, length: 3), payload: [1, 1, 1]))
    bytes.writeImmutableBuffer(.request(NBDRequest(command: .write, handle: 4, offset: 0, length: 0)))
    bytes.writeImmutableBuffer(.request(NBDRequest(flags: .fua, command: .flush, handle: 5, offset: 0, length: 0)))
    return bytes
}

private let expectedMessages: [NBDServerDecoder.Message] = [
    .clientFlags(3),
    .option(.structuredReply, payload: ByteBuffer()),
    .option(NBDOption(rawValue: 99), payload: ByteBuffer(bytes: [1, 2, 3, 4, 5])),
    .option(.go, payload: .infoRequest(name: "live", infos: [.blockSize])),
    .request(NBDRequest(command: .read, handle: 1, offset: 0, length: 4096)),
    .request(NBDRequest(command: .write, handle: 2, offset: 8, length: 5)),
    .writePayload(NBDWritePayload(ByteBuffer(bytes: [9, 8, 7, 6, 5]))),
    .request(NBDRequest(command: .write, handle: 3, offset: 0, length: 3)),
    .discardedWritePayload(length: 3),
    .request(NBDRequest(command: .write, handle: 4, offset: 0, length: 0)),
    .writePayload(NBDWritePayload(ByteBuffer())),
    .request(NBDRequest(flags: .fua, command: .flush, handle: 5, offset: 0, length: 0)),
]

/// Feeds `chunks` through a decoder the way the server drives it (transmission after GO, the
/// write with handle 3 refused) and returns every message.
private func decode(
    _ chunks: [ByteBuffer],
    limits: NBDLimits = NBDLimits()
) throws(NBDProtocolError) -> [NBDServerDecoder.Message] {
    var decoder = NBDServerDecoder(limits: limits, allocator: ByteBufferAllocator())
    var messages: [NBDServerDecoder.Message] = []
    for chunk in chunks {
        decoder.receive(chunk)
        while let message = try decoder.next() {
            messages.append(message)
            switch message {
            case .option(.go, _): decoder.startTransmission()
            case .request(let request) where request.command == .write:
                if request.handle == 3 {
                    decoder.discardWritePayload()
                } else {
                    decoder.keepWritePayload(request.handle == 2 ? .inPlace : .copy(into: ByteBuffer()))
                }
            default: break
            }
        }
    }
    #expect(decoder.queuedBytes == 0)
    return messages
}

private func split(_ buffer: ByteBuffer, at cuts: [Int]) -> [ByteBuffer] {
    var chunks: [ByteBuffer] = []
    var start = 0
    for cut in cuts.sorted() + [buffer.readableBytes] where cut > start {
        chunks.append(buffer.getSlice(at: buffer.readerIndex + start, length: cut - start)!)
        start = cut
    }
    return chunks
}

@Suite struct NBDServerDecoderTests {
    /// The whole session in one buffer decodes to the expected messages.
    @Test func decodesASessionFedAllAtOnce() throws {
        #expect(try decode([sessionBytes()]) == expectedMessages)
    }

    /// The same session fed one byte at a time decodes identically.
    @Test func decodesASessionFedByteAtATime() throws {
        let bytes = sessionBytes()
        #expect(try decode(split(bytes, at: Array(1..<bytes.readableBytes))) == expectedMessages)
    }

    /// The same session in 200 seeded random splittings decodes identically.
    @Test func decodesASessionInRandomSplits() throws {
        let bytes = sessionBytes()
        var random = SeededRandom(seed: 0x5EED_0001)
        for _ in 0..<200 {
            let cuts = (0..<Int.random(in: 1...12, using: &random)).map { _ in
                Int.random(in: 1..<bytes.readableBytes, using: &random)
            }
            #expect(try decode(split(bytes, at: cuts)) == expectedMessages, "seed \(random.seed) cuts \(cuts)")
        }
    }

    /// A kept WRITE payload lands in the buffer the caller provided, whatever the splitting.
    @Test func writePayloadGoesIntoTheCallersBuffer() throws {
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt32(1))
        bytes.writeImmutableBuffer(.option(.go, .infoRequest(name: "x")))
        bytes.writeImmutableBuffer(
            .request(NBDRequest(command: .write, handle: 1, offset: 0, length: 4), payload: [1, 2, 3, 4]))
        for cut in 1..<bytes.readableBytes {
            var decoder = NBDServerDecoder(limits: NBDLimits(), allocator: ByteBufferAllocator())
            var destination = ByteBufferAllocator().buffer(capacity: 64)
            destination.writeString("x")
            destination.moveReaderIndex(forwardBy: 1)
            var payload: ByteBuffer?
            for chunk in split(bytes, at: [cut]) {
                decoder.receive(chunk)
                while let message = try decoder.next() {
                    switch message {
                    case .option: decoder.startTransmission()
                    case .request: decoder.keepWritePayload(.copy(into: destination))
                    case .writePayload(let buffer): payload = buffer.contiguous()
                    default: break
                    }
                }
            }
            #expect(payload.map { Array($0.readableBytesView) } == [1, 2, 3, 4])
            #expect(payload?.capacity == 64)
        }
    }

    /// A payload kept in place arrives as slices of the received buffers, without a copy.
    @Test func inPlacePayloadSlicesTheReceivedBuffers() throws {
        var header = ByteBuffer()
        header.writeInteger(UInt32(1))
        header.writeImmutableBuffer(.option(.go, .infoRequest(name: "x")))
        header.writeImmutableBuffer(.request(NBDRequest(command: .write, handle: 1, offset: 0, length: 6)))
        header.writeBytes([1, 2])
        let second = ByteBuffer(bytes: [3, 4, 5, 6, 0x25])
        var decoder = NBDServerDecoder(limits: NBDLimits(), allocator: ByteBufferAllocator())
        decoder.receive(header)
        _ = try decoder.next()
        _ = try decoder.next()
        decoder.startTransmission()
        _ = try decoder.next()
        decoder.keepWritePayload(.inPlace)
        #expect(try decoder.next() == nil)
        decoder.receive(second)
        guard case .writePayload(let payload) = try decoder.next() else {
            Issue.record("no payload")
            return
        }
        #expect(payload.buffers.map { Array($0.readableBytesView) } == [[1, 2], [3, 4, 5, 6]])
        let shared = payload.buffers[1].withUnsafeReadableBytes { piece in
            second.withUnsafeReadableBytes { piece.baseAddress == $0.baseAddress }
        }
        #expect(shared)
        #expect(decoder.queuedBytes == 1)
    }

    /// A bad option magic is a protocol violation, after which the decoder yields nothing.
    @Test func badOptionMagicIsFatal() throws {
        var decoder = NBDServerDecoder(limits: NBDLimits(), allocator: ByteBufferAllocator())
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt32(1))
        bytes.writeMultipleIntegers(UInt64(0x1234), NBDOption.list.rawValue, UInt32(0))
        decoder.receive(bytes)
        #expect(try decoder.next() == .clientFlags(1))
        #expect(throws: NBDProtocolError.self) { try decoder.next() }
        decoder.receive(.option(.list))
        #expect(try decoder.next() == nil)
    }

    /// A bad request magic is a protocol violation.
    @Test func badRequestMagicIsFatal() throws {
        var decoder = NBDServerDecoder(limits: NBDLimits(), allocator: ByteBufferAllocator())
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt32(1))
        bytes.writeImmutableBuffer(.option(.go, .infoRequest(name: "x")))
        bytes.writeMultipleIntegers(UInt32(0x2560_9514), UInt16(0), UInt16(0), UInt64(1), UInt64(0), UInt32(0))
        decoder.receive(bytes)
        _ = try decoder.next()
        _ = try decoder.next()
        decoder.startTransmission()
        let error = #expect(throws: NBDProtocolError.self) { try decoder.next() }
        #expect(error?.code == .badRequestMagic)
    }

    /// An option payload over the buffering limit is read past, not stored, then reported.
    @Test func oversizedOptionIsDiscarded() throws {
        var limits = NBDLimits()
        limits.maximumOptionPayloadBytes = 16
        var payload = ByteBuffer()
        payload.writeRepeatingByte(7, count: 1000)
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt32(1))
        bytes.writeImmutableBuffer(.option(.list, payload))
        bytes.writeImmutableBuffer(.option(.abort))
        let chunks = split(bytes, at: Array(stride(from: 3, to: bytes.readableBytes, by: 97)))
        var decoder = NBDServerDecoder(limits: limits, allocator: ByteBufferAllocator())
        var messages: [NBDServerDecoder.Message] = []
        for chunk in chunks {
            decoder.receive(chunk)
            while let message = try decoder.next() { messages.append(message) }
            #expect(decoder.queuedBytes < 100)
        }
        #expect(
            messages == [
                .clientFlags(1), .oversizedOption(.list, length: 1000), .option(.abort, payload: ByteBuffer()),
            ])
    }

    /// An option longer than anything worth reading past ends the session at its header.
    @Test func hugeOptionIsFatal() throws {
        var decoder = NBDServerDecoder(limits: NBDLimits(), allocator: ByteBufferAllocator())
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt32(1))
        bytes.writeMultipleIntegers(NBDMagic.option, NBDOption.list.rawValue, UInt32.max)
        decoder.receive(bytes)
        _ = try decoder.next()
        let error = #expect(throws: NBDProtocolError.self) { try decoder.next() }
        #expect(error?.code == .payloadTooLarge)
    }

    /// A refused write with a huge payload is read past in pieces without buffering it.
    @Test func discardedWritePayloadIsNotBuffered() throws {
        var decoder = NBDServerDecoder(limits: NBDLimits(), allocator: ByteBufferAllocator())
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt32(1))
        bytes.writeImmutableBuffer(.option(.go, .infoRequest(name: "x")))
        bytes.writeImmutableBuffer(.request(NBDRequest(command: .write, handle: 1, offset: 0, length: 1 << 20)))
        decoder.receive(bytes)
        _ = try decoder.next()
        _ = try decoder.next()
        decoder.startTransmission()
        _ = try decoder.next()
        decoder.discardWritePayload()
        var chunk = ByteBuffer()
        chunk.writeRepeatingByte(0, count: 64 * 1024)
        for _ in 0..<16 {
            decoder.receive(chunk)
            let message = try decoder.next()
            #expect(decoder.queuedBytes == 0)
            if message != nil { #expect(message == .discardedWritePayload(length: 1 << 20)) }
        }
    }
}
