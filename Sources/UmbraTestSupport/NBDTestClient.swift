// A thin, synchronous Swift wrapper over libnbd (the CNBD system library), for tests and benchmarks
// only. Each method is one libnbd call; failures become `NBDClientError` carrying libnbd's errno
// (for a command the server refused, the errno from the reply: EPERM, EINVAL, ENOSPC...).
// Calls block the calling thread until the server answers.

import CNBD

#if canImport(Glibc)
    import Glibc
#endif

/// An error from libnbd: `errno` as libnbd reports it and libnbd's message.
public struct NBDClientError: Error, CustomStringConvertible, Sendable {
    public var errno: Int32
    public var message: String

    public var description: String { "libnbd: \(message) (errno \(errno))" }

    static func last() -> NBDClientError {
        NBDClientError(errno: nbd_get_errno(), message: nbd_get_error().map { String(cString: $0) } ?? "unknown error")
    }
}

/// One libnbd handle.
public final class NBDTestClient: @unchecked Sendable {
    /// Command flags, as libnbd names them.
    public struct CommandFlags: OptionSet, Sendable {
        public var rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let fua = CommandFlags(rawValue: LIBNBD_CMD_FLAG_FUA)
        public static let noHole = CommandFlags(rawValue: LIBNBD_CMD_FLAG_NO_HOLE)
        public static let dontFragment = CommandFlags(rawValue: LIBNBD_CMD_FLAG_DF)
        public static let requestOne = CommandFlags(rawValue: LIBNBD_CMD_FLAG_REQ_ONE)
        public static let fastZero = CommandFlags(rawValue: LIBNBD_CMD_FLAG_FAST_ZERO)
    }

    /// A chunk of a structured read as libnbd reports it.
    public struct ReadChunk: Hashable, Sendable {
        public enum Kind: Hashable, Sendable { case data, hole, error }
        public var offset: UInt64
        public var length: Int
        public var kind: Kind

        public init(offset: UInt64, length: Int, kind: Kind) {
            self.offset = offset
            self.length = length
            self.kind = kind
        }
    }

    /// A block status extent: `length` bytes with `flags`.
    public struct Extent: Hashable, Sendable {
        public var length: UInt32
        public var flags: UInt32
        public init(length: UInt32, flags: UInt32) {
            self.length = length
            self.flags = flags
        }
    }

    /// A command started with `startRead`/`startWrite`, whose buffer lives until this object is
    /// released.
    public final class PendingCommand: @unchecked Sendable {
        public let cookie: Int64
        let buffer: UnsafeMutableRawBufferPointer

        init(cookie: Int64, buffer: UnsafeMutableRawBufferPointer) {
            self.cookie = cookie
            self.buffer = buffer
        }

        /// The buffer's bytes (for a read, valid once the command completed).
        public var bytes: [UInt8] { Array(buffer) }

        deinit { buffer.deallocate() }
    }

    private let handle: OpaquePointer

    public init() throws {
        guard let handle = nbd_create() else { throw NBDClientError.last() }
        self.handle = handle
    }

    deinit { nbd_close(handle) }

    // MARK: - Settings (before connecting)

    public func setExportName(_ name: String) throws { try check(nbd_set_export_name(handle, name)) }
    public func setRequestStructuredReplies(_ request: Bool) throws {
        try check(nbd_set_request_structured_replies(handle, request))
    }
    /// `LIBNBD_HANDSHAKE_FLAG_FIXED_NEWSTYLE` (1) and `..._NO_ZEROES` (2).
    public func setHandshakeFlags(_ flags: UInt32) throws { try check(nbd_set_handshake_flags(handle, flags)) }
    /// Stop after the handshake flags so options can be sent one by one.
    public func setOptMode(_ enable: Bool) throws { try check(nbd_set_opt_mode(handle, enable)) }
    /// 0 lets the client send requests the server must refuse.
    public func setStrictMode(_ flags: UInt32) throws { try check(nbd_set_strict_mode(handle, flags)) }
    /// Ask for `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION`.
    public func setFullInfo(_ request: Bool) throws { try check(nbd_set_full_info(handle, request)) }
    public func setRequestBlockSize(_ request: Bool) throws { try check(nbd_set_request_block_size(handle, request)) }
    public func addMetaContext(_ name: String) throws { try check(nbd_add_meta_context(handle, name)) }
    public func clearMetaContexts() throws { try check(nbd_clear_meta_contexts(handle)) }

    // MARK: - Connecting and options

    public func connect(uri: String) throws { try check(nbd_connect_uri(handle, uri)) }
    public func connect(unixSocket path: String) throws { try check(nbd_connect_unix(handle, path)) }
    /// Runs `command` (the executable's path, then its arguments) as the server, talking to it over
    /// its stdin and stdout (`nbd_connect_command`); closing the client waits for it to exit.
    public func connect(command: [String]) throws {
        var arguments = command.map { strdup($0) }
        defer { for argument in arguments { free(argument) } }
        arguments.append(nil)
        try check(nbd_connect_command(handle, &arguments))
    }
    public func optGo() throws { try check(nbd_opt_go(handle)) }
    public func optInfo() throws { try check(nbd_opt_info(handle)) }
    public func optAbort() throws { try check(nbd_opt_abort(handle)) }

    /// `NBD_OPT_LIST`: every export's name and description.
    public func optList() throws -> [(name: String, description: String)] {
        final class Box { var exports: [(name: String, description: String)] = [] }
        let box = Box()
        let callback = nbd_list_callback(
            callback: { userData, name, description in
                let box = Unmanaged<Box>.fromOpaque(userData!).takeUnretainedValue()
                box.exports.append((String(cString: name!), description.map { String(cString: $0) } ?? ""))
                return 0
            },
            user_data: Unmanaged.passUnretained(box).toOpaque(),
            free: nil
        )
        try withExtendedLifetime(box) { try check(nbd_opt_list(handle, callback)) }
        return box.exports
    }

    /// `NBD_OPT_LIST_META_CONTEXT` with the contexts added by `addMetaContext` as queries.
    public func optListMetaContext() throws -> [String] {
        final class Box { var names: [String] = [] }
        let box = Box()
        let callback = nbd_context_callback(
            callback: { userData, name in
                Unmanaged<Box>.fromOpaque(userData!).takeUnretainedValue().names.append(String(cString: name!))
                return 0
            },
            user_data: Unmanaged.passUnretained(box).toOpaque(),
            free: nil
        )
        try withExtendedLifetime(box) { try check(nbd_opt_list_meta_context(handle, callback)) }
        return box.names
    }

    // MARK: - What was negotiated

    public func size() throws -> UInt64 { UInt64(try check64(nbd_get_size(handle))) }
    public var isReadOnly: Bool { get throws { try flag(nbd_is_read_only(handle)) } }
    public var canFlush: Bool { get throws { try flag(nbd_can_flush(handle)) } }
    public var canFUA: Bool { get throws { try flag(nbd_can_fua(handle)) } }
    public var canTrim: Bool { get throws { try flag(nbd_can_trim(handle)) } }
    public var canZero: Bool { get throws { try flag(nbd_can_zero(handle)) } }
    public var canFastZero: Bool { get throws { try flag(nbd_can_fast_zero(handle)) } }
    public var canDF: Bool { get throws { try flag(nbd_can_df(handle)) } }
    public var canMultiConn: Bool { get throws { try flag(nbd_can_multi_conn(handle)) } }
    public var canCache: Bool { get throws { try flag(nbd_can_cache(handle)) } }
    public var isRotational: Bool { get throws { try flag(nbd_is_rotational(handle)) } }
    public var structuredRepliesNegotiated: Bool {
        get throws { try flag(nbd_get_structured_replies_negotiated(handle)) }
    }
    public func canMetaContext(_ name: String) throws -> Bool { try flag(nbd_can_meta_context(handle, name)) }

    /// (minimum, preferred, maximum); 0 where the server sent none.
    public func blockSize() throws -> (minimum: Int64, preferred: Int64, maximum: Int64) {
        (
            try check64(nbd_get_block_size(handle, LIBNBD_SIZE_MINIMUM)),
            try check64(nbd_get_block_size(handle, LIBNBD_SIZE_PREFERRED)),
            try check64(nbd_get_block_size(handle, LIBNBD_SIZE_MAXIMUM))
        )
    }

    public func canonicalExportName() throws -> String { try string(nbd_get_canonical_export_name(handle)) }
    public func exportDescription() throws -> String { try string(nbd_get_export_description(handle)) }
    public func protocolName() throws -> String {
        guard let name = nbd_get_protocol(handle) else { throw NBDClientError.last() }
        return String(cString: name)
    }

    // MARK: - Commands

    public func pread(count: Int, offset: UInt64, flags: CommandFlags = []) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try check(nbd_pread(handle, $0.baseAddress, count, offset, flags.rawValue)) }
        return bytes
    }

    /// What a structured read produced: the buffer, each chunk as libnbd reported it (error
    /// chunks included), and the error if the read failed.
    public struct StructuredRead: Sendable {
        public var bytes: [UInt8]
        public var chunks: [ReadChunk]
        public var error: NBDClientError?
    }

    /// A structured read that reports the chunks the server sent, even when it fails.
    public func preadStructured(count: Int, offset: UInt64, flags: CommandFlags = []) -> StructuredRead {
        final class Box { var chunks: [ReadChunk] = [] }
        let box = Box()
        var bytes = [UInt8](repeating: 0xAA, count: count)
        let callback = nbd_chunk_callback(
            callback: { userData, _, count, offset, status, _ in
                let kind: ReadChunk.Kind =
                    switch Int32(status) {
                    case LIBNBD_READ_DATA: .data
                    case LIBNBD_READ_HOLE: .hole
                    default: .error
                    }
                Unmanaged<Box>.fromOpaque(userData!).takeUnretainedValue().chunks.append(
                    ReadChunk(offset: offset, length: count, kind: kind)
                )
                return 0
            },
            user_data: Unmanaged.passUnretained(box).toOpaque(),
            free: nil
        )
        let result = withExtendedLifetime(box) {
            bytes.withUnsafeMutableBytes {
                nbd_pread_structured(handle, $0.baseAddress, count, offset, callback, flags.rawValue)
            }
        }
        return StructuredRead(bytes: bytes, chunks: box.chunks, error: result < 0 ? NBDClientError.last() : nil)
    }

    public func pwrite(_ bytes: [UInt8], offset: UInt64, flags: CommandFlags = []) throws {
        try bytes.withUnsafeBytes { try check(nbd_pwrite(handle, $0.baseAddress, bytes.count, offset, flags.rawValue)) }
    }

    public func flush(flags: CommandFlags = []) throws { try check(nbd_flush(handle, flags.rawValue)) }
    public func trim(count: UInt64, offset: UInt64, flags: CommandFlags = []) throws {
        try check(nbd_trim(handle, count, offset, flags.rawValue))
    }
    public func cache(count: UInt64, offset: UInt64, flags: CommandFlags = []) throws {
        try check(nbd_cache(handle, count, offset, flags.rawValue))
    }
    public func zero(count: UInt64, offset: UInt64, flags: CommandFlags = []) throws {
        try check(nbd_zero(handle, count, offset, flags.rawValue))
    }

    /// Block status for every negotiated context: context name → extents.
    public func blockStatus(count: UInt64, offset: UInt64, flags: CommandFlags = []) throws -> [String: [Extent]] {
        final class Box { var contexts: [String: [Extent]] = [:] }
        let box = Box()
        let callback = nbd_extent_callback(
            callback: { userData, context, _, entries, count, _ in
                var extents: [Extent] = []
                for index in stride(from: 0, to: count - 1, by: 2) {
                    extents.append(Extent(length: entries![index], flags: entries![index + 1]))
                }
                Unmanaged<Box>.fromOpaque(userData!).takeUnretainedValue().contexts[String(cString: context!)] = extents
                return 0
            },
            user_data: Unmanaged.passUnretained(box).toOpaque(),
            free: nil
        )
        try withExtendedLifetime(box) { try check(nbd_block_status(handle, count, offset, callback, flags.rawValue)) }
        return box.contexts
    }

    /// `NBD_CMD_DISC`, then wait for the server to close.
    public func shutdown() throws { try check(nbd_shutdown(handle, 0)) }

    // MARK: - Asynchronous commands (for pipelining)

    /// Sends a READ without waiting for the reply.
    public func startRead(count: Int, offset: UInt64, flags: CommandFlags = []) throws -> PendingCommand {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(count, 1), alignment: 16)
        let cookie = nbd_aio_pread(
            handle,
            buffer.baseAddress,
            count,
            offset,
            nbd_completion_callback(callback: nil, user_data: nil, free: nil),
            flags.rawValue
        )
        guard cookie >= 0 else {
            buffer.deallocate()
            throw NBDClientError.last()
        }
        return PendingCommand(cookie: cookie, buffer: UnsafeMutableRawBufferPointer(rebasing: buffer[..<count]))
    }

    /// Sends a WRITE without waiting for the reply. libnbd keeps the pointer, so the data lives in
    /// the returned object until the command completes.
    public func startWrite(_ bytes: [UInt8], offset: UInt64, flags: CommandFlags = []) throws -> PendingCommand {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
        buffer.copyBytes(from: bytes)
        let cookie = nbd_aio_pwrite(
            handle,
            buffer.baseAddress,
            bytes.count,
            offset,
            nbd_completion_callback(callback: nil, user_data: nil, free: nil),
            flags.rawValue
        )
        guard cookie >= 0 else {
            buffer.deallocate()
            throw NBDClientError.last()
        }
        return PendingCommand(cookie: cookie, buffer: UnsafeMutableRawBufferPointer(rebasing: buffer[..<bytes.count]))
    }

    /// Whether the command has completed; throws its error if it failed.
    public func isComplete(_ cookie: Int64) throws -> Bool {
        let result = nbd_aio_command_completed(handle, UInt64(cookie))
        if result < 0 { throw NBDClientError.last() }
        return result == 1
    }

    /// The cookie of some completed command, or nil if none.
    public func peekCompleted() -> Int64? {
        let cookie = nbd_aio_peek_command_completed(handle)
        return cookie > 0 ? cookie : nil
    }

    /// Waits (up to `timeoutMilliseconds`, -1 for ever) for the socket and makes progress.
    @discardableResult
    public func poll(timeoutMilliseconds: Int32 = -1) throws -> Int32 {
        let result = nbd_poll(handle, timeoutMilliseconds)
        if result < 0 { throw NBDClientError.last() }
        return result
    }

    public var inFlight: Int { Int(nbd_aio_in_flight(handle)) }
    public var isDead: Bool { nbd_aio_is_dead(handle) == 1 }
    public var isClosed: Bool { nbd_aio_is_closed(handle) == 1 }

    // MARK: - Helpers

    private func check(_ result: Int32) throws {
        if result < 0 { throw NBDClientError.last() }
    }

    private func check64(_ result: Int64) throws -> Int64 {
        if result < 0 { throw NBDClientError.last() }
        return result
    }

    private func flag(_ result: Int32) throws -> Bool {
        if result < 0 { throw NBDClientError.last() }
        return result == 1
    }

    private func string(_ pointer: UnsafeMutablePointer<CChar>?) throws -> String {
        guard let pointer else { throw NBDClientError.last() }
        defer { free(pointer) }
        return String(cString: pointer)
    }
}
