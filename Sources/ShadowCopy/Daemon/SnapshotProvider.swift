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
/// `validateSnapshotSet`; `flushVolumes` (only when writers take part, while they prepare; nobody
/// waits for it); `prepareSnapshotSet` once writers are frozen; `commitSnapshotSet` right away, and
/// `abortSnapshotSet` instead of commit, or after a commit that threw. A committed set that is not
/// kept at once is kept with `keepSnapshotSet` before BackupComplete, or removed with
/// `deleteSnapshotSet` when it must not survive (a later writer failed, the requester aborted, the
/// daemon stops). The coordinator runs one set at a time.
///
/// Errors thrown may be `ShadowCopyError` (their code reaches the requester as it is, e.g. `not-found`
/// for an unknown volume); anything else is reported as `provider-failed` with its description.
public protocol SnapshotProvider: Sendable {
    /// What `prepareSnapshotSet` returns and the other calls take back.
    associatedtype HoldToken: Sendable

    /// Throws if a set of these volumes cannot be taken (unknown volume, repeated volume, too many).
    /// Called before any writer hears of the set.
    func validateSnapshotSet(volumes: [String]) async throws

    /// Makes the volumes' data durable ahead of the set, so that the prepare has nothing to flush
    /// between Freeze and Thaw. Purely an optimisation: errors are ignored.
    func flushVolumes(_ volumes: [String]) async throws

    /// Holds new writes on every volume and drains writes in flight (flushing first when
    /// `flushingFirst`). The set must get GUID `id`. The provider enforces its own hold limit (a commit
    /// after it throws) and releases the hold by itself once the limit is past. If the calling task is
    /// cancelled before writes are held, it gives up (throws) holding nothing.
    func prepareSnapshotSet(id: UUID, volumes: [String], flushingFirst: Bool) async throws -> HoldToken

    /// Takes the snapshots with one timestamp and fresh snapshot GUIDs and releases the hold. With
    /// `keep`, returns once the set is durable for good. Without, the set is *pending*: it returns as
    /// soon as writes are released, the snapshots are readable, and the provider rolls the set back
    /// after a crash unless `keepSnapshotSet` made it durable first.
    func commitSnapshotSet(_ token: HoldToken, keep: Bool) async throws -> CommittedSnapshotSet

    /// Makes a pending set durable for good: a crash after this returns keeps it.
    func keepSnapshotSet(id: UUID) async throws

    /// Releases the hold without taking snapshots. Must be safe after a commit that threw.
    func abortSnapshotSet(_ token: HoldToken) async

    /// Deletes every snapshot of a committed set.
    func deleteSnapshotSet(id: UUID) async throws

    /// How long the prepared set held new writes, once it has let them go (for the set's log line).
    func holdDuration(of token: HoldToken) -> Duration?
}

/// The requester operations that are not about sets or writers; the daemon implements them. Throw a
/// `ShadowCopyError` to choose the code (`not-found`, `already-exists`, `invalid-argument`); anything
/// else reaches the requester as `internal`.
public protocol ControlRequestHandler: Sendable {
    func createVolume(_ params: CreateVolumeParams) async throws -> VolumeInfo
    func listVolumes() async throws -> VolumeList
    /// Changes a volume's diff-store limit or policy, durably; returns the volume as it is now.
    func setVolume(_ params: SetVolumeParams) async throws -> VolumeInfo
    /// Makes a live volume read as one of its snapshots, ending its NBD connections meanwhile.
    func revertVolume(_ params: RevertParams) async throws -> RevertResultInfo
    /// Records what a set was taken for; its snapshots show it in `snapshot.list`.
    func labelSet(_ params: LabelSetParams) async throws
    /// Writes a snapshot as a qcow2 image.
    func backupSnapshot(_ params: BackupImageParams) async throws -> BackupImageResult
    /// Creates a volume from a qcow2 image and its backing chain.
    func restoreVolume(_ params: RestoreParams) async throws -> RestoreResult
    /// `deletingImage`: an RBD volume's image goes too (it stays otherwise).
    func deleteVolume(name: String, deletingImage: Bool) async throws
    func listSnapshots(volume: String?) async throws -> SnapshotList
    func deleteSnapshots(ids: [UUID]) async throws -> DeleteSnapshotsResult
    func changes(_ params: ChangesParams) async throws -> ChangeList
    /// Reads everything the volumes preserved and compares it with its checksums.
    func verify(_ params: VerifyParams) async throws -> VerifyResult
    /// The daemon at a glance: version, uptime, listeners, connections, writers, volumes.
    func status() async throws -> StatusResult
    /// Re-reads the access rules and TLS files for new connections; throws (the old configuration
    /// staying) if they are bad.
    func reload() async throws -> ReloadResult
}
