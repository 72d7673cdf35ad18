// The daemon as users meet it: a real `umbra serve` process, driven through its control socket and
// read and written through libnbd.

import Foundation
import ShadowCopy
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

@Suite struct DaemonTests {
    /// A snapshot's export can be read as soon as `snapshot create` returns, and holds the old data while the volume changes.
    @Test func snapshotExportIsReadyWhenCreateReturns() async throws {
        try await DaemonFixture.with(volumes: ["disk:4M"]) { daemon in
            let live = try daemon.connect("disk")
            let before = [UInt8](repeating: 0xAB, count: 65536)
            try live.pwrite(before, offset: 0)
            let control = try await daemon.control()
            let set = try await control.createSnapshotSet(CreateSetParams(volumes: ["disk"]))
            #expect(set.crashConsistent)
            let export = try #require(set.snapshots.first?.export)
            let snapshot = try daemon.connect(export)
            try live.pwrite([UInt8](repeating: 0xCD, count: 65536), offset: 0)
            #expect(try snapshot.pread(count: 65536, offset: 0) == before)
            #expect(try snapshot.isReadOnly)
            #expect(throws: NBDClientError.self) { try snapshot.pwrite([1], offset: 0) }
            await control.close()
        }
    }

    /// Deleting a snapshot ends the connections to its export (ESHUTDOWN, then closed); the volume's export keeps working.
    @Test func deletingASnapshotEndsItsConnections() async throws {
        try await DaemonFixture.with(volumes: ["disk:4M"]) { daemon in
            let control = try await daemon.control()
            let set = try await control.createSnapshotSet(CreateSetParams(volumes: ["disk"]))
            let snapshot = try daemon.connect(set.snapshots[0].export)
            let live = try daemon.connect("disk")
            _ = try snapshot.pread(count: 4096, offset: 0)
            let deleted = try await control.deleteSnapshots(ids: [set.set])
            #expect(deleted.deleted == [set.snapshots[0].id])
            do {
                _ = try snapshot.pread(count: 4096, offset: 0)
                Issue.record("a read of a deleted snapshot succeeded")
            } catch let error as NBDClientError {
                // ESHUTDOWN during the export-removal grace period (1 s); on a loaded machine the
                // grace may be over before this read, and then the connection is already closed.
                // (The grace itself is tested deterministically in NBDServerLifecycleTests.)
                #expect(error.errno == ESHUTDOWN || error.errno == ENOTCONN, "errno \(error.errno)")
            }
            try live.pwrite([1, 2, 3], offset: 100)
            #expect(try live.pread(count: 3, offset: 100) == [1, 2, 3])
            await control.close()
        }
    }

    /// FAST_ZERO is honest. tmpfs can punch holes but has no fallocate ZERO_RANGE: there a fast zero
    /// that may trim succeeds, one that must keep its space (NO_HOLE) answers ENOTSUP and changes
    /// nothing, and the same zero without FAST_ZERO writes the zeros.
    @Test func fastZeroIsHonest() async throws {
        let mounts = (try? String(contentsOfFile: "/proc/mounts", encoding: .utf8)) ?? ""
        try #require(
            mounts.split(separator: "\n").contains {
                $0.split(separator: " ").dropFirst().prefix(2) == ["/dev/shm", "tmpfs"]
            },
            "this check needs /dev/shm on tmpfs (a file system without ZERO_RANGE)")
        let image = "/dev/shm/umbra-fast-zero-\(getpid()).img"
        #expect(FileManager.default.createFile(atPath: image, contents: Data(repeating: 0xAA, count: 1 << 20)))
        defer { try? FileManager.default.removeItem(atPath: image) }
        try await DaemonFixture.with(volumes: [], extraArguments: ["--volume-file", "shm:" + image]) { daemon in
            let client = try daemon.connect("shm")
            try client.zero(count: 65536, offset: 0, flags: .fastZero)
            #expect(try client.pread(count: 65536, offset: 0) == [UInt8](repeating: 0, count: 65536))
            do {
                try client.zero(count: 65536, offset: 65536, flags: [.fastZero, .noHole])
                Issue.record("a fast zero that tmpfs can only do by writing zeros succeeded")
            } catch let error as NBDClientError {
                #expect(error.errno == ENOTSUP, "errno \(error.errno)")
            }
            #expect(try client.pread(count: 65536, offset: 65536) == [UInt8](repeating: 0xAA, count: 65536))
            try client.zero(count: 65536, offset: 65536, flags: .noHole)
            #expect(try client.pread(count: 65536, offset: 65536) == [UInt8](repeating: 0, count: 65536))
        }
    }

    /// Reads and writes of up to 64 MiB by default, as nbdkit and nbd-server take them, advertised as
    /// the maximum block size; `--max-request` lowers the bound, and a longer request gets EINVAL.
    @Test func largeRequestsUpToTheAdvertisedMaximum() async throws {
        try await DaemonFixture.with(volumes: ["disk:80M"]) { daemon in
            let client = try daemon.connect("disk")
            #expect(try client.blockSize().maximum == 64 << 20)
            var random = SeededRandom(seed: 64)
            var bytes = [UInt8](repeating: 0, count: 64 << 20)
            bytes.withUnsafeMutableBytes { random.fill($0) }
            try client.pwrite(bytes, offset: 4096)
            #expect(try client.pread(count: 64 << 20, offset: 4096) == bytes)
        }
        try await DaemonFixture.with(volumes: ["disk:8M"], extraArguments: ["--max-request", "1M"]) { daemon in
            let client = try daemon.connect("disk")
            #expect(try client.blockSize().maximum == 1 << 20)
            try client.setStrictMode(0)
            do {
                _ = try client.pread(count: 2 << 20, offset: 0)
                Issue.record("a read longer than the advertised maximum was served")
            } catch let error as NBDClientError {
                #expect(error.errno == EINVAL, "errno \(error.errno)")
            }
            #expect(try client.pread(count: 1 << 20, offset: 0).count == 1 << 20)
        }
    }

    /// A second daemon on the same data directory refuses to start and says why.
    @Test func secondDaemonIsRefused() async throws {
        try await DaemonFixture.with(volumes: ["disk:1M"]) { daemon in
            let second = try ChildProcess(
                builtProduct("umbra"),
                ["serve", "--data", daemon.data, "--listen", "unix:" + daemon.directory.path + "/other.sock"],
                captureStandardError: true)
            let status = second.finish()
            #expect(status != 0)
            #expect(second.standardErrorText.contains("is in use by another Umbra process"))
        }
    }

    /// SIGTERM answers what is in flight, flushes, and exits 0; the data is there after a restart.
    @Test func stopsCleanlyAndKeepsData() async throws {
        let directory = try TemporaryDirectory("umbra-restart")
        defer { directory.remove() }
        let arguments = [
            "serve", "--data", directory.path + "/data", "--listen", "unix:" + directory.path + "/nbd.sock",
            "--control", directory.path + "/control.sock", "--volume", "disk:2M", "--log-level", "warning",
        ]
        let pattern = (0..<131072).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        var first = try ChildProcess(builtProduct("umbra"), arguments)
        #expect(first.readLine()?.hasPrefix("ready") == true)
        let client = try NBDTestClient()
        try client.connect(uri: "nbd+unix:///disk?socket=\(directory.path)/nbd.sock")
        try client.pwrite(pattern, offset: 8192)
        kill(first.processIdentifier, SIGTERM)
        #expect(first.finish() == 0)
        first = try ChildProcess(builtProduct("umbra"), arguments)
        #expect(first.readLine()?.hasPrefix("ready") == true)
        let again = try NBDTestClient()
        try again.connect(uri: "nbd+unix:///disk?socket=\(directory.path)/nbd.sock")
        #expect(try again.pread(count: pattern.count, offset: 8192) == pattern)
        kill(first.processIdentifier, SIGTERM)
        #expect(first.finish() == 0)
    }

    /// The CLI prints one JSON document with --json, and one clear sentence on stderr with a non-zero status on error.
    @Test func cliOutputs() async throws {
        try await DaemonFixture.with(volumes: ["disk:1M"]) { daemon in
            let umbra = builtProduct("umbra")
            let list = try ChildProcess(umbra, ["volume", "list", "--json", "--control", daemon.controlSocket])
            let output = list.readAll()
            #expect(list.finish() == 0)
            let json = try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any]
            let volumes = json?["volumes"] as? [[String: Any]]
            #expect(volumes?.first?["name"] as? String == "disk")
            #expect(volumes?.first?["size"] as? Int == 1 << 20)

            let create = try ChildProcess(
                umbra, ["snapshot", "create", "disk", "--json", "--control", daemon.controlSocket])
            let created = try JSONSerialization.jsonObject(with: Data(create.readAll().utf8)) as? [String: Any]
            #expect(create.finish() == 0)
            #expect((created?["snapshots"] as? [[String: Any]])?.first?["volume"] as? String == "disk")
            #expect(created?["set"] as? String == (created?["set"] as? String)?.lowercased())

            let missing = try ChildProcess(
                umbra, ["volume", "delete", "nope", "--control", daemon.controlSocket], captureStandardError: true)
            #expect(missing.finish() == 1)
            // The daemon's sentence, printed as it came: no "Error: " before it, its period kept.
            #expect(missing.standardErrorText == "No volume named 'nope'.\n")
            #expect(missing.readAll().isEmpty)
        }
    }

    /// `volume create --diff-limit --when-full` sets a volume's diff-store limit and policy from the
    /// CLI: both are shown back, `--when-full` alone is refused, and with `fail-snapshot` a write
    /// whose copy does not fit fails the snapshot, never the write.
    @Test func diffLimitFromTheCLI() async throws {
        try await DaemonFixture.with(volumes: []) { daemon in
            let umbra = builtProduct("umbra")
            let control = ["--control", daemon.controlSocket]
            let create = try ChildProcess(
                umbra,
                ["volume", "create", "small", "--size", "1M", "--chunk-size", "64K", "--diff-limit", "128K"]
                    + ["--when-full", "fail-snapshot", "--json"] + control)
            let created = try JSONSerialization.jsonObject(with: Data(create.readAll().utf8)) as? [String: Any]
            #expect(create.finish() == 0)
            #expect(created?["diffLimit"] as? Int == 128 << 10)
            #expect(created?["whenFull"] as? String == "fail-snapshot")

            let list = try ChildProcess(umbra, ["volume", "list"] + control)
            let table = list.readAll()
            #expect(list.finish() == 0)
            #expect(table.contains("128 KiB") && table.contains("fail-snapshot"), "\(table)")

            let alone = try ChildProcess(
                umbra, ["volume", "create", "other", "--size", "1M", "--when-full", "delete-oldest"] + control,
                captureStandardError: true)
            #expect(alone.finish() != 0)
            #expect(alone.standardErrorText.contains("--when-full needs --diff-limit"))

            let requester = try await daemon.control()
            let live = try daemon.connect("small")
            // Chunks of zeros need no copy; these three do.
            try live.pwrite([UInt8](repeating: 1, count: 192 << 10), offset: 0)
            let set = try await requester.createSnapshotSet(CreateSetParams(volumes: ["small"]))
            // Three chunks to copy, room for two: the snapshot fails, the live write does not.
            try live.pwrite([UInt8](repeating: 7, count: 192 << 10), offset: 0)
            #expect(try live.pread(count: 192 << 10, offset: 0) == [UInt8](repeating: 7, count: 192 << 10))
            let snapshots = try await requester.listSnapshots(volume: "small").snapshots
            #expect(snapshots.map(\.id) == [set.snapshots[0].id])
            #expect(snapshots.first?.state == "failed")
            await requester.close()
        }
    }

    /// `volume set` changes a live volume's limit and policy: shown back, kept across a restart,
    /// enforced (a copy that does not fit fails the snapshot), removable with `none`; nonsense is
    /// refused with a sentence and changes nothing.
    @Test func diffLimitChangedFromTheCLI() async throws {
        let directory = try TemporaryDirectory("umbra-volume-set")
        defer { directory.remove() }
        var daemon = try DaemonFixture.start(volumes: ["disk:1M"], in: directory)
        let umbra = builtProduct("umbra")
        let control = ["--control", daemon.controlSocket]
        func run(_ arguments: [String]) throws -> (status: Int32, output: String, errors: String) {
            try ChildProcess.run(umbra, arguments + control)
        }
        let set = try run(["volume", "set", "disk", "--diff-limit", "128K", "--when-full", "fail-snapshot", "--json"])
        #expect(set.status == 0, "\(set.errors)")
        let shown = try JSONSerialization.jsonObject(with: Data(set.output.utf8)) as? [String: Any]
        #expect(shown?["diffLimit"] as? Int == 128 << 10)
        #expect(shown?["whenFull"] as? String == "fail-snapshot")
        let human = try run(["volume", "set", "disk", "--when-full", "fail-snapshot"])
        #expect(human.output == "Volume disk: diff store up to 128 KiB (when full: fail-snapshot).", "\(human)")

        for (arguments, complaint) in [
            (["volume", "set", "disk"], "nothing to change"),
            (["volume", "set", "disk", "--diff-limit", "100K"], "whole number of chunks"),
            (["volume", "set", "disk", "--diff-limit", "none", "--when-full", "delete-oldest"], "needs a limit"),
            (["volume", "set", "nope", "--diff-limit", "1M"], "No volume named 'nope'."),
        ] {
            let refused = try run(arguments)
            #expect(refused.status != 0 && refused.errors.contains(complaint), "\(arguments): \(refused)")
        }

        #expect(daemon.stop(keepingDirectory: true) == 0)
        daemon = try DaemonFixture.start(volumes: ["disk:1M"], in: directory)
        let requester = try await daemon.control()
        let volume = try await requester.listVolumes().volumes.first
        #expect(volume?.diffLimit == 128 << 10 && volume?.whenFull == .failSnapshot)
        let live = try daemon.connect("disk")
        try live.pwrite([UInt8](repeating: 1, count: 192 << 10), offset: 0)
        let taken = try await requester.createSnapshotSet(CreateSetParams(volumes: ["disk"], writers: false))
        // Three chunks to copy, room for two: the snapshot fails, the write goes through.
        try live.pwrite([UInt8](repeating: 7, count: 192 << 10), offset: 0)
        #expect(try await requester.listSnapshots(volume: "disk").snapshots.first?.state == "failed")
        _ = try await requester.deleteSnapshots(ids: [taken.set])

        let unlimited = try run(["volume", "set", "disk", "--diff-limit", "none"])
        #expect(unlimited.output == "Volume disk: no diff limit.", "\(unlimited)")
        _ = try await requester.createSnapshotSet(CreateSetParams(volumes: ["disk"], writers: false))
        try live.pwrite([UInt8](repeating: 8, count: 192 << 10), offset: 0)
        #expect(try await requester.listSnapshots(volume: "disk").snapshots.map(\.state) == ["ready"])
        #expect(try await requester.status().volumes.first?.diffBytes == 192 << 10)
        await requester.close()
        try live.shutdown()
        #expect(daemon.stop() == 0)
    }

    /// `umbra status`: the JSON keys of the contract (every one present, `null` where unknown) with
    /// values that match what the test did, and the human table's warning for a volume past 80 % of
    /// its diff limit.
    @Test func statusShowsTheDaemonAtAGlance() async throws {
        try await DaemonFixture.with(volumes: ["disk:1M"]) { daemon in
            let umbra = builtProduct("umbra")
            let control = ["--control", daemon.controlSocket]
            let create = try ChildProcess(
                umbra, ["volume", "create", "small", "--size", "1M", "--diff-limit", "128K"] + control)
            #expect(create.finish() == 0)
            let client = try daemon.connect("disk")
            let small = try daemon.connect("small")
            try small.pwrite([UInt8](repeating: 1, count: 128 << 10), offset: 0)
            let requester = try await daemon.control()
            _ = try await requester.createSnapshotSet(CreateSetParams(volumes: ["small"], writers: false))
            try small.pwrite([UInt8](repeating: 2, count: 128 << 10), offset: 0)

            let version = try ChildProcess(umbra, ["--version"])
            let versionText = version.readAll()
            #expect(version.finish() == 0)
            let status = try ChildProcess(umbra, ["status", "--json"] + control)
            let text = status.readAll()
            #expect(status.finish() == 0)
            let json = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any]
            #expect(json?["version"] as? String == versionText)
            #expect((json?["uptimeSeconds"] as? Double).map { $0 >= 0 } == true)
            #expect(json?["connections"] as? Int == 2)
            #expect(json?["writers"] as? Int == 0)
            #expect((json?["listeners"] as? [String])?.first == "unix:" + daemon.nbdSocket)
            let volumes = json?["volumes"] as? [[String: Any]]
            #expect(volumes?.map { $0["name"] as? String } == ["disk", "small"])
            let disk = volumes?.first
            #expect(disk?["backend"] as? String == "local")
            #expect(disk?["size"] as? Int == 1 << 20)
            #expect(disk?.keys.contains("diffLimit") == true && disk?["diffLimit"] is NSNull)
            #expect(disk?["snapshots"] as? Int == 0)
            #expect(disk?["oldestSnapshotAgeSeconds"] is NSNull)
            #expect(["write", "reflink"].contains(disk?["copyMethod"] as? String))
            let limited = volumes?.last
            #expect(limited?["diffLimit"] as? Int == 128 << 10)
            #expect(limited?["diffBytes"] as? Int == 128 << 10)
            #expect(limited?["snapshots"] as? Int == 1)
            #expect((limited?["oldestSnapshotAgeSeconds"] as? Double).map { $0 >= 0 } == true)

            let human = try ChildProcess(umbra, ["status"] + control)
            let table = human.readAll()
            #expect(human.finish() == 0)
            #expect(table.contains("Warning: volume 'small' holds 100 % of its diff limit"), "\(table)")
            #expect(!table.contains("volume 'disk' holds"), "\(table)")
            _ = client
            await requester.close()
        }
    }

    /// A data directory on XFS with reflink: the daemon says at start and in `status` that copies
    /// share blocks, first writes through NBD after a snapshot leave the snapshot's export reading what
    /// the volume held, and so does a restart after kill -9. On the test's own temporary directory
    /// (ext4 or tmpfs here) `status` says copies are written.
    @Test(.enabled(if: ReflinkFileSystem.unavailableReason == nil, "needs root, xfsprogs and a loop device"))
    func reflinkCopiesThroughTheDaemon() async throws {
        try await ReflinkFileSystem.with { fileSystem in
            let data = fileSystem.path + "/data"
            let directory = try TemporaryDirectory("umbra-daemon")
            defer { directory.remove() }
            var daemon = try DaemonFixture.start(volumes: ["disk:4M"], in: directory, data: data, capturingLog: true)
            let requester = try await daemon.control()
            #expect(try await requester.status().volumes.map(\.copyMethod) == ["reflink"])
            var random = SeededRandom(seed: 31)
            var original = [UInt8](repeating: 0, count: 4 << 20)
            original.withUnsafeMutableBytes { random.fill($0) }
            let live = try daemon.connect("disk")
            try live.pwrite(original, offset: 0)
            let set = try await requester.createSnapshotSet(CreateSetParams(volumes: ["disk"], writers: false))
            let export = "disk@\(set.snapshots[0].id.uuidString.lowercased())"
            // Two 1 MiB writes from the middle of a chunk (runs of 17 chunks, cloned; the rest of the
            // first and last chunk stays shared), then 4 KiB into every chunk of the last MiB (each
            // copy written: too short to clone).
            var overwritten = [UInt8](repeating: 0, count: 4 << 20)
            overwritten.withUnsafeMutableBytes { random.fill($0) }
            for offset in [32 << 10, (3 << 19) + (32 << 10)] {
                try live.pwrite(Array(overwritten[offset..<(offset + (1 << 20))]), offset: UInt64(offset))
            }
            for offset in stride(from: 3 << 20, to: 4 << 20, by: 64 << 10) {
                try live.pwrite(Array(overwritten[offset..<(offset + 4096)]), offset: UInt64(offset))
            }
            try live.flush()
            #expect(try ReflinkFileSystem.hasSharedExtents(data + "/volumes/1/diff"))
            #expect(try daemon.connect(export).pread(count: 4 << 20, offset: 0) == original)
            await requester.close()

            daemon.killNine()
            #expect(daemon.log.contains("copy-on-write shares blocks with the live data (reflink)"), "\(daemon.log)")
            daemon = try DaemonFixture.start(volumes: ["disk:4M"], in: directory, data: data)
            #expect(try daemon.connect(export).pread(count: 4 << 20, offset: 0) == original)
            let after = try await daemon.control()
            #expect(try await after.verify(volumes: ["disk"]).volumes.first?.damaged.isEmpty == true)
            await after.close()
            #expect(daemon.stop(keepingDirectory: true) == 0)
        }
    }

    /// One byte flipped in a diff store while the daemon runs: NBD reads of the snapshot that meet it
    /// get EIO (never the wrong bytes), other ranges read exactly, and `umbra verify` names the
    /// snapshot and range and exits 1; a clean volume verifies with exit 0.
    @Test func verifyFindsRottenCopies() async throws {
        try await DaemonFixture.with(volumes: ["disk:1M", "clean:1M"]) { daemon in
            let umbra = builtProduct("umbra")
            let control = ["--control", daemon.controlSocket]
            let requester = try await daemon.control()
            let live = try daemon.connect("disk")
            var random = SeededRandom(seed: 12)
            var original = [UInt8](repeating: 0, count: 256 << 10)
            original.withUnsafeMutableBytes { random.fill($0) }
            try live.pwrite(original, offset: 0)
            let set = try await requester.createSnapshotSet(CreateSetParams(volumes: ["disk", "clean"]))
            // Chunks 0..3 (64 KiB each) are copied to slots 0..3, in order.
            try live.pwrite([UInt8](repeating: 9, count: 256 << 10), offset: 0)
            let snapshot = set.snapshots[0].id

            let clean = try ChildProcess(umbra, ["verify", "--json"] + control)
            let cleanReport = try JSONSerialization.jsonObject(with: Data(clean.readAll().utf8)) as? [String: Any]
            #expect(clean.finish() == 0)
            let cleanVolumes = cleanReport?["volumes"] as? [[String: Any]]
            #expect(cleanVolumes?.map { $0["name"] as? String } == ["clean", "disk"])
            #expect(cleanVolumes?.last?["bytesChecked"] as? Int == 256 << 10)

            // Rot: one bit of slot 2 (chunk 2), written behind the daemon's back.
            let diff = try FileHandle(forUpdating: URL(fileURLWithPath: daemon.data + "/volumes/1/diff"))
            try diff.seek(toOffset: (2 << 16) + 1000)
            let byte = try diff.read(upToCount: 1)![0]
            try diff.seek(toOffset: (2 << 16) + 1000)
            try diff.write(contentsOf: [byte ^ 1])
            try diff.close()

            let reader = try daemon.connect("disk@" + snapshot.uuidString.lowercased())
            #expect(throws: NBDClientError.self) { _ = try reader.pread(count: 4096, offset: (2 << 16) + 4096) }
            do {
                _ = try reader.pread(count: 256 << 10, offset: 0)
                Issue.record("a read over the damaged chunk returned data")
            } catch let error as NBDClientError {
                #expect(error.errno == EIO)
            }
            #expect(try reader.pread(count: 128 << 10, offset: 0) == Array(original[..<(128 << 10)]))
            #expect(try reader.pread(count: 64 << 10, offset: 3 << 16) == Array(original[(3 << 16)...]))

            let damaged = try ChildProcess(umbra, ["verify", "disk", "--json"] + control)
            let report = try JSONSerialization.jsonObject(with: Data(damaged.readAll().utf8)) as? [String: Any]
            #expect(damaged.finish() == 1)
            let volume = (report?["volumes"] as? [[String: Any]])?.first
            #expect(volume?["snapshotsChecked"] as? Int == 1)
            let ranges = volume?["damaged"] as? [[String: Any]]
            #expect(ranges?.count == 1)
            #expect(ranges?.first?["snapshot"] as? String == snapshot.uuidString.lowercased())
            #expect(ranges?.first?["offset"] as? Int == 2 << 16)
            #expect(ranges?.first?["length"] as? Int == 1 << 16)

            let human = try ChildProcess(umbra, ["verify", "disk"] + control, captureStandardError: true)
            let table = human.readAll()
            #expect(human.finish() == 1)
            #expect(table.contains("offset 131072  length 65536"), "\(table)")
            #expect(human.standardErrorText.hasPrefix("Found 1 damaged range"))

            let unknown = try ChildProcess(umbra, ["verify", "nope"] + control, captureStandardError: true)
            #expect(unknown.finish() == 1)
            #expect(unknown.standardErrorText == "No volume named 'nope'.\n")
            await requester.close()
        }
    }

    /// --volume-file serves an existing file's data; snapshots of it work; the file is left alone when the daemon stops.
    @Test func servesAnExistingFile() async throws {
        let directory = try TemporaryDirectory("umbra-volume-file")
        defer { directory.remove() }
        let path = directory.path + "/disk.img"
        var random = SeededRandom(seed: 77)
        var original = [UInt8](repeating: 0, count: 1 << 20)
        original.withUnsafeMutableBytes { random.fill($0) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(original)))
        try await DaemonFixture.with(volumes: [], extraArguments: ["--volume-file", "disk:" + path]) { daemon in
            let live = try daemon.connect("disk")
            #expect(try live.size() == UInt64(original.count))
            #expect(try live.pread(count: original.count, offset: 0) == original)
            let control = try await daemon.control()
            let set = try await control.createSnapshotSet(CreateSetParams(volumes: ["disk"]))
            try live.pwrite([UInt8](repeating: 9, count: 8192), offset: 4096)
            let snapshot = try daemon.connect(set.snapshots[0].export)
            #expect(try snapshot.pread(count: original.count, offset: 0) == original)
            await control.close()
        }
        let after = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(after[4096..<12288].allSatisfy { $0 == 9 })
    }
}
