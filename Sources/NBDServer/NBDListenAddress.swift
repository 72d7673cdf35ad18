/// Where a server listens: `tcp://HOST:PORT` (IPv6 hosts in brackets) or `unix:PATH`.
public enum NBDListenAddress: Hashable, Sendable, CustomStringConvertible {
    case tcp(host: String, port: Int)
    case unix(path: String)

    /// The longest Unix socket path the kernel accepts (`sun_path` holds 108 bytes with the NUL).
    public static let maximumUnixPathBytes = 107

    /// Parses `tcp://HOST:PORT` or `unix:PATH`.
    public init(parsing text: String) throws(NBDError) {
        if text.hasPrefix("tcp://") {
            let rest = text.dropFirst("tcp://".count)
            let host: Substring
            let portText: Substring
            if rest.hasPrefix("[") {
                guard let close = rest.firstIndex(of: "]"), rest[rest.index(after: close)...].hasPrefix(":") else {
                    throw Self.invalid(text, "an IPv6 host must be written [ADDRESS]:PORT")
                }
                host = rest[rest.index(after: rest.startIndex)..<close]
                portText = rest[rest.index(close, offsetBy: 2)...]
            } else {
                guard let colon = rest.lastIndex(of: ":") else { throw Self.invalid(text, "the port is missing") }
                host = rest[..<colon]
                portText = rest[rest.index(after: colon)...]
            }
            guard !host.isEmpty, !host.contains("/") else { throw Self.invalid(text, "the host is missing") }
            guard !portText.isEmpty, portText.allSatisfy(\.isASCII), portText.allSatisfy(\.isNumber),
                portText.count <= 5, let port = Int(portText), port <= 65535
            else { throw Self.invalid(text, "the port must be a number from 0 to 65535") }
            self = .tcp(host: String(host), port: port)
        } else if text.hasPrefix("unix:") {
            let path = String(text.dropFirst("unix:".count))
            guard !path.isEmpty else { throw Self.invalid(text, "the path is missing") }
            guard path.utf8.count <= Self.maximumUnixPathBytes, !path.utf8.contains(0) else {
                throw Self.invalid(text, "the path is longer than \(Self.maximumUnixPathBytes) bytes")
            }
            self = .unix(path: path)
        } else {
            throw Self.invalid(text, "expected tcp://HOST:PORT or unix:PATH")
        }
    }

    public var description: String {
        switch self {
        case .tcp(let host, let port): host.contains(":") ? "tcp://[\(host)]:\(port)" : "tcp://\(host):\(port)"
        case .unix(let path): "unix:\(path)"
        }
    }

    private static func invalid(_ text: String, _ reason: String) -> NBDError {
        NBDError(.einval, "invalid listen address \"\(text)\": \(reason)")
    }
}
