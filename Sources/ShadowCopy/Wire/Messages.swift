// The typed payloads of the control protocol: every `params` and `result` object of
// docs/control-protocol.md. Field names here are the wire names; the list and create results are the
// `--json` shapes of INTERFACE.md, so the CLI prints them unchanged.

import Foundation

// MARK: - Handshake

public enum ControlRole: String, Codable, Sendable, CaseIterable {
    case requester
    case writer

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let value = try container.decode(String.self)
        guard let role = Self(rawValue: value) else {
            throw DecodingError.dataCorruptedError(
                in: container, debugDescription: "must be \"requester\" or \"writer\", not \"\(value)\"")
        }
        self = role
    }
}

public struct HelloParams: Codable, Sendable, Hashable {
    /// The highest protocol version the client speaks.
    public var version: Int
    public var role: ControlRole
    /// Free text naming the client program, for logs.
    public var client: String?
    /// Writers only: the writer's name (e.g. `postgres`).
    public var name: String?
    /// Writers only: a GUID the writer keeps across reconnects; the daemon makes one up when absent.
    @OptionalGUIDCoding public var instance: UUID?
    /// Writers only: the volumes the writer cares about; `"*"` means every volume.
    public var volumes: [String]?

    public init(
        version: Int = ControlProtocol.version,
        role: ControlRole,
        client: String? = nil,
        name: String? = nil,
        instance: UUID? = nil,
        volumes: [String]? = nil
    ) {
        self.version = version
        self.role = role
        self.client = client
        self.name = name
        self.instance = instance
        self.volumes = volumes
    }
}

public struct HelloResult: Codable, Sendable, Hashable {
    /// The version both sides now speak.
    public var version: Int
    public var server: String
    /// Writers only: the writer's instance GUID.
    @OptionalGUIDCoding public var instance: UUID?
    /// Writers only, when there are any: the volumes the writer named that do not exist (yet). The
    /// writer is registered anyway and hears of sets of a volume once it exists; a typo shows here.
    public var unknownVolumes: [String]?

    public init(version: Int, server: String, instance: UUID? = nil, unknownVolumes: [String]? = nil) {
        self.version = version
        self.server = server
        self.instance = instance
        self.unknownVolumes = unknownVolumes
    }
}

/// The result of a method that has nothing to say.
public struct EmptyResult: Codable, Sendable, Hashable {
    public init() {}
}

// MARK: - Volumes

/// What a volume does when its diff store is full (`volume.create`'s `whenFull`).
public enum DiffStoreFullPolicy: String, Codable, Sendable, Hashable, CaseIterable {
    /// Delete the volume's oldest snapshots until the copy fits (what VSS does).
    case deleteOldest = "delete-oldest"
    /// Fail the snapshot that needs the space; the others stay readable.
    case failSnapshot = "fail-snapshot"
}

public struct VolumeInfo: Codable, Sendable, Hashable {
    public var name: String
    /// Bytes.
    public var size: UInt64
    /// Bytes.
    public var chunkSize: UInt64
    /// Bytes the diff store may hold; absent for no limit.
    public var diffLimit: UInt64?
    public var whenFull: DiffStoreFullPolicy?
    /// Which provider holds it: `local` (the engine's files) or `rbd` (a Ceph RBD image).
    public var backend: String?
    /// `POOL/IMAGE`, for an RBD volume.
    public var image: String?

    public init(
        name: String, size: UInt64, chunkSize: UInt64, diffLimit: UInt64? = nil, whenFull: DiffStoreFullPolicy? = nil,
        backend: String? = nil, image: String? = nil
    ) {
        self.name = name
        self.size = size
        self.chunkSize = chunkSize
        self.diffLimit = diffLimit
        self.whenFull = whenFull
        self.backend = backend
        self.image = image
    }
}

public struct VolumeList: Codable, Sendable, Hashable {
    public var volumes: [VolumeInfo]
    public init(volumes: [VolumeInfo]) { self.volumes = volumes }
}

public struct CreateVolumeParams: Codable, Sendable, Hashable {
    public var name: String
    /// Bytes.
    public var size: UInt64
    /// Bytes; the daemon's default when absent.
    public var chunkSize: UInt64?
    /// Bytes the diff store may hold; no limit when absent.
    public var diffLimit: UInt64?
    /// What happens when the diff store is full; `delete-oldest` when absent. Needs `diffLimit`.
    public var whenFull: DiffStoreFullPolicy?
    /// `POOL/IMAGE`: the volume is this Ceph RBD image (created when `size` is not 0, else an
    /// existing one at its own size). Needs a daemon started with `--ceph-conf`.
    public var rbd: String?

    public init(
        name: String, size: UInt64, chunkSize: UInt64? = nil, diffLimit: UInt64? = nil,
        whenFull: DiffStoreFullPolicy? = nil, rbd: String? = nil
    ) {
        self.rbd = rbd
        self.name = name
        self.size = size
        self.chunkSize = chunkSize
        self.diffLimit = diffLimit
        self.whenFull = whenFull
    }
}

/// `volume.set`: what changes (an absent field stays as it is; at least one must be there).
public struct SetVolumeParams: Codable, Sendable, Hashable {
    public var name: String
    /// Bytes the diff store may hold from now on, a whole number of chunks; 0 removes the limit
    /// (and the policy goes back to `delete-oldest`).
    public var diffLimit: UInt64?
    /// What happens when the diff store is full. Needs a limit (given here or already set).
    public var whenFull: DiffStoreFullPolicy?

    public init(name: String, diffLimit: UInt64? = nil, whenFull: DiffStoreFullPolicy? = nil) {
        self.name = name
        self.diffLimit = diffLimit
        self.whenFull = whenFull
    }
}

/// `volume.revert`: make the live volume read as one of its snapshots.
public struct RevertParams: Codable, Sendable, Hashable {
    public var name: String
    @GUIDCoding public var snapshot: UUID

    public init(name: String, snapshot: UUID) {
        self.name = name
        self.snapshot = snapshot
    }
}

public struct RevertResultInfo: Codable, Sendable, Hashable {
    public var volume: String
    @GUIDCoding public var snapshot: UUID
    /// Bytes of the live volume rewritten: those that changed since the snapshot.
    public var changedBytes: UInt64
    public var seconds: Double

    public init(volume: String, snapshot: UUID, changedBytes: UInt64, seconds: Double) {
        self.volume = volume
        self.snapshot = snapshot
        self.changedBytes = changedBytes
        self.seconds = seconds
    }
}

/// `snapshot.backup`: write a snapshot as a qcow2 image (the daemon writes it; `umbra backup` drives
/// a whole backup with it).
public struct BackupImageParams: Codable, Sendable, Hashable {
    @GUIDCoding public var snapshot: UUID
    /// Where the image goes: an absolute path, on the daemon's machine. It is written as
    /// `FILE.partial` and renamed to `FILE` once complete and durable.
    public var file: String
    /// An older snapshot of the same volume: the image then holds only what changed since it.
    @OptionalGUIDCoding public var base: UUID?
    /// The backing file the image names (the base's image, relative to this one). Needs `base`.
    public var backingFile: String?

    public init(snapshot: UUID, file: String, base: UUID? = nil, backingFile: String? = nil) {
        self.snapshot = snapshot
        self.file = file
        self.base = base
        self.backingFile = backingFile
    }
}

public struct BackupImageResult: Codable, Sendable, Hashable {
    public var file: String
    /// `full` or `incremental`.
    public var kind: String
    /// The volume's size.
    public var bytes: UInt64
    /// Data written into the image (zeros take none).
    public var copiedBytes: UInt64
    /// CRC-32C of the whole image file as written.
    public var checksum: UInt32
    /// The image file's length.
    public var fileBytes: UInt64
    public var seconds: Double

    public init(
        file: String, kind: String, bytes: UInt64, copiedBytes: UInt64, checksum: UInt32, fileBytes: UInt64,
        seconds: Double
    ) {
        self.fileBytes = fileBytes
        self.file = file
        self.kind = kind
        self.bytes = bytes
        self.copiedBytes = copiedBytes
        self.checksum = checksum
        self.seconds = seconds
    }
}

/// `volume.restore`: create a volume holding what a qcow2 image (and its backing chain) holds.
public struct RestoreParams: Codable, Sendable, Hashable {
    public var name: String
    /// An absolute path on the daemon's machine.
    public var file: String

    public init(name: String, file: String) {
        self.name = name
        self.file = file
    }
}

public struct RestoreResult: Codable, Sendable, Hashable {
    public var volume: String
    public var size: UInt64
    /// Data written into the volume (zeros take none).
    public var copiedBytes: UInt64
    public var seconds: Double

    public init(volume: String, size: UInt64, copiedBytes: UInt64, seconds: Double) {
        self.volume = volume
        self.size = size
        self.copiedBytes = copiedBytes
        self.seconds = seconds
    }
}

public struct VolumeNameParams: Codable, Sendable, Hashable {
    public var name: String
    /// `volume.delete` of an RBD volume: remove the RBD image too (it stays when absent).
    public var deleteImage: Bool?
    public init(name: String, deleteImage: Bool? = nil) {
        self.name = name
        self.deleteImage = deleteImage
    }
}

// MARK: - Snapshots

public struct SnapshotInfo: Codable, Sendable, Hashable {
    @GUIDCoding public var id: UUID
    @GUIDCoding public var set: UUID
    public var volume: String
    /// The NBD export name, `VOLUME@GUID`.
    public var export: String
    public var createdAt: Date
    /// Bytes the snapshot holds in the diff store.
    public var diffBytes: UInt64
    /// `ready`, or `failed` when its diff store ran out of space (it can then only be deleted).
    public var state: String
    /// Why it failed, for a failed snapshot.
    public var failure: String?
    /// What its set was taken for (`backup`), if recorded (`set.label`).
    public var purpose: String?

    public init(
        id: UUID, set: UUID, volume: String, export: String, createdAt: Date, diffBytes: UInt64,
        state: String = "ready", failure: String? = nil, purpose: String? = nil
    ) {
        self.purpose = purpose
        self.id = id
        self.set = set
        self.volume = volume
        self.export = export
        self.createdAt = createdAt
        self.diffBytes = diffBytes
        self.state = state
        self.failure = failure
    }
}

public struct SnapshotList: Codable, Sendable, Hashable {
    /// Oldest first.
    public var snapshots: [SnapshotInfo]
    public init(snapshots: [SnapshotInfo]) { self.snapshots = snapshots }
}

public struct ListSnapshotsParams: Codable, Sendable, Hashable {
    /// Only this volume's snapshots when present.
    public var volume: String?
    public init(volume: String? = nil) { self.volume = volume }
}

public struct DeleteSnapshotsParams: Codable, Sendable, Hashable {
    /// Snapshot GUIDs, or set GUIDs to delete every snapshot of the set.
    @GUIDListCoding public var ids: [UUID]
    public init(ids: [UUID]) { self.ids = ids }
}

public struct DeleteSnapshotsResult: Codable, Sendable, Hashable {
    /// The snapshot GUIDs that were deleted.
    @GUIDListCoding public var deleted: [UUID]
    public init(deleted: [UUID]) { self.deleted = deleted }
}

public struct ChangesParams: Codable, Sendable, Hashable {
    public var volume: String
    @GUIDCoding public var since: UUID
    /// The newer snapshot; the live volume when absent.
    @OptionalGUIDCoding public var until: UUID?

    public init(volume: String, since: UUID, until: UUID? = nil) {
        self.volume = volume
        self.since = since
        self.until = until
    }
}

public struct ByteExtent: Codable, Sendable, Hashable {
    public var offset: UInt64
    public var length: UInt64
    public init(offset: UInt64, length: UInt64) {
        self.offset = offset
        self.length = length
    }
}

public struct ChangeList: Codable, Sendable, Hashable {
    public var chunkSize: UInt64
    /// Sorted and merged.
    public var extents: [ByteExtent]
    public init(chunkSize: UInt64, extents: [ByteExtent]) {
        self.chunkSize = chunkSize
        self.extents = extents
    }
}

// MARK: - Status

public struct StatusResult: Codable, Sendable, Hashable {
    public struct Volume: Codable, Sendable, Hashable {
        public var name: String
        public var size: UInt64
        /// "local" (the engine's own files); "rbd" once that provider exists.
        public var backend: String
        /// Bytes the diff store holds for this volume's snapshots.
        public var diffBytes: UInt64
        /// The diff-store limit in bytes; null when unlimited.
        public var diffLimit: UInt64?
        /// How many snapshots (ready, pending or failed).
        public var snapshots: Int
        /// Seconds since the oldest snapshot was taken; null without snapshots.
        public var oldestSnapshotAgeSeconds: Double?
        /// How copy-on-write copies chunks: "reflink" (the diff store shares the live data's blocks)
        /// or "write"; null where the backend copies by itself (RBD).
        public var copyMethod: String?

        public init(
            name: String, size: UInt64, backend: String, diffBytes: UInt64, diffLimit: UInt64?, snapshots: Int,
            oldestSnapshotAgeSeconds: Double?, copyMethod: String? = nil
        ) {
            self.name = name
            self.size = size
            self.backend = backend
            self.diffBytes = diffBytes
            self.diffLimit = diffLimit
            self.snapshots = snapshots
            self.oldestSnapshotAgeSeconds = oldestSnapshotAgeSeconds
            self.copyMethod = copyMethod
        }

        // Unknown values are written as null, not left out: scripts see every key.
        public func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(name, forKey: .name)
            try container.encode(size, forKey: .size)
            try container.encode(backend, forKey: .backend)
            try container.encode(diffBytes, forKey: .diffBytes)
            try container.encode(diffLimit, forKey: .diffLimit)
            try container.encode(snapshots, forKey: .snapshots)
            try container.encode(oldestSnapshotAgeSeconds, forKey: .oldestSnapshotAgeSeconds)
            try container.encode(copyMethod, forKey: .copyMethod)
        }
    }

    public var version: String
    public var uptimeSeconds: Double
    /// The NBD addresses the daemon listens on.
    public var listeners: [String]
    /// Open NBD connections.
    public var connections: Int
    /// Connected writers.
    public var writers: Int
    /// Connected writers by state (`stable`, `frozen`, …).
    public var writerStates: [String: Int]
    /// Successful reloads of the configuration since the daemon started (SIGHUP or `reload`).
    public var reloads: Int
    public var volumes: [Volume]

    public init(
        version: String, uptimeSeconds: Double, listeners: [String], connections: Int, writers: Int,
        writerStates: [String: Int], reloads: Int, volumes: [Volume]
    ) {
        self.version = version
        self.uptimeSeconds = uptimeSeconds
        self.listeners = listeners
        self.connections = connections
        self.writers = writers
        self.writerStates = writerStates
        self.reloads = reloads
        self.volumes = volumes
    }
}

// MARK: - Reload

public struct ReloadResult: Codable, Sendable, Hashable {
    /// What was read again: "access" (the access rules), "tls" (certificates and keys).
    public var reloaded: [String]
    public init(reloaded: [String]) { self.reloaded = reloaded }
}

// MARK: - Verification

public struct VerifyParams: Codable, Sendable, Hashable {
    /// The volumes to verify; every volume when empty.
    public var volumes: [String]
    public init(volumes: [String]) { self.volumes = volumes }
}

public struct VerifyResult: Codable, Sendable, Hashable {
    public struct Damage: Codable, Sendable, Hashable {
        @GUIDCoding public var snapshot: UUID
        public var offset: UInt64
        public var length: UInt64
        public init(snapshot: UUID, offset: UInt64, length: UInt64) {
            self.snapshot = snapshot
            self.offset = offset
            self.length = length
        }
    }

    public struct Volume: Codable, Sendable, Hashable {
        public var name: String
        public var snapshotsChecked: Int
        /// Preserved bytes read and compared with their checksums.
        public var bytesChecked: UInt64
        /// Preserved bytes recorded before checksums existed (format 2 or older): read, not compared.
        public var bytesUnchecked: UInt64
        /// Volume ranges that read wrong, for each snapshot whose reads meet them.
        public var damaged: [Damage]
        public init(
            name: String, snapshotsChecked: Int, bytesChecked: UInt64, bytesUnchecked: UInt64, damaged: [Damage]
        ) {
            self.name = name
            self.snapshotsChecked = snapshotsChecked
            self.bytesChecked = bytesChecked
            self.bytesUnchecked = bytesUnchecked
            self.damaged = damaged
        }
    }

    public var volumes: [Volume]
    public init(volumes: [Volume]) { self.volumes = volumes }
}

// MARK: - Shadow copy sets

public struct CreateSetParams: Codable, Sendable, Hashable {
    /// The volumes to snapshot at one instant (at least one, no repeats).
    public var volumes: [String]
    /// `false` skips the writers: a crash-consistent set (`--no-writers`).
    public var writers: Bool
    /// Overrides the Freeze→Thaw limit for this set (`--freeze-timeout`), in seconds.
    public var freezeTimeoutSeconds: Double?
    /// Keep the set open after PostSnapshot; the requester then sends `set.complete` or `set.abort`.
    public var keepOpen: Bool
    /// Wait for a set in progress to finish instead of failing with `busy`.
    public var wait: Bool

    public init(
        volumes: [String],
        writers: Bool = true,
        freezeTimeoutSeconds: Double? = nil,
        keepOpen: Bool = false,
        wait: Bool = false
    ) {
        self.volumes = volumes
        self.writers = writers
        self.freezeTimeoutSeconds = freezeTimeoutSeconds
        self.keepOpen = keepOpen
        self.wait = wait
    }

    enum CodingKeys: String, CodingKey {
        case volumes, writers, freezeTimeoutSeconds, keepOpen, wait
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        volumes = try container.decode([String].self, forKey: .volumes)
        writers = try container.decodeIfPresent(Bool.self, forKey: .writers) ?? true
        freezeTimeoutSeconds = try container.decodeIfPresent(Double.self, forKey: .freezeTimeoutSeconds)
        keepOpen = try container.decodeIfPresent(Bool.self, forKey: .keepOpen) ?? false
        wait = try container.decodeIfPresent(Bool.self, forKey: .wait) ?? false
    }
}

public struct CreatedSnapshot: Codable, Sendable, Hashable {
    @GUIDCoding public var id: UUID
    public var volume: String
    /// The NBD export name, `VOLUME@GUID`.
    public var export: String

    public init(id: UUID, volume: String, export: String) {
        self.id = id
        self.volume = volume
        self.export = export
    }
}

/// The result of `snapshot.create` and `set.complete`: INTERFACE.md's `snapshot create --json` shape,
/// plus the writers' outcomes.
public struct SnapshotSetResult: Codable, Sendable, Hashable {
    @GUIDCoding public var set: UUID
    public var createdAt: Date
    public var snapshots: [CreatedSnapshot]
    /// Every writer that took part, with the state it ended in.
    public var writers: [WriterInfo]
    /// True when no writer took part: the snapshots are crash-consistent, not application-consistent.
    public var crashConsistent: Bool
    /// `open` while a kept-open set waits for `set.complete`; `complete` after BackupComplete.
    public var state: SetResultState

    public init(
        set: UUID,
        createdAt: Date,
        snapshots: [CreatedSnapshot],
        writers: [WriterInfo],
        crashConsistent: Bool,
        state: SetResultState
    ) {
        self.set = set
        self.createdAt = createdAt
        self.snapshots = snapshots
        self.writers = writers
        self.crashConsistent = crashConsistent
        self.state = state
    }
}

public enum SetResultState: String, Codable, Sendable, Hashable {
    case open
    case complete
}

public struct SetParams: Codable, Sendable, Hashable {
    @GUIDCoding public var set: UUID
    public init(set: UUID) { self.set = set }
}

/// `set.label`: record what a set was taken for.
public struct LabelSetParams: Codable, Sendable, Hashable {
    @GUIDCoding public var set: UUID
    public var purpose: String
    public init(set: UUID, purpose: String) {
        self.set = set
        self.purpose = purpose
    }
}

// MARK: - Writers

public struct WriterInfo: Codable, Sendable, Hashable {
    public var name: String
    @GUIDCoding public var instance: UUID
    /// The volumes it cares about (`"*"`: all).
    public var volumes: [String]
    public var state: WriterState
    /// The last failure, if the writer failed the last set it took part in.
    public var failure: WriterFailure?
    /// What went wrong, in the writer's or the daemon's words.
    public var message: String?
    /// What the writer reported at Identify.
    public var metadata: JSONValue?

    public init(
        name: String,
        instance: UUID,
        volumes: [String],
        state: WriterState,
        failure: WriterFailure? = nil,
        message: String? = nil,
        metadata: JSONValue? = nil
    ) {
        self.name = name
        self.instance = instance
        self.volumes = volumes
        self.state = state
        self.failure = failure
        self.message = message
        self.metadata = metadata
    }
}

public struct WriterList: Codable, Sendable, Hashable {
    public var writers: [WriterInfo]
    public init(writers: [WriterInfo]) { self.writers = writers }
}

/// The `params` of every event the daemon sends a writer.
public struct WriterEventParams: Codable, Sendable, Hashable {
    @GUIDCoding public var set: UUID
    /// Every volume of the set.
    public var volumes: [String]
    /// How long the daemon waits for the answer to this event, in milliseconds.
    public var timeoutMs: Int64
    /// Freeze only: the Freeze→Thaw limit in milliseconds. A frozen writer that hears nothing for this
    /// long should thaw by itself.
    public var freezeWindowMs: Int64?
    /// Thaw, PostSnapshot and BackupComplete: the snapshots taken.
    public var snapshots: [CreatedSnapshot]?
    /// Abort only: why.
    public var reason: String?

    public init(
        set: UUID,
        volumes: [String],
        timeoutMs: Int64,
        freezeWindowMs: Int64? = nil,
        snapshots: [CreatedSnapshot]? = nil,
        reason: String? = nil
    ) {
        self.set = set
        self.volumes = volumes
        self.timeoutMs = timeoutMs
        self.freezeWindowMs = freezeWindowMs
        self.snapshots = snapshots
        self.reason = reason
    }
}

/// What a writer answers to Identify (anything else gets `{}`).
public struct IdentifyResult: Codable, Sendable, Hashable {
    public var metadata: JSONValue?
    public init(metadata: JSONValue? = nil) { self.metadata = metadata }
}

/// The `error` object of a writer's veto.
public struct VetoBody: Codable, Sendable, Hashable {
    public var code: String
    public var failure: WriterFailure?
    public var message: String?

    public init(failure: WriterFailure, message: String) {
        self.code = "veto"
        self.failure = failure
        self.message = message
    }
}
