import NBDProtocol
import NIOCore
import NIOSSL

// The handler's side of negotiation: STARTTLS (the ACK flushed in plain text, then TLS first in the
// pipeline; its handshake names the client) and the export catalog the handshake machine asks, which
// shows each client only the exports its access allows.

extension NBDConnectionHandler {
    // MARK: - TLS

    /// STARTTLS was acknowledged: flush the ACK in plain text, then put TLS in front of this handler.
    func startTLS() {
        guard let context, let tls = environment.tls else { return closeNow(reason: "STARTTLS without TLS") }
        replies.flushIfNeeded()
        do {
            let session = try tls.makeServerHandler()
            try context.pipeline.syncOperations.addHandler(session.handler, position: .first)
            tlsSession = session
            // NIOSSL encrypts bytes only: exports are asked for data instead of file ranges.
            replies.sendsFileRegions = false
            // TLS ends with close_notify, not a TCP half-close; a client that just closes its side
            // (libnbd after NBD_CMD_DISC) must close the connection, or NIOSSL, waiting for the
            // client's close_notify, would hold it open until its shutdown timeout.
            try context.channel.syncOptions?.setOption(.allowRemoteHalfClosure, value: false)
        } catch {
            logger.error("NBD connection cannot start TLS, disconnecting", metadata: ["nbd.error": "\(error)"])
            closeNow()
        }
    }

    func tlsHandshakeCompleted() {
        guard let tlsSession, let tls = environment.tls else {
            return closeNow(reason: "TLS handshake completed outside STARTTLS")
        }
        tlsEstablished = true
        if environment.metrics != nil { NBDMetrics.tlsHandshake("ok") }
        clientIdentity = tls.identity(of: tlsSession.handler, record: tlsSession.pskRecord)
        logger[metadataKey: "nbd.client"] = "\(clientIdentity)"
        logger.debug("NBD connection upgraded to TLS")
        run(machine.tlsEstablished())
        processInbound()
    }

    // MARK: - NBDExportCatalog

    func listExports() -> [NBDExportListing] {
        environment.registry.exports.filter { access(to: $0.name) != .none }.map {
            NBDExportListing(name: $0.name, description: $0.description)
        }
    }

    func lookUpExport(named name: String, forTransmission: Bool) -> NBDExportDescription? {
        // The default export ("") is resolved first, so the rules judge the export it stands for.
        guard let resolved = environment.registry.export(named: name) else { return nil }
        let access = access(to: resolved.name)
        guard access != .none else {
            if environment.metrics != nil { NBDMetrics.refused("access") }
            return nil
        }
        guard forTransmission else { return describe(resolved, access: access) }
        guard let connection, let (export, id) = environment.registry.bind(resolved.name, connection) else {
            return nil
        }
        self.export = export
        self.binding = (export.name, id)
        return describe(export, access: access)
    }

    func access(to exportName: String) -> NBDExportAccess {
        environment.accessPolicy?(clientIdentity, exportName) ?? .readWrite
    }

    func describe(_ export: any NBDExport, access: NBDExportAccess) -> NBDExportDescription {
        NBDExportDescription(
            name: export.name,
            description: export.description,
            size: export.size,
            isReadOnly: export.isReadOnly || access < .readWrite,
            blockSize: export.blockSize.capped(atMaximum: environment.limits.maximumRequestBytes),
            metaContexts: export.metaContexts,
            supportsFastZero: export.supportsFastZero
        )
    }
}
