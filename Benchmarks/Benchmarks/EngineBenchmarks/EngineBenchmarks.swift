// Engine benchmarks (issue 2): copy-on-write write throughput against the machine's durable write
// bandwidth, 1 vs 500 snapshots, snapshot set creation on 1 GiB vs 1 TiB volumes, reading the oldest
// vs the newest of 256 snapshots, and a chunk-size sweep that picks the default.
//
// Every sample moves a fixed payload (8 MiB: 8 writes of 1 MiB at queue depth 8, or 2048 writes of
// 4 KiB at queue depth 32), so MiB/s = 8 / (wall-clock seconds per sample); Scripts/bench/run-all.sh
// runs it with the other benchmarks, and docs/performance.md gives the medians. Files live under $UMBRA_BENCH_DIR (default /tmp), on a
// real file system: the copy-on-write path's fdatasync is part of what is measured.

import Benchmark
import BlockIO
import Foundation
import SnapshotEngine

let payloadBytes = 8 << 20
let sequentialWriteSize = 1 << 20
let sequentialDepth = 8
let randomWriteSize = 4096
let randomDepth = 32
/// The part of each volume that is filled with data before measuring, so copies copy real bytes.
let regionBytes = 256 << 20

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .cpuTotal, .mallocCountTotal],
        timeUnits: .microseconds,
        warmupIterations: 1,
        maxDuration: .seconds(6),
        maxIterations: 40
    )

    // MARK: The machine's durable write bandwidth, for the copy-on-write targets.

    let raw = RawFile()
    measure(
        "baseline: durable write 1 MiB seq (fdatasync per 8 MiB)", setup: { try raw.open() }, teardown: { raw.close() }
    ) {
        benchmark in
        benchmark.startMeasurement()
        raw.sequentialDurable()
        benchmark.stopMeasurement()
    }
    measure(
        "baseline: durable write 4 KiB rand (fdatasync per 8 MiB)", setup: { try raw.open() }, teardown: { raw.close() }
    ) {
        benchmark in
        benchmark.startMeasurement()
        raw.randomDurable()
        benchmark.stopMeasurement()
    }

    // MARK: Write throughput through the engine at the default chunk size.

    let plain = EngineFixture(chunkSize: VolumeSpec.defaultChunkSize)
    measure(
        "engine: write 1 MiB seq, no snapshot", setup: { try await plain.open() }, teardown: { await plain.close() }
    ) {
        benchmark in
        await plain.measure(benchmark) { try await plain.sequentialWrites() }
    }
    measure(
        "engine: write 4 KiB rand, no snapshot", setup: { try await plain.open() }, teardown: { await plain.close() }
    ) {
        benchmark in
        await plain.measure(benchmark) { try await plain.randomWrites(distinctChunks: false) }
    }

    for chunkSize in [4, 16, 64, 256, 1024].map({ ByteCount.kibibytes(UInt64($0)) }) {
        let fixture = EngineFixture(chunkSize: chunkSize)
        let label = "\(chunkSize.rawValue >> 10) KiB chunks"
        let setup: @Sendable () async throws -> Void = { try await fixture.open() }
        let teardown: @Sendable () async throws -> Void = { await fixture.close() }
        measure("cow: first write 1 MiB seq, \(label)", setup: setup, teardown: teardown) { benchmark in
            await fixture.measure(benchmark, freshSnapshot: true) { try await fixture.sequentialWrites() }
        }
        measure("cow: first write 4 KiB rand, \(label)", setup: setup, teardown: teardown) { benchmark in
            await fixture.measure(benchmark, freshSnapshot: true) {
                try await fixture.randomWrites(distinctChunks: true)
            }
        }
        measure(
            "cow: rewrite 1 MiB seq, \(label)", setup: { try await fixture.open(preservingRegion: true) },
            teardown: teardown
        ) { benchmark in
            await fixture.measure(benchmark) { try await fixture.sequentialWrites() }
        }
        measure(
            "cow: rewrite 4 KiB rand, \(label)", setup: { try await fixture.open(preservingRegion: true) },
            teardown: teardown
        ) { benchmark in
            await fixture.measure(benchmark) { try await fixture.randomWrites(distinctChunks: false) }
        }
    }

    // MARK: The write path does not care how many snapshots there are.

    for count in [1, 500] {
        let fixture = EngineFixture(chunkSize: VolumeSpec.defaultChunkSize)
        measure(
            "snapshots: first write 4 KiB rand with \(count) snapshot\(count == 1 ? "" : "s")",
            setup: { try await fixture.open(olderSnapshots: count - 1) }, teardown: { await fixture.close() }
        ) { benchmark in
            await fixture.measure(benchmark, freshSnapshot: true) {
                try await fixture.randomWrites(distinctChunks: true)
            }
        }
    }

    // MARK: Taking a set costs the same for 1 GiB and 1 TiB, both written across their whole range.

    for size in [ByteCount.gibibytes(1), ByteCount.tebibytes(1)] {
        let fixture = EngineFixture(chunkSize: VolumeSpec.defaultChunkSize, volumeSize: size, prefill: .spread)
        let label = size == .gibibytes(1) ? "1 GiB" : "1 TiB"
        measure(
            "sets: create a snapshot set of a \(label) volume",
            configuration: .init(timeUnits: .microseconds, maxIterations: 200),
            setup: { try await fixture.open() }, teardown: { await fixture.close() }
        ) { benchmark in
            await fixture.measureSetCreation(benchmark)
        }
    }

    // MARK: Reading old snapshots costs about what reading new ones does.

    let history = EngineFixture(chunkSize: VolumeSpec.defaultChunkSize)
    measure(
        "reads: read 1 MiB seq from the oldest of 256 snapshots", setup: { try await history.open(history: 256) },
        teardown: { await history.close() }
    ) { benchmark in
        await history.measure(benchmark) { try await history.sequentialSnapshotReads(oldest: true) }
    }
    measure(
        "reads: read 1 MiB seq from the newest of 256 snapshots", setup: { try await history.open(history: 256) },
        teardown: { await history.close() }
    ) { benchmark in
        await history.measure(benchmark) { try await history.sequentialSnapshotReads(oldest: false) }
    }
}

/// Registers a benchmark; setup and teardown come before the measured body here (package-benchmark
/// takes the body first).
func measure(
    _ name: String, configuration: Benchmark.Configuration = Benchmark.defaultConfiguration,
    setup: @escaping Benchmark.BenchmarkSetupHook, teardown: @escaping Benchmark.BenchmarkTeardownHook,
    _ body: @escaping Benchmark.BenchmarkAsyncClosure
) {
    Benchmark(name, configuration: configuration, closure: body, setup: setup, teardown: teardown)
}

/// Where benchmark files go.
func benchmarkDirectory(_ label: String) -> String {
    let base = ProcessInfo.processInfo.environment["UMBRA_BENCH_DIR"] ?? "/tmp"
    return "\(base)/umbra-engine-bench-\(getpid())-\(label)"
}

/// A page-aligned buffer of non-zero bytes, reused by every write.
nonisolated(unsafe) let dataBuffer: UnsafeRawBufferPointer = {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: sequentialWriteSize, alignment: 4096)
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    for index in 0..<(buffer.count / 8) {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        buffer.storeBytes(of: state | 1, toByteOffset: index * 8, as: UInt64.self)
    }
    return UnsafeRawBufferPointer(buffer)
}()

/// The same bytes as an array, for the engine's owned-buffer API.
let dataBytes = Array(dataBuffer)

/// A plain file written with pwrite and fdatasync: the durable bandwidth the engine is held to.
final class RawFile: @unchecked Sendable {
    var storage: FileStorage?
    var directory = ""
    var sequentialCursor = 0
    var random = SystemRandomNumberGenerator()

    func open() throws {
        guard storage == nil else { return }
        directory = benchmarkDirectory("raw")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let file = try FileStorage(path: directory + "/raw.img", mode: .createIfMissing)
        var offset = 0
        while offset < regionBytes {
            try file.write(toAbsoluteOffset: ByteOffset(offset), dataBuffer)
            offset += dataBuffer.count
        }
        try file.synchronize()
        storage = file
    }

    func close() {
        storage = nil
        try? FileManager.default.removeItem(atPath: directory)
    }

    func sequentialDurable() {
        guard let storage else { return }
        for _ in 0..<(payloadBytes / sequentialWriteSize) {
            try! storage.write(toAbsoluteOffset: ByteOffset(sequentialCursor), dataBuffer)
            sequentialCursor = (sequentialCursor + sequentialWriteSize) % regionBytes
        }
        try! storage.synchronize()
    }

    func randomDurable() {
        guard let storage else { return }
        let block = UnsafeRawBufferPointer(rebasing: dataBuffer[0..<randomWriteSize])
        for _ in 0..<(payloadBytes / randomWriteSize) {
            let offset = Int.random(in: 0..<(regionBytes / randomWriteSize), using: &random) * randomWriteSize
            try! storage.write(toAbsoluteOffset: ByteOffset(offset), block)
        }
        try! storage.synchronize()
    }
}

/// A store with one volume, its first `regionBytes` filled with data.
final class EngineFixture: @unchecked Sendable {
    let chunkSize: ByteCount
    let volumeSize: ByteCount
    let prefill: Prefill
    var store: SnapshotStore?
    var volume: Volume?
    var directory = ""
    var sequentialCursor = 0
    var random = SystemRandomNumberGenerator()
    var snapshots: [UUID] = []
    /// The snapshot a first-write sample writes against; replaced before each such sample.
    var fresh: UUID?
    var historyIDs: [UUID] = []

    /// What is written before measuring: the first `regionBytes`, or as much spread evenly over the
    /// whole volume (one write every `volumeSize / 256` bytes), so that a big volume is a written one.
    enum Prefill { case region, spread }

    init(chunkSize: ByteCount, volumeSize: ByteCount = .gibibytes(1), prefill: Prefill = .region) {
        self.chunkSize = chunkSize
        self.volumeSize = volumeSize
        self.prefill = prefill
    }

    func open(preservingRegion: Bool = false, olderSnapshots: Int = 0, history: Int = 0) async throws {
        guard store == nil else { return }
        directory = benchmarkDirectory("\(chunkSize.rawValue)-\(volumeSize.rawValue)-\(UUID().uuidString.prefix(6))")
        // Writes return once their copy is durable (nothing answered early), so that a sample of
        // first writes includes the copies' syncs and compares with the durable write bandwidth.
        var configuration = StoreConfiguration()
        configuration.heldWriteBytes = .zero
        let store = try await SnapshotStore.open(path: directory, configuration: configuration)
        try await store.createVolume(VolumeSpec(name: "bench", size: volumeSize, chunkSize: chunkSize))
        let volume = try store.volume(named: "bench")
        self.store = store
        self.volume = volume
        let writes = regionBytes / dataBuffer.count
        let stride = prefill == .region ? UInt64(dataBuffer.count) : volumeSize.rawValue / UInt64(writes)
        for index in 0..<UInt64(writes) {
            try await volume.write(at: ByteOffset(index * stride), dataBytes)
        }
        try await volume.flush()
        for _ in 0..<olderSnapshots {
            // Each older snapshot preserves a little, so the chain is not empty metadata.
            try await randomWrites(distinctChunks: true, count: 8)
            snapshots.append(try await store.createSnapshotSet(volumes: ["bench"]).snapshots[0].id)
        }
        for _ in 0..<history {
            try await randomWrites(distinctChunks: true, count: 32, size: Int(chunkSize.rawValue))
            historyIDs.append(try await store.createSnapshotSet(volumes: ["bench"]).snapshots[0].id)
        }
        if preservingRegion {
            _ = try await store.createSnapshotSet(volumes: ["bench"])
            var offset = 0
            while offset < regionBytes {
                try await volume.write(at: ByteOffset(offset), dataBytes)
                offset += dataBuffer.count
            }
        }
    }

    func close() async {
        try? await store?.close()
        store = nil
        volume = nil
        fresh = nil
        snapshots = []
        historyIDs = []
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Measures `body`; with `freshSnapshot`, first replaces the newest snapshot with a new one (not
    /// measured), so every chunk is a first write again and the diff store does not grow.
    func measure(_ benchmark: Benchmark, freshSnapshot: Bool = false, _ body: () async throws -> Void) async {
        do {
            if freshSnapshot, let store {
                if let previous = fresh { try await store.deleteSnapshots(ids: [previous]) }
                fresh = try await store.createSnapshotSet(volumes: ["bench"]).snapshots[0].id
            }
            benchmark.startMeasurement()
            try await body()
            benchmark.stopMeasurement()
        } catch {
            benchmark.error("\(error)")
        }
    }

    func measureSetCreation(_ benchmark: Benchmark) async {
        guard let store else { return }
        do {
            benchmark.startMeasurement()
            let set = try await store.createSnapshotSet(volumes: ["bench"])
            benchmark.stopMeasurement()
            try await store.deleteSnapshots(ids: [set.id])
        } catch {
            benchmark.error("\(error)")
        }
    }

    /// 8 MiB as 1 MiB writes, 8 in flight, continuing where the last sample stopped.
    func sequentialWrites() async throws {
        guard let volume else { return }
        let base = sequentialCursor
        sequentialCursor = (sequentialCursor + payloadBytes) % regionBytes
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<sequentialDepth {
                group.addTask {
                    try await volume.write(at: ByteOffset(base + index * sequentialWriteSize), dataBytes)
                }
            }
            try await group.waitForAll()
        }
    }

    /// 8 MiB as 4 KiB writes at random places (with `distinctChunks`, each in a different chunk),
    /// 32 in flight.
    func randomWrites(distinctChunks: Bool, count: Int = payloadBytes / randomWriteSize, size: Int = randomWriteSize)
        async throws
    {
        guard let volume else { return }
        let chunk = Int(chunkSize.rawValue)
        let chunksInRegion = regionBytes / chunk
        var offsets: [Int] = []
        offsets.reserveCapacity(count)
        if distinctChunks {
            var chosen = Set<Int>()
            while offsets.count < min(count, chunksInRegion) {
                let index = Int.random(in: 0..<chunksInRegion, using: &random)
                guard chosen.insert(index).inserted else { continue }
                let within = chunk > size ? Int.random(in: 0..<(chunk / size), using: &random) * size : 0
                offsets.append(index * chunk + within)
            }
        } else {
            for _ in 0..<count { offsets.append(Int.random(in: 0..<(regionBytes / size), using: &random) * size) }
        }
        let block = Array(dataBytes[0..<size])
        let all = offsets
        try await withThrowingTaskGroup(of: Void.self) { group in
            for lane in 0..<randomDepth {
                group.addTask {
                    var index = lane
                    while index < all.count {
                        try await volume.write(at: ByteOffset(all[index]), block)
                        index += randomDepth
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// 8 MiB read as 1 MiB reads of the oldest or newest history snapshot, 8 in flight.
    func sequentialSnapshotReads(oldest: Bool) async throws {
        guard let store, let id = oldest ? historyIDs.first : historyIDs.last else { return }
        let snapshot = try store.snapshot(id: id)
        let base = sequentialCursor
        sequentialCursor = (sequentialCursor + payloadBytes) % regionBytes
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<sequentialDepth {
                group.addTask {
                    let buffer = [UInt8](repeating: 0, count: sequentialWriteSize)
                    _ = try await snapshot.read(at: ByteOffset(base + index * sequentialWriteSize), into: buffer)
                }
            }
            try await group.waitForAll()
        }
    }
}
