// The requester's side of the control socket, as the `umbra` CLI and backup tools use it: connect,
// say hello as a requester, then one typed call per daemon operation. Errors from the daemon come back
// as `ShadowCopyError` with the daemon's code and sentence, ready to print.

import Foundation
import NIOCore
import NIOPosix

public final class ControlClient: Sendable {
    private let connection: ControlConnection
    /// The protocol version agreed in hello.
    public let version: Int
    public let serverName: String

    private init(connection: ControlConnection, hello: HelloResult) {
        self.connection = connection
        self.version = hello.version
        self.serverName = hello.server
    }

    /// Connects to the daemon's control socket and says hello as a requester.
    public static func connect(
        socketPath: String,
        clientName: String = "umbra",
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws -> ControlClient {
        let connection = try await ControlConnection.connect(socketPath: socketPath, group: group)
        do {
            let hello = try await call(
                connection,
                "hello",
                HelloParams(role: .requester, client: clientName),
                as: HelloResult.self
            )
            return ControlClient(connection: connection, hello: hello)
        } catch {
            await connection.close()
            throw error
        }
    }

    public func close() async { await connection.close() }

    /// Any method by name, for methods this type has no wrapper for.
    public func call<Result: Decodable>(_ method: String, params: some Encodable, as type: Result.Type)
        async throws -> Result
    {
        try await Self.call(connection, method, params, as: type)
    }

    public func ping() async throws { _ = try await call("ping", params: EmptyResult(), as: EmptyResult.self) }

    // MARK: - Volumes

    public func createVolume(
        name: String, size: UInt64, chunkSize: UInt64? = nil, diffLimit: UInt64? = nil,
        whenFull: DiffStoreFullPolicy? = nil, rbd: String? = nil
    ) async throws -> VolumeInfo {
        try await call(
            "volume.create",
            params: CreateVolumeParams(
                name: name, size: size, chunkSize: chunkSize, diffLimit: diffLimit, whenFull: whenFull, rbd: rbd),
            as: VolumeInfo.self)
    }

    public func listVolumes() async throws -> VolumeList {
        try await call("volume.list", params: EmptyResult(), as: VolumeList.self)
    }

    /// Changes a volume's diff-store limit (0 removes it) or policy; nil leaves each as it is.
    public func setVolume(
        name: String, diffLimit: UInt64? = nil, whenFull: DiffStoreFullPolicy? = nil
    ) async throws -> VolumeInfo {
        try await call(
            "volume.set", params: SetVolumeParams(name: name, diffLimit: diffLimit, whenFull: whenFull),
            as: VolumeInfo.self)
    }

    /// Makes the live volume read as one of its snapshots (`volume.revert`).
    public func revertVolume(name: String, to snapshot: UUID) async throws -> RevertResultInfo {
        try await call(
            "volume.revert", params: RevertParams(name: name, snapshot: snapshot), as: RevertResultInfo.self)
    }

    /// Records what set `id` was taken for (`backup`); its snapshots show it.
    public func labelSet(_ id: UUID, purpose: String) async throws {
        _ = try await call("set.label", params: LabelSetParams(set: id, purpose: purpose), as: EmptyResult.self)
    }

    /// Writes a snapshot as a qcow2 image at `file` (on the daemon's machine).
    public func backupSnapshot(_ params: BackupImageParams) async throws -> BackupImageResult {
        try await call("snapshot.backup", params: params, as: BackupImageResult.self)
    }

    /// Creates volume `name` from the qcow2 image at `file` (on the daemon's machine).
    public func restoreVolume(name: String, from file: String) async throws -> RestoreResult {
        try await call("volume.restore", params: RestoreParams(name: name, file: file), as: RestoreResult.self)
    }

    /// `deletingImage`: an RBD volume's image is removed too.
    public func deleteVolume(name: String, deletingImage: Bool = false) async throws {
        _ = try await call(
            "volume.delete", params: VolumeNameParams(name: name, deleteImage: deletingImage ? true : nil),
            as: EmptyResult.self)
    }

    // MARK: - Snapshots and sets

    /// Takes a shadow copy set (`snapshot create`). With `keepOpen`, the set stays open after
    /// PostSnapshot until `completeSet` or `abortSet` on this same client.
    public func createSnapshotSet(_ params: CreateSetParams) async throws -> SnapshotSetResult {
        try await call("snapshot.create", params: params, as: SnapshotSetResult.self)
    }

    /// The backup of an open set is done: writers get BackupComplete; the snapshots stay.
    public func completeSet(_ id: UUID) async throws -> SnapshotSetResult {
        try await call("set.complete", params: SetParams(set: id), as: SnapshotSetResult.self)
    }

    /// Gives up an open set: writers get Abort and its snapshots are deleted.
    public func abortSet(_ id: UUID) async throws {
        _ = try await call("set.abort", params: SetParams(set: id), as: EmptyResult.self)
    }

    public func listSnapshots(volume: String? = nil) async throws -> SnapshotList {
        try await call("snapshot.list", params: ListSnapshotsParams(volume: volume), as: SnapshotList.self)
    }

    public func deleteSnapshots(ids: [UUID]) async throws -> DeleteSnapshotsResult {
        try await call("snapshot.delete", params: DeleteSnapshotsParams(ids: ids), as: DeleteSnapshotsResult.self)
    }

    public func changes(volume: String, since: UUID, until: UUID? = nil) async throws -> ChangeList {
        try await call(
            "snapshot.changes",
            params: ChangesParams(volume: volume, since: since, until: until),
            as: ChangeList.self
        )
    }

    /// Reads everything the volumes (all, if `volumes` is empty) preserved and compares it with its
    /// checksums. Takes as long as reading the diff stores.
    public func verify(volumes: [String]) async throws -> VerifyResult {
        try await call("verify", params: VerifyParams(volumes: volumes), as: VerifyResult.self)
    }

    /// Re-reads the daemon's access rules and TLS files; throws the reason if they are bad (the
    /// configuration in use then stays).
    public func reload() async throws -> ReloadResult {
        try await call("reload", params: EmptyResult(), as: ReloadResult.self)
    }

    /// The daemon at a glance.
    public func status() async throws -> StatusResult {
        try await call("status", params: EmptyResult(), as: StatusResult.self)
    }

    public func listWriters() async throws -> WriterList {
        try await call("writer.list", params: EmptyResult(), as: WriterList.self)
    }

    private static func call<Result: Decodable>(
        _ connection: ControlConnection,
        _ method: String,
        _ params: some Encodable,
        as type: Result.Type
    ) async throws -> Result {
        let response = try await connection.request(method: method, params: params)
        if case .error(let error) = response.kind { throw error }
        return try response.result(type)
    }
}
