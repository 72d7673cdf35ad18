// umbra reload: the daemon re-reads its access rules and TLS files (as on SIGHUP), for new
// connections; open ones keep what they negotiated. A bad file is refused and the old one stays.

import ArgumentParser
import Foundation
import ShadowCopy

struct ReloadCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload",
        abstract: "Make the daemon re-read its access rules and TLS certificates and keys (as SIGHUP does).",
        discussion: """
            New connections get the new configuration; open ones keep theirs. If a file is bad, the \
            reload is refused with the reason and the configuration in use stays. TLS cannot be \
            switched on or off this way.
            """)
    @OptionGroup var connection: ControlOptions
    @OptionGroup var output: OutputOptions

    func run() async throws {
        let result = try await withClient(connection) { try await $0.reload() }
        if output.json { return try printJSON(result) }
        print(
            result.reloaded.isEmpty
                ? "Reloaded (the daemon has no access rules or TLS files to read)."
                : "Reloaded: \(result.reloaded.joined(separator: ", ")).")
    }
}
