import NBDProtocol
import NIOCore
import Testing

private func bytes(_ write: (inout ByteBuffer) -> Void) -> [UInt8] {
    var buffer = ByteBuffer()
    write(&buffer)
    return Array(buffer.readableBytesView)
}

private func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.bigEndian) { Array($0) }
}

@Suite struct NBDCodecTests {
    /// The greeting is NBDMAGIC, IHAVEOPT and the 16-bit handshake flags.
    @Test func greeting() {
        #expect(
            bytes { $0.writeNBDHandshakeMessage(.greeting([.fixedNewstyle, .noZeroes])) } == Array(
                "NBDMAGICIHAVEOPT".utf8) + [0, 3])
    }

    /// The EXPORT_NAME reply is size, flags and optionally 124 zeroes.
    @Test func exportNameReply() {
        let short = bytes {
            $0.writeNBDHandshakeMessage(
                .exportNameReply(size: 1 << 30, flags: [.hasFlags, .readOnly], zeroPadding: false))
        }
        #expect(short == be(UInt64(1 << 30)) + [0, 3])
        let padded = bytes {
            $0.writeNBDHandshakeMessage(.exportNameReply(size: 1, flags: .hasFlags, zeroPadding: true))
        }
        #expect(padded.count == 10 + 124)
        #expect(padded.suffix(124).allSatisfy { $0 == 0 })
    }

    /// Option replies carry the reply magic, option, type, length and data as specified.
    @Test func optionReplies() {
        let header = { (option: UInt32, type: UInt32, length: UInt32) in
            be(NBDMagic.optionReply) + be(option) + be(type) + be(length)
        }
        #expect(bytes { $0.writeNBDOptionReply(.ack(.go)) } == header(7, 1, 0))
        #expect(
            bytes {
                $0.writeNBDOptionReply(
                    NBDOptionReply(option: .list, body: .server(.init(name: "ab", description: "d"))))
            }
                == header(3, 2, 7) + be(UInt32(2)) + Array("abd".utf8)
        )
        #expect(
            bytes {
                $0.writeNBDOptionReply(NBDOptionReply(option: .info, body: .info(.export(size: 5, flags: .hasFlags))))
            }
                == header(6, 3, 12) + be(UInt16(0)) + be(UInt64(5)) + be(UInt16(1))
        )
        #expect(
            bytes { $0.writeNBDOptionReply(NBDOptionReply(option: .go, body: .info(.name("n")))) }
                == header(7, 3, 3) + be(UInt16(1)) + Array("n".utf8)
        )
        #expect(
            bytes { $0.writeNBDOptionReply(NBDOptionReply(option: .go, body: .info(.description("dd")))) }
                == header(7, 3, 4) + be(UInt16(2)) + Array("dd".utf8)
        )
        let size = NBDBlockSize(minimum: 512, preferred: 4096, maximum: 1 << 25)
        #expect(
            bytes { $0.writeNBDOptionReply(NBDOptionReply(option: .go, body: .info(.blockSize(size)))) }
                == header(7, 3, 14) + be(UInt16(3)) + be(UInt32(512)) + be(UInt32(4096)) + be(UInt32(1 << 25))
        )
        #expect(
            bytes {
                $0.writeNBDOptionReply(
                    NBDOptionReply(option: .setMetaContext, body: .metaContext(.init(id: 9, name: "base:allocation"))))
            }
                == header(10, 4, 19) + be(UInt32(9)) + Array("base:allocation".utf8)
        )
        #expect(
            bytes { $0.writeNBDOptionReply(.error(.startTLS, .errPolicy, "no")) } == header(5, 0x8000_0002, 2)
                + Array("no".utf8))
    }

    /// Strings longer than 4096 bytes are cut at a character boundary when sent.
    @Test func longStringsAreCut() {
        let long = String(repeating: "é", count: 3000)  // 6000 bytes
        var buffer = ByteBuffer()
        buffer.writeNBDOptionReply(.error(.go, .errUnknown, long))
        #expect(buffer.readableBytes == ByteBuffer.nbdOptionReplyHeaderBytes + 4096)
    }

    /// Request headers round-trip; a bad magic throws; fewer than 28 bytes give nil.
    @Test func requestHeader() throws {
        let request = NBDRequest(
            flags: [.fua, .noHole], command: .writeZeroes, handle: 0xDEAD_BEEF, offset: 1 << 40, length: 77)
        var buffer = ByteBuffer()
        buffer.writeNBDRequest(request)
        #expect(buffer.readableBytes == NBDRequest.headerBytes)
        var short = buffer.getSlice(at: 0, length: 27)!
        #expect(try short.readNBDRequest() == nil)
        #expect(try buffer.readNBDRequest() == request)
        var bad = ByteBuffer(bytes: [0x25, 0x60, 0x95, 0x14] + [UInt8](repeating: 0, count: 24))
        #expect(throws: NBDProtocolError.self) { try bad.readNBDRequest() }
    }

    /// Simple and structured reply headers have the specified layout.
    @Test func replyHeaders() {
        #expect(
            bytes { $0.writeNBDSimpleReply(handle: 7, error: .eperm) } == be(NBDMagic.simpleReply) + be(UInt32(1))
                + be(UInt64(7)))
        let chunk = { (flags: UInt16, type: UInt16, length: UInt32) in
            be(NBDMagic.structuredReply) + be(flags) + be(type) + be(UInt64(7)) + be(length)
        }
        #expect(bytes { $0.writeNBDStructuredDone(handle: 7) } == chunk(1, 0, 0))
        #expect(
            bytes { $0.writeNBDOffsetDataHeader(handle: 7, flags: .done, offset: 4096, dataLength: 512) }
                == chunk(1, 1, 520) + be(UInt64(4096))
        )
        #expect(
            bytes { $0.writeNBDOffsetHole(handle: 7, flags: [], offset: 0, length: 9) } == chunk(0, 2, 12)
                + be(UInt64(0)) + be(UInt32(9))
        )
        #expect(
            bytes { $0.writeNBDStructuredError(handle: 7, flags: .done, error: .einval, message: "bad") }
                == chunk(1, 0x8001, 9) + be(UInt32(22)) + be(UInt16(3)) + Array("bad".utf8)
        )
        #expect(
            bytes { $0.writeNBDStructuredError(handle: 7, flags: .done, error: .eio, message: "", offset: 99) }
                == chunk(1, 0x8002, 14) + be(UInt32(5)) + be(UInt16(0)) + be(UInt64(99))
        )
        #expect(
            bytes {
                $0.writeNBDBlockStatus(handle: 7, flags: .done, contextID: 2, extents: [.init(length: 512, flags: 3)])
            }
                == chunk(1, 5, 12) + be(UInt32(2)) + be(UInt32(512)) + be(UInt32(3))
        )
    }

    /// Protocol strings must be UTF-8, without NUL, at most 4096 bytes.
    @Test func stringValidation() throws {
        var good = ByteBuffer(string: "héllo")
        #expect(try good.readNBDString(length: good.readableBytes, what: "s") == "héllo")
        for invalid in [[0x61, 0x00, 0x62], [0xC3, 0x28], [0xFF]] as [[UInt8]] {
            var buffer = ByteBuffer(bytes: invalid)
            #expect(throws: NBDProtocolError.self) { try buffer.readNBDString(length: invalid.count, what: "s") }
        }
        var long = ByteBuffer(repeating: 0x61, count: 4097)
        #expect(throws: NBDProtocolError.self) { try long.readNBDString(length: 4097, what: "s") }
    }

    /// Extents are clipped to the request, merged, bounded in number, and never empty.
    @Test func extentNormalization() {
        let extents = [
            NBDExtent(length: 100, flags: 1), .init(length: 0, flags: 2), .init(length: 50, flags: 1),
            .init(length: 900, flags: 3),
        ]
        #expect(
            NBDExtent.normalized(extents, length: 1000, requestOne: false, maximumCount: 10) == [
                .init(length: 150, flags: 1), .init(length: 850, flags: 3),
            ])
        #expect(
            NBDExtent.normalized(extents, length: 1000, requestOne: true, maximumCount: 10) == [
                .init(length: 150, flags: 1)
            ])
        #expect(
            NBDExtent.normalized(extents, length: 120, requestOne: false, maximumCount: 10) == [
                .init(length: 120, flags: 1)
            ])
        #expect(
            NBDExtent.normalized([], length: 64, requestOne: false, maximumCount: 10) == [.init(length: 64, flags: 0)])
        let many = (0..<100).map { NBDExtent(length: 1, flags: UInt32($0 % 2)) }
        #expect(NBDExtent.normalized(many, length: 100, requestOne: false, maximumCount: 8).count == 8)
    }

    /// Block size constraints are checked against the spec's rules.
    @Test func blockSizeValidation() {
        #expect(NBDBlockSize.default.violation(exportSize: 1 << 30) == nil)
        #expect(NBDBlockSize(minimum: 3, preferred: 4096, maximum: 1 << 20).violation(exportSize: 1 << 30) != nil)
        #expect(
            NBDBlockSize(minimum: 1 << 17, preferred: 1 << 17, maximum: 1 << 20).violation(exportSize: 1 << 30) != nil)
        #expect(NBDBlockSize(minimum: 512, preferred: 256, maximum: 1 << 20).violation(exportSize: 1 << 30) != nil)
        #expect(NBDBlockSize(minimum: 512, preferred: 4096, maximum: 1000).violation(exportSize: 1 << 30) != nil)
        #expect(NBDBlockSize(minimum: 512, preferred: 4096, maximum: 2048).violation(exportSize: 1 << 30) != nil)
        #expect(NBDBlockSize(minimum: 512, preferred: 4096, maximum: 2048).violation(exportSize: 2048) == nil)
        #expect(NBDBlockSize(minimum: 512, preferred: 4096, maximum: .max).violation(exportSize: 1 << 30) == nil)
        #expect(
            NBDBlockSize(minimum: 512, preferred: 4096, maximum: .max).capped(atMaximum: 1_000_000).maximum == 999_936)
    }
}
