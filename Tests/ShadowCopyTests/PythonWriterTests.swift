// Scripts/umbra_writer.py, written from docs/control-protocol.md alone, run as a real subprocess
// against a real server: it takes part in sets, vetoes with the right failure kind, hangs (SIGSTOP)
// and is killed while frozen (SIGKILL), and the daemon copes each time.

import Foundation
import Glibc
import Testing
import UmbraTestSupport

@testable import ShadowCopy

private let scriptPath = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Scripts/umbra_writer.py").path

/// `python3 Scripts/umbra_writer.py ARGS…` as a child process.
final class PythonWriter: Sendable {
    let process: Process
    let stderrPath: String

    init(_ fixture: ServerFixture, name: String, volumes: [String] = ["db"], arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments =
            ["python3", scriptPath, "--socket", fixture.socketPath, "--name", name, "--verbose"]
            + volumes.flatMap { ["--volume", $0] } + arguments
        stderrPath = fixture.directory.appendingPathComponent("\(name)-\(UUID().guidString.prefix(4)).log").path
        _ = FileManager.default.createFile(atPath: stderrPath, contents: nil)
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: stderrPath))
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        self.process = process
    }

    func signal(_ number: Int32) { kill(process.processIdentifier, number) }

    func stop() {
        if process.isRunning {
            signal(SIGKILL)
            process.waitUntilExit()
        }
    }

    var log: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }
}

/// Waits (briefly, in real time) for something an outside process does; fails the test after 10 s.
private func eventually(_ what: String, _ condition: () async throws -> Bool) async throws {
    let start = ContinuousClock.now
    while try await !condition() {
        guard ContinuousClock.now - start < .seconds(10) else {
            Issue.record("timed out waiting for \(what)")
            throw PlainError(description: "timed out waiting for \(what)")
        }
        try await Task.sleep(for: .milliseconds(5))
    }
}

private func lines(_ path: String) -> [String] {
    ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
}

@Suite(.timeLimit(.minutes(1))) struct PythonWriterTests {
    /// The Python writer registers, runs its commands at Freeze, Thaw and BackupComplete with the set in
    /// its environment, and the set reports it.
    @Test func pythonWriterTakesPartInASet() async throws {
        try await ServerFixture.with { fixture in
            let log = fixture.directory.appendingPathComponent("events").path
            let writer = try PythonWriter(
                fixture,
                name: "py",
                arguments: [
                    "--on-freeze", "echo freeze $UMBRA_SET $UMBRA_VOLUMES >> \(log)",
                    "--on-thaw", "echo thaw $UMBRA_SNAPSHOTS >> \(log)",
                    "--on-backup-complete", "echo backup-complete >> \(log)",
                ]
            )
            defer { writer.stop() }
            await fixture.coordinator.waitForWriters(count: 1)
            let client = try await fixture.client()
            let result = try await client.createSnapshotSet(CreateSetParams(volumes: ["db", "logs"]))
            #expect(result.writers.map(\.name) == ["py"])
            #expect(result.writers.map(\.state) == [.stable])
            #expect(!result.crashConsistent)
            let exports = result.snapshots.map(\.export).joined(separator: " ")
            #expect(lines(log) == ["freeze \(result.set.guidString) db logs", "thaw \(exports)", "backup-complete"])
            await client.close()
        }
    }

    /// A failing command vetoes: exit 75 as retryable, any other status as non-retryable, with the
    /// command's output in the message that reaches the requester.
    @Test(arguments: [(Int32(75), WriterFailure.retryable), (3, .nonRetryable)])
    func pythonWriterVetoes(status: Int32, kind: WriterFailure) async throws {
        try await ServerFixture.with { fixture in
            let writer = try PythonWriter(
                fixture,
                name: "py",
                arguments: ["--on-prepare-for-snapshot", "echo 'tables locked' >&2; exit \(status)"]
            )
            defer { writer.stop() }
            await fixture.coordinator.waitForWriters(count: 1)
            let client = try await fixture.client()
            do {
                _ = try await client.createSnapshotSet(CreateSetParams(volumes: ["db"]))
                Issue.record("the set should have failed")
            } catch let error as ShadowCopyError {
                #expect(error.code == .writerFailed)
                #expect(error.message.contains("'py'") && error.message.contains("prepare-for-snapshot"))
                #expect(error.message.contains("tables locked") && error.message.contains("status \(status)"))
                #expect(error.details?.failedWriters?.first?.failure == kind)
            }
            let listed = try await client.listWriters().writers.first
            #expect(listed?.state == .failedAtPrepareSnapshot)
            #expect(listed?.failure == kind)
            #expect(fixture.provider.callsBesidesFlushes == [.validate(["db"])])
            await client.close()
        }
    }

    /// A Python writer that stops answering (SIGSTOP) times out at Identify on the manual clock; once
    /// it runs again it catches up, and the next set succeeds.
    @Test func pythonWriterThatHangsTimesOut() async throws {
        try await ServerFixture.with { fixture in
            let log = fixture.directory.appendingPathComponent("events").path
            let writer = try PythonWriter(fixture, name: "py", arguments: ["--on-freeze", "echo freeze >> \(log)"])
            defer { writer.stop() }
            await fixture.coordinator.waitForWriters(count: 1)
            writer.signal(SIGSTOP)
            let client = try await fixture.client()
            let set = Task { try await client.createSnapshotSet(CreateSetParams(volumes: ["db"])) }
            await fixture.clock.waitForSleepers(count: 1)
            fixture.clock.advance(by: .seconds(30))
            do {
                _ = try await set.value
                Issue.record("the set should have failed")
            } catch let error as ShadowCopyError {
                #expect(error.code == .writerFailed)
                #expect(error.details?.failedWriters?.first?.writer == "py")
                #expect(error.details?.failedWriters?.first?.step == .identify)
                #expect(error.details?.failedWriters?.first?.failure == .timeout)
            }
            writer.signal(SIGCONT)
            let result = try await client.createSnapshotSet(CreateSetParams(volumes: ["db"]))
            #expect(result.writers.map(\.state) == [.stable])
            #expect(lines(log) == ["freeze"])
            await client.close()
        }
    }

    /// A Python writer killed while frozen fails the set as retryable at Freeze (the other writer is
    /// aborted, the provider released); restarted with the same instance GUID, it takes part in the
    /// next set.
    @Test func pythonWriterKilledWhileFrozenThenRestarted() async throws {
        try await ServerFixture.with { fixture in
            let instance = UUID()
            let log = fixture.directory.appendingPathComponent("events").path
            let arguments = ["--instance", instance.guidString, "--on-freeze", "echo freeze >> \(log)"]
            let writer = try PythonWriter(fixture, name: "py", arguments: arguments)
            defer { writer.stop() }
            let swift = RecordingDelegate()
            await swift.set(.freeze, .block)
            let swiftTask = try await startWriter(fixture, name: "swift", delegate: swift, expectedWriters: 2)
            let client = try await fixture.client()
            let set = Task { try await client.createSnapshotSet(CreateSetParams(volumes: ["db"])) }
            await swift.waitFor(.freeze)
            try await eventually("the Python writer to freeze") {
                try await client.listWriters().writers.first { $0.name == "py" }?.state == .waitingForThaw
            }
            writer.signal(SIGKILL)
            do {
                _ = try await set.value
                Issue.record("the set should have failed")
            } catch let error as ShadowCopyError {
                #expect(error.code == .writerFailed)
                #expect(error.details?.failedWriters?.first?.writer == "py")
                #expect(error.details?.failedWriters?.first?.step == .freeze)
                #expect(error.details?.failedWriters?.first?.failure == .retryable)
            }
            await swift.set(.freeze, .succeed)
            await swift.release()
            await swift.waitFor(.abort)
            #expect(!fixture.provider.isHolding)

            let restarted = try PythonWriter(fixture, name: "py", arguments: arguments)
            defer { restarted.stop() }
            await fixture.coordinator.waitForWriters(count: 2)
            let result = try await client.createSnapshotSet(CreateSetParams(volumes: ["db"]))
            #expect(result.writers.map(\.instance).contains(instance))
            #expect(result.writers.allSatisfy { $0.state == .stable })
            #expect(lines(log) == ["freeze", "freeze"])
            await client.close()
            swiftTask.cancel()
            try? await swiftTask.value
        }
    }
}
