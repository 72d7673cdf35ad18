// The TLS flags of umbra serve (--tls, --tls-certificate, --tls-key, --tls-psk, client CAs), read
// into the server's TLS configuration; every problem is one sentence naming the file.

import ArgumentParser
import Foundation
import NBDProtocol
import NBDServer
import NIOSSL
import SnapshotEngine

/// `--tls require|optional`.
enum TLSModeArgument: String, ExpressibleByArgument, CaseIterable {
    case require, optional

    var mode: NBDTLSMode { self == .require ? .required : .optional }
}

/// The TLS flags of `umbra serve`, turned into the server's TLS configuration.
struct ServeTLSOptions: Sendable {
    var certificate: String?
    var key: String?
    var certificateAuthority: String?
    var mode: TLSModeArgument?
    var preSharedKeyFile: String?

    /// Checks the flags go together (files are read by `configuration()`).
    func validate() throws {
        if key != nil && certificate == nil { throw ValidationError("--tls-key needs --tls-cert.") }
        if certificate != nil && key == nil { throw ValidationError("--tls-cert needs --tls-key.") }
        if certificateAuthority != nil && certificate == nil {
            throw ValidationError("--tls-ca (client certificates) needs --tls-cert and --tls-key.")
        }
        if mode != nil && certificate == nil && preSharedKeyFile == nil {
            throw ValidationError("--tls needs --tls-cert and --tls-key, or --tls-psk-file.")
        }
    }

    /// The server's TLS configuration, or nil without TLS flags. Throws one sentence per problem.
    func configuration() throws -> NBDTLSConfiguration? {
        guard certificate != nil || preSharedKeyFile != nil else { return nil }
        var chain: [NIOSSLCertificate] = []
        var privateKey: NIOSSLPrivateKey?
        if let certificate, let key {
            chain = try Self.certificates(certificate, what: "--tls-cert")
            do {
                privateKey = try NIOSSLPrivateKey(file: key, format: .pem)
            } catch {
                throw ValidationError("--tls-key \(key) is not a readable PEM private key (\(error)).")
            }
        }
        let authorities = try certificateAuthority.map { try Self.certificates($0, what: "--tls-ca") } ?? []
        let keys = try preSharedKeyFile.map(Self.preSharedKeys(path:)) ?? [:]
        do {
            return try NBDTLSConfiguration(
                mode: (mode ?? .require).mode, certificateChain: chain, privateKey: privateKey,
                clientCertificateAuthorities: authorities, preSharedKeys: keys)
        } catch {
            throw ValidationError("The TLS files do not work together: \(error.message).")
        }
    }

    private static func certificates(_ path: String, what: String) throws -> [NIOSSLCertificate] {
        let certificates = try? NIOSSLCertificate.fromPEMFile(path)
        guard let certificates, !certificates.isEmpty else {
            throw ValidationError("\(what) \(path) is not a readable PEM certificate file.")
        }
        return certificates
    }

    /// psktool's format: `IDENTITY:HEXKEY` per line.
    static func preSharedKeys(path: String) throws -> [String: [UInt8]] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw ValidationError("Cannot read the PSK file \(path).")
        }
        var keys: [String: [UInt8]] = [:]
        for (index, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = line.trimmingCharacters(in: .whitespaces)
            if line.isEmpty { continue }
            guard let colon = line.firstIndex(of: ":"), colon != line.startIndex,
                let key = hexBytes(line[line.index(after: colon)...]), !key.isEmpty
            else {
                throw ValidationError("Line \(index + 1) of the PSK file \(path) is not IDENTITY:HEXKEY.")
            }
            let identity = String(line[..<colon])
            guard keys.updateValue(key, forKey: identity) == nil else {
                throw ValidationError("The PSK file \(path) names \(identity) twice.")
            }
        }
        guard !keys.isEmpty else { throw ValidationError("The PSK file \(path) holds no keys.") }
        return keys
    }

    private static func hexBytes(_ text: Substring) -> [UInt8]? {
        let digits = Array(text.utf8)
        guard digits.count % 2 == 0, digits.allSatisfy({ Character(Unicode.Scalar($0)).isHexDigit }) else {
            return nil
        }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        for index in stride(from: 0, to: digits.count, by: 2) {
            guard let byte = UInt8(String(decoding: digits[index..<index + 2], as: UTF8.self), radix: 16) else {
                return nil
            }
            bytes.append(byte)
        }
        return bytes
    }
}
