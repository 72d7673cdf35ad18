import ArgumentParser

@main
struct Umbra: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "umbra",
        abstract: "Copy-on-write snapshots of block volumes, served over NBD.",
        subcommands: [Serve.self, VolumeCommand.self, SnapshotCommand.self, WriterCommand.self, EngineShell.self]
    )
}
