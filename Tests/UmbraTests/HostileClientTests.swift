// Hostile clients against a real `umbra serve` over real sockets: malformed and adversarial bytes,
// floods, stalls, hang-ups. Before each attack the volume gets data and a snapshot, and both are
// checksummed through libnbd; after it a fresh client must be served and both checksums must be
// unchanged (no attack here completes a valid write). Limits are set small where an attack needs
// to reach one; waits are for the server's answer or close, never for time to pass.

import Foundation
import NBDProtocol
import NIOCore
import ShadowCopy
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

private let volumeBytes: UInt64 = 64 << 20
private let mib = 1 << 20

/// The live volume and a snapshot of it, with their checksums before the attack.
private struct Integrity {
    let snapshot: String
    let checksums: [String: Int]

    static func prepare(_ daemon: DaemonFixture) async throws -> Integrity {
        try daemon.connect("disk").pwrite([UInt8]((0..<mib).map { UInt8(truncatingIfNeeded: $0 &* 31) }), offset: 0)
        let control = try await daemon.control()
        let set = try await control.createSnapshotSet(CreateSetParams(volumes: ["disk"]))
        await control.close()
        // The live volume then differs from the snapshot. (A fresh client: with a short idle
        // timeout, one left waiting for the snapshot may be gone.)
        try daemon.connect("disk").pwrite([UInt8](repeating: 0x77, count: 65536), offset: UInt64(mib))
        let snapshot = try #require(set.snapshots.first?.export)
        return Integrity(
            snapshot: snapshot,
            checksums: ["disk": try checksum(daemon, "disk"), snapshot: try checksum(daemon, snapshot)]
        )
    }

    /// A fresh client is served, and the volume and snapshot are as before the attack.
    func verify(_ daemon: DaemonFixture, after attack: String) throws {
        for (export, before) in checksums {
            #expect(try Self.checksum(daemon, export) == before, "\(export) changed by \(attack)")
        }
    }

    /// SipHash of the export's bytes, read through a fresh libnbd client (stable within this process).
    static func checksum(_ daemon: DaemonFixture, _ export: String) throws -> Int {
        let client = try daemon.connect(export)
        var hasher = Hasher()
        let chunk = 8 * mib
        for offset in stride(from: 0, to: Int(try client.size()), by: chunk) {
            try client.pread(count: chunk, offset: UInt64(offset)).withUnsafeBytes { hasher.combine(bytes: $0) }
        }
        return hasher.finalize()
    }
}

/// Runs `attack` against a daemon serving a 64 MiB volume `disk`, then checks it is intact.
private func withAttack(
    _ name: String, arguments: [String] = [], _ attack: (DaemonFixture, Integrity) async throws -> Void
) async throws {
    try await DaemonFixture.with(volumes: ["disk:64M"], extraArguments: arguments) { daemon in
        let integrity = try await Integrity.prepare(daemon)
        try await attack(daemon, integrity)
        try integrity.verify(daemon, after: name)
    }
}

private func request(
    _ command: NBDCommand, offset: UInt64 = 0, length: UInt32 = 4096, flags: UInt16 = 0, handle: UInt64 = 1
) -> NBDRequest {
    NBDRequest(
        flags: NBDCommandFlags(rawValue: flags), command: command, handle: handle, offset: offset, length: length)
}

/// The 18-byte greeting's worth of client flags, then `GO` to `export`, then `requests`.
private func session(_ export: String, _ requests: [NBDRequest]) -> [UInt8] {
    var bytes = ByteBuffer()
    bytes.writeInteger(NBDClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
    var go = ByteBuffer.option(.go, .infoRequest(name: export))
    bytes.writeBuffer(&go)
    for request in requests { bytes.writeNBDRequest(request) }
    return Array(bytes.readableBytesView)
}

/// One option reply: its type; nil if the server closed.
private func receiveOptionReply(_ socket: RawNBDSocket) throws -> UInt32? {
    guard let header = try socket.receive(20) else { return nil }
    var buffer = ByteBuffer(bytes: header)
    guard let (magic, _, type, length) = buffer.readMultipleIntegers(as: (UInt64, UInt32, UInt32, UInt32).self),
        magic == NBDMagic.optionReply, try socket.receive(Int(length)) != nil
    else { return nil }
    return type
}

private func residentBytes(of pid: Int32, _ field: String = "VmRSS") throws -> Int {
    let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
    guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }),
        let kib = Int(line.split(separator: " ", omittingEmptySubsequences: true)[1])
    else { throw FixtureError("no \(field) in /proc/\(pid)/status") }
    return kib * 1024
}

private func raiseDescriptorLimit() {
    var limit = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    limit.rlim_cur = limit.rlim_max
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
}

// One daemon at a time: nine at once, each flooded, load a 2-core machine enough to upset other suites.
@Suite(.serialized) struct HostileClientTests {
    /// Wrong magics (client flags, option, request) end the connection; nothing else is disturbed.
    @Test func wrongMagics() async throws {
        try await withAttack("wrong magics") { daemon, _ in
            let flags = try RawNBDSocket(unixPath: daemon.nbdSocket)
            _ = try flags.receiveGreeting()
            flags.send([0xFF, 0xFF, 0xFF, 0xFF])
            #expect(try flags.receiveUntilClosed().isEmpty)

            let option = try RawNBDSocket(unixPath: daemon.nbdSocket)
            _ = try option.receiveGreeting()
            var bytes = session("disk", [])
            bytes[4] ^= 0xFF
            option.send(bytes)
            #expect(try option.receiveUntilClosed().isEmpty)

            let transmission = try RawNBDSocket(unixPath: daemon.nbdSocket)
            try transmission.negotiate(export: "disk")
            var header = ByteBuffer.request(request(.read))
            header.setInteger(UInt32(0xDEAD_BEEF), at: 0)
            transmission.send(header)
            #expect(try transmission.receiveUntilClosed().isEmpty)
        }
    }

    /// A session cut at every byte (then end-of-file) is closed by the server, and nothing after.
    @Test func truncatedAtEveryByte() async throws {
        try await withAttack("truncated sessions") { daemon, _ in
            let whole = session("disk", [request(.read, length: 512), request(.write, length: 512)])
            for cut in 0..<whole.count {
                let socket = try RawNBDSocket(unixPath: daemon.nbdSocket)
                _ = try socket.receiveGreeting()
                socket.send(Array(whole[..<cut]))
                socket.shutdownOutput()
                _ = try socket.receiveUntilClosed()
            }
        }
    }

    /// Lengths near 2^32, offsets near 2^64, offset+length overflow and ranges past the end: each is
    /// refused with an error and the session goes on; only what cannot even be read past ends it.
    @Test func hugeLengthsAndOffsets() async throws {
        try await withAttack("huge lengths and offsets") { daemon, _ in
            for length: UInt32 in [.max, .max - 1, 1 << 31, 64 << 20 + 1] {
                let socket = try RawNBDSocket(unixPath: daemon.nbdSocket)
                _ = try socket.receiveGreeting()
                var bytes = ByteBuffer()
                bytes.writeInteger(NBDClientFlags.fixedNewstyle.rawValue)
                bytes.writeMultipleIntegers(NBDMagic.option, NBDOption.go.rawValue, length)
                socket.send(bytes)
                #expect(try socket.receiveUntilClosed().isEmpty, "option of \(length) bytes")
            }

            let socket = try RawNBDSocket(unixPath: daemon.nbdSocket)
            try socket.negotiate(export: "disk")
            let end = volumeBytes
            let refused: [(NBDRequest, [UInt8])] = [
                (request(.read, length: .max), []),
                (request(.read, length: .max - 4095), []),
                (request(.read, length: 1 << 31), []),
                (request(.read, offset: .max - 511, length: 512), []),
                (request(.read, offset: 1 << 63), []),
                (request(.read, offset: .max - 4095, length: 8192), []),
                (request(.read, offset: end - 4096, length: 8192), []),
                (request(.read, offset: end), []),
                (request(.write, offset: end - 4096, length: 8192), [UInt8](repeating: 0xEE, count: 8192)),
                (request(.write, offset: .max - 4095, length: 8192), [UInt8](repeating: 0xEE, count: 8192)),
                (request(.trim, offset: end - 4096, length: 8192), []),
                (request(.writeZeroes, offset: .max - 4095, length: 8192), []),
                (request(.cache, offset: end, length: .max), []),
            ]
            for (request, payload) in refused {
                let reply = try #require(try socket.exchange(request, payload: payload), "closed on \(request)")
                #expect(reply.errno != 0, "\(request) was served")
            }
            #expect(try socket.exchange(request(.read, length: 4096))?.errno == 0)
            // A WRITE too big even to read past ends the session.
            socket.send(.request(request(.write, length: .max)))
            #expect(try socket.receiveUntilClosed().isEmpty)
        }
    }

    /// Unknown commands and flags are refused with an error (a WRITE's payload read past, not
    /// written) and the session goes on.
    @Test func unknownCommandsAndFlags() async throws {
        try await withAttack("unknown commands and flags") { daemon, _ in
            let socket = try RawNBDSocket(unixPath: daemon.nbdSocket)
            try socket.negotiate(export: "disk")
            let refused: [(NBDRequest, [UInt8])] = [
                (request(NBDCommand(rawValue: 8)), []),
                (request(NBDCommand(rawValue: 99)), []),
                (request(NBDCommand(rawValue: .max)), []),
                (request(.read, flags: 0x8000), []),
                (request(.read, flags: 0x0080), []),
                (request(.write, flags: 0x4000), [UInt8](repeating: 0xEE, count: 4096)),
                (request(.writeZeroes, flags: 0x0100), []),
                (request(.flush, length: 4096), []),
                (request(.blockStatus), []),
            ]
            for (request, payload) in refused {
                let reply = try #require(try socket.exchange(request, payload: payload), "closed on \(request)")
                #expect(reply.errno != 0, "\(request) was served")
            }
            #expect(try socket.exchange(request(.read, length: 4096))?.errno == 0)
        }
    }

    /// Thousands of options without GO, and options declaring big payloads, are each answered;
    /// the session can still go to transmission.
    @Test func optionFloods() async throws {
        try await withAttack("option floods") { daemon, _ in
            let socket = try RawNBDSocket(unixPath: daemon.nbdSocket)
            _ = try socket.receiveGreeting()
            socket.send([0, 0, 0, 3])
            let batch = 500
            for round in 0..<10 {
                var bytes = ByteBuffer()
                for index in 0..<batch {
                    var option = ByteBuffer.option(NBDOption(rawValue: 0x7F00_0000 + UInt32(round * batch + index)))
                    bytes.writeBuffer(&option)
                }
                socket.send(bytes)
                for _ in 0..<batch {
                    let type = try #require(try receiveOptionReply(socket), "closed in the flood")
                    #expect(type & 0x8000_0000 != 0)
                }
            }
            for length in [65 * 1024, 4 * mib, 40 * mib] {
                var option = ByteBuffer()
                option.writeMultipleIntegers(NBDMagic.option, NBDOption.go.rawValue, UInt32(length))
                socket.send(option)
                socket.send([UInt8](repeating: 0x41, count: length))
                let type = try #require(try receiveOptionReply(socket), "closed after \(length) bytes of option")
                #expect(type & 0x8000_0000 != 0)
            }
            socket.send(ByteBuffer.option(.go, .infoRequest(name: "disk")))
            while let type = try receiveOptionReply(socket), type != NBDOptionReplyType.ack.rawValue {
                #expect(type & 0x8000_0000 == 0)
            }
            #expect(try socket.exchange(request(.read, length: 4096))?.errno == 0)
        }
    }

    /// Thousands of idle connections: those over the per-client and overall limits are closed
    /// without a greeting; Unix-socket clients are exempt from the per-client limit; the daemon
    /// serves a fresh client once they are gone.
    @Test func thousandsOfIdleConnections() async throws {
        raiseDescriptorLimit()
        let arguments = [
            "--listen", "tcp://127.0.0.1:0", "--max-connections", "1500", "--max-connections-per-client", "1000",
        ]
        try await withAttack("idle connections", arguments: arguments) { daemon, _ in
            let tcp = try #require(daemon.readyLine.split(separator: " ").first { $0.hasPrefix("nbd=") })
            let port = try #require(tcp.split(separator: ",").last.flatMap { Int($0.split(separator: ":").last!) })
            var sockets: [RawNBDSocket] = []
            var greeted = 0
            for _ in 0..<1100 {
                let socket = try RawNBDSocket(host: "127.0.0.1", port: port)
                if try socket.receiveGreeting() != nil { greeted += 1 }
                sockets.append(socket)
            }
            #expect(greeted == 1000, "the per-client limit")
            let other = try RawNBDSocket(host: "127.0.0.1", port: port, source: "127.0.0.2")
            #expect(try other.receiveGreeting() != nil, "another address is not limited by the first")
            sockets.append(other)
            let unix = try daemon.connect("disk")
            greeted = 0
            for _ in 0..<600 {
                let socket = try RawNBDSocket(unixPath: daemon.nbdSocket)
                if try socket.receiveGreeting() != nil { greeted += 1 }
                sockets.append(socket)
            }
            // 1002 are open besides; up to three clients of the checksums may not be closed yet.
            #expect((1500 - 1002 - 3...1500 - 1002).contains(greeted), "the overall limit")
            #expect(throws: NBDClientError.self) { _ = try daemon.connect("disk") }
            // The connection admitted before the flood is still served.
            #expect(try unix.pread(count: 4096, offset: 0).count == 4096)
            for socket in sockets { socket.close() }
            // Their closes reach the server asynchronously; a fresh client is admitted once they have.
            var admitted = false
            for _ in 0..<10_000 where !admitted {
                admitted = (try? daemon.connect("disk")) != nil
            }
            #expect(admitted)
        }
    }

    /// Clients that pipeline big READs and never read the replies: the memory the daemon holds for
    /// them stays within the in-flight bounds, per connection and overall. With 32 MiB per
    /// connection and 96 MiB overall, each stalled client holds exactly one 32 MiB reply (its header
    /// reaching the client shows it is produced) and only three of five get one.
    @Test func clientsThatStopReading() async throws {
        // No reply timeout: this measures what stalled clients hold while they are still connected.
        let arguments = [
            "--max-inflight-bytes-per-connection", "32M", "--max-inflight-bytes", "96M", "--reply-timeout", "0",
        ]
        try await withAttack("clients that stop reading", arguments: arguments) { daemon, integrity in
            let pid = daemon.process.processIdentifier
            let baseline = try residentBytes(of: pid)
            let reads = (0..<20_000).flatMap { index in
                Array(
                    ByteBuffer.request(request(.read, offset: UInt64(index % 2) << 25, length: 32 << 20))
                        .readableBytesView)
            }
            func stall() throws -> RawNBDSocket {
                let socket = try RawNBDSocket(unixPath: daemon.nbdSocket, receiveBufferBytes: 64 * 1024)
                try socket.negotiate(export: integrity.snapshot)
                // Until the socket takes no more: the daemon has stopped reading this client.
                var sent = 0
                while sent < reads.count {
                    let count = socket.sendWithoutBlocking(Array(reads[sent...]))
                    if count == 0 { break }
                    sent += count
                }
                #expect(sent < reads.count, "the daemon kept reading a client that does not read")
                return socket
            }
            var clients = [try stall()]
            #expect(clients[0].isReadable(withinMilliseconds: 30_000))
            let one = try residentBytes(of: pid) - baseline
            for _ in 0..<4 { clients.append(try stall()) }
            var readable = 0
            for client in clients where readable < 3 {
                if client.isReadable(withinMilliseconds: 30_000) { readable += 1 }
            }
            let holding = clients.filter { $0.isReadable(withinMilliseconds: 0) }.count
            let five = try residentBytes(of: pid) - baseline
            let peak = try residentBytes(of: pid, "VmHWM") - baseline
            print(
                "clientsThatStopReading: RSS above baseline \(one / mib) MiB with one stalled client, "
                    + "\(five / mib) MiB with five (peak \(peak / mib) MiB); baseline \(baseline / mib) MiB")
            #expect(holding == 3, "the overall budget lets three of five clients hold a reply")
            let slack = 24 * mib
            #expect(one <= 32 * mib + slack)
            #expect(five <= 96 * mib + slack)
            for client in clients { client.reset() }
        }
    }

    /// A client that stops taking its replies is closed once they have not moved for the reply
    /// timeout, and the budget its READ data held goes back. Here the stalled client's one 32 MiB
    /// reply holds the whole server budget, so another client's READ is answered only after that.
    @Test(.timeLimit(.minutes(2))) func stalledRepliesTimeOut() async throws {
        let arguments = [
            "--max-inflight-bytes-per-connection", "32M", "--max-inflight-bytes", "32M", "--reply-timeout", "1",
        ]
        try await withAttack("a client that stopped taking replies", arguments: arguments) { daemon, integrity in
            let reads = (0..<64).flatMap { index in
                Array(
                    ByteBuffer.request(request(.read, offset: UInt64(index % 2) << 25, length: 32 << 20))
                        .readableBytesView)
            }
            let stalled = try RawNBDSocket(unixPath: daemon.nbdSocket, receiveBufferBytes: 64 * 1024)
            defer { stalled.reset() }
            try stalled.negotiate(export: integrity.snapshot)
            #expect(stalled.sendWithoutBlocking(reads) > 0)
            #expect(stalled.isReadable(withinMilliseconds: 30_000), "the stalled client's first reply is produced")
            let other = try daemon.connect(integrity.snapshot)
            let started = ContinuousClock.now
            let read = try await onOwnThread { try other.pread(count: 1 << 20, offset: 0) }
            #expect(read.count == 1 << 20)
            print("stalledRepliesTimeOut: another client's READ was answered \(ContinuousClock.now - started) later")

            // The same after DISC: the graceful close waits for the reply, and must not wait for ever.
            // Half the budget, so the DISC is read too; the other client then asks for all of it.
            var readThenDisconnect = ByteBuffer.request(request(.read, offset: 0, length: 16 << 20))
            var disconnect = ByteBuffer.request(request(.disconnect, length: 0, handle: 2))
            readThenDisconnect.writeBuffer(&disconnect)
            let leaving = try RawNBDSocket(unixPath: daemon.nbdSocket, receiveBufferBytes: 64 * 1024)
            defer { leaving.reset() }
            try leaving.negotiate(export: integrity.snapshot)
            #expect(leaving.sendWithoutBlocking(Array(readThenDisconnect.readableBytesView)) > 0)
            #expect(leaving.isReadable(withinMilliseconds: 30_000), "the leaving client's reply is produced")
            let again = try await onOwnThread { try other.pread(count: 32 << 20, offset: 0) }
            #expect(again.count == 32 << 20, "the bytes held by a client that sent DISC and reads nothing came back")
        }
    }

    /// Hang-ups in the middle of a WRITE payload (orderly and by reset) write nothing.
    @Test func disconnectsMidWrite() async throws {
        try await withAttack("disconnects mid-write") { daemon, _ in
            let write = Array(
                ByteBuffer.request(
                    request(.write, offset: 2 << 20, length: UInt32(mib)),
                    payload: [UInt8](repeating: 0x5A, count: mib)
                ).readableBytesView)
            for (index, cut) in [0, 1, 27, 28, 29, 28 + 4095, 28 + mib / 2, 28 + mib - 1].enumerated() {
                let socket = try RawNBDSocket(unixPath: daemon.nbdSocket)
                try socket.negotiate(export: "disk")
                // A READ in flight too (small enough that its unread reply does not stop the daemon
                // reading the payload).
                socket.send(ByteBuffer.request(request(.read, offset: 0, length: 65536)))
                #expect(socket.send(Array(write[..<cut])))
                if index % 2 == 0 { socket.reset() } else { socket.close() }
            }
        }
    }

    /// A client that does not reach transmission in the handshake timeout, and one that sends no
    /// request for the idle timeout, are closed by the server; a fresh client is served. (No
    /// integrity check around this one: its own libnbd connections could idle past the timeout on a
    /// loaded machine. The three sockets wait at once, so the test costs one timeout.)
    @Test func handshakeAndIdleTimeouts() async throws {
        let arguments = ["--handshake-timeout", "2", "--idle-timeout", "2"]
        try await DaemonFixture.with(volumes: ["disk:4M"], extraArguments: arguments) { daemon in
            let silent = try RawNBDSocket(unixPath: daemon.nbdSocket)
            #expect(try silent.receiveGreeting() != nil)

            let haggling = try RawNBDSocket(unixPath: daemon.nbdSocket)
            _ = try haggling.receiveGreeting()
            haggling.send(Array(session("disk", [])[..<10]))

            let idle = try RawNBDSocket(unixPath: daemon.nbdSocket)
            try idle.negotiate(export: "disk")
            #expect(try idle.exchange(request(.read, length: 4096))?.errno == 0)

            #expect(try silent.receiveUntilClosed().isEmpty)
            #expect(try haggling.receiveUntilClosed().isEmpty)
            #expect(try idle.receiveUntilClosed().isEmpty)

            let fresh = try daemon.connect("disk")
            #expect(try fresh.pread(count: 4096, offset: 0).count == 4096)
        }
    }
}
