import NBDProtocol
import NIOCore
import Testing
import UmbraTestSupport

@testable import NBDServer

/// A well-formed session: flags, structured replies, GO, a few requests, DISC.
private func validSession() -> ByteBuffer {
    var bytes = ByteBuffer()
    bytes.writeInteger(UInt32(3))
    bytes.writeMultipleIntegers(NBDMagic.option, NBDOption.structuredReply.rawValue, UInt32(0))
    var go = ByteBuffer()
    go.writeInteger(UInt32(4))
    go.writeString("live")
    go.writeInteger(UInt16(0))
    bytes.writeMultipleIntegers(NBDMagic.option, NBDOption.go.rawValue, UInt32(go.readableBytes))
    bytes.writeImmutableBuffer(go)
    bytes.writeNBDRequest(NBDRequest(command: .write, handle: 1, offset: 0, length: 8))
    bytes.writeBytes([1, 2, 3, 4, 5, 6, 7, 8])
    bytes.writeNBDRequest(NBDRequest(command: .read, handle: 2, offset: 0, length: 8))
    bytes.writeNBDRequest(NBDRequest(flags: .fua, command: .flush, handle: 3, offset: 0, length: 0))
    bytes.writeNBDRequest(NBDRequest(command: .disconnect, handle: 4, offset: 0, length: 0))
    return bytes
}

/// The server still serves a normal client.
private func expectServerHealthy(_ fixture: ServerFixture) async throws {
    let client = try await fixture.connect("live")
    try await blocking { () throws in
        try client.pwrite([42], offset: 100)
        #expect(try client.pread(count: 1, offset: 100) == [42])
    }
}

@Suite struct NBDServerHostileInputTests {
    /// Pure garbage is met with a closed connection, never a crash.
    @Test func garbageClosesTheConnection() async throws {
        try await ServerFixture.with([MemoryExport(name: "live")]) { fixture in
            var random = SeededRandom(seed: 7)
            for length in [1, 4, 20, 100, 5000] {
                var bytes = [UInt8](repeating: 0, count: length)
                bytes.withUnsafeMutableBytes { random.fill($0) }
                _ = try await RawClient.exchange(ByteBuffer(bytes: bytes), socketPath: fixture.socketPath)
            }
            try await expectServerHealthy(fixture)
        }
    }

    /// A handshake cut anywhere (the client hangs up) is handled.
    @Test func truncatedHandshakes() async throws {
        try await ServerFixture.with([MemoryExport(name: "live")]) { fixture in
            let session = validSession()
            for cut in [0, 2, 4, 10, 20, 30, 40, 50, 60, 70, 80, 90] where cut < session.readableBytes {
                _ = try await RawClient.exchange(session.getSlice(at: 0, length: cut)!, socketPath: fixture.socketPath)
            }
            try await expectServerHealthy(fixture)
        }
    }

    /// Giant lengths: an option of 4 GiB and a WRITE of 4 GiB end the session without allocating;
    /// a READ of 2 GiB is refused with EINVAL and the session goes on.
    @Test func giantLengths() async throws {
        try await ServerFixture.with([MemoryExport(name: "live")]) { fixture in
            var option = ByteBuffer()
            option.writeInteger(UInt32(3))
            option.writeMultipleIntegers(NBDMagic.option, NBDOption.go.rawValue, UInt32.max)
            var reply = try await RawClient.exchange(option, socketPath: fixture.socketPath, halfClose: false)
            #expect(reply.readableBytes == 18)

            var session = validSession()
            session.moveWriterIndex(to: session.writerIndex - 4 * 28 - 8)
            session.writeNBDRequest(NBDRequest(command: .read, handle: 9, offset: 0, length: 1 << 31))
            session.writeNBDRequest(NBDRequest(command: .write, handle: 10, offset: 0, length: .max))
            reply = try await RawClient.exchange(session, socketPath: fixture.socketPath, halfClose: false)
            try #require(reply.readSlice(length: 18) != nil)
            #expect(reply.readOptionReplies().last?.type == .ack)
            // The oversized READ gets a structured EINVAL error chunk, then the WRITE ends it all.
            #expect(reply.readInteger(as: UInt32.self) == NBDMagic.structuredReply)
            #expect(reply.readInteger(as: UInt16.self) == NBDReplyFlags.done.rawValue)
            #expect(reply.readInteger(as: UInt16.self) == NBDStructuredReplyType.error.rawValue)
            #expect(reply.readInteger(as: UInt64.self) == 9)
            #expect(reply.readInteger(as: UInt32.self) != nil)  // length
            #expect(reply.readInteger(as: UInt32.self) == NBDErrno.einval.rawValue)
            try await expectServerHealthy(fixture)
        }
    }

    /// Hundreds of seeded mutations of a valid session (flipped bytes, cut, duplicated pieces)
    /// never crash the server or disturb a connection in use meanwhile.
    @Test func mutatedSessions() async throws {
        let export = MemoryExport(name: "live")
        try await ServerFixture.with([export]) { fixture in
            let bystander = try await fixture.connect("live")
            let session = Array(validSession().readableBytesView)
            var random = SeededRandom(seed: 0xBAD_5EED)
            for round in 0..<300 {
                var bytes = session
                switch round % 3 {
                case 0:
                    for _ in 0..<Int.random(in: 1...4, using: &random) {
                        bytes[Int.random(in: 0..<bytes.count, using: &random)] = UInt8.random(
                            in: 0...255, using: &random)
                    }
                case 1:
                    bytes = Array(bytes.prefix(Int.random(in: 0..<bytes.count, using: &random)))
                default:
                    let start = Int.random(in: 0..<bytes.count, using: &random)
                    let piece = bytes[start..<min(bytes.count, start + Int.random(in: 1...40, using: &random))]
                    bytes.insert(contentsOf: piece, at: Int.random(in: 0..<bytes.count, using: &random))
                }
                _ = try await RawClient.exchange(ByteBuffer(bytes: bytes), socketPath: fixture.socketPath)
                if round % 50 == 0 {
                    #expect(await clientErrno { _ = try bystander.pread(count: 8, offset: 0) } == nil, "round \(round)")
                }
            }
            try await expectServerHealthy(fixture)
        }
    }

    /// A client that hangs up while a request is in flight and a WRITE payload is half sent
    /// does not upset the server.
    @Test func hangUpWithRequestsInFlight() async throws {
        let export = MemoryExport(name: "live")
        let gate = export.gateReads(at: 0)
        try await ServerFixture.with([export]) { fixture in
            var session = validSession()
            session.moveWriterIndex(to: session.writerIndex - 4 * 28 - 8)
            session.writeNBDRequest(NBDRequest(command: .read, handle: 2, offset: 0, length: 8))
            session.writeNBDRequest(NBDRequest(command: .write, handle: 3, offset: 0, length: 4096))
            session.writeBytes([1, 2, 3])
            async let exchanged = RawClient.exchange(session, socketPath: fixture.socketPath)
            await gate.waitUntilReached()
            gate.open()
            _ = try await exchanged
            try await expectServerHealthy(fixture)
        }
    }
}
