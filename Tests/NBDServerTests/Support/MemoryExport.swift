import NBDProtocol
import NBDServer
import NIOCore
import Synchronization

/// An in-memory export for tests. Storage is tracked in 4 KiB blocks: a block never written (or
/// trimmed, or zeroed with trimming allowed) is a hole, read back as `.zeroes`, reported with
/// `HOLE|ZERO` in `base:allocation`. Every write marks its blocks dirty in each dirty-bitmap
/// context. Reads at an offset with a gate wait at the gate; calls are logged; an error can be
/// injected per command. It never suspends unless a gate says so, so it also works on an
/// `EmbeddedChannel`.
final class MemoryExport: NBDExport {
    static let blockBytes = 4096

    enum Call: Hashable, Sendable {
        case write(offset: UInt64, length: Int, fua: Bool)
        case flush
        case trim(offset: UInt64, length: UInt32, fua: Bool)
        case writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fast: Bool, fua: Bool)
        case cache(offset: UInt64, length: UInt32)
        case blockStatus(context: String, offset: UInt64, length: UInt32)
    }

    private struct State {
        var bytes: [UInt8]
        var allocated: [Bool]
        var dirty: [String: Set<Int>] = [:]
        var readGates: [UInt64: Gate] = [:]
        var failures: [NBDCommand: any Error] = [:]
        var calls: [Call] = []
        var readsInFlight = 0
        var maximumReadsInFlight = 0
    }

    let name: String
    let description: String
    let size: UInt64
    let isReadOnly: Bool
    let blockSize: NBDBlockSize
    let supportsFastZero: Bool
    let metaContexts: [String]
    private let state: Mutex<State>

    init(
        name: String,
        description: String = "",
        size: UInt64 = 1 << 20,
        isReadOnly: Bool = false,
        blockSize: NBDBlockSize = .default,
        supportsFastZero: Bool = true,
        dirtyBitmaps: [String] = []
    ) {
        self.name = name
        self.description = description
        self.size = size
        self.isReadOnly = isReadOnly
        self.blockSize = blockSize
        self.supportsFastZero = supportsFastZero
        self.metaContexts = dirtyBitmaps.map { NBDMetaContextName.qemuDirtyBitmapPrefix + $0 }
        let blocks = (Int(size) + Self.blockBytes - 1) / Self.blockBytes
        var initial = State(
            bytes: [UInt8](repeating: 0, count: Int(size)), allocated: [Bool](repeating: false, count: blocks))
        for context in metaContexts { initial.dirty[context] = [] }
        self.state = Mutex(initial)
    }

    // MARK: - Test controls

    /// Fills `[offset, offset + bytes.count)` directly (allocated, not dirty).
    func fill(_ bytes: [UInt8], at offset: Int) {
        state.withLock { state in
            state.bytes.replaceSubrange(offset..<offset + bytes.count, with: bytes)
            for block in Self.blocks(touching: offset, count: bytes.count) { state.allocated[block] = true }
        }
    }

    func contents(at offset: Int, count: Int) -> [UInt8] {
        state.withLock { Array($0.bytes[offset..<offset + count]) }
    }

    /// Reads starting exactly at `offset` wait at the returned gate until it is opened.
    func gateReads(at offset: UInt64) -> Gate {
        let gate = Gate()
        state.withLock { $0.readGates[offset] = gate }
        return gate
    }

    /// The next call of `command` throws `error`.
    func failNext(_ command: NBDCommand, with error: any Error) {
        state.withLock { $0.failures[command] = error }
    }

    var calls: [Call] { state.withLock { $0.calls } }
    var maximumReadsInFlight: Int { state.withLock { $0.maximumReadsInFlight } }

    // MARK: - NBDExport

    func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult {
        let gate = state.withLock { state -> Gate? in
            state.readsInFlight += 1
            state.maximumReadsInFlight = max(state.maximumReadsInFlight, state.readsInFlight)
            return state.readGates[offset]
        }
        defer { state.withLock { $0.readsInFlight -= 1 } }
        if let gate { await gate.pass() }
        try takeFailure(.read)
        return state.withLock { state in
            var segments: [NBDReadSegment] = []
            var position = Int(offset)
            let end = Int(offset) + Int(length)
            while position < end {
                let block = position / Self.blockBytes
                let allocated = state.allocated[block]
                var runEnd = min(end, (block + 1) * Self.blockBytes)
                while runEnd < end && state.allocated[runEnd / Self.blockBytes] == allocated {
                    runEnd = min(end, runEnd + Self.blockBytes)
                }
                if allocated {
                    var buffer = buffers.buffer(capacity: runEnd - position)
                    buffer.writeBytes(state.bytes[position..<runEnd])
                    segments.append(.data(buffer))
                } else {
                    segments.append(.zeroes(length: UInt32(runEnd - position)))
                }
                position = runEnd
            }
            if segments.count == 1, case .data(let buffer) = segments[0] { return .data(buffer) }
            if segments.count == 1, case .zeroes = segments[0] { return .zeroes }
            return .segments(segments)
        }
    }

    func write(offset: UInt64, data payload: NBDWritePayload, fua: Bool) async throws {
        let data = payload.contiguous()
        try takeFailure(.write)
        state.withLock { state in
            state.calls.append(.write(offset: offset, length: data.readableBytes, fua: fua))
            let start = Int(offset)
            state.bytes.replaceSubrange(start..<start + data.readableBytes, with: data.readableBytesView)
            for block in Self.blocks(touching: start, count: data.readableBytes) {
                state.allocated[block] = true
                for context in state.dirty.keys { state.dirty[context]!.insert(block) }
            }
        }
    }

    func flush() async throws {
        try takeFailure(.flush)
        state.withLock { $0.calls.append(.flush) }
    }

    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws {
        try takeFailure(.trim)
        state.withLock { state in
            state.calls.append(.trim(offset: offset, length: length, fua: fua))
            Self.deallocate(&state, offset: Int(offset), count: Int(length))
        }
    }

    func writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fast: Bool, fua: Bool) async throws {
        try takeFailure(.writeZeroes)
        state.withLock { state in
            state.calls.append(.writeZeroes(offset: offset, length: length, mayTrim: mayTrim, fast: fast, fua: fua))
            let start = Int(offset)
            state.bytes.replaceSubrange(start..<start + Int(length), with: repeatElement(0, count: Int(length)))
            for block in Self.blocks(touching: start, count: Int(length)) {
                state.allocated[block] = true
                for context in state.dirty.keys { state.dirty[context]!.insert(block) }
            }
            if mayTrim { Self.deallocate(&state, offset: start, count: Int(length)) }
        }
    }

    func cache(offset: UInt64, length: UInt32) async throws {
        try takeFailure(.cache)
        state.withLock { $0.calls.append(.cache(offset: offset, length: length)) }
    }

    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws -> [NBDExtent] {
        try takeFailure(.blockStatus)
        return state.withLock { state in
            state.calls.append(.blockStatus(context: context, offset: offset, length: length))
            var extents: [NBDExtent] = []
            var position = Int(offset)
            let end = min(Int(size), Int(offset) + Int(length))
            while position < end {
                let block = position / Self.blockBytes
                let flags: UInt32
                if context == NBDMetaContextName.baseAllocation {
                    flags =
                        state.allocated[block]
                        ? 0 : (NBDAllocationFlags.hole.rawValue | NBDAllocationFlags.zero.rawValue)
                } else {
                    flags = state.dirty[context]?.contains(block) == true ? NBDDirtyBitmapFlags.dirty : 0
                }
                let next = min(end, (block + 1) * Self.blockBytes)
                extents.append(NBDExtent(length: UInt32(next - position), flags: flags))
                position = next
            }
            return extents
        }
    }

    // MARK: - Helpers

    private func takeFailure(_ command: NBDCommand) throws {
        if let error = state.withLock({ $0.failures.removeValue(forKey: command) }) { throw error }
    }

    private static func blocks(touching offset: Int, count: Int) -> Range<Int> {
        guard count > 0 else { return offset / blockBytes..<offset / blockBytes }
        return offset / blockBytes..<(offset + count - 1) / blockBytes + 1
    }

    /// Deallocates (and zeroes) the blocks entirely inside the range.
    private static func deallocate(_ state: inout State, offset: Int, count: Int) {
        let first = (offset + blockBytes - 1) / blockBytes
        let last = (offset + count) / blockBytes
        guard first < last else { return }
        for block in first..<last {
            state.allocated[block] = false
            let start = block * blockBytes
            state.bytes.replaceSubrange(
                start..<min(start + blockBytes, state.bytes.count),
                with: repeatElement(0, count: min(blockBytes, state.bytes.count - start)))
        }
    }
}
