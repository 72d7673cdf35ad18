// The seams between the coordinator and the daemon. `ShadowCopy` never imports the engine: the
// `umbra` executable makes the engine a `SnapshotProvider` and the daemon a `ControlRequestHandler`.

import Foundation

/// A set the provider has committed: one timestamp, one snapshot per volume.
public struct CommittedSnapshotSet: Sendable, Hashable {
    public var id: UUID
    public var createdAt: Date
    /// One per volume, in the order the volumes were given.
    public var snapshots: [CreatedSnapshot]

    public init(id: UUID, createdAt: Date, snapshots: [CreatedSnapshot]) {
        self.id = id
        self.createdAt = createdAt
        self.snapshots = snapshots
    }
}

/// The snapshot engine as the coordinator drives it. For one set the calls are, in order:
/// `validateSnapshotSet`, then `prepareSnapshotSet` (writers are frozen), then `commitSnapshotSet`
/// right away, and `abortSnapshotSet` instead of commit, or after a commit that threw. A committed set
/// that must not survive (a later writer failed, the requester aborted) is removed with
/// `deleteSnapshotSet`. The coordinator runs one set at a time.
///
/// Errors thrown may be `ShadowCopyError` (their code reaches the requester as it is, e.g. `not-found`
/// for an unknown volume); anything else is reported as `provider-failed` with its description.
public protocol SnapshotProvider: Sendable {
    /// What `prepareSnapshotSet` returns and the other calls take back.
    associatedtype HoldToken: Sendable

    /// Throws if a set of these volumes cannot be taken (unknown volume, repeated volume, too many).
    /// Called before any writer hears of the set.
    func validateSnapshotSet(volumes: [String]) async throws

    /// Holds new writes on every volume, drains writes in flight and flushes. The set must get GUID
    /// `id`. The provider enforces its own hold limit (a commit after it throws) and releases the hold
    /// by itself once the limit is past.
    func prepareSnapshotSet(id: UUID, volumes: [String]) async throws -> HoldToken

    /// Records the set durably with one timestamp and fresh snapshot GUIDs, and releases the hold.
    func commitSnapshotSet(_ token: HoldToken) async throws -> CommittedSnapshotSet

    /// Releases the hold without taking snapshots. Must be safe after a commit that threw.
    func abortSnapshotSet(_ token: HoldToken) async

    /// Deletes every snapshot of a committed set.
    func deleteSnapshotSet(id: UUID) async throws
}

/// The requester operations that are not about sets or writers; the daemon implements them. Throw a
/// `ShadowCopyError` to choose the code (`not-found`, `already-exists`, `invalid-argument`); anything
/// else reaches the requester as `internal`.
public protocol ControlRequestHandler: Sendable {
    func createVolume(_ params: CreateVolumeParams) async throws -> VolumeInfo
    func listVolumes() async throws -> VolumeList
    func deleteVolume(name: String) async throws
    func listSnapshots(volume: String?) async throws -> SnapshotList
    func deleteSnapshots(ids: [UUID]) async throws -> DeleteSnapshotsResult
    func changes(_ params: ChangesParams) async throws -> ChangeList
}
