import NBDProtocol
import NIOCore
import NIOSSL
import Synchronization

// Design note. TLS is an in-session upgrade (NBD_OPT_STARTTLS): the connection handler inserts the
// handler made here in front of itself once the ACK is on its way, and learns who the client is
// when the handshake completes. Who the client is comes from a verified client certificate (its
// subject's common name, only when a CA to verify it against is configured) or from the identity
// of the pre-shared key it used. NIOSSL reports the PSK identity only to the key callback, which
// belongs to a context, so with PSKs each connection gets its own context whose callback records
// the identity for that connection; without them all connections share one context. BoringSSL
// does PSK in TLS 1.2 only, so configuring keys caps the server at TLS 1.2. The access policy is a
// plain function of identity and export name so the daemon can own its rule format.

/// Who a client proved to be.
public enum NBDClientIdentity: Hashable, Sendable, CustomStringConvertible {
    /// No proof: plain text, or TLS without a client certificate or pre-shared key.
    case unauthenticated
    /// A client certificate verified against the configured CA, by its subject's common name
    /// (empty if it has none).
    case certificate(commonName: String)
    /// The identity of the pre-shared key the client proved to know.
    case preSharedKey(identity: String)

    /// The name access rules match: the common name or the PSK identity; nil if unauthenticated.
    public var name: String? {
        switch self {
        case .unauthenticated: nil
        case .certificate(let commonName): commonName
        case .preSharedKey(let identity): identity
        }
    }

    public var description: String {
        switch self {
        case .unauthenticated: "unauthenticated"
        case .certificate(let commonName): "certificate CN=\(commonName)"
        case .preSharedKey(let identity): "PSK \(identity)"
        }
    }
}

/// What a client may do with an export.
public enum NBDExportAccess: Comparable, Hashable, Sendable {
    /// The export is invisible: not listed, and answered as if it did not exist.
    case none
    /// Listed and servable, but writes get `EPERM` (as on a read-only export).
    case readOnly
    case readWrite
}

/// Decides what a client may do with the export called `exportName` (never empty: the default
/// export is resolved first).
public typealias NBDAccessPolicy = @Sendable (_ client: NBDClientIdentity, _ exportName: String) -> NBDExportAccess

/// TLS for an NBD server: X.509 certificates, optionally client certificates (mutual TLS) and
/// pre-shared keys.
public struct NBDTLSConfiguration: Sendable {
    /// `.optional` or `.required` (never `.disabled`).
    public let mode: NBDTLSMode
    private let base: TLSConfiguration
    private let preSharedKeys: [String: NIOSSLSecureBytes]
    private let verifiesClientCertificates: Bool
    /// The context all connections share when there are no pre-shared keys.
    private let sharedContext: NIOSSLContext?

    /// - Parameters:
    ///   - certificateChain: the server's certificate then its intermediates; may be empty with
    ///     pre-shared keys only.
    ///   - privateKey: the key of the first certificate.
    ///   - clientCertificateAuthorities: if not empty, a client must present a certificate signed by
    ///     one of these (or use a pre-shared key).
    ///   - preSharedKeys: identity → key (TLS-PSK, TLS 1.2).
    public init(
        mode: NBDTLSMode,
        certificateChain: [NIOSSLCertificate],
        privateKey: NIOSSLPrivateKey?,
        clientCertificateAuthorities: [NIOSSLCertificate] = [],
        preSharedKeys: [String: [UInt8]] = [:]
    ) throws(NBDError) {
        guard mode != .disabled else { throw NBDError(.einval, "a TLS configuration needs TLS optional or required") }
        guard certificateChain.isEmpty == (privateKey == nil) else {
            throw NBDError(.einval, "a TLS server certificate and its private key go together")
        }
        guard !certificateChain.isEmpty || !preSharedKeys.isEmpty else {
            throw NBDError(.einval, "TLS needs a server certificate or pre-shared keys")
        }
        guard clientCertificateAuthorities.isEmpty || !certificateChain.isEmpty else {
            throw NBDError(.einval, "verifying client certificates needs a server certificate")
        }
        var base: TLSConfiguration
        if let privateKey {
            base = .makeServerConfiguration(
                certificateChain: certificateChain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        } else {
            base = .makePreSharedKeyConfiguration()
        }
        // proto.md: TLS 1.2 at least, older versions not by default.
        base.minimumTLSVersion = .tlsv12
        if !clientCertificateAuthorities.isEmpty {
            base.certificateVerification = .noHostnameVerification
            base.trustRoots = .certificates(clientCertificateAuthorities)
            base.sendCANameList = true
        }
        if !preSharedKeys.isEmpty {
            base.maximumTLSVersion = .tlsv12
        }
        self.mode = mode
        self.base = base
        self.preSharedKeys = preSharedKeys.mapValues { NIOSSLSecureBytes($0) }
        self.verifiesClientCertificates = !clientCertificateAuthorities.isEmpty
        do {
            let context = try NIOSSLContext(
                configuration: preSharedKeys.isEmpty
                    ? base
                    : Self.adding(
                        keys: self.preSharedKeys, to: base, recordingIn: PSKIdentityRecord()))
            self.sharedContext = preSharedKeys.isEmpty ? context : nil
        } catch {
            throw NBDError(.einval, "the TLS configuration is not usable: \(error)")
        }
    }

    /// Where one connection's key callback leaves the identity it accepted.
    final class PSKIdentityRecord: Sendable {
        let identity = Mutex<String?>(nil)
    }

    /// A TLS handler for one connection, and where it records the PSK identity it accepts.
    func makeServerHandler() throws -> (handler: NIOSSLServerHandler, pskRecord: PSKIdentityRecord?) {
        if let sharedContext { return (NIOSSLServerHandler(context: sharedContext), nil) }
        let record = PSKIdentityRecord()
        let context = try NIOSSLContext(configuration: Self.adding(keys: preSharedKeys, to: base, recordingIn: record))
        return (NIOSSLServerHandler(context: context), record)
    }

    /// Who the client is, once the handshake of `handler` has completed.
    func identity(of handler: NIOSSLServerHandler, record: PSKIdentityRecord?) -> NBDClientIdentity {
        if let name = record?.identity.withLock({ $0 }) { return .preSharedKey(identity: name) }
        // Without a CA the server asks for no certificate, so none is there to trust.
        guard verifiesClientCertificates, let certificate = handler.peerCertificate else { return .unauthenticated }
        let commonName = certificate.subjectName.last { $0.type == .commonName }?.value ?? ""
        return .certificate(commonName: commonName)
    }

    private static func adding(
        keys: [String: NIOSSLSecureBytes],
        to base: TLSConfiguration,
        recordingIn record: PSKIdentityRecord
    ) -> TLSConfiguration {
        var configuration = base
        configuration.pskServerProvider = { context in
            guard let key = keys[context.clientIdentity], key.count <= context.maxPSKLength else {
                throw NBDError(.eperm, "unknown pre-shared key identity")
            }
            record.identity.withLock { $0 = context.clientIdentity }
            return PSKServerIdentityResponse(key: key)
        }
        return configuration
    }
}
