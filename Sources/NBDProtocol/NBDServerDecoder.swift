import NIOCore

// Design note. The decoder cuts the client's byte stream into messages without ever allocating
// from an unchecked length. Received buffers are queued as they arrive (no cumulation copy); a
// header that straddles two buffers is gathered into a fresh buffer of its fixed size; an option
// payload that lies inside one received buffer is handed on as a slice of it (no copy), one that
// spans several is copied once into a buffer of exactly its length, allocated only after the
// length passed its bound. A WRITE payload is neither kept nor skipped until the caller has
// validated the request header and said which. A kept payload is either copied into a buffer the
// caller provides (for small ones: a slow write then holds only its own bytes, not the receive
// buffer they came in) or kept in place as slices of the receive buffers it spans (for big ones:
// no copy at all); a refused one is read past without being stored.

/// Splits what a client sends into handshake and transmission messages.
public struct NBDServerDecoder {
    public enum Message: Hashable, Sendable {
        /// The 32-bit client flags that follow the greeting.
        case clientFlags(UInt32)
        /// An option and its payload (at most `maximumOptionPayloadBytes`).
        case option(NBDOption, payload: ByteBuffer)
        /// An option whose payload exceeded `maximumOptionPayloadBytes` and has been read past.
        case oversizedOption(NBDOption, length: UInt32)
        /// A request header. For a WRITE, call `keepWritePayload(_:)` or `discardWritePayload()` next.
        case request(NBDRequest)
        /// The payload of the last WRITE, kept.
        case writePayload(NBDWritePayload)
        /// The payload of the last WRITE, read past.
        case discardedWritePayload(length: Int)
    }

    private enum PayloadKind {
        case option(NBDOption)
        case write
    }

    private enum State {
        case clientFlags
        case optionHeader
        case requestHeader
        /// A WRITE header was returned; the caller has not said yet what to do with its payload.
        case awaitingWritePayloadDecision(length: Int)
        case optionPayload(NBDOption, length: Int)
        /// An option payload spanning several received buffers being gathered.
        case gatheringOption(NBDOption, ByteBuffer, remaining: Int)
        /// A WRITE payload being copied into the caller's buffer.
        case copyingWrite(ByteBuffer, remaining: Int)
        /// A WRITE payload being kept as slices of the receive buffers.
        case slicingWrite([ByteBuffer], remaining: Int)
        case discarding(PayloadKind, length: Int, remaining: Int)
        case failed
    }

    private let limits: NBDLimits
    private let allocator: ByteBufferAllocator
    private var state: State = .clientFlags
    private var queue = CircularBuffer<ByteBuffer>(initialCapacity: 4)

    /// Bytes received and not yet returned as (part of) a message.
    public private(set) var queuedBytes = 0

    public init(limits: NBDLimits, allocator: ByteBufferAllocator) {
        self.limits = limits
        self.allocator = allocator
    }

    /// Queues bytes received from the client.
    public mutating func receive(_ buffer: ByteBuffer) {
        guard buffer.readableBytes > 0 else { return }
        queuedBytes += buffer.readableBytes
        queue.append(buffer)
    }

    /// Switches from option haggling to transmission requests (after GO or EXPORT_NAME).
    public mutating func startTransmission() {
        guard case .optionHeader = state else {
            assertionFailure("transmission starts between two options, not in \(state)")
            return
        }
        state = .requestHeader
    }

    /// Where a kept WRITE payload goes.
    public enum WritePayloadStorage {
        /// Appended to this buffer (which should have room for the whole payload).
        case copy(into: ByteBuffer)
        /// Left where it was received, as slices of the receive buffers.
        case inPlace
    }

    /// Keeps the payload of the WRITE just returned; it comes as `.writePayload`.
    public mutating func keepWritePayload(_ storage: WritePayloadStorage) {
        guard case .awaitingWritePayloadDecision(let length) = state else {
            assertionFailure("no WRITE payload is waiting for a decision in \(state)")
            return
        }
        switch storage {
        case .copy(let destination): state = .copyingWrite(destination, remaining: length)
        case .inPlace: state = .slicingWrite([], remaining: length)
        }
    }

    /// Reads past the payload of the WRITE just returned; `.discardedWritePayload` follows.
    /// The caller has checked the length against `maximumDiscardedPayloadBytes`.
    public mutating func discardWritePayload() {
        guard case .awaitingWritePayloadDecision(let length) = state else {
            assertionFailure("no WRITE payload is waiting for a decision in \(state)")
            return
        }
        state = .discarding(.write, length: length, remaining: length)
    }

    /// The next complete message, or nil if more bytes are needed (or a WRITE payload decision).
    /// After an error the decoder returns nothing more: the session is over.
    public mutating func next() throws(NBDProtocolError) -> Message? {
        while true {
            switch state {
            case .failed, .awaitingWritePayloadDecision:
                return nil

            case .clientFlags:
                guard var header = take(4) else { return nil }
                state = .optionHeader
                return .clientFlags(header.readInteger(as: UInt32.self)!)

            case .optionHeader:
                guard var header = take(16) else { return nil }
                let (magic, code, length) = header.readMultipleIntegers(as: (UInt64, UInt32, UInt32).self)!
                guard magic == NBDMagic.option else {
                    state = .failed
                    throw NBDProtocolError(.badOptionMagic, "bad option magic 0x\(String(magic, radix: 16))")
                }
                let option = NBDOption(rawValue: code)
                if Int(length) <= limits.maximumOptionPayloadBytes {
                    state = .optionPayload(option, length: Int(length))
                } else if Int(length) <= limits.maximumDiscardedPayloadBytes {
                    state = .discarding(.option(option), length: Int(length), remaining: Int(length))
                } else {
                    state = .failed
                    throw NBDProtocolError(
                        .payloadTooLarge, "\(option) payload of \(length) bytes is too large to read")
                }

            case .requestHeader:
                guard var header = take(NBDRequest.headerBytes) else { return nil }
                let request: NBDRequest
                do {
                    request = try header.readNBDRequest()!
                } catch {
                    state = .failed
                    throw error
                }
                if request.command == .write {
                    state = .awaitingWritePayloadDecision(length: Int(request.length))
                }
                return .request(request)

            case .optionPayload(let option, let length):
                if length == 0 {
                    state = .optionHeader
                    return .option(option, payload: allocator.buffer(capacity: 0))
                }
                if let first = queue.first, first.readableBytes >= length {
                    state = .optionHeader
                    return .option(option, payload: take(length)!)
                }
                guard queuedBytes > 0 else { return nil }
                state = .gatheringOption(option, allocator.buffer(capacity: length), remaining: length)

            case .gatheringOption(let option, var gathered, let remaining):
                guard queuedBytes > 0 else { return nil }
                state = .failed  // drop the state's reference so `gathered` is written in place
                let stillRemaining = moveQueuedBytes(into: &gathered, upTo: remaining)
                guard stillRemaining == 0 else {
                    state = .gatheringOption(option, gathered, remaining: stillRemaining)
                    return nil
                }
                state = .optionHeader
                return .option(option, payload: gathered)

            case .copyingWrite(var collected, let remaining):
                state = .failed  // drop the state's reference so `collected` is written in place
                let stillRemaining = moveQueuedBytes(into: &collected, upTo: remaining)
                if stillRemaining == 0 {
                    state = .requestHeader
                    return .writePayload(NBDWritePayload(collected))
                }
                state = .copyingWrite(collected, remaining: stillRemaining)
                return nil

            case .slicingWrite(var pieces, var remaining):
                state = .failed
                while remaining > 0, !queue.isEmpty {
                    let take = min(remaining, queue[queue.startIndex].readableBytes)
                    pieces.append(queue[queue.startIndex].readSlice(length: take)!)
                    if queue[queue.startIndex].readableBytes == 0 { _ = queue.removeFirst() }
                    queuedBytes -= take
                    remaining -= take
                }
                if remaining == 0 {
                    state = .requestHeader
                    return .writePayload(NBDWritePayload(pieces: pieces))
                }
                state = .slicingWrite(pieces, remaining: remaining)
                return nil

            case .discarding(let kind, let length, let remaining):
                let stillRemaining = remaining - skipQueuedBytes(upTo: remaining)
                guard stillRemaining == 0 else {
                    state = .discarding(kind, length: length, remaining: stillRemaining)
                    return nil
                }
                switch kind {
                case .option(let option):
                    state = .optionHeader
                    return .oversizedOption(option, length: UInt32(length))
                case .write:
                    state = .requestHeader
                    return .discardedWritePayload(length: length)
                }
            }
        }
    }

    /// Exactly `count` bytes as one buffer: a slice when they lie in one received buffer, else
    /// a copy gathered from several. Nil (and nothing consumed) if fewer are queued.
    private mutating func take(_ count: Int) -> ByteBuffer? {
        guard queuedBytes >= count else { return nil }
        if queue[queue.startIndex].readableBytes >= count {
            queuedBytes -= count
            let slice = queue[queue.startIndex].readSlice(length: count)!
            if queue[queue.startIndex].readableBytes == 0 { _ = queue.removeFirst() }
            return slice
        }
        var gathered = allocator.buffer(capacity: count)
        let remaining = moveQueuedBytes(into: &gathered, upTo: count)
        assert(remaining == 0)
        return gathered
    }

    /// Moves up to `limit` queued bytes into `target`; returns how many of `limit` are still missing.
    private mutating func moveQueuedBytes(into target: inout ByteBuffer, upTo limit: Int) -> Int {
        var remaining = limit
        while remaining > 0, !queue.isEmpty {
            let available = queue[queue.startIndex].readableBytes
            if available <= remaining {
                var buffer = queue.removeFirst()
                target.writeBuffer(&buffer)
                remaining -= available
                queuedBytes -= available
            } else {
                var slice = queue[queue.startIndex].readSlice(length: remaining)!
                target.writeBuffer(&slice)
                queuedBytes -= remaining
                remaining = 0
            }
        }
        return remaining
    }

    /// Drops up to `limit` queued bytes; returns how many were dropped.
    private mutating func skipQueuedBytes(upTo limit: Int) -> Int {
        var skipped = 0
        while skipped < limit, !queue.isEmpty {
            let available = queue[queue.startIndex].readableBytes
            if available <= limit - skipped {
                _ = queue.removeFirst()
                skipped += available
            } else {
                queue[queue.startIndex].moveReaderIndex(forwardBy: limit - skipped)
                skipped = limit
            }
        }
        queuedBytes -= skipped
        return skipped
    }
}
