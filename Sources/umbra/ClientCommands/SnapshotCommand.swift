// umbra snapshot: take shadow copy sets, list and delete snapshots, and ask what changed between two.

import ArgumentParser
import Foundation
import Logging
import NIOPosix
import ShadowCopy

struct SnapshotCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot", abstract: "Take, list and delete shadow copy sets, and ask what changed.",
        subcommands: [Create.self, List.self, Delete.self, Changes.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Take one shadow copy set of the volumes, at one instant, with the writers' help.")
        @Argument(help: "The volumes to snapshot together.") var volumes: [String]
        @Option(help: "The Freeze→Thaw limit for this set, in seconds.") var freezeTimeout: Double?
        @Flag(help: "Do not involve writers: a crash-consistent set.") var noWriters = false
        @Flag(help: "If another set is being taken, wait for it instead of failing.") var wait = false
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func validate() throws {
            if volumes.isEmpty { throw ValidationError("Name at least one volume.") }
            if let freezeTimeout, !(freezeTimeout > 0 && freezeTimeout <= 3600) {
                throw ValidationError("--freeze-timeout must be more than 0 and at most 3600 seconds.")
            }
        }

        func run() async throws {
            let params = CreateSetParams(
                volumes: volumes, writers: !noWriters, freezeTimeoutSeconds: freezeTimeout, keepOpen: false, wait: wait)
            let result = try await withClient(connection) { try await $0.createSnapshotSet(params) }
            if output.json { return try printJSON(result) }
            print("Took shadow copy set \(result.set.uuidString.lowercased()) at \(formatTime(result.createdAt)).")
            printTable(
                ["SNAPSHOT", "VOLUME", "EXPORT"],
                result.snapshots.map { [$0.id.uuidString.lowercased(), $0.volume, $0.export] })
            if result.crashConsistent {
                print("No writer took part: the snapshots are crash-consistent.")
            } else {
                print("Writers: " + result.writers.map { "\($0.name) (\($0.state.rawValue))" }.joined(separator: ", "))
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List snapshots, oldest first.")
        @Argument(help: "Only this volume's snapshots.") var volume: String?
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            let list = try await withClient(connection) { try await $0.listSnapshots(volume: volume) }
            if output.json { return try printJSON(list) }
            if list.snapshots.isEmpty { return print("No snapshots.") }
            printTable(
                ["SNAPSHOT", "SET", "VOLUME", "CREATED", "DIFF", "PURPOSE", "STATE"],
                list.snapshots.map {
                    [
                        $0.id.uuidString.lowercased(), $0.set.uuidString.lowercased(), $0.volume,
                        formatTime($0.createdAt),
                        Size.format($0.diffBytes), $0.purpose ?? "-", $0.failure.map { "failed: \($0)" } ?? $0.state,
                    ]
                })
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete snapshots (a set's GUID deletes the whole set); all or nothing.")
        @Argument(help: "Snapshot or set GUIDs.") var ids: [String]
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func validate() throws {
            if ids.isEmpty { throw ValidationError("Name at least one snapshot or set GUID.") }
            for id in ids where UUID(uuidString: id) == nil { throw ValidationError("'\(id)' is not a GUID.") }
        }

        func run() async throws {
            let result = try await withClient(connection) {
                try await $0.deleteSnapshots(ids: ids.compactMap(UUID.init(uuidString:)))
            }
            if output.json { return try printJSON(result) }
            print("Deleted \(result.deleted.count) snapshot\(result.deleted.count == 1 ? "" : "s").")
        }
    }

    struct Changes: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The byte ranges that may differ between a snapshot and a newer one (or the live volume).")
        @Argument(help: "The volume.") var volume: String
        @Option(help: "The older snapshot's GUID.") var since: String
        @Option(help: "The newer snapshot's GUID (default: the live volume).") var until: String?
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func validate() throws {
            for id in [since] + (until.map { [$0] } ?? []) where UUID(uuidString: id) == nil {
                throw ValidationError("'\(id)' is not a GUID.")
            }
        }

        func run() async throws {
            let list = try await withClient(connection) {
                try await $0.changes(
                    volume: volume, since: UUID(uuidString: since)!, until: until.flatMap(UUID.init(uuidString:)))
            }
            if output.json { return try printJSON(list) }
            let total = list.extents.reduce(0) { $0 + $1.length }
            print(
                "\(list.extents.count) extent\(list.extents.count == 1 ? "" : "s"), \(Size.format(total)) (chunk size \(Size.format(list.chunkSize))):"
            )
            for extent in list.extents { print("  offset \(extent.offset)  length \(extent.length)") }
        }
    }
}

// MARK: - Writers
