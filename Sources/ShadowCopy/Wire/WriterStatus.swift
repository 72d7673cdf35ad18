// A writer's state, as VSS reports it (VSS_WRITER_STATE), and how each event moves it.
//
// The state says what the writer is waiting for next: after PrepareForSnapshot it waits for Freeze,
// after Freeze for Thaw, and so on back to stable after BackupComplete. A writer that fails stays
// "failed at <step>" with its failure and message until the next set it takes part in begins; a writer
// told to Abort goes back to stable.

import CoreMetrics

/// The events the daemon sends a writer, in the order a set sends them (Abort: at any point).
public enum WriterEvent: String, Codable, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case identify
    case prepareForBackup = "prepare-for-backup"
    case prepareForSnapshot = "prepare-for-snapshot"
    case freeze
    case thaw
    case postSnapshot = "post-snapshot"
    case backupComplete = "backup-complete"
    case abort

    public var description: String { rawValue }
}

/// How a writer failed; the writer chooses when it vetoes, the daemon when it gives up waiting.
public enum WriterFailure: String, Codable, Sendable, Hashable, CustomStringConvertible {
    /// Trying the set again later may work (VSS_E_WRITERERROR_RETRYABLE). Also used when a writer's
    /// connection drops mid-set: it may come back.
    case retryable
    /// Trying again will not help until someone fixes something (VSS_E_WRITERERROR_NONRETRYABLE).
    case nonRetryable = "non-retryable"
    /// A time limit ran out: the writer's own (it says so), an event's response time, or the Freeze→Thaw
    /// window (VSS_E_WRITERERROR_TIMEOUT).
    case timeout

    public var description: String { rawValue }
}

public enum WriterState: String, Codable, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case stable
    case waitingForFreeze = "waiting-for-freeze"
    case waitingForThaw = "waiting-for-thaw"
    case waitingForPostSnapshot = "waiting-for-post-snapshot"
    case waitingForBackupComplete = "waiting-for-backup-complete"
    case failedAtIdentify = "failed-at-identify"
    case failedAtPrepareBackup = "failed-at-prepare-backup"
    case failedAtPrepareSnapshot = "failed-at-prepare-snapshot"
    case failedAtFreeze = "failed-at-freeze"
    case failedAtThaw = "failed-at-thaw"
    case failedAtPostSnapshot = "failed-at-post-snapshot"
    case failedAtBackupComplete = "failed-at-backup-complete"

    public var description: String { rawValue }

    public var isFailed: Bool { rawValue.hasPrefix("failed-") }

    /// The state of a writer that answered `event` successfully.
    static func after(_ event: WriterEvent) -> WriterState {
        switch event {
        case .identify, .prepareForBackup, .backupComplete, .abort: .stable
        case .prepareForSnapshot: .waitingForFreeze
        case .freeze: .waitingForThaw
        case .thaw: .waitingForPostSnapshot
        case .postSnapshot: .waitingForBackupComplete
        }
    }

    /// The state of a writer that failed while `event` was the set's step.
    static func failed(at event: WriterEvent) -> WriterState {
        switch event {
        case .identify: .failedAtIdentify
        case .prepareForBackup: .failedAtPrepareBackup
        case .prepareForSnapshot: .failedAtPrepareSnapshot
        case .freeze, .abort: .failedAtFreeze
        case .thaw: .failedAtThaw
        case .postSnapshot: .failedAtPostSnapshot
        case .backupComplete: .failedAtBackupComplete
        }
    }
}

/// One writer's progress through a set.
struct WriterStatus: Hashable, Sendable {
    private(set) var state: WriterState = .stable
    private(set) var failure: WriterFailure?
    private(set) var message: String?
    private(set) var metadata: JSONValue?

    /// A new set begins: earlier failures are forgotten, as VSS does.
    mutating func reset() {
        state = .stable
        failure = nil
        message = nil
    }

    mutating func succeeded(_ event: WriterEvent, metadata: JSONValue? = nil) {
        assert(!state.isFailed, "a failed writer is not sent further events")
        Self.count(event, outcome: "ok")
        state = .after(event)
        if event == .identify { self.metadata = metadata }
    }

    mutating func failed(at event: WriterEvent, _ failure: WriterFailure, message: String) {
        Self.count(event, outcome: failure.rawValue)
        state = .failed(at: event)
        self.failure = failure
        self.message = message
    }

    /// Writer events by outcome (`ok`, or the failure), through swift-metrics.
    private static func count(_ event: WriterEvent, outcome: String) {
        Counter(label: "umbra_writer_events_total", dimensions: [("event", event.rawValue), ("outcome", outcome)])
            .increment()
    }

    /// The set was aborted because of someone else: back to stable. A failed writer keeps its failure.
    mutating func aborted() {
        if !state.isFailed { state = .stable }
    }
}
