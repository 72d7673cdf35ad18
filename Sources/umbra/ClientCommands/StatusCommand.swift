// umbra status: the daemon at a glance, and each volume's capacity.

import ArgumentParser
import Foundation
import ShadowCopy

struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the daemon's version, uptime, listeners, connections and writers, and each volume's capacity.",
        discussion: "A volume whose diff store holds more than 80 % of its limit gets a warning line.")
    @OptionGroup var connection: ControlOptions
    @OptionGroup var output: OutputOptions

    /// The share of its diff limit above which a volume is flagged.
    static let warningShare = 0.8

    func run() async throws {
        let status = try await withClient(connection) { try await $0.status() }
        if output.json { return try printJSON(status) }
        print("Umbra \(status.version), up \(Self.duration(status.uptimeSeconds))")
        print("NBD: \(status.listeners.joined(separator: ", "))")
        let states = status.writerStates.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }
        print(
            "Connections: \(status.connections)    Writers: \(status.writers)"
                + (states.isEmpty ? "" : " (\(states.joined(separator: ", ")))"))
        if status.volumes.isEmpty { return print("No volumes.") }
        print("")
        printTable(
            ["VOLUME", "SIZE", "BACKEND", "COPIES", "DIFF", "LIMIT", "SNAPSHOTS", "OLDEST"],
            status.volumes.map {
                [
                    $0.name, Size.format($0.size), $0.backend, $0.copyMethod ?? "-", Size.format($0.diffBytes),
                    $0.diffLimit.map { Size.format($0) } ?? "none", String($0.snapshots),
                    $0.oldestSnapshotAgeSeconds.map(Self.duration) ?? "-",
                ]
            })
        for volume in status.volumes {
            guard let limit = volume.diffLimit, limit > 0,
                Double(volume.diffBytes) > Self.warningShare * Double(limit)
            else { continue }
            let percent = Int((Double(volume.diffBytes) / Double(limit) * 100).rounded())
            print(
                "Warning: volume '\(volume.name)' holds \(percent) % of its diff limit; its policy frees space by failing or deleting snapshots."
            )
        }
    }

    /// "3 d 4 h", "2 h 5 min", "42 s".
    static func duration(_ seconds: Double) -> String {
        let total = Int(seconds)
        let (days, hours, minutes) = (total / 86400, total % 86400 / 3600, total % 3600 / 60)
        if days > 0 { return "\(days) d \(hours) h" }
        if hours > 0 { return "\(hours) h \(minutes) min" }
        if minutes > 0 { return "\(minutes) min \(total % 60) s" }
        return "\(total) s"
    }
}
