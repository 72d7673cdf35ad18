// The engine's volumes and snapshots as NBD exports. The live volume is `NAME` (read-write); a
// snapshot is `NAME@GUID` (read-only). Changed-block tracking is offered as QEMU's dirty-bitmap
// contexts: `qemu:dirty-bitmap:GUID` on the live export and on newer snapshots of the same volume,
// dirty meaning "may have changed since snapshot GUID".
//
// Reads fill a pooled ByteBuffer in place and writes go from the received ByteBuffers: the engine
// takes them as owned buffers (BlockIO's IOBuffer and IOBytes) and reaches their bytes only inside
// closures, so no pointer outlives the call that lent it.

import BlockIO
import Logging
import NBDProtocol
import NBDServer
import NIOCore
import SnapshotEngine
import Synchronization

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

enum ExportNaming {
    static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"
    /// Live reads at least this long are sent from the file with sendfile(2) rather than copied into
    /// a buffer (measured: about a third of the CPU for 1 MiB reads; more than a copy for 4 KiB).
    static let sendfileThreshold: UInt32 = 128 * 1024

    static func blockSize(chunkSize: ByteCount) -> NBDBlockSize {
        // Preferred: a chunk (capped at 64 KiB), so well-behaved clients copy on write whole chunks.
        NBDBlockSize(
            minimum: 1, preferred: UInt32(min(chunkSize.rawValue, 65536)),
            maximum: NBDBlockSize.default.maximum)
    }

    /// `base:allocation` extents from engine allocation extents.
    static func allocationExtents(_ extents: [AllocationExtent]) -> [NBDExtent] {
        extents.map { extent in
            NBDExtent(
                length: UInt32(extent.range.count.rawValue),
                flags: extent.isHole ? NBDAllocationFlags.hole.rawValue | NBDAllocationFlags.zero.rawValue : 0)
        }
    }

    /// Dirty-bitmap extents covering `offset ..< offset + length` from the changed ranges within it.
    static func dirtyExtents(_ changed: [ByteRange], offset: UInt64, length: UInt32) -> [NBDExtent] {
        var extents: [NBDExtent] = []
        var position = offset
        let end = offset + UInt64(length)
        for range in changed {
            let start = max(range.offset.rawValue, offset)
            let stop = min(range.end.rawValue, end)
            guard stop > start else { continue }
            if start > position { extents.append(NBDExtent(length: UInt32(start - position), flags: 0)) }
            extents.append(NBDExtent(length: UInt32(stop - start), flags: NBDDirtyBitmapFlags.dirty))
            position = stop
        }
        if position < end { extents.append(NBDExtent(length: UInt32(end - position), flags: 0)) }
        return extents
    }

    static func snapshotID(fromContext context: String) -> UUID? {
        guard context.hasPrefix(dirtyBitmapPrefix) else { return nil }
        return UUID(uuidString: String(context.dropFirst(dirtyBitmapPrefix.count)))
    }
}

/// A pooled ByteBuffer as the target of an engine read: its first `count` writable bytes, filled in
/// place (the buffer is owned by one party at a time, so its storage is never copied).
struct ReadTarget: IOBuffer {
    var buffer: ByteBuffer
    let count: Int

    init(length: UInt32, buffers: NBDBufferPool) {
        buffer = buffers.buffer(capacity: Int(length))
        count = Int(length)
    }

    mutating func withUnsafeMutableBytes<Result>(_ body: (UnsafeMutableRawBufferPointer) throws -> Result) rethrows
        -> Result
    {
        let count = self.count
        return try buffer.withUnsafeMutableWritableBytes {
            try body(UnsafeMutableRawBufferPointer(rebasing: $0[0..<count]))
        }
    }

    /// The buffer, holding the bytes read.
    consuming func filled() -> ByteBuffer {
        buffer.moveWriterIndex(forwardBy: count)
        return buffer
    }
}

/// A received WRITE payload buffer as the source of an engine write.
struct PayloadBytes: IOBytes {
    let buffer: ByteBuffer
    var count: Int { buffer.readableBytes }

    func withUnsafeBytes<Result>(_ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result {
        try buffer.withUnsafeReadableBytes(body)
    }
}

/// An engine error on its way to an NBD client, with the errno the engine's one table gives it.
struct ExportError: NBDErrorConvertible {
    let underlying: any Error
    var nbdErrno: NBDErrno {
        guard let engine = underlying as? EngineError else { return .eio }
        return NBDError.errno(forSystemErrno: engine.errno.rawValue)
    }
    var description: String { "\(underlying)" }

    static func wrapping<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch {
            throw ExportError(underlying: error)
        }
    }
}

/// A volume's live data.
struct LiveVolumeExport: NBDExport {
    let volume: Volume
    let store: SnapshotStore

    var name: String { volume.name }
    var description: String { "Umbra volume \(volume.name)" }
    var size: UInt64 { volume.size.rawValue }
    var isReadOnly: Bool { false }
    var blockSize: NBDBlockSize { ExportNaming.blockSize(chunkSize: volume.chunkSize) }
    var supportsFastZero: Bool { true }
    var metaContexts: [String] {
        ((try? store.snapshots(volume: volume.name)) ?? []).filter { $0.state == .ready }.map {
            ExportNaming.dirtyBitmapPrefix + $0.id.guidString
        }
    }

    func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult {
        try await read(offset: offset, length: length, buffers: buffers, allowsFileSegments: true)
    }

    func read(
        offset: UInt64, length: UInt32, buffers: NBDBufferPool, allowsFileSegments: Bool
    ) async throws -> NBDReadResult {
        try await ExportError.wrapping {
            if allowsFileSegments, length >= ExportNaming.sendfileThreshold,
                let file = try volume.liveFileRange(at: ByteOffset(offset), count: ByteCount(UInt64(length)))
            {
                return .file(
                    NBDFileSegment(descriptor: file.descriptor, offset: offset, length: length, release: file.release))
            }
            let target = ReadTarget(length: length, buffers: buffers)
            return .data(try await volume.read(at: ByteOffset(offset), into: target).filled())
        }
    }

    func write(offset: UInt64, data: NBDWritePayload, fua: Bool) async throws {
        try await ExportError.wrapping {
            try await volume.write(at: ByteOffset(offset), gathering: data.buffers.map(PayloadBytes.init), fua: fua)
        }
    }

    func flush() async throws {
        try await ExportError.wrapping { try await volume.flush() }
    }

    func trim(offset: UInt64, length: UInt32, fua: Bool) async throws {
        try await ExportError.wrapping {
            try await volume.discard(at: ByteOffset(offset), count: ByteCount(UInt64(length)), fua: fua)
        }
    }

    func writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fast: Bool, fua: Bool) async throws {
        try await ExportError.wrapping {
            try await volume.writeZeroes(
                at: ByteOffset(offset), count: ByteCount(UInt64(length)), mayDiscard: mayTrim, fua: fua)
        }
    }

    func cache(offset: UInt64, length: UInt32) async throws {}

    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws -> [NBDExtent] {
        try await ExportError.wrapping {
            if let id = ExportNaming.snapshotID(fromContext: context) {
                let since = try store.snapshot(id: id)
                let changed = try since.changes(
                    within: ByteRange(offset: ByteOffset(offset), count: ByteCount(UInt64(length))))
                return ExportNaming.dirtyExtents(changed, offset: offset, length: length)
            }
            return ExportNaming.allocationExtents(
                try await volume.allocation(at: ByteOffset(offset), count: ByteCount(UInt64(length))))
        }
    }
}

/// A snapshot, read-only.
struct SnapshotExport: NBDExport {
    let snapshot: SnapshotView
    let store: SnapshotStore

    var name: String { snapshot.exportName }
    var description: String {
        "Umbra snapshot of \(snapshot.volumeName) taken \(snapshot.createdAt.formatted(.iso8601))"
    }
    var size: UInt64 { snapshot.size.rawValue }
    var isReadOnly: Bool { true }
    var blockSize: NBDBlockSize { ExportNaming.blockSize(chunkSize: snapshot.chunkSize) }
    /// Older snapshots of the same volume: what changed between each of them and this one.
    var metaContexts: [String] {
        let all = ((try? store.snapshots(volume: snapshot.volumeName)) ?? []).filter { $0.state == .ready }
        guard let position = all.firstIndex(where: { $0.id == snapshot.id }) else { return [] }
        return all[..<position].map { ExportNaming.dirtyBitmapPrefix + $0.id.guidString }
    }

    func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult {
        try await ExportError.wrapping {
            let target = ReadTarget(length: length, buffers: buffers)
            return .data(try await snapshot.read(at: ByteOffset(offset), into: target).filled())
        }
    }

    func write(offset: UInt64, data: NBDWritePayload, fua: Bool) async throws {
        throw NBDError(.eperm, "snapshots are read-only")
    }

    func flush() async throws {}

    func writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fast: Bool, fua: Bool) async throws {
        throw NBDError(.eperm, "snapshots are read-only")
    }

    func blockStatus(context: String, offset: UInt64, length: UInt32) async throws -> [NBDExtent] {
        try await ExportError.wrapping {
            if let id = ExportNaming.snapshotID(fromContext: context) {
                let older = try store.snapshot(id: id)
                let changed = try older.changes(
                    until: snapshot, within: ByteRange(offset: ByteOffset(offset), count: ByteCount(UInt64(length))))
                return ExportNaming.dirtyExtents(changed, offset: offset, length: length)
            }
            return ExportNaming.allocationExtents(
                try await snapshot.allocation(at: ByteOffset(offset), count: ByteCount(UInt64(length))))
        }
    }
}

/// Keeps the NBD export registry in step with the store.
final class ExportReconciler: Sendable {
    private let registry: NBDExportRegistry
    private let store = Mutex<SnapshotStore?>(nil)
    private let logger: Logger
    /// The one export to keep (`umbra serve --stdio`), or nil for all of them.
    private let only: String?

    init(registry: NBDExportRegistry, logger: Logger, only: String? = nil) {
        self.registry = registry
        self.logger = logger
        self.only = only
    }

    func attach(_ store: SnapshotStore) {
        self.store.withLock { $0 = store }
    }

    func storeChanged(_ event: StoreEvent) {
        if case .snapshotFailed(let id, let reason) = event {
            logger.warning("snapshot failed", metadata: ["snapshot.id": "\(id.guidString)", "reason": "\(reason)"])
        }
        reconcile()
    }

    /// Adds an export for every volume and readable snapshot that lacks one, and starts removing the
    /// exports whose volume or snapshot is gone (their connections are ended with ESHUTDOWN).
    func reconcile() {
        let stale = update()
        if !stale.isEmpty {
            let registry = self.registry
            Task {
                for name in stale { await registry.remove(named: name) }
            }
        }
    }

    /// Reconciles and waits until the exports that went away are removed and their connections
    /// closed: a request that deletes something answers only once its exports are gone.
    func settle() async {
        for name in update() { await registry.remove(named: name) }
    }

    /// Adds the missing exports; returns the names of those to remove.
    private func update() -> Set<String> {
        guard let store = store.withLock({ $0 }) else { return [] }
        var wanted: [String: any NBDExport] = [:]
        for info in store.volumes() {
            guard let volume = try? store.volume(named: info.name) else { continue }
            wanted[info.name] = LiveVolumeExport(volume: volume, store: store)
        }
        for info in (try? store.snapshots()) ?? [] where info.state == .ready {
            guard let view = try? store.snapshot(id: info.id) else { continue }
            wanted[info.exportName] = SnapshotExport(snapshot: view, store: store)
        }
        if let only { wanted = wanted.filter { $0.key == only } }
        let present = Set(registry.names)
        for (name, export) in wanted where !present.contains(name) {
            do {
                try registry.add(export)
            } catch {
                logger.error("could not add an export", metadata: ["nbd.export": "\(name)", "error": "\(error)"])
            }
        }
        return present.subtracting(wanted.keys)
    }
}
