// umbra volume: create, list and delete the daemon's volumes.

import ArgumentParser
import Foundation
import Logging
import NIOPosix
import ShadowCopy

struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume", abstract: "Create, list and delete volumes.",
        subcommands: [Create.self, List.self, Delete.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a volume.")
        @Argument(help: "The volume's name (letters, digits, . _ -).") var name: String
        @Option(help: "Its size: bytes, or with K, M, G, T (a multiple of 4 KiB).") var size: Size
        @Option(help: "The copy-on-write chunk size: a power of two from 4K to 1M.") var chunkSize: Size?
        @Option(help: "The most the volume's diff store may hold (at least one chunk); no limit if absent.")
        var diffLimit: Size?
        @Option(
            help: "When the diff store is full: delete-oldest (the default) or fail-snapshot. Needs --diff-limit.",
            transform: { value in
                guard let policy = DiffStoreFullPolicy(rawValue: value) else {
                    throw ValidationError("use delete-oldest or fail-snapshot.")
                }
                return policy
            })
        var whenFull: DiffStoreFullPolicy?
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func validate() throws {
            if whenFull != nil && diffLimit == nil {
                throw ValidationError("--when-full needs --diff-limit: without a limit the diff store is never full.")
            }
        }

        func run() async throws {
            let info = try await withClient(connection) {
                try await $0.createVolume(
                    name: name, size: size.bytes, chunkSize: chunkSize?.bytes, diffLimit: diffLimit?.bytes,
                    whenFull: whenFull)
            }
            if diffLimit != nil && info.diffLimit == nil {
                throw ShadowCopyError(
                    .internal,
                    "The daemon created volume \(info.name) without the diff limit (it predates --diff-limit); delete it and upgrade the daemon."
                )
            }
            if output.json { return try printJSON(info) }
            var line = "Created volume \(info.name): \(Size.format(info.size)), \(Size.format(info.chunkSize)) chunks"
            if let limit = info.diffLimit {
                line +=
                    ", diff store up to \(Size.format(limit)) (when full: \(info.whenFull?.rawValue ?? "delete-oldest"))"
            }
            print(line + ".")
        }
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
                ["NAME", "SIZE", "CHUNK", "DIFF LIMIT", "WHEN FULL"],
                list.volumes.map {
                    [
                        $0.name, Size.format($0.size), Size.format($0.chunkSize),
                        $0.diffLimit.map(Size.format) ?? "-", $0.whenFull?.rawValue ?? "-",
                    ]
                })
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a volume (it must have no snapshots).")
        @Argument(help: "The volume's name.") var name: String
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            try await withClient(connection) { try await $0.deleteVolume(name: name) }
            if output.json { return try printJSON(["deleted": name]) }
            print("Deleted volume \(name).")
        }
    }
}

// MARK: - Snapshots
