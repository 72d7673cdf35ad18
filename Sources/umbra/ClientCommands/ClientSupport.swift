// What the commands that talk to a running daemon share: finding its control socket, --json, and
// errors as one sentence on stderr and a non-zero exit status. Each command prints people-readable
// text, or with --json one JSON document on stdout and nothing else there.

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

    init(message: String) { description = message }

    init(_ error: any Error) {
        if let error = error as? CLIError {
            description = error.description
        } else if let error = error as? ShadowCopyError, !error.message.isEmpty {
            description = error.message
        } else {
            let text = "\(error)"
            description = text.isEmpty ? "The command failed." : sentence(text)
        }
    }
}

/// A clause (an error's description) as one sentence: capitalized, ending in a full stop unless it
/// ends in one of its own.
func sentence(_ clause: String) -> String {
    let capitalized = clause.prefix(1).uppercased() + clause.dropFirst()
    return capitalized.hasSuffix(".") || capitalized.hasSuffix("!") || capitalized.hasSuffix("?")
        ? capitalized : capitalized + "."
}

/// `path` made absolute (relative to the working directory), without a trailing slash.
func absolutePath(_ path: String) throws -> String {
    guard !path.isEmpty else { throw CLIError(message: "The path is empty.") }
    var absolute = path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    while absolute.count > 1 && absolute.hasSuffix("/") { absolute.removeLast() }
    return absolute
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
