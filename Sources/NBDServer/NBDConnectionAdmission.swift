import NBDProtocol
import NIOCore

// Design note. Connection limits as a value the server keeps under its state lock: admit or refuse
// each accepted connection, count it off when it closes. A refused connection is closed before it is
// greeted. A flood must not flood the log too, so only the first refusal after the last admission is
// reported as a warning (a "burst"); the next admission reports how many the burst refused.

/// Counts open connections, overall and per client address, against `NBDLimits`.
struct NBDConnectionAdmission {
    enum Decision: Equatable {
        /// Admitted; `refusedBefore` connections were refused since the previous admission.
        case admit(refusedBefore: Int)
        /// Refused; `firstOfBurst` if nothing was refused since the previous admission.
        case refuse(reason: String, firstOfBurst: Bool)
    }

    let maximumConnections: Int
    let maximumConnectionsPerClient: Int
    private(set) var openConnections = 0
    private var openPerClient: [String: Int] = [:]
    private var refusedInBurst = 0

    init(limits: NBDLimits) {
        maximumConnections = limits.maximumConnections
        maximumConnectionsPerClient = limits.maximumConnectionsPerClient
    }

    /// The address a per-client limit counts: the IP of a TCP peer; nil for Unix-socket peers.
    static func client(of peer: SocketAddress?) -> String? {
        switch peer {
        case .v4, .v6: peer?.ipAddress
        case .unixDomainSocket, nil: nil
        }
    }

    mutating func admit(client: String?) -> Decision {
        var reason: String?
        if openConnections >= maximumConnections {
            reason = "\(maximumConnections) connections are open (the server's limit)"
        } else if let client, openPerClient[client, default: 0] >= maximumConnectionsPerClient {
            reason = "\(maximumConnectionsPerClient) connections from \(client) are open (the per-client limit)"
        }
        if let reason {
            refusedInBurst += 1
            return .refuse(reason: reason, firstOfBurst: refusedInBurst == 1)
        }
        openConnections += 1
        if let client { openPerClient[client, default: 0] += 1 }
        defer { refusedInBurst = 0 }
        return .admit(refusedBefore: refusedInBurst)
    }

    /// An admitted connection closed.
    mutating func closed(client: String?) {
        assert(openConnections > 0, "more connections closed than admitted")
        openConnections -= 1
        guard let client, let count = openPerClient[client] else { return }
        openPerClient[client] = count > 1 ? count - 1 : nil
    }
}
