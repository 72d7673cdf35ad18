// A writer that runs shell commands for events (`umbra writer run --on-freeze CMD --on-thaw CMD …`),
// for databases and services that have quiesce commands.
//
// Each command runs as `/bin/sh -c CMD` with the event described in UMBRA_* environment variables.
// Exit 0 answers the event; exit 75 (EX_TEMPFAIL) vetoes as retryable; any other status, or a signal,
// vetoes as non-retryable; a command still running when the event's time is up is terminated and
// vetoes as a timeout. The command's output (stdout and stderr, last `outputBytesMax` bytes) becomes
// the veto message. Output goes to a temporary file rather than a pipe, so a chatty command can never
// block on a full pipe while we wait for it.
//
// An Abort after a successful Freeze runs the thaw command first: an application must never be left
// frozen because the set failed elsewhere.

import Foundation
import Synchronization

public final class CommandWriter: ShadowCopyWriterDelegate {
    /// The exit status that means "retry later" (EX_TEMPFAIL in sysexits.h).
    public static let retryableExitStatus: Int32 = 75
    /// How much of a command's output is kept for the veto message.
    public static let outputBytesMax = 4096

    public let commands: [WriterEvent: String]
    public let shell: String
    private let frozenSet = Mutex<UUID?>(nil)

    /// - Parameter commands: the command for each event; events without one are answered at once.
    public init(commands: [WriterEvent: String], shell: String = "/bin/sh") {
        self.commands = commands
        self.shell = shell
    }

    public func onIdentify(_ context: WriterEventContext) async throws -> JSONValue? {
        try await run(.identify, context)
        return nil
    }

    public func onPrepareForBackup(_ context: WriterEventContext) async throws {
        try await run(.prepareForBackup, context)
    }

    public func onPrepareForSnapshot(_ context: WriterEventContext) async throws {
        try await run(.prepareForSnapshot, context)
    }

    public func onFreeze(_ context: WriterEventContext) async throws {
        try await run(.freeze, context)
        frozenSet.withLock { $0 = context.set }
    }

    public func onThaw(_ context: WriterEventContext) async throws {
        frozenSet.withLock { $0 = nil }
        try await run(.thaw, context)
    }

    public func onPostSnapshot(_ context: WriterEventContext) async throws {
        try await run(.postSnapshot, context)
    }

    public func onBackupComplete(_ context: WriterEventContext) async throws {
        try await run(.backupComplete, context)
    }

    public func onAbort(_ context: WriterEventContext) async {
        let wasFrozen = frozenSet.withLock { frozen in
            defer { frozen = nil }
            return frozen != nil
        }
        if wasFrozen { try? await run(.thaw, context) }
        try? await run(.abort, context)
    }

    /// Runs the command for `event`, if there is one; throws `WriterVeto` when it fails.
    func run(_ event: WriterEvent, _ context: WriterEventContext) async throws {
        guard let command = commands[event] else { return }
        let outcome = try await Self.execute(
            shell: shell,
            command: command,
            environment: environment(for: event, context),
            timeout: context.timeout
        )
        switch outcome.status {
        case .exited(0):
            return
        case .exited(Self.retryableExitStatus):
            throw WriterVeto(.retryable, Self.describe(command, "exited with status 75", outcome.output))
        case .exited(let status):
            throw WriterVeto(.nonRetryable, Self.describe(command, "exited with status \(status)", outcome.output))
        case .signalled(let signal):
            throw WriterVeto(.nonRetryable, Self.describe(command, "was killed by signal \(signal)", outcome.output))
        case .timedOut:
            throw WriterVeto(
                .timeout,
                Self.describe(command, "was still running after \(context.timeout) and was stopped", outcome.output)
            )
        }
    }

    private func environment(for event: WriterEvent, _ context: WriterEventContext) -> [String: String] {
        var environment = ProcessInfo.processInfo.environment
        environment["UMBRA_EVENT"] = event.rawValue
        environment["UMBRA_SET"] = context.set.guidString
        environment["UMBRA_VOLUMES"] = context.volumes.joined(separator: " ")
        environment["UMBRA_SNAPSHOTS"] = context.snapshots.map(\.export).joined(separator: " ")
        environment["UMBRA_REASON"] = context.reason ?? ""
        return environment
    }

    private static func describe(_ command: String, _ what: String, _ output: String) -> String {
        let trimmed = output.trimmingCharacters(in: .whitespacesAndNewlines)
        return trimmed.isEmpty ? "'\(command)' \(what)." : "'\(command)' \(what): \(trimmed)"
    }

    enum Status: Hashable, Sendable {
        case exited(Int32)
        case signalled(Int32)
        case timedOut
    }

    static func execute(shell: String, command: String, environment: [String: String], timeout: Duration)
        async throws -> (status: Status, output: String)
    {
        let outputURL = FileManager.default.temporaryDirectory
            .appendingPathComponent("umbra-writer-\(UUID().guidString).out")
        guard FileManager.default.createFile(atPath: outputURL.path, contents: nil) else {
            throw WriterVeto(.nonRetryable, "Cannot create a temporary file for the command's output.")
        }
        defer { try? FileManager.default.removeItem(at: outputURL) }
        let output = try FileHandle(forWritingTo: outputURL)
        defer { try? output.close() }

        let process = Process()
        process.executableURL = URL(fileURLWithPath: shell)
        process.arguments = ["-c", command]
        process.environment = environment
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = output
        process.standardError = output
        let exited = AsyncStream.makeStream(of: Void.self)
        process.terminationHandler = { _ in exited.continuation.finish() }
        do {
            try process.run()
        } catch {
            throw WriterVeto(.nonRetryable, "'\(command)' could not be started: \(error).")
        }
        let timedOut = Mutex(false)
        let watchdog = Task {
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            timedOut.withLock { $0 = true }
            process.terminate()
        }
        for await _ in exited.stream {}
        watchdog.cancel()

        let data = (try? Data(contentsOf: outputURL)) ?? Data()
        let text = String(decoding: data.suffix(outputBytesMax), as: UTF8.self)
        if timedOut.withLock({ $0 }) { return (.timedOut, text) }
        switch process.terminationReason {
        case .exit: return (.exited(process.terminationStatus), text)
        case .uncaughtSignal: return (.signalled(process.terminationStatus), text)
        @unknown default: return (.exited(process.terminationStatus), text)
        }
    }
}
