import NBDProtocol
import NIOCore

#if canImport(Glibc)
    import Glibc
#endif

// Design note. A hostile client has to do what a real one never would: send half a header, never
// read, hang up mid-payload, open thousands of sockets. So this is a plain blocking POSIX socket,
// not libnbd and not NIO: every byte and every stall is the test's. Blocking reads carry a receive
// timeout only as a guard against a hung test; tests wait for the server's answer or close, never
// for time to pass.

/// A blocking socket speaking raw NBD bytes to a server.
public final class RawNBDSocket {
    public let descriptor: Int32
    private var isClosed = false

    /// Longest a blocking read or send waits before the test is declared hung.
    public static let hungAfterSeconds = 30

    /// Connects to a Unix socket. `receiveBufferBytes` shrinks the kernel's receive buffer first
    /// (for a client that stops reading, so the server cannot park much in the kernel).
    public init(unixPath path: String, receiveBufferBytes: Int32? = nil) throws {
        descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw RawSocketError("socket: errno \(errno)") }
        try configure(receiveBufferBytes: receiveBufferBytes)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw RawSocketError("path too long") }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard result == 0 else {
            let error = errno
            close()  // once: deinit runs after a throw from here and must not close it again
            throw RawSocketError("connect to \(path): errno \(error)")
        }
    }

    /// Connects to an IPv4 TCP address, from `source` if given (any 127.x.y.z works on loopback).
    public init(host: String, port: Int, source: String? = nil) throws {
        descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw RawSocketError("socket: errno \(errno)") }
        try configure(receiveBufferBytes: nil)
        do {
            if let source {
                var local = try Self.inetAddress(source, port: 0)
                let bound = withUnsafePointer(to: &local) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                    }
                }
                guard bound == 0 else { throw RawSocketError("bind \(source): errno \(errno)") }
            }
            var remote = try Self.inetAddress(host, port: port)
            let result = withUnsafePointer(to: &remote) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard result == 0 else { throw RawSocketError("connect to \(host):\(port): errno \(errno)") }
        } catch {
            close()  // once: deinit runs after a throw from here and must not close it again
            throw error
        }
    }

    deinit { close() }

    private static func inetAddress(_ host: String, port: Int) throws -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else { throw RawSocketError("bad address \(host)") }
        return address
    }

    private func configure(receiveBufferBytes: Int32?) throws {
        var timeout = timeval(tv_sec: Self.hungAfterSeconds, tv_usec: 0)
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(descriptor, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        if var size = receiveBufferBytes {
            setsockopt(descriptor, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
    }

    /// Sends all of `bytes`; false if the server has closed (EPIPE, ECONNRESET).
    @discardableResult
    public func send(_ bytes: ByteBuffer) -> Bool {
        send(Array(bytes.readableBytesView))
    }

    /// Sends all of `bytes`; false if the server has closed (EPIPE, ECONNRESET) or has not read
    /// for `hungAfterSeconds`.
    @discardableResult
    public func send(_ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let result = bytes[sent...].withUnsafeBytes {
                Glibc.send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL))
            }
            if result < 0 {
                if errno == EINTR { continue }
                return false
            }
            sent += result
        }
        return true
    }

    /// Sends as much of `bytes` as the socket takes without blocking; returns the count sent.
    public func sendWithoutBlocking(_ bytes: [UInt8]) -> Int {
        let result = bytes.withUnsafeBytes {
            Glibc.send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
        }
        return max(0, result)
    }

    /// Exactly `count` bytes, or nil if the server closed first. Throws if the test seems hung.
    public func receive(_ count: Int) throws -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            let result = bytes[received...].withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            if result == 0 { return nil }
            if result < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    throw RawSocketError("no answer in \(Self.hungAfterSeconds) s")
                }
                return nil  // ECONNRESET: closed too
            }
            received += result
        }
        return bytes
    }

    /// Reads until the server closes; returns what it sent. Throws if it never does.
    public func receiveUntilClosed() throws -> [UInt8] {
        var all: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let result = chunk.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            if result == 0 { return all }
            if result < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    throw RawSocketError("the server did not close in \(Self.hungAfterSeconds) s")
                }
                return all
            }
            all += chunk[..<result]
        }
    }

    /// Whether bytes (or end-of-file) are waiting to be read, within `milliseconds`.
    public func isReadable(withinMilliseconds milliseconds: Int32) -> Bool {
        var entry = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        return poll(&entry, 1, milliseconds) > 0
    }

    /// Stops sending (the server reads end-of-file).
    public func shutdownOutput() { shutdown(descriptor, Int32(SHUT_WR)) }

    /// Closes with a reset instead of an orderly end-of-file.
    public func reset() {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(descriptor, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        close()
    }

    public func close() {
        guard !isClosed else { return }
        isClosed = true
        Glibc.close(descriptor)
    }

    // MARK: - NBD steps

    /// Reads the 18-byte newstyle greeting; nil if the server closed instead.
    public func receiveGreeting() throws -> [UInt8]? { try receive(18) }

    /// Greeting, client flags, `GO` to `export` without structured replies; throws unless the server
    /// acknowledges. Afterwards requests get simple replies.
    public func negotiate(export: String) throws {
        guard try receiveGreeting() != nil else { throw RawSocketError("no greeting") }
        var bytes = ByteBuffer()
        bytes.writeInteger(NBDClientFlags([.fixedNewstyle, .noZeroes]).rawValue)
        var go = ByteBuffer.option(.go, .infoRequest(name: export))
        bytes.writeBuffer(&go)
        send(bytes)
        while true {
            guard let header = try receive(20) else { throw RawSocketError("closed during GO") }
            var buffer = ByteBuffer(bytes: header)
            guard let (_, _, type, length) = buffer.readMultipleIntegers(as: (UInt64, UInt32, UInt32, UInt32).self),
                try receive(Int(length)) != nil
            else { throw RawSocketError("closed during GO") }
            if type == NBDOptionReplyType.ack.rawValue { return }
            if type & 0x8000_0000 != 0 { throw RawSocketError("GO refused with reply type \(type)") }
        }
    }

    /// Sends a request (and its payload) and reads its simple reply: the errno (0 for success)
    /// and any READ data; nil if the server closed.
    public func exchange(_ request: NBDRequest, payload: [UInt8] = []) throws -> (errno: UInt32, data: [UInt8])? {
        guard send(.request(request, payload: payload)) else { return nil }
        return try receiveSimpleReply(dataBytes: request.command == .read ? Int(request.length) : 0)
    }

    /// A simple reply: errno and, on success, `dataBytes` of data; nil if the server closed.
    public func receiveSimpleReply(dataBytes: Int) throws -> (errno: UInt32, data: [UInt8])? {
        guard let header = try receive(16) else { return nil }
        var buffer = ByteBuffer(bytes: header)
        guard let (magic, error, _) = buffer.readMultipleIntegers(as: (UInt32, UInt32, UInt64).self),
            magic == NBDMagic.simpleReply
        else { throw RawSocketError("not a simple reply: \(header)") }
        guard error == 0, dataBytes > 0 else { return (error, []) }
        guard let data = try receive(dataBytes) else { return nil }
        return (0, data)
    }
}

public struct RawSocketError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
