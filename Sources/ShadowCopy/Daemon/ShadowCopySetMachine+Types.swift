// The set machine's vocabulary: the writers it knows, its configuration, its steps, and the actions
// it asks its driver to carry out.

import Foundation

/// A writer connection, as the coordinator numbers them.
struct WriterID: Hashable, Comparable, Sendable, CustomStringConvertible {
    var rawValue: UInt64
    static func < (lhs: WriterID, rhs: WriterID) -> Bool { lhs.rawValue < rhs.rawValue }
    var description: String { "writer#\(rawValue)" }
}

/// What the set needs to know about a writer taking part.
struct SetParticipant: Hashable, Sendable {
    var id: WriterID
    var name: String
    var instance: UUID
    var volumes: [String]
}

extension ShadowCopySetMachine {
    struct Configuration: Hashable, Sendable {
        /// How long each writer has to answer each event.
        var eventTimeout: Duration
        /// The hard limit from sending Freeze to sending Thaw.
        var freezeWindow: Duration
        /// Stop after PostSnapshot and wait for `requesterCompleted`.
        var keepOpen: Bool
    }

    enum Step: Hashable, Sendable {
        case notStarted
        case event(WriterEvent)
        case preparing
        case committing
        case open
        case keeping
        case releasing
        case deleting
        case finished
    }

    enum Outcome: Hashable, Sendable {
        case created
        case failed(ShadowCopyError)
    }

    enum Action: Hashable, Sendable {
        /// Send `event` to these writers (never `.abort` to a writer whose connection is gone).
        case send(WriterEvent, to: [WriterID])
        /// Flush the volumes ahead of the freeze, so the prepare need not (nobody waits for it).
        case flushProvider
        case prepareProvider(flushingFirst: Bool)
        /// Stop a prepare that is still draining writes: the set is off.
        case cancelPrepare
        /// Commit: kept at once when `keep`, else pending until `keepSet`.
        case commitProvider(keep: Bool)
        /// Make the set's snapshots survive a crash (before BackupComplete goes out).
        case keepSet
        /// Release the provider's hold without (or after a failed) commit.
        case releaseProvider
        /// Delete the committed set.
        case deleteSet
        /// A kept-open set is ready: answer the create request; the set waits for the requester.
        case setOpen
        case finish(Outcome)
    }
}
