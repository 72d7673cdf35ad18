// A writer that runs shell commands for events (`umbra writer run --on-freeze CMD --on-thaw CMD …`),
// for databases and services that have quiesce commands.
//
// Each command runs as `/bin/sh -c CMD` with the event described in UMBRA_* environment variables.
// Exit 0 answers the event; exit 75 (EX_TEMPFAIL) vetoes as retryable; any other status, or a signal,
// vetoes as non-retryable; a command still running when the event's time is up is terminated and
// vetoes as a timeout. The command's output (stdout and stderr, last `outputBytesMax` bytes) becomes
// the veto message. Output goes to a temporary file rather than a pipe, so a chatty command can never
// block on a full pipe while we wait for it. Commands are spawned (not Foundation's `Process`) as the
// leader of their own process group, so a timeout kills everything the command started; `Process`
// would also wait for any grandchild still holding its descriptors.
//
// An Abort after a successful Freeze runs the thaw command first: an application must never be left
// frozen because the set failed elsewhere.

import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

public final class CommandWriter: ShadowCopyWriterDelegate {
    /// The exit status that means "retry later" (EX_TEMPFAIL in sysexits.h).
    public static let retryableExitStatus: Int32 = 75
    /// How much of a command's output is kept for the veto message.
    public static let outputBytesMax = 4096

    public let commands: [WriterEvent: String]
    public let shell: String
    private let clock: any Clock<Duration>
    private let frozenSet = Mutex<UUID?>(nil)

    /// - Parameters:
    ///   - commands: the command for each event; events without one are answered at once.
    ///   - clock: times each command against the event's answer time.
    public init(
        commands: [WriterEvent: String], shell: String = "/bin/sh", clock: any Clock<Duration> = ContinuousClock()
    ) {
        self.commands = commands
        self.shell = shell
        self.clock = clock
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
            timeout: context.timeout,
            clock: clock
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

    static func execute(
        shell: String,
        command: String,
        environment: [String: String],
        timeout: Duration,
        clock: any Clock<Duration>
    ) async throws -> (status: Status, output: String) {
        let outputPath = FileManager.default.temporaryDirectory
            .appendingPathComponent("umbra-writer-\(UUID().guidString).out").path
        defer { try? FileManager.default.removeItem(atPath: outputPath) }
        let pid: pid_t
        do {
            pid = try spawnInOwnGroup(
                shell: shell, arguments: ["-c", command], environment: environment, outputPath: outputPath)
        } catch {
            throw WriterVeto(.nonRetryable, "'\(command)' could not be started: \(error).")
        }
        let timedOut = Mutex(false)
        let watchdog = Task {
            guard (try? await clock.sleep(for: timeout)) != nil else { return }
            timedOut.withLock { $0 = true }
            kill(-pid, SIGKILL)  // the whole group: `sh` and whatever it started
        }
        let status = await waitForExit(pid)
        watchdog.cancel()

        let data = FileManager.default.contents(atPath: outputPath) ?? Data()
        let text = String(decoding: data.suffix(outputBytesMax), as: UTF8.self)
        if timedOut.withLock({ $0 }) { return (.timedOut, text) }
        let signal = status & 0x7f
        return (signal == 0 ? .exited((status >> 8) & 0xff) : .signalled(signal), text)
    }

    /// Starts `shell arguments…` as the leader of a new process group (so a timeout can stop everything
    /// it started), stdin from /dev/null, stdout and stderr into `outputPath`. Wraps `posix_spawn`.
    private static func spawnInOwnGroup(
        shell: String,
        arguments: [String],
        environment: [String: String],
        outputPath: String
    ) throws -> pid_t {
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
        posix_spawnattr_setpgroup(&attributes, 0)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)

        let argv = ([shell] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, shell, &actions, &attributes, argv, envp)
        guard result == 0 else { throw PlainSystemError(code: result) }
        return pid
    }

    /// Waits for `pid` on a thread of its own (waitpid blocks) and returns its raw wait status.
    private static func waitForExit(_ pid: pid_t) async -> Int32 {
        await withCheckedContinuation { continuation in
            Thread.detachNewThread {
                var status: Int32 = 0
                while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
                continuation.resume(returning: status)
            }
        }
    }
}

private struct PlainSystemError: Error, CustomStringConvertible {
    var code: Int32
    var description: String { String(cString: strerror(code)) }
}
