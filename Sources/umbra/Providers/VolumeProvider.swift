// The seam for providers beside the local engine. `ProviderSet` takes each one's part of a set
// through it, and the daemon's requests and exports reach its volumes through it, never through
// its concrete type. Ceph RBD (`RBDProvider`) is the first; docs/providers.md says what a new one
// brings.

import NBDServer
import ShadowCopy

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Writes a provider holds for one set, until `release`.
protocol ProviderHold: AnyObject, Sendable {
    var setID: UUID { get }
    /// Lets every held write go (again, if called twice).
    func release()
    /// How long writes were held, once they were let go.
    var holdDuration: Duration? { get }
}

protocol VolumeProvider: Sendable {
    /// What `volume.list` and `status` show as the volumes' backend (`rbd`).
    var backend: String { get }
    /// Every volume it records, served or not.
    var volumeNames: [String] { get }
    /// Whether it records `name` (a name no other provider may take).
    func hasVolume(_ name: String) -> Bool
    /// A volume as `volume.list` shows it; nil if it is not this provider's.
    func describe(volume: String) -> ShadowCopy.VolumeInfo?
    /// Its volumes as `status` shows them.
    func status(now: Date) -> [StatusResult.Volume]

    /// Whether `volume.create` with these parameters is for this provider, and creating it.
    func claims(_ params: CreateVolumeParams) -> Bool
    /// Creates the volume and returns once its export is served.
    func createVolume(_ params: CreateVolumeParams) async throws -> ShadowCopy.VolumeInfo
    /// Removes the volume's snapshots and forgets it (`deletingImage`: its backing storage too); its
    /// exports are gone, and their clients disconnected, before it closes the volume.
    func deleteVolume(name: String, deletingImage: Bool) async throws

    // Sets, in this order: flush (optional), hold, takeSnapshots while every provider holds,
    // release, settleSet; rollBack instead of release after a failure.
    func flush(_ volumes: [String]) async throws
    /// Holds new writes through Umbra's exports on the volumes, drains and flushes those in flight;
    /// past `limit` the writes go by themselves and `takeSnapshots` fails.
    func hold(setID: UUID, volumes: [String], limit: Duration) async throws -> any ProviderHold
    /// Takes the held volumes' snapshots, recorded as pending until `settleSet`. With
    /// `decidedByCatalog`, the local catalog's record of the set decides it after a crash.
    func takeSnapshots(_ hold: any ProviderHold, createdAt: Date, decidedByCatalog: Bool) async throws
        -> [CreatedSnapshot]
    /// Serves the snapshots just taken.
    func announceSnapshots() async
    /// Gives the set's snapshots its time, and with `kept` keeps them for good.
    func settleSet(_ id: UUID, createdAt: Date?, kept: Bool) throws
    /// Removes what `takeSnapshots` took for a set that did not commit, and lets writes go.
    func rollBack(_ hold: any ProviderHold) async
    /// Records what a set was for; false if it has no snapshot of that set.
    func labelSet(_ id: UUID, purpose: String) throws -> Bool

    /// Its snapshots, oldest first.
    func snapshots(volume: String?) -> [ShadowCopy.SnapshotInfo]
    /// Deletes the snapshots named, or those of the sets named, that are its own; returns their GUIDs.
    func deleteSnapshots(ids: [UUID]) async throws -> [UUID]
    /// What changed on `volume` since snapshot `since` until snapshot `until` (the live volume when nil).
    func changes(_ params: ChangesParams) async throws -> ChangeList

    /// An export for each volume (read-write) and each snapshot (read-only). Must not wait for
    /// storage: it is called under the export registry's lock.
    func exports() -> [any NBDExport]
    /// Closes everything, waiting for the storage no longer than `limit`; false if it gave up.
    func close(waitingAtMost limit: Duration) async -> Bool
}

extension VolumeProvider {
    func hasSnapshot(_ id: UUID) -> Bool { snapshots(volume: nil).contains { $0.id == id } }

    func hasSet(_ id: UUID) -> Bool { snapshots(volume: nil).contains { $0.set == id } }
}

extension [any VolumeProvider] {
    /// The provider holding `volume`, if it is not a local one.
    func provider(of volume: String) -> (any VolumeProvider)? { first { $0.hasVolume(volume) } }
}
