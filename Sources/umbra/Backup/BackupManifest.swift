// A backup directory's manifest (`DIR/umbra-backups.json`): every image a backup completed, with the
// CRC-32C of the file as written. It is replaced whole (written beside, synced, renamed, the
// directory synced), so it is always the old list or the new one. An image is listed only once its
// set completed; a backup that stopped halfway leaves nothing listed.

import BlockIO
import Foundation
import ShadowCopy

struct BackupManifest: Codable {
    static let fileName = "umbra-backups.json"
    static let currentVersion = 1

    struct Entry: Codable {
        var volume: String
        @GUIDCoding var snapshot: UUID
        @GUIDCoding var set: UUID
        /// Relative to DIR: VOLUME/SNAPSHOT.qcow2.
        var file: String
        var kind: String
        /// The backing file as the image records it (relative to the image); nil for a full image.
        var backing: String?
        var createdAt: Date
        var bytes: UInt64
        var copiedBytes: UInt64
        /// CRC-32C of the whole image file.
        var checksum: UInt32
    }

    var version = currentVersion
    var backups: [Entry] = []

    /// The manifest of `directory`; an empty one if it has none yet (unless `mustExist`).
    static func load(from directory: String, mustExist: Bool = false) throws -> BackupManifest {
        let path = directory + "/" + fileName
        guard FileManager.default.fileExists(atPath: path) else {
            if mustExist {
                var isDirectory: ObjCBool = false
                guard FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory),
                    isDirectory.boolValue
                else { throw CLIError(message: "\(directory) is not a directory.") }
                throw CLIError(message: "\(directory) holds no Umbra backups (no \(fileName)).")
            }
            return BackupManifest()
        }
        let manifest: BackupManifest
        do {
            manifest = try ControlJSON.makeDecoder().decode(
                BackupManifest.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        } catch {
            throw CLIError(message: "\(path) is damaged (\(error)); nothing was changed.")
        }
        guard manifest.version == currentVersion else {
            throw CLIError(
                message: "\(path) is version \(manifest.version); this Umbra reads version \(currentVersion).")
        }
        return manifest
    }

    func save(to directory: String) throws {
        try DaemonFiles.replace(Self.fileName, in: directory, with: Array(try ControlJSON.makeEncoder().encode(self)))
    }

    /// The most images one chain holds (a full image and its incrementals); past it a backup is
    /// full again, so that restoring never reads through an endless chain.
    static let longestChain = 64

    /// How many images the chain of `volume`'s last backup holds.
    func chainLength(of volume: String) -> Int {
        var length = 0
        for entry in backups.reversed() where entry.volume == volume {
            length += 1
            if entry.backing == nil { break }
        }
        return length
    }

    /// The last backup of `volume`.
    func last(of volume: String) -> Entry? { backups.last { $0.volume == volume } }

    /// By volume, then oldest first.
    func ordered() -> [Entry] {
        let volumes = backups.map(\.volume).reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }.sorted()
        return volumes.flatMap { volume in backups.filter { $0.volume == volume } }
    }
}

enum BackupDirectory {
    /// DIR absolute, created if missing, and checked to be a directory this process can write.
    static func prepare(_ path: String) throws -> String {
        let directory = try absolutePath(path)
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory) {
            guard isDirectory.boolValue else { throw CLIError(message: "\(directory) is a file, not a directory.") }
        } else {
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            } catch {
                throw CLIError(
                    message: "Cannot create the backup directory \(directory): \(error.localizedDescription)")
            }
        }
        guard access(directory, W_OK | X_OK) == 0 else {
            throw CLIError(message: "Cannot write to the backup directory \(directory).")
        }
        return directory
    }

    /// Takes DIR's lock (the file `lock`), or says another backup holds it.
    static func lock(_ directory: String) throws -> any DirectoryLock {
        do {
            guard let lock = try FileSystemDirectory(path: directory).lockExclusively() else {
                throw CLIError(message: "Another backup is writing to \(directory); try again when it is done.")
            }
            return lock
        } catch let error as BlockIOError {
            throw CLIError(message: "Cannot lock the backup directory \(directory): \(error).")
        }
    }

    /// Removes, from the volumes' folders in DIR, the images (SNAPSHOT.qcow2, and .partial ones)
    /// that the manifest does not list: what a backup interrupted before its manifest was saved left
    /// behind. Holding DIR's lock, nothing else is writing them.
    static func removeLeftovers(in directory: String, volumes: [String], keeping manifest: BackupManifest) {
        let listed = Set(manifest.backups.map(\.file))
        for volume in volumes {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: directory + "/" + volume)) ?? []
            for name in names where !listed.contains(volume + "/" + name) {
                let image = name.hasSuffix(".partial") ? String(name.dropLast(".partial".count)) : name
                guard image.hasSuffix(".qcow2"), UUID(uuidString: String(image.dropLast(".qcow2".count))) != nil else {
                    continue
                }
                try? FileManager.default.removeItem(atPath: directory + "/" + volume + "/" + name)
            }
        }
    }

    static func makeSubdirectory(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw CLIError(message: "Cannot create \(path): \(error.localizedDescription)")
        }
    }
}

/// A progress line on stderr while an image is written, when stderr is a terminal: bytes written of
/// bytes to copy (at most), rate and time left. The daemon writes the image as FILE.partial, whose
/// length says how far it is.
struct BackupProgress {
    let label: String
    let partialPath: String
    let total: UInt64

    func showing<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        guard isatty(STDERR_FILENO) == 1 else { return try await body() }
        let started = ContinuousClock.now
        let reporter = Task { [label, partialPath, total] in
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(250))
                let size = (try? FileManager.default.attributesOfItem(atPath: partialPath)[.size] as? UInt64) ?? 0
                let done = min(size, total)
                let elapsed = (ContinuousClock.now - started).seconds
                let rate = elapsed > 0 ? Double(done) / elapsed : 0
                let left = rate > 0 ? Double(total - done) / rate : 0
                FileHandle.standardError.write(
                    Data(
                        "\r\(label): \(Size.format(done)) of \(Size.format(total)), \(Size.format(UInt64(rate)))/s, \(Int(left)) s left   "
                            .utf8))
            }
        }
        defer {
            reporter.cancel()
            FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
        }
        return try await body()
    }
}
