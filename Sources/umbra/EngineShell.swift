// `umbra engine-shell`: runs engine commands read from standard input, one per line, answering each
// with one line. The process-level crash tests drive it and kill it with SIGKILL at random points;
// it is also a handy way to poke at a data directory by hand. Commands:
//
//   create NAME SIZE CHUNK          create a volume
//   write NAME OFFSET LENGTH        followed by exactly LENGTH raw bytes
//   trim NAME OFFSET LENGTH
//   flush NAME
//   set NAME...                     answers "ok SET SNAPSHOT..." (snapshots in the order named)
//   delete ID...
//   quit
//
// Answers are "ok …" or "error MESSAGE".

import ArgumentParser
import BlockIO
import Foundation
import SnapshotEngine

struct EngineShell: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "engine-shell",
        abstract: "Run engine commands from standard input (for crash tests and debugging).",
        shouldDisplay: false
    )

    @Option(help: "The data directory.")
    var data: String = "./umbra-data"

    func run() async throws {
        let store = try await SnapshotStore.open(path: data)
        let input = FileHandle.standardInput
        var reader = LineReader(handle: input)
        while let line = reader.nextLine() {
            let words = line.split(separator: " ").map(String.init)
            guard let command = words.first else { continue }
            let reply: String
            do {
                let answer = try await execute(command, Array(words.dropFirst()), store: store, reader: &reader)
                reply = answer.isEmpty ? "ok" : "ok \(answer)"
            } catch {
                reply = "error \(error)"
            }
            // Unbuffered, so the answer is out before the next command runs (a kill may follow).
            do {
                try FileHandle.standardOutput.write(contentsOf: Data((reply + "\n").utf8))
            } catch {
                break  // Nobody is listening any more.
            }
            if command == "quit" { break }
        }
        try await store.close()
    }

    private func execute(_ command: String, _ arguments: [String], store: SnapshotStore, reader: inout LineReader)
        async throws -> String
    {
        func number(_ index: Int) throws -> UInt64 {
            guard index < arguments.count, let value = UInt64(arguments[index]) else {
                throw ValidationError("'\(command)' needs a number as argument \(index + 1)")
            }
            return value
        }
        switch command {
        case "create":
            try await store.createVolume(
                VolumeSpec(
                    name: arguments.first ?? "", size: ByteCount(try number(1)), chunkSize: ByteCount(try number(2))))
            return ""
        case "write":
            let length = Int(try number(2))
            let bytes = reader.read(count: length)
            guard bytes.count == length else { throw ValidationError("input ended inside a write") }
            try await store.volume(named: arguments[0]).write(at: ByteOffset(try number(1)), bytes)
            return ""
        case "trim":
            try await store.volume(named: arguments.first ?? "").discard(
                at: ByteOffset(try number(1)), count: ByteCount(try number(2)))
            return ""
        case "flush":
            try await store.volume(named: arguments.first ?? "").flush()
            return ""
        case "set":
            let set = try await store.createSnapshotSet(volumes: arguments)
            let byVolume = Dictionary(uniqueKeysWithValues: set.snapshots.map { ($0.volume, $0.id.guidString) })
            return ([set.id.guidString] + arguments.map { byVolume[$0] ?? "?" }).joined(separator: " ")
        case "delete":
            let ids = try arguments.map { argument in
                guard let id = UUID(uuidString: argument) else { throw ValidationError("'\(argument)' is not a GUID") }
                return id
            }
            return try await store.deleteSnapshots(ids: ids).map(\.guidString).joined(separator: " ")
        case "quit":
            return ""
        default:
            throw ValidationError("unknown command '\(command)'")
        }
    }
}

/// Reads lines and raw byte runs from a file handle, buffering.
struct LineReader {
    let handle: FileHandle
    var buffer: [UInt8] = []

    init(handle: FileHandle) { self.handle = handle }

    private mutating func fill() -> Bool {
        let chunk = handle.availableData
        guard !chunk.isEmpty else { return false }
        buffer.append(contentsOf: chunk)
        return true
    }

    mutating func nextLine() -> String? {
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeFirst(newline + 1)
                return line
            }
            if !fill() {
                guard !buffer.isEmpty else { return nil }
                defer { buffer.removeAll() }
                return String(decoding: buffer, as: UTF8.self)
            }
        }
    }

    mutating func read(count: Int) -> [UInt8] {
        while buffer.count < count {
            if !fill() { break }
        }
        let taken = Array(buffer.prefix(count))
        buffer.removeFirst(taken.count)
        return taken
    }
}
