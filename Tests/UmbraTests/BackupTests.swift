// `umbra backup`, `backup list`, `backup verify` and `restore` as a user runs them, checked with
// QEMU's own tools: every image passes `qemu-img check`, `qemu-img compare` finds it identical to
// its snapshot's NBD export, incrementals chain onto the previous image, a damaged image is named by
// `verify`, a restored volume reads as the backup, and a backup interrupted halfway leaves nothing
// that `list` or `verify` would take for a backup.

import Foundation
import ShadowCopy
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

@Suite struct BackupTests {
    static func umbra(_ arguments: [String], _ daemon: DaemonFixture) throws -> (
        status: Int32, output: String, errors: String
    ) {
        try ChildProcess.run(builtProduct("umbra"), arguments + ["--control", daemon.controlSocket])
    }

    static func offline(_ arguments: [String]) throws -> (status: Int32, output: String, errors: String) {
        try ChildProcess.run(builtProduct("umbra"), arguments)
    }

    static func qemuImg(_ arguments: [String]) throws -> (status: Int32, output: String) {
        let run = try ChildProcess.run("/usr/bin/qemu-img", arguments)
        return (run.status, run.output + run.errors)
    }

    static func json(_ text: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "\(text)")
    }

    /// Backs up `volumes` into `directory`; returns the summary's backups by volume.
    static func backUp(_ volumes: [String], to directory: String, _ daemon: DaemonFixture, full: Bool = false)
        throws -> [String: [String: Any]]
    {
        let run = try umbra(["backup"] + volumes + ["--to", directory, "--json"] + (full ? ["--full"] : []), daemon)
        #expect(run.status == 0, "\(run.errors)")
        let backups = try json(run.output)["backups"] as? [[String: Any]] ?? []
        return Dictionary(uniqueKeysWithValues: backups.map { ($0["volume"] as! String, $0) })
    }

    /// The image passes `qemu-img check` and equals its snapshot's export byte for byte.
    static func expectImageMatchesSnapshot(_ image: String, _ export: String, _ daemon: DaemonFixture) throws {
        let check = try qemuImg(["check", image])
        #expect(check.status == 0 && check.output.contains("No errors were found"), "\(check.output)")
        let compare = try qemuImg(["compare", "-f", "qcow2", "-F", "raw", image, daemon.uri(export)])
        #expect(compare.status == 0, "\(image) against \(export): \(compare.output)")
    }

    @Test func fullThenIncrementalsForTwoVolumesInOneSet() async throws {
        try await DaemonFixture.with(volumes: ["a:16M", "b:4M"]) { daemon in
            let directory = daemon.directory.path + "/backups"
            let a = try daemon.connect("a")
            let b = try daemon.connect("b")
            var random = SeededRandom(seed: 7)
            var data = [UInt8](repeating: 0, count: 6 << 20)
            data.withUnsafeMutableBytes { random.fill($0) }
            try a.pwrite(data, offset: 0)
            try b.pwrite(Array(data.prefix(1 << 20)), offset: 2 << 20)

            let first = try Self.backUp(["a", "b"], to: directory, daemon)
            #expect(first["a"]?["kind"] as? String == "full" && first["b"]?["kind"] as? String == "full")
            // Zeros are not written: 6 MiB of data in a 16 MiB volume.
            #expect(first["a"]?["copiedBytes"] as? Int == 6 << 20)
            #expect(first["a"]?["bytes"] as? Int == 16 << 20)
            for volume in ["a", "b"] {
                let snapshot = try #require(first[volume]?["snapshot"] as? String)
                #expect(first[volume]?["file"] as? String == "\(volume)/\(snapshot).qcow2")
                try Self.expectImageMatchesSnapshot(
                    directory + "/\(volume)/\(snapshot).qcow2", "\(volume)@\(snapshot)", daemon)
            }

            // 1 % of a changes (160 KiB in two places); b does not.
            try a.pwrite([UInt8](repeating: 0x5A, count: 96 << 10), offset: 1 << 20)
            try a.pwrite([UInt8](repeating: 0xA5, count: 64 << 10), offset: 12 << 20)
            let second = try Self.backUp(["a", "b"], to: directory, daemon)
            #expect(second["a"]?["kind"] as? String == "incremental")
            #expect(second["b"]?["copiedBytes"] as? Int == 0)
            let copied = try #require(second["a"]?["copiedBytes"] as? Int)
            #expect(copied >= 160 << 10 && copied <= 256 << 10, "\(copied)")
            let aFirst = try #require(first["a"]?["snapshot"] as? String)
            let aSecond = try #require(second["a"]?["snapshot"] as? String)
            try Self.expectImageMatchesSnapshot(directory + "/a/\(aSecond).qcow2", "a@\(aSecond)", daemon)
            let chain = try Self.qemuImg(["info", "--backing-chain", directory + "/a/\(aSecond).qcow2"])
            #expect(chain.output.contains("backing file: \(aFirst).qcow2"), "\(chain.output)")

            try a.pwrite([UInt8](repeating: 0x77, count: 4096), offset: 5 << 20)
            let third = try Self.backUp(["a"], to: directory, daemon)
            let aThird = try #require(third["a"]?["snapshot"] as? String)
            try Self.expectImageMatchesSnapshot(directory + "/a/\(aThird).qcow2", "a@\(aThird)", daemon)
            // Only the last backup's snapshot of each volume is kept, as the next base.
            let requester = try await daemon.control()
            let left = try await requester.listSnapshots().snapshots
            #expect(Set(left.map(\.id.guidString)) == [aThird, try #require(second["b"]?["snapshot"] as? String)])
            #expect(left.allSatisfy { $0.purpose == "backup" })
            let listedJSON = try Self.umbra(["snapshot", "list", "--json"], daemon)
            #expect(listedJSON.output.contains(#""purpose":"backup""#), "\(listedJSON.output)")

            let list = try Self.offline(["backup", "list", directory, "--json"])
            #expect(list.status == 0, "\(list.errors)")
            let listed = try Self.json(list.output)["backups"] as? [[String: Any]] ?? []
            #expect(listed.map { $0["volume"] as? String } == ["a", "a", "a", "b", "b"])
            #expect(
                listed.map { $0["kind"] as? String } == ["full", "incremental", "incremental", "full", "incremental"])
            #expect(listed[0]["backing"] is NSNull && listed[1]["backing"] as? String == "\(aFirst).qcow2")

            let verify = try Self.offline(["backup", "verify", directory, "--json"])
            #expect(verify.status == 0, "\(verify.output)\(verify.errors)")
            #expect(
                (try Self.json(verify.output)["images"] as? [[String: Any]])?.allSatisfy { $0["ok"] as? Bool == true }
                    == true)

            // The newest image restores, through its chain, to a volume that reads as the snapshot.
            let restore = try Self.umbra(
                ["restore", directory + "/a/\(aThird).qcow2", "--volume", "a2", "--json"], daemon)
            #expect(restore.status == 0, "\(restore.errors)")
            let restored = try daemon.connect("a2")
            let snapshot = try daemon.connect("a@\(aThird)")
            #expect(try restored.pread(count: 16 << 20, offset: 0) == snapshot.pread(count: 16 << 20, offset: 0))
            let again = try Self.umbra(["restore", directory + "/a/\(aThird).qcow2", "--volume", "a2"], daemon)
            #expect(again.status == 1 && again.errors.contains("already exists"), "\(again.errors)")

            // A byte changed by hand in the middle image: verify names it.
            let middle = directory + "/a/\(aSecond).qcow2"
            let handle = try #require(FileHandle(forUpdatingAtPath: middle))
            try handle.seek(toOffset: 64 << 10)
            try handle.write(contentsOf: Data([0xFF]))
            try handle.close()
            let damaged = try Self.offline(["backup", "verify", directory, "--json"])
            #expect(damaged.status == 1)
            let images = try Self.json(damaged.output)["images"] as? [[String: Any]] ?? []
            #expect(
                images.filter { $0["ok"] as? Bool == false }.map { $0["file"] as? String } == ["a/\(aSecond).qcow2"])
            await requester.close()
        }
    }

    @Test func badInputIsRefusedAndDamagesNothing() async throws {
        try await DaemonFixture.with(volumes: ["a:4M"]) { daemon in
            let file = daemon.directory.path + "/not-a-directory"
            try Data("x".utf8).write(to: URL(fileURLWithPath: file))
            let onFile = try Self.umbra(["backup", "a", "--to", file], daemon)
            #expect(onFile.status == 1 && onFile.errors.contains("is a file, not a directory"), "\(onFile.errors)")

            let directory = daemon.directory.path + "/backups"
            _ = try Self.backUp(["a"], to: directory, daemon)
            let manifest = try Data(contentsOf: URL(fileURLWithPath: directory + "/umbra-backups.json"))
            let unknown = try Self.umbra(["backup", "a", "nope", "--to", directory], daemon)
            #expect(unknown.status == 1 && unknown.errors.contains("nope"), "\(unknown.errors)")
            #expect(try Data(contentsOf: URL(fileURLWithPath: directory + "/umbra-backups.json")) == manifest)
            let files = try FileManager.default.contentsOfDirectory(atPath: directory + "/a")
            #expect(files.count == 1 && files[0].hasSuffix(".qcow2"), "\(files)")

            let inside = try Self.umbra(["backup", "a", "--to", daemon.data + "/backups"], daemon)
            #expect(inside.status == 1 && inside.errors.contains("inside the data directory"), "\(inside.errors)")

            let empty = try Self.offline(["backup", "list", daemon.directory.path])
            #expect(empty.status == 1 && empty.errors.contains("holds no Umbra backups"), "\(empty.errors)")
        }
    }

    /// Ctrl-C while an image is being written: the set is aborted, the half-written image removed,
    /// nothing listed; the next backup starts over cleanly. The backup directory is on a disk whose
    /// syncs the test holds up (Scripts/testing/faultfs.py), so Ctrl-C comes while the image's sync
    /// is in progress, every time.
    @Test func anInterruptedBackupLeavesNothingThatLooksValid() async throws {
        let disk = try SlowDisk()
        defer { disk.unmount() }
        try await DaemonFixture.with(volumes: ["big:64M"]) { daemon in
            let client = try daemon.connect("big")
            var random = SeededRandom(seed: 9)
            var data = [UInt8](repeating: 0, count: 8 << 20)
            data.withUnsafeMutableBytes { random.fill($0) }
            for step in 0..<4 { try client.pwrite(data, offset: UInt64(step) << 23) }
            let directory = disk.mountpoint + "/backups"
            try disk.setSyncDelay(seconds: 3)
            let backup = try ChildProcess(
                builtProduct("umbra"), ["backup", "big", "--to", directory, "--control", daemon.controlSocket],
                captureStandardError: true)
            func partials() -> [String] {
                ((try? FileManager.default.contentsOfDirectory(atPath: directory + "/big")) ?? []).filter {
                    $0.hasSuffix(".partial")
                }
            }
            try await disk.waitForSyncInProgress(of: ".partial")
            kill(backup.processIdentifier, SIGINT)
            #expect(backup.finish() != 0)
            // The daemon notices the set is gone and removes what it was writing.
            let giveUp = ContinuousClock.now + .seconds(60)
            while !partials().isEmpty, ContinuousClock.now < giveUp { await Task.yield() }
            #expect(partials().isEmpty)
            let requester = try await daemon.control()
            #expect(try await requester.listSnapshots().snapshots.isEmpty)
            await requester.close()
            #expect(!FileManager.default.fileExists(atPath: directory + "/umbra-backups.json"))

            try disk.setSyncDelay(seconds: 0)
            let again = try Self.backUp(["big"], to: directory, daemon)
            #expect(again["big"]?["kind"] as? String == "full")
            // Whatever the interrupted run left (an image the daemon finished writing just as its set
            // was aborted, unlisted) is gone: the folder holds the one listed image.
            let snapshot = try #require(again["big"]?["snapshot"] as? String)
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory + "/big") == ["\(snapshot).qcow2"])
            let verify = try Self.offline(["backup", "verify", directory])
            #expect(verify.status == 0, "\(verify.output)\(verify.errors)")
        }
    }
}
