/// What the handshake needs to know about an export: the answers to LIST, INFO, GO and the meta
/// context options. The server builds one from its export object when a client asks.
public struct NBDExportDescription: Hashable, Sendable {
    /// The canonical name (what `NBD_INFO_NAME` and `NBD_REP_SERVER` report).
    public var name: String
    public var description: String
    public var size: UInt64
    public var isReadOnly: Bool
    /// The constraints as advertised (already capped at the server's request limit).
    public var blockSize: NBDBlockSize
    /// Metadata contexts besides `base:allocation`, e.g. `qemu:dirty-bitmap:NAME`.
    public var metaContexts: [String]
    /// Whether WRITE_ZEROES with `FAST_ZERO` can be served faster than a write; if not, such
    /// requests fail with `ENOTSUP` without reaching the export.
    public var supportsFastZero: Bool

    public init(
        name: String,
        description: String = "",
        size: UInt64,
        isReadOnly: Bool,
        blockSize: NBDBlockSize = .default,
        metaContexts: [String] = [],
        supportsFastZero: Bool = false
    ) {
        self.name = name
        self.description = description
        self.size = size
        self.isReadOnly = isReadOnly
        self.blockSize = blockSize
        self.metaContexts = metaContexts
        self.supportsFastZero = supportsFastZero
    }

    /// Every context a client may select on this export, `base:allocation` first.
    public var allMetaContexts: [String] { [NBDMetaContextName.baseAllocation] + metaContexts }

    /// The transmission flags advertised for this export. `SEND_DF` depends on structured replies,
    /// so the flags are a function of the negotiation, not of the export alone.
    public func transmissionFlags(structuredReplies: Bool) -> NBDTransmissionFlags {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendCache, .canMultiConn]
        if isReadOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }
}

/// One entry of the answer to `NBD_OPT_LIST`.
public struct NBDExportListing: Hashable, Sendable {
    public var name: String
    public var description: String

    public init(name: String, description: String = "") {
        self.name = name
        self.description = description
    }
}

/// Where the handshake looks exports up. The server implements it over its export registry.
public protocol NBDExportCatalog {
    /// Every export, in the order `NBD_OPT_LIST` reports them.
    func listExports() -> [NBDExportListing]

    /// The export called `name` (`""` is the default export), or nil if there is none.
    ///
    /// `forTransmission` is true exactly once per session, when the handshake has validated
    /// everything else and is about to enter transmission with the result: an implementation may
    /// bind the connection to the export then, atomically with the lookup.
    func lookUpExport(named name: String, forTransmission: Bool) -> NBDExportDescription?
}

/// A metadata context selected with `NBD_OPT_SET_META_CONTEXT`.
public struct NBDMetaContext: Hashable, Sendable {
    public var id: UInt32
    public var name: String

    public init(id: UInt32, name: String) {
        self.id = id
        self.name = name
    }
}

/// Everything the handshake settled that the transmission phase needs.
public struct NBDSession: Hashable, Sendable {
    public var export: NBDExportDescription
    public var transmissionFlags: NBDTransmissionFlags
    public var structuredReplies: Bool
    /// The contexts `NBD_CMD_BLOCK_STATUS` answers, in id order; empty if none were selected.
    public var metaContexts: [NBDMetaContext]

    public init(
        export: NBDExportDescription,
        transmissionFlags: NBDTransmissionFlags,
        structuredReplies: Bool,
        metaContexts: [NBDMetaContext]
    ) {
        self.export = export
        self.transmissionFlags = transmissionFlags
        self.structuredReplies = structuredReplies
        self.metaContexts = metaContexts
    }
}
