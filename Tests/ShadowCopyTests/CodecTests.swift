// Framing and envelope codecs: lines split the same whether bytes come all at once, one at a time or
// in random pieces; oversized lines are dropped without losing the next; messages parse and encode as
// the protocol page says.

import Foundation
import NIOCore
import Testing
import UmbraTestSupport

@testable import ShadowCopy

private func frames(_ input: [UInt8], pieces: [Int], limit: Int) -> [ControlFrame] {
    var framer = LineFramer(lineBytesMax: limit)
    var buffer = ByteBuffer()
    var output: [ControlFrame] = []
    var offset = 0
    for size in pieces + [input.count] where offset < input.count {
        let end = min(input.count, offset + size)
        buffer.writeBytes(input[offset..<end])
        offset = end
        while let frame = framer.next(from: &buffer) { output.append(frame) }
        buffer.discardReadBytes()
    }
    return output
}

private func text(_ frame: ControlFrame) -> String? {
    guard case .line(let line) = frame else { return nil }
    return String(buffer: line)
}

@Suite struct FramingTests {
    static let input = Array(
        "{\"a\":1}\n\r\n{\"b\":2}\r\n\(String(repeating: "z", count: 40))\n{\"c\":3}\ntrailing".utf8)
    static let expected: [String?] = ["{\"a\":1}", "", "{\"b\":2}", nil, "{\"c\":3}"]

    /// All at once, byte at a time, and in seeded random pieces give the same frames; the too-long line
    /// becomes one `.oversized` and the partial last line waits.
    @Test func splittingDoesNotMatter() {
        let all = frames(Self.input, pieces: [Self.input.count], limit: 32)
        #expect(all.map(text) == Self.expected)
        #expect(all[3] == .oversized)
        #expect(
            frames(Self.input, pieces: Array(repeating: 1, count: Self.input.count), limit: 32).map(text)
                == Self.expected)
        var random = SeededRandom(seed: 7)
        for _ in 0..<50 {
            let pieces = (0..<Self.input.count).map { _ in Int.random(in: 1...9, using: &random) }
            #expect(frames(Self.input, pieces: pieces, limit: 32).map(text) == Self.expected)
        }
    }

    /// A line with no newline that outgrows the limit is reported at once and discarded as it streams
    /// in, without buffering it; the line after it is intact.
    @Test func endlessLineIsDiscardedAsItArrives() {
        var framer = LineFramer(lineBytesMax: 16)
        var buffer = ByteBuffer(string: String(repeating: "x", count: 20))
        #expect(framer.next(from: &buffer) == .oversized)
        #expect(buffer.readableBytes == 0)
        buffer.writeString(String(repeating: "y", count: 1000))
        #expect(framer.next(from: &buffer) == nil)
        #expect(buffer.readableBytes == 0)
        buffer.writeString("yy\n{\"ok\":true}\n")
        #expect(framer.next(from: &buffer).map(text) == "{\"ok\":true}")
    }

    /// A line of exactly the limit is accepted; one byte more is not.
    @Test func limitIsInclusive() {
        var framer = LineFramer(lineBytesMax: 4)
        var buffer = ByteBuffer(string: "abcd\nabcde\n")
        #expect(framer.next(from: &buffer).map(text) == "abcd")
        #expect(framer.next(from: &buffer) == .oversized)
        #expect(framer.next(from: &buffer) == nil)
    }
}

@Suite struct EnvelopeTests {
    /// Requests, results and errors are told apart; ids may be numbers or strings.
    @Test func parsesEachShape() throws {
        let request = try IncomingMessage.parse(ByteBuffer(string: #"{"id":"x","method":"ping"}"#)).get()
        #expect(request.id == .string("x"))
        #expect(request.kind == .request(method: "ping"))
        let result = try IncomingMessage.parse(ByteBuffer(string: #"{"id":7,"result":{}}"#)).get()
        #expect(result.kind == .result)
        let error = try IncomingMessage.parse(ByteBuffer(string: #"{"id":7,"error":{"code":"veto"}}"#)).get()
        #expect(error.kind == .error(ShadowCopyError(ControlErrorCode(rawValue: "veto"), "")))
    }

    /// Lines that are not messages get `bad-message`, with the id when it could be read.
    @Test func rejectsNonMessages() {
        for line in ["", "null", "42", "{", #"{"id":1}"#, #"{"id":true,"method":"x"}"#, "\u{FF}"] {
            guard case .failure(let reply) = IncomingMessage.parse(ByteBuffer(string: line)) else {
                Issue.record("'\(line)' parsed")
                continue
            }
            #expect(reply.error.code == .badMessage)
        }
        guard case .failure(let reply) = IncomingMessage.parse(ByteBuffer(string: #"{"id":1}"#)) else { return }
        #expect(reply.id == .number(1))
    }

    /// Absent params decode as `{}` with defaults; wrong types say which field.
    @Test func paramsDecodeWithDefaultsAndClearErrors() throws {
        let bare = try IncomingMessage.parse(
            ByteBuffer(string: #"{"id":1,"method":"snapshot.create","params":{"volumes":["a"]}}"#)
        ).get()
        #expect(try bare.params(CreateSetParams.self) == CreateSetParams(volumes: ["a"]))
        let none = try IncomingMessage.parse(ByteBuffer(string: #"{"id":1,"method":"snapshot.list"}"#)).get()
        #expect(try none.params(ListSnapshotsParams.self) == ListSnapshotsParams())
        let wrong = try IncomingMessage.parse(ByteBuffer(string: #"{"id":1,"method":"x","params":{"volumes":[1]}}"#))
            .get()
        #expect(throws: ShadowCopyError.self) { try wrong.params(CreateSetParams.self) }
        let big = try IncomingMessage.parse(
            ByteBuffer(string: #"{"id":1,"method":"x","params":{"name":"v","size":109951162777600}}"#)
        ).get()
        #expect(try big.params(CreateVolumeParams.self).size == 100 << 40)
    }

    /// GUIDs are written lowercase and read in either case; absent optional GUIDs are left out.
    @Test func guidsAreLowercase() throws {
        let id = UUID(uuidString: "ABCDEF01-2345-6789-ABCD-EF0123456789")!
        let line = String(buffer: ControlEncoding.result(id: .number(1), ChangesParams(volume: "v", since: id)))
        #expect(line == #"{"id":1,"result":{"since":"abcdef01-2345-6789-abcd-ef0123456789","volume":"v"}}"# + "\n")
        let upper = try IncomingMessage.parse(
            ByteBuffer(
                string:
                    #"{"id":1,"method":"x","params":{"volume":"v","since":"ABCDEF01-2345-6789-ABCD-EF0123456789","until":"abcdef01-2345-6789-abcd-ef0123456789"}}"#
            )
        ).get()
        let params = try upper.params(ChangesParams.self)
        #expect(params.since == id && params.until == id)
    }

    /// An error answer to an unreadable line carries `"id":null`; a veto has code, failure and message.
    @Test func errorsEncodeAsThePageSays() {
        let unreadable = String(
            buffer: ControlEncoding.error(ErrorReply(id: nil, error: ShadowCopyError(.badMessage, "Bad."))))
        #expect(unreadable == #"{"error":{"code":"bad-message","message":"Bad."},"id":null}"# + "\n")
        let veto = String(buffer: ControlEncoding.veto(id: .number(3), failure: .nonRetryable, message: "no"))
        #expect(veto == #"{"error":{"code":"veto","failure":"non-retryable","message":"no"},"id":3}"# + "\n")
    }

    /// Identify metadata of any JSON shape survives the trip.
    @Test func metadataRoundTrips() throws {
        let metadata = JSONValue.object([
            "components": .array([.string("main"), .number(2), .bool(true), .null]),
            "nested": .object(["a": .number(1.5)]),
        ])
        let data = try ControlJSON.makeEncoder().encode(IdentifyResult(metadata: metadata))
        #expect(try ControlJSON.makeDecoder().decode(IdentifyResult.self, from: data).metadata == metadata)
    }
}
