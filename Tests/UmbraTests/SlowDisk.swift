// The real daemon on a disk it can only see through `Scripts/testing/faultfs.py`: a FUSE
// pass-through whose syncs take as long as the test says, and which reports every sync it is asked
// for (files and directories), so a test can see what the daemon made durable and when.

import Foundation
import Synchronization
import UmbraTestSupport

/// `faultfs.py` mounted over a fresh directory, with the sync delay set through its delay file.
final class SlowDisk: @unchecked Sendable {
    let directory: TemporaryDirectory
    let process: ChildProcess
    var mountpoint: String { directory.path + "/mnt" }
    private var delayFile: String { directory.path + "/delay" }
    private let syncs = Mutex<[String]>([])
    private let reader = DispatchSemaphore(value: 0)

    static var script: String {
        repositoryRoot + "/Scripts/testing/faultfs.py"
    }

    init() throws {
        directory = try TemporaryDirectory("umbra-slowdisk")
        try FileManager.default.createDirectory(atPath: directory.path + "/src", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: directory.path + "/mnt", withIntermediateDirectories: true)
        try "0".write(toFile: directory.path + "/delay", atomically: true, encoding: .utf8)
        process = try ChildProcess(
            "/usr/bin/python3",
            [Self.script, directory.path + "/src", directory.path + "/mnt", "--delay-file", directory.path + "/delay"],
            captureStandardError: true)
        guard process.readLine() == "mounted" else {
            process.kill()
            throw FixtureError("faultfs did not mount: \(process.standardErrorText)")
        }
        Thread.detachNewThread { [self] in
            while let line = process.readLine() { syncs.withLock { $0.append(line) } }
            reader.signal()
        }
    }

    /// Every sync from now on takes `seconds`.
    func setSyncDelay(seconds: Double) throws {
        try "\(seconds)".write(toFile: delayFile, atomically: true, encoding: .utf8)
    }

    /// Waits until a sync of a file whose path contains `fragment` has begun (and not yet ended).
    func waitForSyncInProgress(of fragment: String) async throws {
        try await waitForSyncs("no sync of \(fragment) began") { lines in
            var open = 0
            for line in lines where line.contains(fragment) {
                open += line.hasPrefix("fsync-begin ") ? 1 : line.hasPrefix("fsync-end ") ? -1 : 0
            }
            return open > 0
        }
    }

    /// Waits until a sync of exactly `path` (as the mounted file system names it: "/" is its root)
    /// has completed.
    func waitForCompletedSync(of path: String) async throws {
        try await waitForSyncs("no sync of \(path) completed") { $0.contains("fsync-end " + path) }
    }

    /// Waits, up to a minute, until the sync lines seen so far satisfy `done`.
    private func waitForSyncs(_ failure: String, until done: ([String]) -> Bool) async throws {
        let giveUp = ContinuousClock.now + .seconds(60)
        while !syncs.withLock({ done($0) }) {
            guard ContinuousClock.now < giveUp else {
                throw FixtureError("\(failure); syncs seen: \(syncs.withLock { $0 })")
            }
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    func unmount() {
        unmountFUSE(mountpoint, served: process)
        reader.wait()
        directory.remove()
    }
}

/// The repository's root directory (for its scripts).
let repositoryRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path

/// Unmounts a FUSE file system and waits for the process serving it to exit (killing it after 30 s).
func unmountFUSE(_ mountpoint: String, served process: ChildProcess) {
    let unmount = Process()
    unmount.executableURL = URL(fileURLWithPath: "/usr/bin/fusermount")
    unmount.arguments = ["-u", mountpoint]
    try? unmount.run()
    unmount.waitUntilExit()
    if !process.waitUntilExit(seconds: 30) { process.kill() }
}
