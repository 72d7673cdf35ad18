// What a writer application implements: VSS's CVssWriter callbacks as async functions, with the
// set's context each event carries and the veto it may throw.

import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// What the daemon said about the set with an event.
public struct WriterEventContext: Sendable, Hashable {
    public var event: WriterEvent
    public var set: UUID
    /// Every volume of the set.
    public var volumes: [String]
    /// How long the daemon waits for this answer.
    public var timeout: Duration
    /// Freeze only: how long the application may stay frozen.
    public var freezeWindow: Duration?
    /// Thaw, PostSnapshot, BackupComplete (and Abort after the commit): the snapshots taken.
    public var snapshots: [CreatedSnapshot]
    /// Abort only: why.
    public var reason: String?

    public init(
        event: WriterEvent,
        set: UUID,
        volumes: [String],
        timeout: Duration,
        freezeWindow: Duration? = nil,
        snapshots: [CreatedSnapshot] = [],
        reason: String? = nil
    ) {
        self.event = event
        self.set = set
        self.volumes = volumes
        self.timeout = timeout
        self.freezeWindow = freezeWindow
        self.snapshots = snapshots
        self.reason = reason
    }
}

/// Throw this from a callback to veto with a chosen failure kind.
public struct WriterVeto: Error, Sendable, Hashable {
    public var failure: WriterFailure
    public var message: String
    public init(_ failure: WriterFailure, _ message: String) {
        self.failure = failure
        self.message = message
    }
}

/// An application taking part in shadow copy sets. Every callback has a default that does nothing.
public protocol ShadowCopyWriterDelegate: Sendable {
    /// Report metadata (components, paths, anything JSON) for the requester; nil for none.
    func onIdentify(_ context: WriterEventContext) async throws -> JSONValue?
    func onPrepareForBackup(_ context: WriterEventContext) async throws
    func onPrepareForSnapshot(_ context: WriterEventContext) async throws
    /// Finish what is in flight, flush, and stop writing until Thaw or Abort.
    func onFreeze(_ context: WriterEventContext) async throws
    /// Resume writing.
    func onThaw(_ context: WriterEventContext) async throws
    func onPostSnapshot(_ context: WriterEventContext) async throws
    func onBackupComplete(_ context: WriterEventContext) async throws
    /// The set is off; if frozen, resume writing. Called by the SDK itself if the daemon goes away
    /// while frozen or the freeze window passes.
    func onAbort(_ context: WriterEventContext) async
}

extension ShadowCopyWriterDelegate {
    public func onIdentify(_ context: WriterEventContext) async throws -> JSONValue? { nil }
    public func onPrepareForBackup(_ context: WriterEventContext) async throws {}
    public func onPrepareForSnapshot(_ context: WriterEventContext) async throws {}
    public func onFreeze(_ context: WriterEventContext) async throws {}
    public func onThaw(_ context: WriterEventContext) async throws {}
    public func onPostSnapshot(_ context: WriterEventContext) async throws {}
    public func onBackupComplete(_ context: WriterEventContext) async throws {}
    public func onAbort(_ context: WriterEventContext) async {}
}
