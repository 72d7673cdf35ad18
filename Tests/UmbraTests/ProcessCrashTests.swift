// kill -9 at random points: `umbra engine-shell` runs writes, trims, flushes, snapshot sets and
// deletions on two volumes, fed in pipelined batches; the test reads a random number of answers and
// kills the process, so the kill lands in the middle of whatever it was doing. The data directory is
// then reopened in this process and checked: every snapshot reads back exactly what its volume held
// when it was taken, every write completed before the volume's last flush or set is there (a killed
// process loses no page cache), a write completed since may be missing (it was answered before its
// copy-on-write was done, as NBD allows until a flush), an interrupted write is in or out byte by
// byte, and snapshots vanish only by deletion.

import BlockIO
import Foundation
import SnapshotEngine
import Testing
import UmbraTestSupport

@Suite struct ProcessCrashTests {
    static let volumes = ["p", "q"]
    static let volumeSize = 1 << 20
    static let rounds = 16

    enum Operation {
        case write(volume: String, offset: Int, bytes: [UInt8])
        case trim(volume: String, offset: Int, count: Int)
        case flush(volume: String)
        case set(volumes: [String])
        case delete(id: UUID)

        var command: [UInt8] {
            switch self {
            case .write(let volume, let offset, let bytes):
                Array("write \(volume) \(offset) \(bytes.count)\n".utf8) + bytes
            case .trim(let volume, let offset, let count): Array("trim \(volume) \(offset) \(count)\n".utf8)
            case .flush(let volume): Array("flush \(volume)\n".utf8)
            case .set(let volumes): Array("set \(volumes.joined(separator: " "))\n".utf8)
            case .delete(let id): Array("delete \(id.uuidString.lowercased())\n".utf8)
            }
        }
    }

    struct Model {
        var content: [String: [UInt8]]
        var snapshots: [UUID: (volume: String, bytes: [UInt8], setID: UUID)] = [:]
        /// The contents as of the volume's last flush or set, which waited for every answered write.
        var settled: [String: [UInt8]] = [:]
        /// Writes answered since then: each may be missing after the kill.
        var unsettled: [String: [(offset: Int, bytes: [UInt8])]] = [:]

        init(content: [String: [UInt8]]) {
            self.content = content
            settled = content
        }

        mutating func settle(_ volume: String) {
            settled[volume] = content[volume]
            unsettled[volume] = []
        }

        mutating func apply(_ operation: Operation, answer: [String]) throws {
            switch operation {
            case .write(let volume, let offset, let bytes):
                overwrite(&content[volume]!, at: offset, with: bytes)
                unsettled[volume, default: []].append((offset, bytes))
            case .trim(let volume, let offset, let count):
                let zeros = [UInt8](repeating: 0, count: count)
                overwrite(&content[volume]!, at: offset, with: zeros)
                unsettled[volume, default: []].append((offset, zeros))
            case .flush(let volume): settle(volume)
            case .set(let volumes):
                guard answer.count == volumes.count + 1, let setID = UUID(uuidString: answer[0]) else {
                    throw SimulationError("bad answer to set: \(answer)")
                }
                for (index, volume) in volumes.enumerated() {
                    snapshots[UUID(uuidString: answer[index + 1])!] = (volume, content[volume]!, setID)
                    settle(volume)
                }
            case .delete(let id):
                for (snapshot, entry) in snapshots where snapshot == id || entry.setID == id {
                    snapshots[snapshot] = nil
                }
            }
        }
    }

    struct SimulationError: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    /// kill -9 during writes with several snapshots: after reopening, every snapshot is exact and every completed write present.
    @Test func survivesKillNine() async throws {
        try await TemporaryDirectory.with("umbra-kill") { directory in
            try await killNineRounds(data: directory.path + "/data", expecting: nil)
        }
    }

    /// The same on XFS with reflink, where copies share the live data's blocks instead of being
    /// written: a crash between a clone and its sync, or during the live write that then gets new
    /// blocks, never changes a snapshot.
    @Test(.enabled(if: ReflinkFileSystem.unavailableReason == nil, "needs root, xfsprogs and a loop device"))
    func survivesKillNineWithReflinkCopies() async throws {
        try await ReflinkFileSystem.with { fileSystem in
            try await killNineRounds(data: fileSystem.path + "/data", expecting: .reflink)
        }
    }

    /// Rounds of operations on two volumes in `data`, each ended by kill -9 and checked by reopening;
    /// `expecting`, the copy method both volumes must report.
    func killNineRounds(data: String, expecting method: CopyMethod?) async throws {
        let umbra = builtProduct("umbra")
        try #require(
            FileManager.default.isExecutableFile(atPath: umbra), "the umbra executable was not built at \(umbra)")
        do {
            var random = SeededRandom(seed: 20_261_121)
            var model = Model(
                content: Dictionary(
                    uniqueKeysWithValues: Self.volumes.map { ($0, [UInt8](repeating: 0, count: Self.volumeSize)) }))

            let setup = try ChildProcess(umbra, ["engine-shell", "--data", data])
            setup.send(Array("create p \(Self.volumeSize) 16384\ncreate q \(Self.volumeSize) 4096\nquit\n".utf8))
            for _ in 0..<3 { #expect(setup.readLine() == "ok") }
            #expect(setup.finish() == 0)

            for round in 0..<Self.rounds {
                var planned = model
                let operations = (0..<Int.random(in: 20...60, using: &random)).map { _ in
                    let operation = randomOperation(&random, model: planned)
                    if case .delete = operation { try? planned.apply(operation, answer: []) }
                    return operation
                }
                let child = try ChildProcess(umbra, ["engine-shell", "--data", data])
                child.send(operations.flatMap(\.command))
                let answered = Int.random(in: 0..<operations.count, using: &random)
                for operation in operations.prefix(answered) {
                    guard let line = child.readLine() else {
                        throw SimulationError("round \(round): the shell ended early")
                    }
                    let words = line.split(separator: " ").map(String.init)
                    guard words.first == "ok" else { throw SimulationError("round \(round): \(line)") }
                    try model.apply(operation, answer: Array(words.dropFirst()))
                }
                child.kill()
                try await verify(
                    data: data, model: &model, uncertain: Array(operations.dropFirst(answered)), round: round,
                    expecting: method)
            }
        }
    }

    func randomOperation(_ random: inout SeededRandom, model: Model) -> Operation {
        let volume = Self.volumes.randomElement(using: &random)!
        switch Int.random(in: 0..<100, using: &random) {
        case 0..<55:
            let count = Int.random(in: 1...65536, using: &random)
            var bytes = [UInt8](repeating: 0, count: count)
            bytes.withUnsafeMutableBytes { random.fill($0) }
            return .write(
                volume: volume, offset: Int.random(in: 0...(Self.volumeSize - count), using: &random), bytes: bytes)
        case 55..<65:
            let count = Int.random(in: 1...65536, using: &random)
            return .trim(
                volume: volume, offset: Int.random(in: 0...(Self.volumeSize - count), using: &random), count: count)
        case 65..<72:
            return .flush(volume: volume)
        case 72..<90:
            return .set(volumes: random.chance(1, in: 2) ? Self.volumes : [volume])
        default:
            let candidates = model.snapshots.keys.sorted { $0.uuidString < $1.uuidString }
            guard let id = candidates.randomElement(using: &random) else { return .flush(volume: volume) }
            return .delete(id: random.chance(1, in: 3) ? model.snapshots[id]!.setID : id)
        }
    }

    /// Reopens the data directory and checks it against the model, given the operations that were sent
    /// but not answered (a prefix of them ran, the next one perhaps partly).
    func verify(
        data: String, model: inout Model, uncertain: [Operation], round: Int, expecting method: CopyMethod? = nil
    ) async throws {
        let store = try await SnapshotStore.open(path: data)
        do {
            if let method { #expect(store.volumes().map(\.copyMethod) == [method, method]) }
            try await check(store, model: &model, uncertain: uncertain, round: round)
        } catch {
            try? await store.close()
            throw error
        }
        try await store.close()
    }

    func check(_ store: SnapshotStore, model: inout Model, uncertain: [Operation], round: Int) async throws {
        #expect(store.consistencyProblems().isEmpty)
        // The state before each unanswered operation, had every earlier one run.
        var states: [[String: [UInt8]]] = [model.content]
        for operation in uncertain {
            var next = Model(content: states.last!)
            if case .set = operation {
            } else if case .delete = operation {
            } else {
                try next.apply(operation, answer: [])
            }
            states.append(next.content)
        }
        for volume in Self.volumes {
            let live = try await store.volume(named: volume).read(at: ByteOffset(0), count: Self.volumeSize)
            for block in stride(from: 0, to: Self.volumeSize, by: 4096) {
                let range = block..<(block + 4096)
                if states.contains(where: { bytesEqual($0[volume]![range], live[range]) }) { continue }
                func unsettledValue(_ offset: Int) -> Bool {
                    model.settled[volume]![offset] == live[offset]
                        || model.unsettled[volume, default: []].contains { write in
                            (write.offset..<(write.offset + write.bytes.count)).contains(offset)
                                && write.bytes[offset - write.offset] == live[offset]
                        }
                }
                for offset in range
                where !states.contains(where: { $0[volume]![offset] == live[offset] }) && !unsettledValue(offset) {
                    throw SimulationError(
                        "round \(round): live \(volume) byte \(offset) is \(live[offset]), which no prefix of the interrupted operations explains"
                    )
                }
            }
            model.content[volume] = live
            model.settle(volume)
        }
        var uncertainSets: [(volumes: [String], state: [String: [UInt8]])] = []
        var uncertainDeletions = Set<UUID>()
        for (index, operation) in uncertain.enumerated() {
            if case .set(let volumes) = operation { uncertainSets.append((volumes, states[index])) }
            if case .delete(let id) = operation { uncertainDeletions.insert(id) }
        }
        let listed = try store.snapshots()
        for info in listed {
            let bytes = try await store.snapshot(id: info.id).read(at: ByteOffset(0), count: Self.volumeSize)
            if let known = model.snapshots[info.id] {
                guard bytesEqual(known.bytes, bytes) else {
                    throw SimulationError("round \(round): snapshot \(info.id) changed")
                }
            } else {
                guard
                    uncertainSets.contains(where: {
                        $0.volumes.contains(info.volume) && bytesEqual($0.state[info.volume]!, bytes)
                    })
                else {
                    throw SimulationError(
                        "round \(round): snapshot \(info.id) of \(info.volume) matches no interrupted set")
                }
                model.snapshots[info.id] = (info.volume, bytes, info.setID)
            }
        }
        let present = Set(listed.map(\.id))
        for (id, entry) in model.snapshots where !present.contains(id) {
            guard uncertainDeletions.contains(id) || uncertainDeletions.contains(entry.setID) else {
                throw SimulationError("round \(round): snapshot \(id) vanished")
            }
            model.snapshots[id] = nil
        }
    }
}
