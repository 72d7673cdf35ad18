// umbra writer: list the connected writers, or run one that answers each event with a command.

import ArgumentParser
import Foundation
import Logging
import NIOPosix
import ShadowCopy

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
