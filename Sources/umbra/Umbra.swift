import ArgumentParser
import Foundation

@main
struct Umbra: AsyncParsableCommand {
    /// The version `umbra --version` and `umbra status` report.
    static let version = "0.2.0"

    static let configuration = CommandConfiguration(
        commandName: "umbra",
        abstract: "Copy-on-write snapshots of block volumes, served over NBD.",
        version: version,
        subcommands: [
            Serve.self, VolumeCommand.self, SnapshotCommand.self, WriterCommand.self, BackupCommand.self,
            RestoreCommand.self, VerifyCommand.self, StatusCommand.self, ReloadCommand.self, EngineShell.self,
        ]
    )

    /// Runs the command; a failure of the work itself is its one sentence on stderr and exit status
    /// 1 (ArgumentParser would prefix "Error: "), while usage errors and help go through ArgumentParser.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var command = command as? any AsyncParsableCommand {
                try await command.run()
            } else {
                try command.run()
            }
        } catch let error as CLIError {
            FileHandle.standardError.write(Data((error.description + "\n").utf8))
            Foundation.exit(1)
        } catch {
            exit(withError: error)
        }
    }
}
