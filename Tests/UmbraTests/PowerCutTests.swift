// A power cut of the real daemon: its data directory on `Scripts/testing/powercutfs.py`, a FUSE file
// system that keeps every write pending until the file is synced (and every directory change until
// its directory is), and drops all of that at a power cut. Unlike kill -9, which leaves the page
// cache alone, here whatever the daemon did not make durable is really gone. After NBD writes with
// FLUSH and FUA and two shadow copy sets, the daemon is killed, the power cut, and the daemon
// started again: every snapshot whose creation returned is listed and byte-exact, and every flushed
// live byte is intact. With syncs ignored (a disk that lies) the same check must fail.

import Foundation
import ShadowCopy
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

@Suite(.serialized) struct PowerCutTests {
    static let volumeSize = 4 << 20

    @Test func everythingAcknowledgedSurvivesAPowerCut() async throws {
        let (problems, lostPages) = try await Self.powerCut(ignoringSyncs: false)
        #expect(problems.isEmpty, "\(problems)")
        // The power cut is real: the write that was never flushed is gone.
        #expect(lostPages == 256, "\(lostPages) of the 256 unflushed pages were lost")
    }

    /// A FUA write is durable by itself: with no FLUSH after it, a power cut keeps its bytes (written
    /// through the live file's O_DSYNC descriptor) and the snapshot it copied chunks for stays exact.
    /// Written without O_DSYNC, the bytes are lost and this fails.
    @Test func aFUAWriteSurvivesAPowerCutWithoutAFlush() async throws {
        let original = Self.pattern(1, count: Self.volumeSize)
        let fua = Self.pattern(6, count: 256 << 10)
        try await Self.acrossAPowerCut { daemon in
            let client = try daemon.connect("disk")
            let control = try await daemon.control()
            try client.pwrite(original, offset: 0)
            try client.flush()
            let snapshot = try await Self.takeSet(control)
            await control.close()
            try client.pwrite(fua, offset: 96 << 10, flags: .fua)
            return snapshot
        } after: { daemon, snapshot in
            // Compared first: a failed #expect on two big arrays would diff them element by element.
            let after = try daemon.connect("disk").pread(count: Self.volumeSize, offset: 0)
            let fuaSurvived = after[(96 << 10)..<((96 << 10) + fua.count)].elementsEqual(fua)
            #expect(fuaSurvived, "the FUA write did not survive the power cut")
            let unchanged = after[..<(64 << 10)].elementsEqual(original[..<(64 << 10)])
            #expect(unchanged, "bytes the FUA write did not touch changed")
            let reader = try daemon.connect("disk@" + snapshot.uuidString.lowercased())
            let exact = try reader.pread(count: Self.volumeSize, offset: 0) == original
            #expect(exact, "the snapshot reads differently after the power cut")
        }
    }

    /// Teeth: on a file system that ignores syncs, the same power cut loses acknowledged data, and
    /// the check above notices.
    @Test func aDiskThatIgnoresSyncsFailsTheCheck() async throws {
        let (problems, _) = try await Self.powerCut(ignoringSyncs: true)
        #expect(!problems.isEmpty, "a power cut on a disk that ignores syncs went unnoticed")
    }

    /// Runs the scenario and returns what did not survive as it should, and how many pages of the
    /// write that was never flushed were lost.
    static func powerCut(ignoringSyncs: Bool) async throws -> (problems: [String], lostPages: Int) {
        let size = volumeSize
        // Acknowledged but never flushed: may be lost, page by page.
        let unflushed = (2 << 20)..<(3 << 20)
        return try await acrossAPowerCut(ignoringSyncs: ignoringSyncs) { daemon in
            var live = Self.pattern(1, count: size)
            var snapshots: [(id: UUID, bytes: [UInt8])] = []
            let client = try daemon.connect("disk")
            let control = try await daemon.control()
            try client.pwrite(live, offset: 0)
            try client.flush()
            snapshots.append((try await Self.takeSet(control), live))
            // A FUA write, then a write and a FLUSH; each copies the chunks it overwrites.
            let fua = Self.pattern(2, count: 1 << 20)
            try client.pwrite(fua, offset: 0, flags: .fua)
            live.replaceSubrange(0..<(1 << 20), with: fua)
            let flushed = Self.pattern(3, count: 512 << 10)
            try client.pwrite(flushed, offset: 1 << 20)
            try client.flush()
            live.replaceSubrange((1 << 20)..<((1 << 20) + (512 << 10)), with: flushed)
            snapshots.append((try await Self.takeSet(control), live))
            try client.pwrite(Self.pattern(4, count: unflushed.count), offset: UInt64(unflushed.lowerBound))
            await control.close()
            return (live, snapshots)
        } after: { daemon, before in
            let (live, snapshots) = before
            var problems: [String] = []
            let control = try await daemon.control()
            let listed = try await control.listSnapshots(volume: "disk").snapshots
            await control.close()
            for (id, bytes) in snapshots {
                guard let snapshot = listed.first(where: { $0.id == id }) else {
                    problems.append("snapshot \(id) was taken but is gone after the power cut")
                    continue
                }
                if snapshot.state != "ready" { problems.append("snapshot \(id) is \(snapshot.state)") }
                let reader = try daemon.connect("disk@" + id.uuidString.lowercased())
                if try reader.pread(count: size, offset: 0) != bytes {
                    problems.append("snapshot \(id) reads differently after the power cut")
                }
            }
            let after = try daemon.connect("disk").pread(count: size, offset: 0)
            let newer = Self.pattern(4, count: 1 << 20)
            var lostPages = 0
            for page in stride(from: 0, to: size, by: 4096) {
                let bytes = after[page..<(page + 4096)]
                if bytes.elementsEqual(live[page..<(page + 4096)]) {
                    if unflushed.contains(page) { lostPages += 1 }
                    continue
                }
                if unflushed.contains(page),
                    bytes.elementsEqual(newer[(page - unflushed.lowerBound)..<(page - unflushed.lowerBound + 4096)])
                {
                    continue
                }
                problems.append("live byte range at \(page) lost a flushed write")
                break
            }
            return (problems, lostPages)
        }
    }

    /// Starts a daemon with volume "disk" (4 MiB) on a fresh power-cut disk, runs `before`, kills the
    /// daemon (-9) and cuts the power, starts it again on what the platter kept, and returns what
    /// `after` makes of it, given what `before` returned.
    static func acrossAPowerCut<State, Result>(
        ignoringSyncs: Bool = false, _ before: (DaemonFixture) async throws -> State,
        after: (DaemonFixture, State) async throws -> Result
    ) async throws -> Result {
        let disk = try PowerCutDisk(ignoringSyncs: ignoringSyncs)
        defer { disk.unmount() }
        let sockets = try TemporaryDirectory("umbra-powercut")
        defer { sockets.remove() }
        let data = disk.mountpoint + "/data"
        let first = try DaemonFixture.start(volumes: ["disk:4M"], in: sockets, data: data)
        let state: State
        do {
            state = try await before(first)
        } catch {
            first.killNine()
            _ = first.process.finish()
            throw error
        }
        first.killNine()
        _ = first.process.finish()
        try await disk.cutPower()
        let second = try DaemonFixture.start(volumes: ["disk:4M"], in: sockets, data: data)
        defer { second.stop() }
        return try await after(second, state)
    }

    static func takeSet(_ control: ControlClient) async throws -> UUID {
        try await control.createSnapshotSet(CreateSetParams(volumes: ["disk"], writers: false)).snapshots[0].id
    }

    static func pattern(_ seed: UInt64, count: Int) -> [UInt8] {
        var random = SeededRandom(seed: seed)
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { random.fill($0) }
        return bytes
    }
}

/// `powercutfs.py` mounted over a fresh directory.
final class PowerCutDisk: @unchecked Sendable {
    let directory: TemporaryDirectory
    let process: ChildProcess
    var mountpoint: String { directory.path + "/mnt" }

    init(ignoringSyncs: Bool) throws {
        directory = try TemporaryDirectory("umbra-powercutfs")
        for name in ["platter", "mnt"] {
            try FileManager.default.createDirectory(
                atPath: directory.path + "/" + name, withIntermediateDirectories: true)
        }
        let script = repositoryRoot + "/Scripts/testing/powercutfs.py"
        process = try ChildProcess(
            "/usr/bin/python3",
            [script, directory.path + "/platter", directory.path + "/mnt"] + (ignoringSyncs ? ["--ignore-fsync"] : []),
            captureStandardError: true)
        guard process.readLine() == "mounted" else {
            process.kill()
            throw FixtureError("powercutfs did not mount: \(process.standardErrorText)")
        }
    }

    /// Drops everything not synced; returns once the file system says it is done.
    func cutPower() async throws {
        process.send(Array("cut\n".utf8))
        let answer = await onOwnThread { [process] in process.readLine() }
        guard answer == "power-cut" else { throw FixtureError("powercutfs answered \(answer ?? "nothing")") }
    }

    func unmount() {
        unmountFUSE(mountpoint, served: process)
        directory.remove()
    }
}
