// umbra volume: create, list and delete the daemon's volumes.

import ArgumentParser
import Foundation
import Logging
import NIOPosix
import ShadowCopy

struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume", abstract: "Create, list, change and delete volumes.",
        subcommands: [Create.self, List.self, Change.self, Revert.self, Delete.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a volume.")
        @Argument(help: "The volume's name (letters, digits, . _ -).") var name: String
        @Option(
            help:
                "Its size: bytes, or with K, M, G, T (a multiple of 4 KiB). With --rbd: create the image at this size (without: use the existing image)."
        )
        var size: Size?
        @Option(
            help: ArgumentHelp(
                "Put the volume on this Ceph RBD image (the daemon needs --ceph-conf).", valueName: "pool/image"))
        var rbd: String?
        @Option(help: "The copy-on-write chunk size: a power of two from 4K to 1M.") var chunkSize: Size?
        @Option(help: "The most the volume's diff store may hold (at least one chunk); no limit if absent.")
        var diffLimit: Size?
        @Option(
            help: "When the diff store is full: delete-oldest (the default) or fail-snapshot. Needs --diff-limit.",
            transform: VolumeCommand.policy)
        var whenFull: DiffStoreFullPolicy?
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func validate() throws {
            if size == nil && rbd == nil { throw ValidationError("Give --size (or --rbd with an existing image).") }
            if rbd != nil && (chunkSize != nil || diffLimit != nil || whenFull != nil) {
                throw ValidationError(
                    "--rbd takes no --chunk-size, --diff-limit or --when-full: RBD keeps its snapshots itself.")
            }
            if whenFull != nil && diffLimit == nil {
                throw ValidationError("--when-full needs --diff-limit: without a limit the diff store is never full.")
            }
        }

        func run() async throws {
            let info = try await withClient(connection) {
                try await $0.createVolume(
                    name: name, size: size?.bytes ?? 0, chunkSize: chunkSize?.bytes, diffLimit: diffLimit?.bytes,
                    whenFull: whenFull, rbd: rbd)
            }
            if diffLimit != nil && info.diffLimit == nil {
                throw ShadowCopyError(
                    .internal,
                    "The daemon created volume \(info.name) without the diff limit (it predates --diff-limit); delete it and upgrade the daemon."
                )
            }
            if output.json { return try printJSON(info) }
            if let image = info.image {
                return print("Created volume \(info.name) on RBD image \(image): \(Size.format(info.size)).")
            }
            print(
                "Created volume \(info.name): \(Size.format(info.size)), \(Size.format(info.chunkSize)) chunks"
                    + (VolumeCommand.describeLimit(info).map { ", " + $0 } ?? "") + ".")
        }
    }

    struct Change: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "set",
            abstract: "Change a volume's diff-store limit or what happens when it is full.",
            discussion: """
                Takes effect at once and survives restarts. A limit below what the diff store holds \
                deletes nothing now: the next copy-on-write that needs space makes the policy give way.
                """)
        @Argument(help: "The volume's name.") var name: String
        @Option(
            help: ArgumentHelp(
                "The most the diff store may hold from now on (whole chunks), or none to remove the limit (default: unchanged).",
                valueName: "size|none"),
            transform: { value in
                if value == "none" { return Size(bytes: 0) }
                guard let size = Size.parse(value), size.bytes > 0 else {
                    throw ValidationError("use a size (bytes, or with K, M, G, T) or none.")
                }
                return size
            })
        var diffLimit: Size?
        @Option(
            help: "When the diff store is full: delete-oldest or fail-snapshot (default: unchanged). Needs a limit.",
            transform: VolumeCommand.policy)
        var whenFull: DiffStoreFullPolicy?
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func validate() throws {
            if diffLimit == nil && whenFull == nil {
                throw ValidationError("Give --diff-limit or --when-full: there is nothing to change.")
            }
            if whenFull != nil && diffLimit?.bytes == 0 {
                throw ValidationError("--when-full needs a limit: without one the diff store is never full.")
            }
        }

        func run() async throws {
            let info = try await withClient(connection) {
                try await $0.setVolume(name: name, diffLimit: diffLimit?.bytes, whenFull: whenFull)
            }
            if output.json { return try printJSON(info) }
            print("Volume \(info.name): \(VolumeCommand.describeLimit(info) ?? "no diff limit").")
        }
    }

    struct Revert: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make a live volume read exactly as one of its snapshots.",
            discussion: """
                Only what changed since the snapshot is rewritten, through copy-on-write, so every \
                snapshot, older and newer, stays as it was. The volume's NBD connections are ended \
                (ESHUTDOWN) while it runs. It is atomic across crashes: after one, the daemon completes \
                it when it starts again.
                """)
        @Argument(help: "The volume's name.") var name: String
        @Option(help: ArgumentHelp("The snapshot to revert to (its GUID).", valueName: "snapshot-id"))
        var to: String
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func validate() throws {
            guard UUID(uuidString: to) != nil else {
                throw ValidationError("--to takes a snapshot GUID (got '\(to)').")
            }
        }

        func run() async throws {
            let snapshot = UUID(uuidString: to)!
            let result = try await withClient(connection) { try await $0.revertVolume(name: name, to: snapshot) }
            if output.json { return try printJSON(result) }
            print(
                "Reverted volume \(result.volume) to snapshot \(result.snapshot.guidString): "
                    + "\(Size.format(result.changedBytes)) rewritten in \(String(format: "%.1f", result.seconds)) s.")
        }
    }

    static func policy(_ value: String) throws -> DiffStoreFullPolicy {
        guard let policy = DiffStoreFullPolicy(rawValue: value) else {
            throw ValidationError("use delete-oldest or fail-snapshot.")
        }
        return policy
    }

    /// "diff store up to SIZE (when full: POLICY)", or nil without a limit.
    static func describeLimit(_ info: VolumeInfo) -> String? {
        guard let limit = info.diffLimit else { return nil }
        return "diff store up to \(Size.format(limit)) (when full: \(info.whenFull?.rawValue ?? "delete-oldest"))"
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the volumes.")
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            let list = try await withClient(connection) { try await $0.listVolumes() }
            if output.json { return try printJSON(list) }
            if list.volumes.isEmpty { return print("No volumes.") }
            printTable(
                ["NAME", "SIZE", "CHUNK", "DIFF LIMIT", "WHEN FULL", "BACKEND"],
                list.volumes.map {
                    [
                        $0.name, Size.format($0.size), Size.format($0.chunkSize),
                        $0.diffLimit.map(Size.format) ?? "-", $0.whenFull?.rawValue ?? "-",
                        $0.image.map { "rbd:" + $0 } ?? $0.backend ?? "local",
                    ]
                })
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete a volume (a local one must have no snapshots).",
            discussion:
                "An RBD volume's snapshots are removed and the volume forgotten; its image stays unless --delete-image."
        )
        @Argument(help: "The volume's name.") var name: String
        @Flag(help: "For an RBD volume: remove the RBD image too.") var deleteImage = false
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await withClient(connection) { try await $0.deleteVolume(name: name, deletingImage: deleteImage) }
            if output.json { return try printJSON(["deleted": name]) }
            print("Deleted volume \(name).")
        }
    }
}

// MARK: - Snapshots
