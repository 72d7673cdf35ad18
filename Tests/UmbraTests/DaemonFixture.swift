import Foundation
import ShadowCopy
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

/// A real `umbra serve` process on a fresh data directory, with its NBD and control sockets in a
/// temporary directory. `start` returns once the daemon printed its ready line.
final class DaemonFixture: @unchecked Sendable {
    let directory: TemporaryDirectory
    let process: ChildProcess
    /// The `ready nbd=… control=…` line, with every NBD address as bound.
    let readyLine: String
    let data: String
    var nbdSocket: String { directory.path + "/nbd.sock" }
    var controlSocket: String { directory.path + "/control.sock" }

    private init(directory: TemporaryDirectory, process: ChildProcess, readyLine: String, data: String) {
        self.data = data
        self.directory = directory
        self.process = process
        self.readyLine = readyLine
    }

    /// Starts a daemon in a fresh directory, or in `directory` (a restart: same data, same sockets).
    /// With `capturingLog`, its stderr is kept for `log` instead of passed through. `data` puts the
    /// data directory elsewhere (on another file system).
    static func start(
        volumes: [String], extraArguments: [String] = [], in directory: TemporaryDirectory? = nil,
        data: String? = nil, capturingLog: Bool = false
    ) throws -> DaemonFixture {
        let directory = try directory ?? TemporaryDirectory("umbra-daemon")
        let data = data ?? directory.path + "/data"
        let logLevel =
            ProcessInfo.processInfo.environment["UMBRA_TEST_LOG_LEVEL"] ?? (capturingLog ? "info" : "warning")
        let process = try ChildProcess(
            builtProduct("umbra"),
            [
                "serve", "--data", data, "--listen", "unix:" + directory.path + "/nbd.sock",
                "--control", directory.path + "/control.sock", "--log-level", logLevel,
            ] + volumes.flatMap { ["--volume", $0] } + extraArguments,
            captureStandardError: capturingLog)
        guard let line = process.readLine(), line.hasPrefix("ready ") else {
            process.kill()
            directory.remove()
            throw FixtureError("the daemon did not start: \(process.standardErrorText)")
        }
        return DaemonFixture(directory: directory, process: process, readyLine: line, data: data)
    }

    /// kill -9: the daemon dies where it stands; the directory stays for a restart.
    func killNine() {
        process.kill()
    }

    /// What the daemon wrote to stderr (when started `capturingLog`), once it has exited.
    var log: String { process.standardErrorText }

    /// SIGTERM, then the exit status. With `keepingDirectory`, the directory stays for a restart.
    @discardableResult
    func stop(keepingDirectory: Bool = false) -> Int32 {
        kill(process.processIdentifier, SIGTERM)
        let status = process.finish()
        if !keepingDirectory { directory.remove() }
        return status
    }

    func uri(_ export: String) -> String {
        "nbd+unix:///\(export)?socket=\(nbdSocket)"
    }

    /// A libnbd client connected to `export`.
    func connect(_ export: String, contexts: [String] = []) throws -> NBDTestClient {
        let client = try NBDTestClient()
        for context in contexts { try client.addMetaContext(context) }
        try client.connect(uri: uri(export))
        return client
    }

    func control() async throws -> ControlClient {
        try await ControlClient.connect(socketPath: controlSocket)
    }

    /// Runs `body` with a started daemon and stops it afterwards, expecting a clean exit.
    static func with<T>(
        volumes: [String], extraArguments: [String] = [], _ body: (DaemonFixture) async throws -> T
    ) async throws -> T {
        let daemon = try start(volumes: volumes, extraArguments: extraArguments)
        do {
            let result = try await body(daemon)
            #expect(daemon.stop() == 0, "umbra serve should exit 0 on SIGTERM")
            return result
        } catch {
            daemon.stop()
            throw error
        }
    }
}

struct FixtureError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
