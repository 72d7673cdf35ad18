// The module's one error type.
//
// Every failure that can reach a client of the control socket carries a stable machine code (the
// strings below are part of the wire protocol, docs/control-protocol.md) and one sentence for people.
// Writer failures add who failed and at which step in `details`, so a requester can say "writer 'pg'
// failed at freeze" without parsing the sentence.

import Foundation

/// A stable, machine-readable error code. New codes may appear within a protocol version; a client
/// treats an unknown code like `internal`.
public struct ControlErrorCode: RawRepresentable, Hashable, Codable, Sendable, CustomStringConvertible {
    public var rawValue: String
    public init(rawValue: String) { self.rawValue = rawValue }
    public init(from decoder: any Decoder) throws {
        rawValue = try decoder.singleValueContainer().decode(String.self)
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(rawValue)
    }
    public var description: String { rawValue }

    /// The line is not a JSON object, or lacks `id`/`method`, or a field has the wrong type.
    public static let badMessage = Self(rawValue: "bad-message")
    /// The line is longer than the receiver's limit; the line was discarded.
    public static let messageTooLarge = Self(rawValue: "message-too-large")
    /// The first request on a connection must be `hello`, and only the first.
    public static let helloRequired = Self(rawValue: "hello-required")
    /// The peer speaks no protocol version this side speaks.
    public static let unsupportedVersion = Self(rawValue: "unsupported-version")
    /// The method is not part of the protocol.
    public static let unknownMethod = Self(rawValue: "unknown-method")
    /// `params` is missing a field or a field has the wrong type or value.
    public static let invalidParams = Self(rawValue: "invalid-params")
    /// The method exists but not for this connection's role.
    public static let wrongRole = Self(rawValue: "wrong-role")
    /// A writer with this instance GUID is already connected.
    public static let duplicateWriter = Self(rawValue: "duplicate-writer")
    /// Another shadow copy set is in progress.
    public static let busy = Self(rawValue: "busy")
    /// No open set with this GUID belongs to this connection.
    public static let unknownSet = Self(rawValue: "unknown-set")
    /// A writer vetoed, missed a time limit or disconnected; the set was aborted.
    public static let writerFailed = Self(rawValue: "writer-failed")
    /// The Freeze→Thaw window ran out while the provider was taking the snapshots; the set was aborted.
    public static let freezeWindowExpired = Self(rawValue: "freeze-window-expired")
    /// The snapshot provider (the engine) refused or failed; the set, if any, was aborted.
    public static let providerFailed = Self(rawValue: "provider-failed")
    /// The set was aborted because its requester asked for it or went away.
    public static let aborted = Self(rawValue: "aborted")
    /// A named volume or snapshot does not exist.
    public static let notFound = Self(rawValue: "not-found")
    /// Something with that name already exists.
    public static let alreadyExists = Self(rawValue: "already-exists")
    /// A value is out of range or otherwise unacceptable (sizes, names).
    public static let invalidArgument = Self(rawValue: "invalid-argument")
    /// The daemon is shutting down.
    public static let shuttingDown = Self(rawValue: "shutting-down")
    /// Anything else; the message says what.
    public static let `internal` = Self(rawValue: "internal")
    /// Client side only: the control socket could not be reached.
    public static let connectionFailed = Self(rawValue: "connection-failed")
    /// Client side only: the connection closed before the answer came.
    public static let connectionClosed = Self(rawValue: "connection-closed")
}

/// Who failed a set, and where. Carried in `error.details.failedWriters` of `writer-failed`.
public struct WriterFailureDetails: Codable, Hashable, Sendable {
    public var writer: String
    @GUIDCoding public var instance: UUID
    public var step: WriterEvent
    public var failure: WriterFailure
    public var message: String

    public init(writer: String, instance: UUID, step: WriterEvent, failure: WriterFailure, message: String) {
        self.writer = writer
        self.instance = instance
        self.step = step
        self.failure = failure
        self.message = message
    }
}

/// Extra, machine-readable context of an error.
public struct ControlErrorDetails: Codable, Hashable, Sendable {
    /// The set this error is about.
    @OptionalGUIDCoding public var set: UUID?
    /// Every writer that failed the set (the first is the one named in the message).
    public var failedWriters: [WriterFailureDetails]?
    /// The state of every writer that took part, as `writer list` shows them.
    public var writers: [WriterInfo]?
    /// For `unsupported-version`: the versions the daemon speaks.
    public var supportedVersions: [Int]?

    public init(
        set: UUID? = nil,
        failedWriters: [WriterFailureDetails]? = nil,
        writers: [WriterInfo]? = nil,
        supportedVersions: [Int]? = nil
    ) {
        self.set = set
        self.failedWriters = failedWriters
        self.writers = writers
        self.supportedVersions = supportedVersions
    }
}

public struct ShadowCopyError: Error, Hashable, Codable, Sendable, CustomStringConvertible {
    public var code: ControlErrorCode
    /// One sentence for people.
    public var message: String
    public var details: ControlErrorDetails?

    public init(_ code: ControlErrorCode, _ message: String, details: ControlErrorDetails? = nil) {
        self.code = code
        self.message = message
        self.details = details
    }

    public var description: String { message }

    enum CodingKeys: String, CodingKey { case code, message, details }

    /// Lenient: a peer's error needs only a code; a missing message or unreadable details are tolerated.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        code = try container.decode(ControlErrorCode.self, forKey: .code)
        message = (try? container.decodeIfPresent(String.self, forKey: .message)) ?? ""
        details = try? container.decodeIfPresent(ControlErrorDetails.self, forKey: .details)
    }

    /// Maps anything a provider or handler throws onto the wire: a `ShadowCopyError` passes as it is,
    /// anything else becomes `fallback` with its description as the message.
    public static func wrapping(_ error: any Error, as fallback: ControlErrorCode) -> ShadowCopyError {
        if let error = error as? ShadowCopyError { return error }
        return ShadowCopyError(fallback, String(describing: error))
    }
}
