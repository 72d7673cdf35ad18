// The daemon's side of backup and restore: a snapshot written as a qcow2 image (`snapshot.backup`),
// and a volume created from one (`volume.restore`). Snapshot reads go through the engine, a few steps
// ahead of the image file, which is written and read on the engine's I/O threads, one step at a time:
// the two overlap, and no Swift concurrency thread ever blocks in a file write.
//
// An image is written as FILE.partial, synced, renamed to FILE and its directory synced: a backup
// that stops halfway (the snapshot deleted because its set was aborted, a full disk, the daemon
// stopping) leaves at most a .partial file, which it removes when it can, and never anything under
// the final name.

import BlockIO
import Foundation
import QCOW2
import ShadowCopy
import SnapshotEngine
import Synchronization

enum ImageTransfer {
    /// One step: what is read from the engine and written to the file at once.
    static let stepBytes = 8 << 20
    /// Steps read from the engine while the file takes the oldest one.
    static let readsAhead = 4

    /// Guest clusters (of `clusterSize`) that `ranges` touch, as ascending runs.
    static func clusterRuns(of ranges: [ByteRange], clusterSize: UInt64) -> [Range<UInt64>] {
        var runs: [Range<UInt64>] = []
        for range in ranges where range.count.rawValue > 0 {
            let first = range.offset.rawValue / clusterSize
            let end = (range.end.rawValue + clusterSize - 1) / clusterSize
            if let last = runs.last, last.upperBound >= first {
                runs[runs.count - 1] = last.lowerBound..<max(last.upperBound, end)
            } else {
                runs.append(first..<end)
            }
        }
        return runs
    }

    /// Writes snapshot `view` as a qcow2 image at `file`: the clusters `ranges` touch (what changed
    /// since the base, over `backingFile`; or everything allocated, for a full image).
    static func writeImage(
        of view: SnapshotView, ranges: [ByteRange], to file: String, backingFile: String?, io: any IOExecutor
    ) async throws -> BackupImageResult {
        let started = ContinuousClock.now
        let (directoryPath, name) = split(file)
        // The requester made the directory; one missing here is not the one it sees (a private /tmp,
        // another mount namespace), and an image written there would be lost to it.
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: directoryPath, isDirectory: &isDirectory), isDirectory.boolValue
        else {
            throw ShadowCopyError(
                .invalidArgument,
                "The directory \(directoryPath) does not exist where the daemon runs (a private /tmp or another mount namespace?); back up to a directory both see."
            )
        }
        let directory = try FileSystemDirectory(path: directoryPath)
        let partial = name + ".partial"
        let size = view.size.rawValue
        let writer = try await io.run { () -> WriterBox in
            if directory.fileExists(partial) { try directory.removeFile(partial) }
            let storage = try directory.openFile(partial, mode: .createNew)
            let checksum = QCOW2Writer.Checksum(
                update: { CRC32C.checksum($0, continuing: $1) }, combine: { CRC32C.combine($0, $1, secondLength: $2) })
            return WriterBox(
                try QCOW2Writer(storage: storage, virtualSize: size, backingFile: backingFile, checksum: checksum))
        }
        do {
            let clusterSize = UInt64(writer.writer.clusterSize)
            // Steps of whole clusters, read `readsAhead` at a time while the file takes the oldest.
            var steps: [(first: UInt64, count: UInt64)] = []
            for clusters in clusterRuns(of: ranges, clusterSize: clusterSize) {
                var cluster = clusters.lowerBound
                while cluster < clusters.upperBound {
                    let count = min(clusters.upperBound - cluster, UInt64(stepBytes) / clusterSize)
                    steps.append((cluster, count))
                    cluster += count
                }
            }
            // Whole-step buffers are reused: a fresh 8 MiB array per step costs a page fault per page.
            let spare = SpareBuffers()
            var reads: [(first: UInt64, task: Task<([UInt8], UInt32), any Error>)] = []
            defer { for read in reads { read.task.cancel() } }
            var next = 0
            while next < steps.count || !reads.isEmpty {
                while reads.count < readsAhead && next < steps.count {
                    let (first, count) = steps[next]
                    next += 1
                    let offset = first * clusterSize
                    // The image's last cluster may reach past the volume: read what exists, pad zeros.
                    let readable = Int(min(count * clusterSize, size - offset))
                    reads.append(
                        (
                            first,
                            Task {
                                var bytes: [UInt8]
                                if readable == stepBytes {
                                    bytes = try await view.read(at: ByteOffset(offset), into: spare.take())
                                } else {
                                    bytes = try await view.read(at: ByteOffset(offset), count: readable)
                                    if bytes.count < Int(count * clusterSize) {
                                        bytes += [UInt8](repeating: 0, count: Int(count * clusterSize) - bytes.count)
                                    }
                                }
                                // Checksummed here, steps in parallel, rather than while the file is written.
                                return (bytes, CRC32C.checksum(bytes))
                            }
                        ))
                }
                let read = reads.removeFirst()
                let (bytes, checksum) = try await read.task.value
                try await io.run {
                    try bytes.withUnsafeBytes {
                        try writer.writer.write(firstCluster: read.first, $0, checksum: checksum)
                    }
                }
                if bytes.count == stepBytes { spare.give(bytes) }
            }
            let (checksum, fileBytes) = try await io.run { () -> (UInt32, UInt64) in
                try writer.writer.finish()
                // Computed as the file was written, so it is not read back.
                return (writer.writer.fileChecksum ?? 0, try writer.writer.fileLength())
            }
            // A set aborted meanwhile (its requester gone) deleted the snapshot: no image for it.
            guard view.isReadable else {
                throw CLIError(
                    message:
                        "Snapshot \(view.id.guidString) was deleted while its image was written (its set was aborted); no image was kept."
                )
            }
            try await io.run { try directory.rename(partial, to: name) }
            let elapsed = ContinuousClock.now - started
            return BackupImageResult(
                file: file, kind: backingFile == nil ? "full" : "incremental", bytes: size,
                copiedBytes: writer.writer.dataBytes, checksum: checksum, fileBytes: fileBytes, seconds: elapsed.seconds
            )
        } catch {
            try? await io.run { try directory.removeFile(partial) }
            throw error
        }
    }

    /// The CRC-32C of a whole file, read in steps.
    static func checksum(of path: String) throws -> UInt32 {
        let storage = try FileStorage(path: path, mode: .readOnly)
        let size = try storage.size().rawValue
        var buffer = [UInt8](repeating: 0, count: stepBytes)
        var checksum: UInt32 = 0
        var offset: UInt64 = 0
        while offset < size {
            let count = Int(min(UInt64(stepBytes), size - offset))
            try buffer.withUnsafeMutableBytes {
                let target = UnsafeMutableRawBufferPointer(rebasing: $0[0..<count])
                try storage.read(fromAbsoluteOffset: ByteOffset(offset), into: target)
                checksum = CRC32C.checksum(UnsafeRawBufferPointer(target), continuing: checksum)
            }
            offset += UInt64(count)
        }
        return checksum
    }

    /// Creates volume `name` in `store` holding what the image at `file` (and its chain) holds. A
    /// failure deletes the volume again.
    static func restore(
        _ file: String, as name: String, in store: SnapshotStore, chunkSize: ByteCount
    ) async throws -> RestoreResult {
        let started = ContinuousClock.now
        let io = store.io
        let image = try await io.run { ImageBox(try QCOW2Image.open(path: file)) }
        let size = image.image.virtualSize
        guard size > 0, size % VolumeSpec.sizeGranularity == 0 else {
            throw CLIError(
                message:
                    "\(file) holds \(size) bytes, not a whole number of \(VolumeSpec.sizeGranularity)-byte blocks; Umbra volumes are."
            )
        }
        // Unfinished until filled: a daemon that dies meanwhile deletes it when it starts again.
        try await store.createVolume(VolumeSpec(name: name, size: ByteCount(size), chunkSize: chunkSize), filling: true)
        do {
            let volume = try store.volume(named: name)
            let clusterSize = UInt64(image.image.clusterSize)
            var copied: UInt64 = 0
            var stepStart: UInt64 = 0
            while stepStart < size {
                let stepEnd = min(size, stepStart + UInt64(stepBytes))
                let first = stepStart
                // The runs of clusters that hold data; the rest read as zeros, as the new volume does.
                let runs = try await io.run { () -> [(offset: UInt64, bytes: [UInt8])] in
                    var ranges: [Range<UInt64>] = []
                    var position = first
                    while position < stepEnd {
                        let end = min(stepEnd, position + clusterSize)
                        if try image.image.holdsData(at: position, count: Int(end - position)) {
                            if let last = ranges.last, last.upperBound == position {
                                ranges[ranges.count - 1] = last.lowerBound..<end
                            } else {
                                ranges.append(position..<end)
                            }
                        }
                        position = end
                    }
                    return try ranges.map { range in
                        var bytes = [UInt8](repeating: 0, count: Int(range.count))
                        try bytes.withUnsafeMutableBytes { try image.image.read(at: range.lowerBound, into: $0) }
                        return (range.lowerBound, bytes)
                    }
                }
                for piece in runs {
                    try await volume.write(at: ByteOffset(piece.offset), piece.bytes)
                    copied += UInt64(piece.bytes.count)
                }
                stepStart = stepEnd
            }
            try await store.finishFilling(volume: name)
            return RestoreResult(
                volume: name, size: size, copiedBytes: copied, seconds: (ContinuousClock.now - started).seconds)
        } catch {
            try? await store.deleteVolume(named: name, deletingSnapshots: true)
            throw error
        }
    }

    /// The directory and the name of an absolute path.
    static func split(_ path: String) -> (directory: String, name: String) {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        let directory = parts.dropLast().joined(separator: "/")
        return (directory.isEmpty ? "/" : directory, String(parts.last ?? ""))
    }
}

/// Step-sized buffers given back after their step was written, for the next read.
private final class SpareBuffers: Sendable {
    private let buffers = Mutex<[[UInt8]]>([])

    func take() -> [UInt8] {
        buffers.withLock { $0.popLast() } ?? [UInt8](repeating: 0, count: ImageTransfer.stepBytes)
    }

    func give(_ buffer: [UInt8]) { buffers.withLock { $0.append(buffer) } }
}

/// The writer, used by one I/O step at a time (each is awaited before the next).
private final class WriterBox: @unchecked Sendable {
    let writer: QCOW2Writer
    init(_ writer: QCOW2Writer) { self.writer = writer }
}

/// The image, read by one I/O step at a time (each is awaited before the next).
private final class ImageBox: @unchecked Sendable {
    let image: QCOW2Image
    init(_ image: QCOW2Image) { self.image = image }
}
