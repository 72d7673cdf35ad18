// Per-export access for `umbra serve --access FILE`: which authenticated (or unauthenticated)
// clients see which exports, and whether they may write. Every problem is one sentence naming the file.
//
// Access file (JSON): rules that only grant; a client gets the most any matching rule grants, and
// nothing (the export is invisible) when none matches.
//
//     { "rules": [
//         { "client": "backup-host", "volumes": ["disk", "logs"], "access": "read-only" },
//         { "client": "*", "volumes": ["scratch"], "access": "read-write" },
//         { "unauthenticated": true, "volumes": ["public"], "access": "read-only" } ] }
//
// `client` is a client certificate's subject common name or a pre-shared key identity; "*" is any
// authenticated client. `unauthenticated: true` instead matches clients that proved nothing (plain
// text, or TLS without a client certificate or key). `volumes` lists volume names or "*". A snapshot
// export VOLUME@GUID follows its volume's rules and is never writable.

import ArgumentParser
import Foundation
import NBDProtocol
import NBDServer
import NIOSSL
import SnapshotEngine

/// The access rules of `--access FILE`.
struct AccessRules: Sendable {
    enum Clients: Hashable, Sendable {
        case unauthenticated
        case anyAuthenticated
        case named(String)
    }

    struct Rule: Hashable, Sendable {
        var clients: Clients
        /// nil: every volume.
        var volumes: Set<String>?
        var access: NBDExportAccess
    }

    var rules: [Rule]

    /// What `client` may do with the export `exportName` (a volume, or `VOLUME@GUID`).
    func access(for client: NBDClientIdentity, toExport exportName: String) -> NBDExportAccess {
        let parts = exportName.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false)
        let volume = String(parts[0])
        var granted = NBDExportAccess.none
        for rule in rules where rule.matches(client) && (rule.volumes?.contains(volume) ?? true) {
            granted = max(granted, rule.access)
        }
        return parts.count > 1 ? min(granted, .readOnly) : granted
    }

    /// Reads and checks the access file at `path`.
    static func load(path: String) throws -> AccessRules {
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw ValidationError("Cannot read the access file \(path): \(error.localizedDescription).")
        }
        guard let document = try? JSONSerialization.jsonObject(with: data) else {
            throw ValidationError("The access file \(path) is not valid JSON.")
        }
        guard let top = document as? [String: Any], Set(top.keys) == ["rules"], let list = top["rules"] as? [Any]
        else {
            throw ValidationError("The access file \(path) must be an object with one key, \"rules\", a list.")
        }
        return AccessRules(
            rules: try list.enumerated().map { index, entry in
                do {
                    return try Rule(parsing: entry)
                } catch let problem as RuleProblem {
                    throw ValidationError("Access rule \(index + 1) in \(path) \(problem.text).")
                }
            })
    }

    private struct RuleProblem: Error {
        var text: String
    }
}

extension AccessRules.Rule {
    fileprivate init(parsing entry: Any) throws {
        typealias Problem = AccessRules.RuleProblem
        guard let rule = entry as? [String: Any] else { throw Problem(text: "is not an object") }
        let unknown = Set(rule.keys).subtracting(["client", "unauthenticated", "volumes", "access"])
        guard unknown.isEmpty else { throw Problem(text: "has unknown keys \(unknown.sorted())") }
        switch (rule["client"], rule["unauthenticated"]) {
        case (let name as String, nil) where name == "*":
            clients = .anyAuthenticated
        case (let name as String, nil) where !name.isEmpty:
            clients = .named(name)
        case (nil, let flag as Bool) where flag:
            clients = .unauthenticated
        default:
            throw Problem(text: "needs either \"client\" (a name or \"*\") or \"unauthenticated\": true")
        }
        guard let names = rule["volumes"] as? [String], !names.isEmpty else {
            throw Problem(text: "needs \"volumes\", a list of volume names or \"*\"")
        }
        if names.contains("*") {
            volumes = nil
        } else if let invalid = names.first(where: { !VolumeSpec.isValidName($0) }) {
            throw Problem(text: "names \"\(invalid)\", which is not a volume name")
        } else {
            volumes = Set(names)
        }
        switch rule["access"] as? String {
        case "read-only": access = .readOnly
        case "read-write": access = .readWrite
        default: throw Problem(text: "needs \"access\": \"read-only\" or \"read-write\"")
        }
    }

    fileprivate func matches(_ client: NBDClientIdentity) -> Bool {
        switch (clients, client.name) {
        case (.unauthenticated, nil): true
        case (.anyAuthenticated, .some): true
        case (.named(let wanted), let name?): wanted == name
        default: false
        }
    }
}
