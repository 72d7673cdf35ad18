// Framing of the control protocol: one JSON object per line, LF-terminated, UTF-8.
//
// Chosen over length prefixes because every language reads lines and parses JSON in its standard
// library, and a person can speak the protocol with `socat - UNIX-CONNECT:…`. JSON escapes newlines
// inside strings, so a LF always ends a message. Each direction has a named bound: a line longer than
// it is discarded up to its LF and reported as one `.oversized` frame, so a bad peer costs CPU, not
// memory, and the connection stays usable.

import NIOCore

public enum ControlProtocol {
    /// The protocol version this module speaks (docs/control-protocol.md).
    public static let version = 1
    /// Every version this module can speak, oldest first.
    public static let supportedVersions = [1]
    /// The longest line (without its LF) the daemon accepts from a client.
    public static let requestLineBytesMax = 64 * 1024
    /// The longest line (without its LF) a client accepts from the daemon; list results can be long.
    public static let responseLineBytesMax = 16 * 1024 * 1024
}

enum ControlFrame: Sendable, Hashable {
    case line(ByteBuffer)
    /// A line longer than the limit arrived (or is arriving) and is being discarded.
    case oversized
}

/// Splits a byte stream into lines, bounded by `lineBytesMax`.
struct LineFramer: Sendable {
    let lineBytesMax: Int
    private var discarding = false

    init(lineBytesMax: Int) {
        precondition(lineBytesMax > 0)
        self.lineBytesMax = lineBytesMax
    }

    /// The next complete frame in `buffer`, consuming it; nil when more bytes are needed.
    mutating func next(from buffer: inout ByteBuffer) -> ControlFrame? {
        while true {
            let newline = buffer.readableBytesView.firstIndex(of: UInt8(ascii: "\n"))
            if discarding {
                guard let newline else {
                    buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
                    return nil
                }
                buffer.moveReaderIndex(to: newline + 1)
                discarding = false
                continue
            }
            guard let newline else {
                guard buffer.readableBytes > lineBytesMax else { return nil }
                buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
                discarding = true
                return .oversized
            }
            let length = newline - buffer.readerIndex
            guard length <= lineBytesMax else {
                buffer.moveReaderIndex(to: newline + 1)
                return .oversized
            }
            var line = buffer.readSlice(length: length)!
            buffer.moveReaderIndex(forwardBy: 1)
            if line.readableBytesView.last == UInt8(ascii: "\r") { line.moveWriterIndex(to: line.writerIndex - 1) }
            return .line(line)
        }
    }
}

/// The one channel handler: bytes in, frames out. A partial line at end of stream is dropped.
struct ControlLineDecoder: ByteToMessageDecoder {
    typealias InboundOut = ControlFrame
    private var framer: LineFramer

    init(lineBytesMax: Int) { framer = LineFramer(lineBytesMax: lineBytesMax) }

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = framer.next(from: &buffer) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws
        -> DecodingState
    {
        while try decode(context: context, buffer: &buffer) == .continue {}
        buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
        return .needMoreData
    }
}
