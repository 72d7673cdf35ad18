// `umbra volume revert` against the real daemon: the live volume reads as the snapshot afterwards,
// every snapshot stays, the volume's NBD clients are ended while it runs; and a daemon killed -9 in
// the middle of a revert completes it when it starts again (the kill comes while the revert's first
// record is being synced, on a disk whose syncs the test holds up: Scripts/testing/faultfs.py).

import Foundation
import ShadowCopy
import Testing
import UmbraTestSupport

@Suite struct VolumeRevertTests {
    @Test func revertFromTheCLI() async throws {
        try await DaemonFixture.with(volumes: ["disk:4M"]) { daemon in
            let original = [UInt8](repeating: 0xA1, count: 1 << 20)
            let client = try daemon.connect("disk")
            try client.pwrite(original, offset: 0)
            let requester = try await daemon.control()
            let taken = try await requester.createSnapshotSet(CreateSetParams(volumes: ["disk"], writers: false))
            let snapshot = taken.snapshots[0].id
            // 256 KiB rewritten and 64 KiB written where there were zeros: 320 KiB changed.
            try client.pwrite([UInt8](repeating: 0xB2, count: 256 << 10), offset: 128 << 10)
            try client.pwrite([UInt8](repeating: 0xC3, count: 64 << 10), offset: 3 << 20)
            try client.flush()

            // Refused before it starts (no such snapshot): the connected client is not ended.
            let refused = try ChildProcess(
                builtProduct("umbra"),
                [
                    "volume", "revert", "disk", "--to", "0c0c0c0c-0000-0000-0000-000000000000", "--control",
                    daemon.controlSocket,
                ], captureStandardError: true)
            #expect(refused.finish() == 1)
            #expect(try client.pread(count: 4096, offset: 0) == Array(original.prefix(4096)))

            let revert = try ChildProcess(
                builtProduct("umbra"),
                ["volume", "revert", "disk", "--to", snapshot.guidString, "--json", "--control", daemon.controlSocket],
                captureStandardError: true)
            let output = revert.readAll()
            #expect(revert.finish() == 0, "\(revert.standardErrorText)")
            let result = try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any]
            #expect(result?["volume"] as? String == "disk")
            #expect(result?["snapshot"] as? String == snapshot.guidString)
            #expect(result?["changedBytes"] as? Int == 320 << 10)
            #expect((result?["seconds"] as? Double ?? -1) >= 0)

            // The client connected before the revert was ended.
            #expect(throws: NBDClientError.self) { _ = try client.pread(count: 4096, offset: 0) }
            let fresh = try daemon.connect("disk")
            #expect(try fresh.pread(count: 1 << 20, offset: 0) == original)
            #expect(try fresh.pread(count: 64 << 10, offset: 3 << 20) == [UInt8](repeating: 0, count: 64 << 10))
            #expect(try await requester.listSnapshots(volume: "disk").snapshots.map(\.id) == [snapshot])
            let snapshotClient = try daemon.connect(taken.snapshots[0].export)
            #expect(try snapshotClient.pread(count: 1 << 20, offset: 0) == original)

            let wrong = try ChildProcess(
                builtProduct("umbra"),
                ["volume", "revert", "nope", "--to", snapshot.guidString, "--control", daemon.controlSocket],
                captureStandardError: true)
            #expect(wrong.finish() == 1)
            #expect(wrong.standardErrorText == "No volume named 'nope'.\n", "\(wrong.standardErrorText)")
            await requester.close()
        }
    }

    @Test func aRevertInterruptedByKillNineCompletesAtRestart() async throws {
        let disk = try SlowDisk()
        defer { disk.unmount() }
        let data = disk.mountpoint + "/data"
        let daemon = try DaemonFixture.start(volumes: ["disk:4M"], data: data)
        let original = [UInt8](repeating: 0x11, count: 1 << 20)
        let client = try daemon.connect("disk")
        try client.pwrite(original, offset: 0)
        let requester = try await daemon.control()
        let snapshot = try await requester.createSnapshotSet(CreateSetParams(volumes: ["disk"], writers: false))
            .snapshots[0].id
        try client.pwrite([UInt8](repeating: 0x22, count: 1 << 20), offset: 0)
        try client.flush()

        // Every sync now takes two seconds: the revert's first record is written and in its sync when
        // the daemon is killed. (A process in a FUSE sync dies when the sync returns, before it runs
        // another instruction: the revert's first write never happens.)
        try disk.setSyncDelay(seconds: 2)
        let reverting = Task { try await requester.revertVolume(name: "disk", to: snapshot) }
        try await disk.waitForSyncInProgress(of: "/catalog")
        daemon.killNine()
        _ = await reverting.result
        try disk.setSyncDelay(seconds: 0)

        let restarted = try DaemonFixture.start(
            volumes: ["disk:4M"], in: daemon.directory, data: data, capturingLog: true)
        let fresh = try restarted.connect("disk")
        #expect(try fresh.pread(count: 1 << 20, offset: 0) == original)
        let again = try await restarted.control()
        #expect(try await again.listSnapshots(volume: "disk").snapshots.map(\.id) == [snapshot])
        await again.close()
        try fresh.shutdown()
        #expect(restarted.stop() == 0)
        #expect(restarted.log.contains("completing a revert interrupted by a crash"), "\(restarted.log)")
    }
}
