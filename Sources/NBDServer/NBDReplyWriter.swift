import Logging
import NBDProtocol
import NIOCore

// Replies: how each outcome becomes bytes on the wire, and when they are flushed. Headers are
// accumulated into one outbound buffer that is written out before each payload and at flush time;
// payloads (read data, zeroes, file ranges) follow as their own buffers or file regions and are never
// copied into a header. Flushes happen when the connection says (after a read burst) or, for replies
// completed outside a read, once per event loop tick. One writer per connection, on its event loop.

final class NBDReplyWriter {
    /// The connection's pipeline position; nil once the handler is removed.
    var context: ChannelHandlerContext?
    /// Whether this session negotiated structured replies.
    var structuredReplies = false
    /// Whether read data may go out as file regions (`sendfile`): not once TLS wraps the connection,
    /// nor over a pipe.
    var sendsFileRegions = true
    private let buffers: NBDBufferPool
    /// Zero bytes to send for holes where the reply cannot say "hole".
    private let zeroes: ByteBuffer
    private let maximumExtentsPerReply: Int
    var logger: Logger
    private var outbound: ByteBuffer?
    private var needsFlush = false
    private var flushScheduled = false

    init(buffers: NBDBufferPool, zeroes: ByteBuffer, maximumExtentsPerReply: Int, logger: Logger) {
        self.buffers = buffers
        self.zeroes = zeroes
        self.maximumExtentsPerReply = maximumExtentsPerReply
        self.logger = logger
    }

    // MARK: - Replies

    func writeHandshake(_ messages: [NBDHandshakeMessage]) {
        for message in messages {
            appendHeader { $0.writeNBDHandshakeMessage(message) }
        }
    }

    func writeReply(to request: NBDRequest, _ outcome: NBDExportCall.Outcome) {
        switch outcome {
        case .done:
            appendHeader { $0.writeNBDSimpleReply(handle: request.handle, error: nil) }
        case .read(let result):
            writeRead(request, result)
        case .blockStatus(let chunks):
            writeBlockStatus(request, chunks)
        case .failed(let error):
            let errno = NBDError.errno(for: error, answering: request)
            if logger.logLevel <= .debug {
                logger.debug(
                    "NBD request failed",
                    metadata: ["nbd.request": "\(request)", "nbd.errno": "\(errno)", "nbd.error": "\(error)"]
                )
            }
            writeError(
                for: request, errno: errno, message: NBDError.message(for: error), offset: (error as? NBDError)?.offset)
        }
    }

    func writeError(
        for request: NBDRequest, errno: NBDErrno, message: @autoclosure () -> String, offset: UInt64?
    ) {
        guard structuredReplies else {
            appendHeader { $0.writeNBDSimpleReply(handle: request.handle, error: errno) }
            return
        }
        var errorOffset: UInt64?
        if let offset, request.command != .flush,
            offset >= request.offset, offset - request.offset < UInt64(request.length)
        {
            errorOffset = offset
        }
        let message = message()
        appendHeader {
            $0.writeNBDStructuredError(
                handle: request.handle, flags: .done, error: errno, message: message, offset: errorOffset)
        }
    }

    func writeRead(_ request: NBDRequest, _ result: NBDReadResult) {
        let structured = structuredReplies
        let handle = request.handle
        let length = Int(request.length)
        switch result {
        case .data(let data):
            guard data.readableBytes == length else { return writeBadReadLength(request, data.readableBytes) }
            if length == 0 {
                appendHeader {
                    if structured {
                        $0.writeNBDStructuredDone(handle: handle)
                    } else {
                        $0.writeNBDSimpleReply(handle: handle, error: nil)
                    }
                }
                return
            }
            appendHeader {
                if structured {
                    $0.writeNBDOffsetDataHeader(
                        handle: handle, flags: .done, offset: request.offset, dataLength: request.length)
                } else {
                    $0.writeNBDSimpleReply(handle: handle, error: nil)
                }
            }
            writeData(data)

        case .file(let file):
            guard Int(file.length) == length else {
                file.release?()
                return writeBadReadLength(request, Int(file.length))
            }
            writeUnfragmented(request, [.file(file)])

        case .zeroes:
            if structured && !request.flags.contains(.dontFragment) {
                appendHeader {
                    $0.writeNBDOffsetHole(handle: handle, flags: .done, offset: request.offset, length: request.length)
                }
            } else {
                writeUnfragmented(request, [.zeroes(length: request.length)])
            }

        case .segments(let segments):
            let total = segments.reduce(0) { $0 + $1.length }
            guard total == length else {
                for case .file(let file) in segments { file.release?() }
                return writeBadReadLength(request, total)
            }
            if !structured || request.flags.contains(.dontFragment) {
                return writeUnfragmented(request, segments)
            }
            var offset = request.offset
            for segment in segments where segment.length > 0 {
                let segmentLength = UInt32(segment.length)
                switch segment {
                case .data(let data):
                    appendHeader {
                        $0.writeNBDOffsetDataHeader(
                            handle: handle, flags: [], offset: offset, dataLength: segmentLength)
                    }
                    writeData(data)
                case .zeroes:
                    appendHeader {
                        $0.writeNBDOffsetHole(handle: handle, flags: [], offset: offset, length: segmentLength)
                    }
                case .file(let file):
                    appendHeader {
                        $0.writeNBDOffsetDataHeader(
                            handle: handle, flags: [], offset: offset, dataLength: segmentLength)
                    }
                    writeFile(file)
                }
                offset += UInt64(segmentLength)
            }
            appendHeader { $0.writeNBDStructuredDone(handle: handle) }
        }
    }

    /// A read reply with all its data in one piece: a simple reply, or one `OFFSET_DATA` chunk
    /// (for `DF`, or holes when the client cannot be told about holes).
    func writeUnfragmented(_ request: NBDRequest, _ segments: [NBDReadSegment]) {
        let structured = structuredReplies
        let hasFile = segments.contains { if case .file = $0 { true } else { false } }
        appendHeader {
            if structured {
                // Data sent from a file can still fail while being sent, so it cannot end the reply.
                let flags: NBDReplyFlags = hasFile ? [] : .done
                $0.writeNBDOffsetDataHeader(
                    handle: request.handle, flags: flags, offset: request.offset, dataLength: request.length)
            } else {
                $0.writeNBDSimpleReply(handle: request.handle, error: nil)
            }
        }
        for segment in segments {
            switch segment {
            case .data(let data): writeData(data)
            case .zeroes(let length): writeZeroes(Int(length))
            case .file(let file): writeFile(file)
            }
        }
        if structured && hasFile { appendHeader { $0.writeNBDStructuredDone(handle: request.handle) } }
    }

    func writeBadReadLength(_ request: NBDRequest, _ produced: Int) {
        logger.error("NBD export returned \(produced) bytes for a read of \(request.length)")
        writeError(for: request, errno: .eio, message: "the export returned a short read", offset: nil)
    }

    func writeBlockStatus(_ request: NBDRequest, _ chunks: [(NBDMetaContext, [NBDExtent])]) {
        let requestOne = request.flags.contains(.requestOne)
        let maximumCount = maximumExtentsPerReply
        for (index, (metaContext, extents)) in chunks.enumerated() {
            let normalized = NBDExtent.normalized(
                extents,
                length: request.length,
                requestOne: requestOne,
                maximumCount: maximumCount
            )
            let flags: NBDReplyFlags = index == chunks.count - 1 ? .done : []
            appendHeader {
                $0.writeNBDBlockStatus(
                    handle: request.handle, flags: flags, contextID: metaContext.id, extents: normalized)
            }
        }
    }

    static func rejectionMessage(_ errno: NBDErrno) -> String {
        switch errno {
        case .eperm: "the export is read-only"
        case .enospc: "the request reaches past the end of the export"
        case .eoverflow: "the read is too large to send unfragmented"
        case .enotsup: "the export cannot write zeroes fast"
        case .eshutdown: "the export is going away or the server is shutting down"
        default: "invalid request: unknown or unadvertised command or flag, bad range, alignment or length"
        }
    }

    // MARK: - Output

    /// Appends header bytes to the outbound buffer.
    func appendHeader(_ body: (inout ByteBuffer) -> Void) {
        guard let context else { return }
        if outbound == nil { outbound = context.channel.allocator.buffer(capacity: 512) }
        body(&outbound!)
        needsFlush = true
    }

    /// Writes pending header bytes, then `payload` as its own buffer.
    func writePayload(_ payload: IOData, promise: EventLoopPromise<Void>? = nil) {
        guard let context else { return }
        if let pending = outbound {
            outbound = nil
            context.write(NIOAny(IOData.byteBuffer(pending)), promise: nil)
        }
        context.write(NIOAny(payload), promise: promise)
        needsFlush = true
    }

    /// Writes read data; big buffers go back to the pool once the socket is done with them.
    func writeData(_ data: ByteBuffer) {
        guard data.capacity >= NBDBufferPool.minimumPooledBytes, let context else {
            return writePayload(.byteBuffer(data))
        }
        let promise = context.eventLoop.makePromise(of: Void.self)
        let buffers = self.buffers
        promise.futureResult.whenComplete { _ in buffers.recycle(data) }
        writePayload(.byteBuffer(data), promise: promise)
    }

    func writeZeroes(_ length: Int) {
        var remaining = length
        while remaining > 0 {
            let count = min(remaining, zeroes.readableBytes)
            writePayload(.byteBuffer(zeroes.getSlice(at: zeroes.readerIndex, length: count)!))
            remaining -= count
        }
    }

    /// Sends a file range with `sendfile`. NIO marks a file handle busy while sending from it, so
    /// each range gets its own transient handle on the export's descriptor, whose ownership is
    /// given back (without closing) once the send is over.
    func writeFile(_ file: NBDFileSegment) {
        guard let context else {
            file.release?()
            return
        }
        let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: file.descriptor)
        let start = Int(file.offset)
        let region = FileRegion(fileHandle: handle, readerIndex: start, endIndex: start + Int(file.length))
        let promise = context.eventLoop.makePromise(of: Void.self)
        promise.futureResult.whenComplete { _ in
            _ = try? handle.takeDescriptorOwnership()
            file.release?()
        }
        writePayload(.fileRegion(region), promise: promise)
    }

    func flushIfNeeded() {
        guard needsFlush, let context else { return }
        needsFlush = false
        if let pending = outbound {
            outbound = nil
            context.write(NIOAny(IOData.byteBuffer(pending)), promise: nil)
        }
        context.flush()
    }

    func scheduleFlush() {
        guard needsFlush, !flushScheduled, let context else { return }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute {
            self.flushScheduled = false
            self.flushIfNeeded()
        }
    }

    /// Writes everything pending and an empty buffer behind it, flushed; `promise` completes once the
    /// socket has taken it all (or failed).
    func writeEverything(promise: EventLoopPromise<Void>) {
        guard let context else { return promise.succeed() }
        if let pending = outbound {
            outbound = nil
            context.write(NIOAny(IOData.byteBuffer(pending)), promise: nil)
        }
        context.writeAndFlush(NIOAny(IOData.byteBuffer(ByteBuffer())), promise: promise)
        needsFlush = false
    }
}
