// umbra backup, backup list, backup verify, and restore: the requester side of the shadow copy
// model. A backup takes one shadow copy set of its volumes (kept open while the images are written),
// has the daemon write each snapshot as a qcow2 image in DIR/VOLUME/SNAPSHOT.qcow2 (over the
// previous backup of that volume in DIR, as its backing file, when there is one), completes the set
// (writers get BackupComplete), and records each image with its checksum in DIR's manifest. `list`
// and `verify` read DIR alone. docs/backup.md is the user's guide.

import ArgumentParser
import BlockIO
import Foundation
import QCOW2
import ShadowCopy
import SnapshotEngine

#if canImport(Glibc)
    import Glibc
#endif

struct BackupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup", abstract: "Back volumes up as qcow2 images; list and verify backups.",
        subcommands: [Take.self, List.self, Verify.self], defaultSubcommand: Take.self)

    struct Take: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create",
            abstract: "Back volumes up into DIR (one shadow copy set for all of them).",
            discussion: """
                The first backup of a volume in DIR is full; later ones hold only what changed since \\
                the previous one, over it as their backing file. Umbra keeps the snapshot of each \\
                volume's last backup as the base of the next, and deletes the one before.
                """)
        @Argument(help: "The volumes to back up.") var volumes: [String]
        @Option(help: ArgumentHelp("The backup directory (created if missing).", valueName: "dir")) var to: String
        @Flag(
            help: "Write full images even where an incremental one could be made (default: incremental when possible).")
        var full = false
        @Flag(help: "Take the set without writers: crash-consistent images (default: with writers).")
        var noWriters = false
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func validate() throws {
            guard !volumes.isEmpty else { throw ValidationError("Name at least one volume to back up.") }
            guard Set(volumes).count == volumes.count else { throw ValidationError("Name each volume once.") }
        }

        func run() async throws {
            let directory = try BackupDirectory.prepare(to)
            // One backup at a time per directory; what an interrupted one left is cleared away.
            let lock = try BackupDirectory.lock(directory)
            defer { lock.release() }
            var manifest = try BackupManifest.load(from: directory)
            BackupDirectory.removeLeftovers(in: directory, volumes: volumes, keeping: manifest)
            let summary = try await withClient(connection) { client in
                try await backUp(into: directory, manifest: &manifest, client: client)
            }
            if output.json { return try printJSON(summary) }
            for backup in summary.backups {
                print(
                    "\(backup.volume): \(backup.kind) backup \(backup.file), \(Size.format(backup.copiedBytes)) written "
                        + "in \(String(format: "%.1f", backup.seconds)) s.")
            }
        }

        private func backUp(
            into directory: String, manifest: inout BackupManifest, client: ControlClient
        ) async throws -> BackupSummary {
            let snapshots = try await client.listSnapshots().snapshots
            let ready = Set(snapshots.filter { $0.state == "ready" }.map(\.id))
            // The base of each volume's incremental: its last backup in DIR, if its image remains and
            // its snapshot is still ready (one the diff-store policy failed cannot say what changed),
            // and the chain is not already at its longest.
            var bases: [String: BackupManifest.Entry] = [:]
            if !full {
                for volume in volumes {
                    if let last = manifest.last(of: volume), ready.contains(last.snapshot),
                        FileManager.default.fileExists(atPath: directory + "/" + last.file),
                        manifest.chainLength(of: volume) < BackupManifest.longestChain
                    {
                        bases[volume] = last
                    }
                }
            }
            // Each volume's last backup snapshot in DIR goes once the new one is kept, whether or not
            // it was this backup's base.
            let existing = Set(snapshots.map(\.id))
            let superseded = volumes.compactMap { manifest.last(of: $0)?.snapshot }.filter { existing.contains($0) }
            let set = try await client.createSnapshotSet(
                CreateSetParams(volumes: volumes, writers: !noWriters, keepOpen: true))
            var written: [String] = []
            var backups: [BackupSummary.Backup] = []
            var entries: [BackupManifest.Entry] = []
            do {
                // `snapshot list` marks them: "purpose": "backup".
                try await client.labelSet(set.set, purpose: "backup")
                for snapshot in set.snapshots {
                    try BackupDirectory.makeSubdirectory(directory + "/" + snapshot.volume)
                    let file = "\(snapshot.volume)/\(snapshot.id.guidString).qcow2"
                    let base = bases[snapshot.volume]
                    let toCopy = try await bytesToCopy(snapshot, base: base, client: client)
                    let progress = BackupProgress(
                        label: snapshot.volume, partialPath: directory + "/" + file + ".partial", total: toCopy)
                    let result = try await progress.showing {
                        try await client.backupSnapshot(
                            BackupImageParams(
                                snapshot: snapshot.id, file: directory + "/" + file, base: base?.snapshot,
                                backingFile: base.map { "\($0.snapshot.guidString).qcow2" }))
                    }
                    written.append(directory + "/" + file)
                    // The daemon wrote it at this path on its side; it must be the file this side sees.
                    let seen =
                        (try? FileManager.default.attributesOfItem(atPath: directory + "/" + file)[.size] as? UInt64)
                    guard seen == result.fileBytes else {
                        throw CLIError(
                            message:
                                "The daemon wrote \(file) where this command cannot see it (\(seen.map { "\($0) bytes here, not \(result.fileBytes)" } ?? "no such file here")): does the daemon have a private /tmp or another mount namespace?"
                        )
                    }
                    entries.append(
                        BackupManifest.Entry(
                            volume: snapshot.volume, snapshot: snapshot.id, set: set.set, file: file,
                            kind: result.kind, backing: base.map { "\($0.snapshot.guidString).qcow2" },
                            createdAt: set.createdAt, bytes: result.bytes, copiedBytes: result.copiedBytes,
                            checksum: result.checksum))
                    backups.append(
                        BackupSummary.Backup(
                            volume: snapshot.volume, snapshot: snapshot.id, file: file, kind: result.kind,
                            bytes: result.bytes, copiedBytes: result.copiedBytes, seconds: result.seconds))
                }
                // Listed before the writers hear BackupComplete (and may drop what the backup now holds).
                manifest.backups += entries
                do {
                    try manifest.save(to: directory)
                    _ = try await client.completeSet(set.set)
                } catch {
                    manifest.backups.removeLast(entries.count)
                    // If the manifest cannot be put back, its entries stay valid: keep their images.
                    if (try? manifest.save(to: directory)) == nil { written = [] }
                    throw error
                }
            } catch {
                // Nothing of this run may look like a backup: its images go, and its set is aborted
                // (its snapshots deleted; the previous bases stay the bases).
                for file in written { try? FileManager.default.removeItem(atPath: file) }
                try? await client.abortSet(set.set)
                let reason = CLIError(error).description
                throw CLIError(
                    message: "The backup failed: \(reason.hasSuffix(".") ? String(reason.dropLast()) : reason). "
                        + "Its shadow copy set was aborted and \(directory) is as it was before.")
            }
            if !superseded.isEmpty { _ = try? await client.deleteSnapshots(ids: superseded) }
            return BackupSummary(set: set.set, backups: backups)
        }

        /// What the image will hold at most: what changed since the base, or the whole volume.
        private func bytesToCopy(
            _ snapshot: CreatedSnapshot, base: BackupManifest.Entry?, client: ControlClient
        ) async throws -> UInt64 {
            if let base {
                let changes = try await client.changes(
                    volume: snapshot.volume, since: base.snapshot, until: snapshot.id)
                return changes.extents.reduce(0) { $0 + $1.length }
            }
            return try await client.listVolumes().volumes.first { $0.name == snapshot.volume }?.size ?? 0
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the backups in DIR, oldest first per volume (reads DIR alone).")
        @Argument(help: "The backup directory.") var directory: String
        @OptionGroup var output: OutputOptions

        func run() async throws {
            let manifest = try BackupManifest.load(from: absolutePath(directory), mustExist: true)
            let listed = manifest.ordered().map {
                BackupList.Backup(
                    volume: $0.volume, snapshot: $0.snapshot, file: $0.file, kind: $0.kind, backing: $0.backing,
                    createdAt: $0.createdAt)
            }
            if output.json { return try printJSON(BackupList(backups: listed)) }
            if listed.isEmpty { return print("No backups.") }
            printTable(
                ["VOLUME", "SNAPSHOT", "KIND", "CREATED", "FILE"],
                listed.map { [$0.volume, $0.snapshot.guidString, $0.kind, formatTime($0.createdAt), $0.file] })
        }
    }

    struct Verify: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Re-read every backup image in DIR against its recorded checksum (reads DIR alone).",
            discussion: "The exit status is 1 if any image is damaged or missing, or its backing chain broken.")
        @Argument(help: "The backup directory.") var directory: String
        @OptionGroup var output: OutputOptions

        func run() async throws {
            let directory = try absolutePath(self.directory)
            let manifest = try BackupManifest.load(from: directory, mustExist: true)
            var images: [BackupVerification.Image] = []
            for entry in manifest.ordered() {
                images.append(
                    BackupVerification.Image(file: entry.file, problem: Self.problem(with: entry, in: directory)))
            }
            let bad = images.filter { !$0.ok }
            if output.json {
                try printJSON(BackupVerification(images: images))
            } else {
                for image in images {
                    print("\(image.ok ? "ok      " : "DAMAGED ") \(image.file)\(image.problem.map { ": \($0)" } ?? "")")
                }
            }
            if !bad.isEmpty {
                throw CLIError(message: "\(bad.count) of \(images.count) backup images are damaged or missing.")
            }
        }

        static func problem(with entry: BackupManifest.Entry, in directory: String) -> String? {
            let path = directory + "/" + entry.file
            guard FileManager.default.fileExists(atPath: path) else { return "missing" }
            do {
                guard try ImageTransfer.checksum(of: path) == entry.checksum else {
                    return "its bytes differ from what was written (checksum mismatch)"
                }
                _ = try QCOW2Image.open(path: path)
                return nil
            } catch {
                return "\(error)"
            }
        }
    }
}

struct RestoreCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore", abstract: "Create a volume from a backup image (its backing chain included).")
    @Argument(help: "The qcow2 image (a backup, or any plain qcow2 image).") var file: String
    @Option(help: "The volume to create (it must not exist).") var volume: String
    @OptionGroup var connection: ControlOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        let path = try absolutePath(file)
        let result = try await withClient(connection) { try await $0.restoreVolume(name: volume, from: path) }
        if output.json { return try printJSON(result) }
        print(
            "Restored volume \(result.volume) (\(Size.format(result.size))) from \(file): "
                + "\(Size.format(result.copiedBytes)) written in \(String(format: "%.1f", result.seconds)) s.")
    }
}

// MARK: - Outputs

struct BackupSummary: Codable {
    struct Backup: Codable {
        var volume: String
        @GUIDCoding var snapshot: UUID
        var file: String
        var kind: String
        var bytes: UInt64
        var copiedBytes: UInt64
        var seconds: Double
    }

    @GUIDCoding var set: UUID
    var backups: [Backup]
}

struct BackupList: Codable {
    struct Backup: Codable {
        var volume: String
        @GUIDCoding var snapshot: UUID
        var file: String
        var kind: String
        var backing: String?
        var createdAt: Date

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(volume, forKey: .volume)
            try container.encode(_snapshot, forKey: .snapshot)
            try container.encode(file, forKey: .file)
            try container.encode(kind, forKey: .kind)
            try container.encode(backing, forKey: .backing)  // null for a full image
            try container.encode(createdAt, forKey: .createdAt)
        }
    }

    var backups: [Backup]
}

struct BackupVerification: Codable {
    struct Image: Codable {
        var file: String
        var ok: Bool { problem == nil }
        var problem: String?

        enum CodingKeys: String, CodingKey { case file, ok, problem }

        init(file: String, problem: String?) {
            self.file = file
            self.problem = problem
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            file = try container.decode(String.self, forKey: .file)
            problem = try container.decodeIfPresent(String.self, forKey: .problem)
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(file, forKey: .file)
            try container.encode(ok, forKey: .ok)
            try container.encodeIfPresent(problem, forKey: .problem)
        }
    }

    var images: [Image]
}
