// What the daemon makes durable on a real file system, seen through the syncs `faultfs.py` reports.

import Foundation
import Testing
import UmbraTestSupport

@Suite(.serialized, .timeLimit(.minutes(2))) struct DurabilityTests {
    /// A data directory that does not exist yet is created durably: the parent of every directory
    /// the daemon makes is synced, so a power cut after the store's own files were synced cannot
    /// take the whole store away (the daemon would then start a new, empty one).
    @Test func missingDataDirectoryIsCreatedDurably() async throws {
        let disk = try SlowDisk()
        defer { disk.unmount() }
        let daemon = try DaemonFixture.start(volumes: ["db:1M"], data: disk.mountpoint + "/fresh/data")
        defer { daemon.stop() }
        // `fresh` is made in the root, and `data` in `fresh`.
        try await disk.waitForCompletedSync(of: "/")
        try await disk.waitForCompletedSync(of: "/fresh")
    }
}
