// The commands that talk to a running daemon over its control socket: volumes, snapshots, writers.
// Each prints people-readable text, or with --json one JSON document on stdout and nothing else
// there; errors are one sentence on stderr and a non-zero exit status.

import ArgumentParser
import Foundation
import Logging
import NIOPosix
import ShadowCopy

/// How a client command finds the daemon.
struct ControlOptions: ParsableArguments {
    @Option(help: "The daemon's control socket (default: $UMBRA_CONTROL, else ./umbra-data/control.sock).")
    var control: String?

    var socketPath: String {
        control ?? ProcessInfo.processInfo.environment["UMBRA_CONTROL"] ?? "./umbra-data/control.sock"
    }

    func connect() async throws -> ControlClient {
        try await ControlClient.connect(socketPath: socketPath)
    }
}

struct OutputOptions: ParsableArguments {
    @Flag(help: "Print one JSON document on stdout.")
    var json = false
}

/// An error reported as one sentence on stderr, with nothing before it: the daemon's message as it
/// came (docs/control-protocol.md: print it as is), anything else made a sentence.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ error: any Error) {
        if let error = error as? CLIError {
            description = error.description
        } else if let error = error as? ShadowCopyError, !error.message.isEmpty {
            description = error.message
        } else {
            let text = "\(error)"
            guard let first = text.first else {
                description = "The command failed."
                return
            }
            let sentence = first.uppercased() + text.dropFirst()
            description =
                sentence.hasSuffix(".") || sentence.hasSuffix("!") || sentence.hasSuffix("?")
                ? sentence : sentence + "."
        }
    }
}

/// Runs a client command body: connects, runs, closes; errors become one sentence on stderr.
func withClient<T>(_ options: ControlOptions, _ body: (ControlClient) async throws -> T) async throws -> T {
    do {
        let client = try await options.connect()
        do {
            let result = try await body(client)
            await client.close()
            return result
        } catch {
            await client.close()
            throw error
        }
    } catch {
        throw CLIError(error)
    }
}

func printJSON(_ value: some Encodable) throws {
    print(try ControlJSON.string(value))
}

/// Left-aligned columns for people.
func printTable(_ header: [String], _ rows: [[String]]) {
    let widths = header.indices.map { column in ([header] + rows).map { $0[column].count }.max() ?? 0 }
    for row in [header] + rows {
        print(
            row.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }
                .joined(separator: "  ").trimmingCharacters(in: .whitespaces))
    }
}

func formatTime(_ date: Date) -> String { date.formatted(.iso8601) }

// MARK: - Volumes

struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume", abstract: "Create, list and delete volumes.",
        subcommands: [Create.self, List.self, Delete.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a volume.")
        @Argument(help: "The volume's name (letters, digits, . _ -).") var name: String
        @Option(help: "Its size: bytes, or with K, M, G, T (a multiple of 4 KiB).") var size: Size
        @Option(help: "The copy-on-write chunk size: a power of two from 4K to 1M.") var chunkSize: Size?
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            let info = try await withClient(connection) {
                try await $0.createVolume(name: name, size: size.bytes, chunkSize: chunkSize?.bytes)
            }
            if output.json { return try printJSON(info) }
            print("Created volume \(info.name): \(Size.format(info.size)), \(Size.format(info.chunkSize)) chunks.")
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
                ["NAME", "SIZE", "CHUNK"],
                list.volumes.map { [$0.name, Size.format($0.size), Size.format($0.chunkSize)] })
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
                ["SNAPSHOT", "SET", "VOLUME", "CREATED", "DIFF", "STATE"],
                list.snapshots.map {
                    [
                        $0.id.uuidString.lowercased(), $0.set.uuidString.lowercased(), $0.volume,
                        formatTime($0.createdAt),
                        Size.format($0.diffBytes), $0.failure.map { "failed: \($0)" } ?? $0.state,
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

struct WriterCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "writer", abstract: "List writers, or run one that runs commands at each event.",
        subcommands: [List.self, Run.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the connected writers and their states.")
        @OptionGroup var connection: ControlOptions
        @OptionGroup var output: OutputOptions

        func run() async throws {
            let list = try await withClient(connection) { try await $0.listWriters() }
            if output.json { return try printJSON(list) }
            if list.writers.isEmpty { return print("No writers connected.") }
            printTable(
                ["NAME", "INSTANCE", "STATE", "VOLUMES", "LAST FAILURE"],
                list.writers.map { writer in
                    [
                        writer.name, writer.instance.uuidString.lowercased(), writer.state.rawValue,
                        writer.volumes.joined(separator: ","),
                        writer.failure.map { "\($0.rawValue): \(writer.message ?? "")" } ?? "",
                    ]
                })
        }
    }

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a writer that runs a shell command at each event (non-zero exit vetoes; 75 is retryable).")
        @Option(help: "The writer's name.") var name: String
        @Option(help: "A volume it writes to ('*' for all). Repeat for several.") var volume: [String] = []
        @Option(help: "Command for Identify.") var onIdentify: String?
        @Option(help: "Command for PrepareForBackup.") var onPrepareBackup: String?
        @Option(help: "Command for PrepareForSnapshot.") var onPrepareSnapshot: String?
        @Option(help: "Command for Freeze: quiesce, then exit 0.") var onFreeze: String?
        @Option(help: "Command for Thaw: resume.") var onThaw: String?
        @Option(help: "Command for PostSnapshot.") var onPostSnapshot: String?
        @Option(help: "Command for BackupComplete.") var onBackupComplete: String?
        @Option(help: "Command for Abort (after a successful Freeze the thaw command runs first).") var onAbort: String?
        @OptionGroup var connection: ControlOptions

        func validate() throws {
            if volume.isEmpty { throw ValidationError("Name at least one --volume.") }
        }

        func run() async throws {
            var commands: [WriterEvent: String] = [:]
            commands[.identify] = onIdentify
            commands[.prepareForBackup] = onPrepareBackup
            commands[.prepareForSnapshot] = onPrepareSnapshot
            commands[.freeze] = onFreeze
            commands[.thaw] = onThaw
            commands[.postSnapshot] = onPostSnapshot
            commands[.backupComplete] = onBackupComplete
            commands[.abort] = onAbort
            let writer = ShadowCopyWriter(
                socketPath: connection.socketPath, name: name, volumes: volume,
                delegate: CommandWriter(commands: commands),
                logger: Logger(label: "umbra.writer") { StreamLogHandler.standardError(label: $0) })
            do {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { try await writer.runReconnecting() }
                    group.addTask { _ = await TerminationSignal.wait() }
                    try await group.next()
                    group.cancelAll()
                }
            } catch is CancellationError {
            } catch {
                throw CLIError(error)
            }
        }
    }
}
