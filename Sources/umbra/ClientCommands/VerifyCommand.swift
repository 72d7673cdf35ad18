// umbra verify: read everything the volumes' snapshots preserved and compare it with its checksums.

import ArgumentParser
import Foundation
import ShadowCopy

struct VerifyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Read every preserved chunk and check it against its checksum; exit status 1 if any is damaged.",
        discussion: """
            Needs the daemon; reads as much as the diff stores hold, while clients go on. A damaged \
            range is a range of the volume, listed for each snapshot whose reads meet it (such reads \
            fail with EIO). Chunks preserved before checksums existed (data directories from before \
            format 3) are counted as unchecked.
            """)
    @Argument(help: "The volumes to verify (default: every volume).") var volumes: [String] = []
    @OptionGroup var connection: ControlOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        let result = try await withClient(connection) { try await $0.verify(volumes: volumes) }
        let damaged = result.volumes.reduce(0) { $0 + $1.damaged.count }
        if output.json {
            try printJSON(result)
            if damaged > 0 { throw ExitCode.failure }
            return
        }
        if result.volumes.isEmpty { return print("No volumes.") }
        printTable(
            ["VOLUME", "SNAPSHOTS", "CHECKED", "UNCHECKED", "DAMAGED"],
            result.volumes.map {
                [
                    $0.name, String($0.snapshotsChecked), Size.format($0.bytesChecked), Size.format($0.bytesUnchecked),
                    String($0.damaged.count),
                ]
            })
        for volume in result.volumes where !volume.damaged.isEmpty {
            print("Damaged in '\(volume.name)':")
            for damage in volume.damaged {
                print(
                    "  snapshot \(damage.snapshot.uuidString.lowercased())  offset \(damage.offset)  length \(damage.length)"
                )
            }
        }
        guard damaged == 0 else {
            throw CLIError(
                message:
                    "Found \(damaged) damaged range\(damaged == 1 ? "" : "s"): reads of those snapshots there fail with EIO."
            )
        }
        print("No damage found.")
    }
}
