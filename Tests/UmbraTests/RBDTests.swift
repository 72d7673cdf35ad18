// RBD volumes against a real single-node Ceph cluster (Scripts/ceph-cluster.sh, one per test), with
// real NBD clients: create and attach, a set of one local and one RBD volume with a writer, exact
// snapshot reads, changed extents as RBD's own `rbd diff` gives them, delete, restart, what a crash
// leaves, bad input, a cluster that goes away, and a counter written to both volumes that every set
// shows at one instant.

import Foundation
import ShadowCopy
import Synchronization
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// A cluster started by the project's script, stopped when the test ends.
struct CephCluster {
    let directory: TemporaryDirectory
    var configuration: String { directory.path + "/ceph/ceph.conf" }

    static func with<T>(_ body: (CephCluster) async throws -> T) async throws -> T {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/ceph-mon") else {
            throw FixtureError(
                "Ceph is not installed (no /usr/bin/ceph-mon): run Scripts/install-dependencies.sh; the RBD tests cannot run without a cluster"
            )
        }
        let directory = try TemporaryDirectory("umbra-ceph")
        let cluster = CephCluster(directory: directory)
        defer {
            _ = try? cluster.script("stop")
            directory.remove()
        }
        try cluster.script("start")
        return try await body(cluster)
    }

    @discardableResult
    func script(_ command: String) throws -> String {
        try ChildProcess.output(repositoryRoot + "/Scripts/ceph-cluster.sh", [command, directory.path + "/ceph"])
    }

    /// Runs the `rbd` tool against the cluster; its output.
    @discardableResult
    func rbd(_ arguments: String...) throws -> String {
        try ChildProcess.output("/usr/bin/rbd", ["-c", configuration] + arguments)
    }

    /// `rbd diff` of the image since a snapshot (or between two), as (offset, length) pairs.
    func diff(_ image: String, since: UUID, until: UUID? = nil) throws -> [ByteExtent] {
        let target = until.map { image + "@" + $0.guidString } ?? image
        let json = try rbd("diff", "--from-snap", since.guidString, "--format", "json", target)
        let entries = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
        return entries.map {
            ByteExtent(offset: ($0["offset"] as! NSNumber).uint64Value, length: ($0["length"] as! NSNumber).uint64Value)
        }
    }

    func daemon(volumes: [String] = [], extraArguments: [String] = [], in directory: TemporaryDirectory? = nil)
        throws -> DaemonFixture
    {
        try DaemonFixture.start(
            volumes: volumes, extraArguments: ["--ceph-conf", configuration] + extraArguments, in: directory)
    }
}

@Suite(.serialized, .timeLimit(.minutes(3))) struct RBDTests {
    static let mebibyte = 1 << 20

    func pattern(_ byte: UInt8, _ count: Int) -> [UInt8] { [UInt8](repeating: byte, count: count) }

    /// Create an image through Umbra, attach it with libnbd, and find the bytes in RBD itself.
    @Test func createAttachAndServe() async throws {
        try await CephCluster.with { cluster in
            let daemon = try cluster.daemon(volumes: ["local:8M"])
            defer { daemon.stop() }
            let control = try await daemon.control()
            let info = try await control.createVolume(name: "disk", size: 16 << 20, rbd: "rbd/disk")
            #expect(info.backend == "rbd" && info.image == "rbd/disk" && info.size == 16 << 20)
            let listed = try await control.listVolumes().volumes
            #expect(listed.map(\.name) == ["local", "disk"])
            #expect(listed.map(\.backend) == ["local", "rbd"])

            let client = try daemon.connect("disk")
            #expect(try client.size() == 16 << 20)
            try client.pwrite(pattern(0x5a, 65536), offset: 4096)
            try client.zero(count: 8192, offset: 8192)
            try client.flush()
            #expect(try client.pread(count: 4, offset: 4096) == pattern(0x5a, 4))
            #expect(try client.pread(count: 8192, offset: 8192) == pattern(0, 8192))
            // What librbd reads without Umbra.
            let exported = cluster.directory.path + "/disk.raw"
            try cluster.rbd("export", "rbd/disk", exported)
            let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: exported)))
            #expect(Array(bytes[4096..<8192]) == pattern(0x5a, 4096))
            #expect(Array(bytes[8192..<16384]) == pattern(0, 8192))
            #expect(Array(bytes[16384..<(4096 + 65536)]) == pattern(0x5a, 65536 - 12288))
            // FUA, and TRIM of a whole object (4 MiB), which RBD deallocates.
            try client.pwrite(pattern(0x6b, 4 << 20), offset: 4 << 20, flags: .fua)
            #expect(try client.pread(count: 4096, offset: 6 << 20) == pattern(0x6b, 4096))
            try client.trim(count: 4 << 20, offset: 4 << 20)
            try client.flush()
            #expect(try client.pread(count: 4096, offset: 6 << 20) == pattern(0, 4096))

            // An existing image, at its own size; the same image twice; names taken; bad input.
            try cluster.rbd("create", "--size", "4M", "rbd/existing")
            let existing = try await control.createVolume(name: "existing", size: 0, rbd: "rbd/existing")
            #expect(existing.size == 4 << 20)
            await expectControlError(.alreadyExists, "already volume disk") {
                _ = try await control.createVolume(name: "again", size: 0, rbd: "rbd/disk")
            }
            await expectControlError(.alreadyExists, "exists") {
                _ = try await control.createVolume(name: "local", size: 1 << 20, rbd: "rbd/other")
            }
            await expectControlError(.alreadyExists, "exists") {
                _ = try await control.createVolume(name: "disk", size: 1 << 20)
            }
            await expectControlError(.notFound, "pool nosuchpool") {
                _ = try await control.createVolume(name: "x", size: 1 << 20, rbd: "nosuchpool/x")
            }
            await expectControlError(.notFound, "image rbd/nosuchimage") {
                _ = try await control.createVolume(name: "x", size: 0, rbd: "rbd/nosuchimage")
            }
            await expectControlError(.invalidParams, "POOL/IMAGE") {
                _ = try await control.createVolume(name: "x", size: 0, rbd: "justanimage")
            }
            #expect(try await control.listVolumes().volumes.count == 3, "a refused create left a volume behind")

            // Delete forgets the volume and keeps the image unless asked.
            try await control.deleteVolume(name: "existing")
            #expect(try cluster.rbd("ls", "rbd").split(separator: "\n").contains("existing"))
            try await control.deleteVolume(name: "disk", deletingImage: true)
            #expect(!(try cluster.rbd("ls", "rbd").split(separator: "\n").contains("disk")))
            #expect(try await control.listVolumes().volumes.map(\.name) == ["local"])
            await control.close()
        }
    }

    /// One set of a local and an RBD volume, with a writer: both snapshots read exactly what was
    /// written before the instant, the changed extents are RBD's own diff, deletion removes the RBD
    /// snapshot, and a restart brings the set back whole.
    @Test func mixedSetWithWriterSurvivesRestart() async throws {
        try await CephCluster.with { cluster in
            let directory = try TemporaryDirectory("umbra-daemon")
            var daemon = try cluster.daemon(volumes: ["local:16M"], in: directory)
            let control = try await daemon.control()
            _ = try await control.createVolume(name: "remote", size: 16 << 20, rbd: "rbd/remote")
            let local = try daemon.connect("local")
            let remote = try daemon.connect("remote")
            for client in [local, remote] {
                try client.pwrite(pattern(0x11, 1 << 20), offset: 0)
                try client.pwrite(pattern(0x22, 4096), offset: 9 << 20)
            }
            let log = WriterEventLog()
            let writer = ShadowCopyWriter(
                socketPath: daemon.controlSocket, name: "recorder", volumes: ["local", "remote"],
                delegate: RecordingWriter(log: log))
            let writerTask = Task { try await writer.run() }
            while try await control.listWriters().writers.isEmpty { try await Task.sleep(for: .milliseconds(2)) }

            let set = try await control.createSnapshotSet(CreateSetParams(volumes: ["local", "remote"]))
            #expect(set.writers.map(\.name) == ["recorder"])
            #expect(log.events.withLock { $0 }.starts(with: ["freeze", "thaw"]))
            let snapshot = Dictionary(uniqueKeysWithValues: set.snapshots.map { ($0.volume, $0) })
            let rbdSnapshot = try #require(snapshot["remote"])
            #expect(try cluster.rbd("snap", "ls", "rbd/remote").contains(rbdSnapshot.id.guidString))

            // After the instant: new data on both.
            for client in [local, remote] {
                try client.pwrite(pattern(0x33, 4096), offset: 0)
                try client.pwrite(pattern(0x44, 8192), offset: 5 << 20)
                try client.flush()
            }
            for export in set.snapshots.map(\.export) {
                let reader = try daemon.connect(export)
                #expect(try reader.pread(count: 1 << 20, offset: 0) == pattern(0x11, 1 << 20), "\(export)")
                #expect(try reader.pread(count: 4096, offset: 9 << 20) == pattern(0x22, 4096), "\(export)")
                #expect(try reader.pread(count: 8192, offset: 5 << 20) == pattern(0, 8192), "\(export)")
                #expect(throws: NBDClientError.self) { try reader.pwrite([1], offset: 0) }
            }
            // Changed extents: exactly RBD's diff, and they cover what was written.
            let changes = try await control.changes(volume: "remote", since: rbdSnapshot.id)
            let expected = try cluster.diff("rbd/remote", since: rbdSnapshot.id)
            #expect(changes.extents == expected)
            for written in [(UInt64(0), UInt64(4096)), (UInt64(5 << 20), UInt64(8192))] {
                #expect(
                    changes.extents.contains {
                        $0.offset <= written.0 && written.0 + written.1 <= $0.offset + $0.length
                    })
            }
            #expect(!changes.extents.contains { $0.offset <= 9 << 20 && 9 << 20 < $0.offset + $0.length })
            // The same as a dirty bitmap on the live export.
            let bitmap = try daemon.connect("remote", contexts: ["qemu:dirty-bitmap:" + rbdSnapshot.id.guidString])
            let dirty = try bitmap.blockStatus(count: 16 << 20, offset: 0)[
                "qemu:dirty-bitmap:" + rbdSnapshot.id.guidString]
            var position: UInt64 = 0
            var dirtyRanges: [ByteExtent] = []
            for extent in dirty ?? [] {
                if extent.flags & 1 != 0 {
                    dirtyRanges.append(ByteExtent(offset: position, length: UInt64(extent.length)))
                }
                position += UInt64(extent.length)
            }
            #expect(dirtyRanges == expected)
            // A second set: what changed between the two snapshots is RBD's diff between them, on
            // `snapshot changes --until` and as a dirty bitmap on the newer snapshot's export.
            let second = try await control.createSnapshotSet(CreateSetParams(volumes: ["remote"], writers: false))
            let newer = try #require(second.snapshots.first)
            let between = try await control.changes(volume: "remote", since: rbdSnapshot.id, until: newer.id)
            #expect(between.extents == (try cluster.diff("rbd/remote", since: rbdSnapshot.id, until: newer.id)))
            #expect(between.extents == expected, "nothing was written between the second set and now")
            let context = "qemu:dirty-bitmap:" + rbdSnapshot.id.guidString
            let onSnapshot = try daemon.connect(newer.export, contexts: [context]).blockStatus(
                count: 16 << 20, offset: 0)[context]
            #expect(onSnapshot?.contains { $0.flags & 1 != 0 } == true)
            _ = try await control.deleteSnapshots(ids: [second.set])
            writerTask.cancel()
            _ = try? await writerTask.value
            await control.close()

            // A restart brings both snapshots back, reading the same.
            #expect(daemon.stop(keepingDirectory: true) == 0)
            daemon = try cluster.daemon(in: directory)
            let again = try await daemon.control()
            let snapshots = try await again.listSnapshots().snapshots
            #expect(Set(snapshots.map(\.id)) == Set(set.snapshots.map(\.id)))
            #expect(Set(snapshots.map(\.createdAt)).count == 1, "a set has one instant")
            let reader = try daemon.connect(rbdSnapshot.export)
            #expect(try reader.pread(count: 4096, offset: 0) == pattern(0x11, 4096))
            #expect(try daemon.connect("remote").pread(count: 4096, offset: 0) == pattern(0x33, 4096))

            // Deleting the set removes the RBD snapshot and its export, and a client still reading it
            // gets errors, not a crashed daemon.
            let lingering = try daemon.connect(rbdSnapshot.export)
            #expect(try lingering.pread(count: 4096, offset: 0) == pattern(0x11, 4096))
            _ = try await again.deleteSnapshots(ids: [set.set])
            #expect(throws: NBDClientError.self) { _ = try lingering.pread(count: 4096, offset: 0) }
            #expect(!(try cluster.rbd("snap", "ls", "rbd/remote").contains(rbdSnapshot.id.guidString)))
            #expect(throws: NBDClientError.self) { _ = try daemon.connect(rbdSnapshot.export) }
            #expect(try await again.listSnapshots().snapshots.isEmpty)
            await again.close()
            #expect(daemon.stop() == 0)
        }
    }

    /// What a crash can leave: a pending (not kept) set is rolled back at start. Snapshots of the image
    /// that Umbra never recorded stay, whatever their names.
    @Test func restartSettlesWhatACrashLeft() async throws {
        try await CephCluster.with { cluster in
            let directory = try TemporaryDirectory("umbra-daemon")
            var daemon = try cluster.daemon(volumes: ["local:8M"], in: directory)
            let control = try await daemon.control()
            _ = try await control.createVolume(name: "remote", size: 8 << 20, rbd: "rbd/remote")
            let kept = try await control.createSnapshotSet(CreateSetParams(volumes: ["local", "remote"]))
            // A set left open (pending until completed) when the daemon dies.
            let open = try await control.createSnapshotSet(
                CreateSetParams(volumes: ["local", "remote"], writers: false, keepOpen: true))
            let orphan = UUID()
            try cluster.rbd("snap", "create", "rbd/remote@" + orphan.guidString)
            try cluster.rbd("snap", "create", "rbd/remote@someone-elses")
            daemon.killNine()
            _ = daemon.stop(keepingDirectory: true)

            daemon = try cluster.daemon(in: directory)
            let again = try await daemon.control()
            let snapshots = try await again.listSnapshots().snapshots
            #expect(
                Set(snapshots.map(\.set)) == [kept.set], "the open set was not rolled back, or the kept one was lost")
            let names = try cluster.rbd("snap", "ls", "rbd/remote")
            #expect(names.contains(orphan.guidString), "a snapshot Umbra never recorded was removed")
            for snapshot in open.snapshots { #expect(!names.contains(snapshot.id.guidString)) }
            #expect(names.contains("someone-elses"))
            #expect(names.contains(try #require(kept.snapshots.first { $0.volume == "remote" }).id.guidString))

            // An image removed behind Umbra's back: the daemon still starts and serves the rest, and
            // the volume can be forgotten.
            _ = try await again.createVolume(name: "doomed", size: 4 << 20, rbd: "rbd/doomed")
            await again.close()
            #expect(daemon.stop(keepingDirectory: true) == 0)
            try cluster.rbd("rm", "rbd/doomed")
            daemon = try cluster.daemon(in: directory)
            let third = try await daemon.control()
            #expect(try await third.listVolumes().volumes.map(\.name) == ["local", "remote"])
            try await third.deleteVolume(name: "doomed")
            await expectControlError(.notFound, "doomed") { try await third.deleteVolume(name: "doomed") }
            await third.close()
            await control.close()
            #expect(daemon.stop() == 0)
        }
    }

    /// A set taken while the cluster does not answer fails, within the Ceph timeout, and lets writes
    /// go; once the cluster is back a set succeeds.
    @Test func aSetFailsCleanlyWhileTheClusterIsAway() async throws {
        try await CephCluster.with { cluster in
            let daemon = try cluster.daemon(
                volumes: ["local:4M"], extraArguments: ["--hold-limit", "2", "--ceph-timeout", "4"])
            let control = try await daemon.control()
            _ = try await control.createVolume(name: "remote", size: 4 << 20, rbd: "rbd/away")
            let local = try daemon.connect("local")
            try cluster.script("pause")
            let started = ContinuousClock.now
            await #expect(throws: ShadowCopyError.self) {
                _ = try await control.createSnapshotSet(CreateSetParams(volumes: ["local", "remote"], writers: false))
            }
            let took = ContinuousClock.now - started
            // The local volume's writes were let go.
            try local.pwrite(pattern(3, 4096), offset: 0)
            try cluster.script("resume")
            #expect(took < .seconds(30), "the failed set took \(took)")
            #expect(try await control.listSnapshots().snapshots.isEmpty)
            let set = try await control.createSnapshotSet(
                CreateSetParams(volumes: ["local", "remote"], writers: false))
            #expect(set.snapshots.count == 2)
            await control.close()
            #expect(daemon.stop() == 0)
        }
    }

    /// A writer that vetoes after the snapshots were taken: the set is deleted, its RBD snapshot too.
    @Test func vetoedSetLeavesNoRBDSnapshot() async throws {
        try await CephCluster.with { cluster in
            let daemon = try cluster.daemon(volumes: ["local:4M"])
            let control = try await daemon.control()
            _ = try await control.createVolume(name: "remote", size: 4 << 20, rbd: "rbd/vetoed")
            let writer = ShadowCopyWriter(
                socketPath: daemon.controlSocket, name: "vetoer", volumes: ["remote"], delegate: VetoingWriter())
            let writerTask = Task { try await writer.run() }
            while try await control.listWriters().writers.isEmpty { try await Task.sleep(for: .milliseconds(5)) }
            await #expect(throws: ShadowCopyError.self) {
                _ = try await control.createSnapshotSet(CreateSetParams(volumes: ["local", "remote"]))
            }
            #expect(try await control.listSnapshots().snapshots.isEmpty)
            #expect(
                !(try cluster.rbd("snap", "ls", "rbd/vetoed").contains("-")), "an RBD snapshot of the vetoed set stayed"
            )
            writerTask.cancel()
            _ = try? await writerTask.value
            await control.close()
            #expect(daemon.stop() == 0)
        }
    }

    /// A counter written to a local and an RBD volume in turn: every crash-consistent set shows the
    /// two within one step, because writes to both are held for one instant.
    @Test func setsAreOneInstantAcrossProviders() async throws {
        try await CephCluster.with { cluster in
            let daemon = try cluster.daemon(volumes: ["local:4M"])
            defer { daemon.stop() }
            let control = try await daemon.control()
            _ = try await control.createVolume(name: "remote", size: 4 << 20, rbd: "rbd/counter")
            let clients = try [daemon.connect("local"), daemon.connect("remote")]
            let shared = CounterState()
            // On threads of their own: a blocking libnbd call must not hold one of the few threads
            // Swift's concurrency runs on.
            let counting = Task {
                try await onOwnThread {
                    var value: UInt64 = 0
                    while !shared.stop.load(ordering: .relaxed) {
                        value += 1
                        let bytes = withUnsafeBytes(of: value.littleEndian) { Array($0) }
                        for client in clients { try client.pwrite(bytes, offset: 0) }
                        shared.steps.store(Int(value), ordering: .relaxed)
                    }
                }
            }
            var spreads: [Int] = []
            for _ in 0..<10 {
                let before = shared.steps.load(ordering: .relaxed)
                while shared.steps.load(ordering: .relaxed) < before + 20 {
                    try await Task.sleep(for: .milliseconds(2))
                }
                let set = try await control.createSnapshotSet(
                    CreateSetParams(volumes: ["local", "remote"], writers: false))
                let values = try set.snapshots.sorted { $0.volume < $1.volume }.map { snapshot in
                    try daemon.connect(snapshot.export).pread(count: 8, offset: 0).enumerated().reduce(UInt64(0)) {
                        $0 | UInt64($1.element) << (8 * $1.offset)
                    }
                }
                // local is written first: it is the same as remote, or one ahead.
                let (local, remote) = (values[0], values[1])
                #expect(local == remote || local == remote + 1, "local \(local), remote \(remote)")
                spreads.append(Int(local) - Int(remote))
                _ = try await control.deleteSnapshots(ids: [set.set])
            }
            shared.stop.store(true, ordering: .relaxed)
            try await counting.value
            #expect(shared.steps.load(ordering: .relaxed) > 200)
            print("rbd counter: \(shared.steps.load(ordering: .relaxed)) steps, spreads per set \(spreads)")

            // The same with a counter per volume, each written by a thread of its own, so that one
            // volume's writes never wait for the other's. A set is one instant T if each snapshot holds
            // a write that started before T, and the write after it on each volume ended after T:
            // max(start of what was caught) <= min(end of the next write).
            let journals = [WriteJournal(), WriteJournal()]
            shared.stop.store(false, ordering: .relaxed)
            let writers = (0..<2).map { index in
                Task {
                    try await onOwnThread {
                        let client = clients[index]
                        var value: UInt64 = 0
                        while !shared.stop.load(ordering: .relaxed) {
                            value += 1
                            let started = ContinuousClock.now
                            try client.pwrite(withUnsafeBytes(of: value.littleEndian) { Array($0) }, offset: 0)
                            journals[index].append(started: started, ended: .now)
                        }
                    }
                }
            }
            for _ in 0..<10 {
                while journals.contains(where: { $0.count < 20 }) { try await Task.sleep(for: .milliseconds(2)) }
                let set = try await control.createSnapshotSet(
                    CreateSetParams(volumes: ["local", "remote"], writers: false))
                let caught = try set.snapshots.sorted { $0.volume < $1.volume }.map { snapshot in
                    try daemon.connect(snapshot.export).pread(count: 8, offset: 0).enumerated().reduce(0) {
                        $0 | Int($1.element) << (8 * $1.offset)
                    }
                }
                // Wait until the write after each caught one has ended.
                for (index, value) in caught.enumerated() {
                    while journals[index].count < value + 1 { try await Task.sleep(for: .milliseconds(2)) }
                }
                let latestStart = zip(journals, caught).map { $0.write($1).started }.max()!
                let earliestNextEnd = zip(journals, caught).map { $0.write($1 + 1).ended }.min()!
                #expect(
                    latestStart <= earliestNextEnd,
                    "no one instant: a caught write started \(latestStart - earliestNextEnd) after another volume's uncaught write ended"
                )
                _ = try await control.deleteSnapshots(ids: [set.set])
            }
            shared.stop.store(true, ordering: .relaxed)
            for writer in writers { try await writer.value }
            await control.close()
        }
    }

    /// Bad configuration stops the daemon with a sentence; a cluster that stops answering fails
    /// requests with EIO within the timeout, the daemon stays up, and serves again when it returns;
    /// and a daemon stops even while its cluster does not answer.
    @Test func badConfigurationAndAClusterThatGoesAway() async throws {
        try await CephCluster.with { cluster in
            func refused(_ arguments: [String]) throws -> String {
                let result = try ChildProcess.run(
                    builtProduct("umbra"),
                    [
                        "serve", "--data", cluster.directory.path + "/refused", "--listen",
                        "unix:" + cluster.directory.path + "/r.sock",
                    ]
                        + arguments)
                #expect(result.status != 0)
                return result.errors
            }
            #expect(
                try refused(["--ceph-conf", "/nonexistent/ceph.conf"]).contains("Cannot read the Ceph configuration"))
            let wrongKey = cluster.directory.path + "/wrong.conf"
            let text = try String(contentsOfFile: cluster.configuration, encoding: .utf8)
                .replacingOccurrences(
                    of: "keyring = " + cluster.directory.path + "/ceph/client.keyring", with: "keyring = /nonexistent")
            try text.write(toFile: wrongKey, atomically: true, encoding: .utf8)
            let message = try refused(["--ceph-conf", wrongKey, "--ceph-timeout", "3"])
            #expect(message.contains("Connecting to the Ceph cluster") && message.contains("keyring"), "\(message)")

            // --rbd without --ceph-conf.
            try await DaemonFixture.with(volumes: []) { plain in
                let control = try await plain.control()
                await expectControlError(.invalidArgument, "--ceph-conf") {
                    _ = try await control.createVolume(name: "x", size: 1 << 20, rbd: "rbd/x")
                }
                await control.close()
            }

            let daemon = try cluster.daemon(extraArguments: ["--ceph-timeout", "3"])
            let control = try await daemon.control()
            _ = try await control.createVolume(name: "remote", size: 4 << 20, rbd: "rbd/away")
            let client = try daemon.connect("remote")
            try client.pwrite(pattern(7, 4096), offset: 0)
            try cluster.script("pause")
            let started = ContinuousClock.now
            #expect(throws: NBDClientError.self) { _ = try client.pread(count: 4096, offset: 1 << 20) }
            let waited = ContinuousClock.now - started
            try cluster.script("resume")
            #expect(waited < .seconds(30), "the failed read took \(waited)")
            // Still up, and serving again.
            #expect(try await control.listVolumes().volumes.map(\.name) == ["remote"])
            let again = try daemon.connect("remote")
            #expect(try again.pread(count: 4096, offset: 0) == pattern(7, 4096))
            try again.pwrite(pattern(8, 4096), offset: 8192)
            await control.close()
            // A daemon whose cluster has gone away still stops, within the timeout, cleanly.
            try cluster.script("pause")
            defer { _ = try? cluster.script("resume") }
            #expect(daemon.stop() == 0)
        }
    }

    func expectControlError(
        _ code: ControlErrorCode, _ fragment: String, sourceLocation: SourceLocation = #_sourceLocation,
        _ body: () async throws -> Void
    ) async {
        do {
            try await body()
            Issue.record("expected \(code) error mentioning '\(fragment)'", sourceLocation: sourceLocation)
        } catch let error as ShadowCopyError {
            #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
            #expect(error.message.contains(fragment), "\(error.message)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        }
    }
}

final class CounterState: Sendable {
    let stop = Atomic(false)
    let steps = Atomic(0)
}

/// When each write of a counter started and ended; write 1 is the first (counter value 1).
final class WriteJournal: Sendable {
    private let writes = Mutex<[(started: ContinuousClock.Instant, ended: ContinuousClock.Instant)]>([])

    func append(started: ContinuousClock.Instant, ended: ContinuousClock.Instant) {
        writes.withLock { $0.append((started, ended)) }
    }

    var count: Int { writes.withLock { $0.count } }

    /// Write `value` (1-based); value 0 is the zeroes before the first write, done at the start of time.
    func write(_ value: Int) -> (started: ContinuousClock.Instant, ended: ContinuousClock.Instant) {
        guard value > 0 else {
            let origin = writes.withLock { $0.first?.started ?? .now }
            return (origin - .seconds(3600), origin - .seconds(3600))
        }
        return writes.withLock { $0[value - 1] }
    }
}

final class WriterEventLog: Sendable {
    let events = Mutex<[String]>([])
}

/// A writer that vetoes once the snapshots exist.
struct VetoingWriter: ShadowCopyWriterDelegate {
    func onPostSnapshot(_ context: WriterEventContext) async throws {
        throw WriterVeto(.nonRetryable, "the test says no")
    }
}

/// A writer that records the events it got.
struct RecordingWriter: ShadowCopyWriterDelegate {
    let log: WriterEventLog
    func onFreeze(_ context: WriterEventContext) async throws { log.events.withLock { $0.append("freeze") } }
    func onThaw(_ context: WriterEventContext) async throws { log.events.withLock { $0.append("thaw") } }
}
