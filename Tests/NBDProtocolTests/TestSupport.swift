import NBDProtocol
import NIOCore

/// A catalog over a fixed list of exports; the empty name resolves to the first.
struct TestCatalog: NBDExportCatalog {
    var exports: [NBDExportDescription]

    func listExports() -> [NBDExportListing] {
        exports.map { NBDExportListing(name: $0.name, description: $0.description) }
    }

    func lookUpExport(named name: String, forTransmission: Bool) -> NBDExportDescription? {
        name.isEmpty ? exports.first : exports.first { $0.name == name }
    }
}

let liveExport = NBDExportDescription(
    name: "live",
    description: "the live volume",
    size: 1 << 20,
    isReadOnly: false,
    blockSize: NBDBlockSize(minimum: 1, preferred: 4096, maximum: 1 << 16),
    metaContexts: ["qemu:dirty-bitmap:aaaa", "qemu:dirty-bitmap:bbbb"],
    supportsFastZero: true
)

let snapshotExport = NBDExportDescription(
    name: "live@aaaa",
    size: 1 << 20,
    isReadOnly: true,
    blockSize: NBDBlockSize(minimum: 512, preferred: 4096, maximum: 1 << 16),
    metaContexts: ["qemu:dirty-bitmap:bbbb"]
)

let testCatalog = TestCatalog(exports: [liveExport, snapshotExport])

extension NBDHandshakeStateMachine.Action {
    /// The option replies this action sends.
    var optionReplies: [NBDOptionReply] {
        let messages: [NBDHandshakeMessage]
        switch self {
        case .none: messages = []
        case .send(let sent), .sendAndClose(let sent), .sendAndStartTransmission(let sent, _),
            .sendAndStartTLS(let sent):
            messages = sent
        }
        return messages.compactMap { if case .optionReply(let reply) = $0 { reply } else { nil } }
    }

    var replyTypes: [NBDOptionReplyType] { optionReplies.map(\.type) }

    var session: NBDSession? {
        if case .sendAndStartTransmission(_, let session) = self { session } else { nil }
    }

    var closes: Bool {
        if case .sendAndClose = self { true } else { false }
    }
}

/// A handshake machine that has greeted and received fixed-newstyle + no-zeroes client flags.
func negotiatingMachine(clientFlags: UInt32 = 3, tlsMode: NBDTLSMode = .disabled) -> NBDHandshakeStateMachine {
    var machine = NBDHandshakeStateMachine(configuration: .init(tlsMode: tlsMode))
    _ = machine.start()
    _ = machine.receivedClientFlags(clientFlags)
    return machine
}
