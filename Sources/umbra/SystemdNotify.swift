// Telling systemd how the daemon is doing (sd_notify(3)): when NOTIFY_SOCKET names a datagram
// socket (a path, or "@" for the abstract namespace), one datagram per state change: READY=1 once
// the daemon serves, STOPPING=1 when it starts to stop. Without NOTIFY_SOCKET nothing is sent. A
// notification that cannot be sent is logged and otherwise ignored: it must never stop the daemon.

import Logging

#if canImport(Glibc)
    import Glibc
#endif

enum SystemdNotify {
    /// Sends `state` (lines such as "READY=1\nSTATUS=…") to NOTIFY_SOCKET, if it is set.
    static func send(_ state: String, logger: Logger) {
        guard let target = getenv("NOTIFY_SOCKET").map({ String(cString: $0) }), !target.isEmpty else { return }
        if let error = deliver(state, to: target) {
            logger.warning("could not notify systemd", metadata: ["socket": "\(target)", "error": "\(error)"])
        }
    }

    /// Sends one datagram; returns what went wrong, or nil.
    private static func deliver(_ state: String, to target: String) -> String? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var path = Array(target.utf8)
        let abstract = path.first == UInt8(ascii: "@")
        if abstract { path[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard path.count < capacity else { return "the socket path is too long" }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: path) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + path.count + (abstract ? 0 : 1))
        let descriptor = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { return String(cString: strerror(errno)) }
        defer { close(descriptor) }
        let bytes = Array(state.utf8)
        let sent = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { socketAddress in
                bytes.withUnsafeBytes {
                    sendto(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), socketAddress, length)
                }
            }
        }
        return sent == bytes.count ? nil : String(cString: strerror(errno))
    }
}
