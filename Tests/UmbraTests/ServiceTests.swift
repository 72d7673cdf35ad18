// Running as a service: structured logs, one line per set; the daemon says READY=1 once it serves and STOPPING=1 when SIGTERM comes, to
// the datagram socket NOTIFY_SOCKET names (here a fake one the test binds); the systemd unit
// verifies; the completion scripts come out of the binary. (Scripts/interop/test-install.sh runs
// Scripts/install.sh itself and checks the manual pages.)

import Foundation
import ShadowCopy
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

@Suite struct ServiceTests {
    @Test func notifiesSystemdWhenReadyAndWhenStopping() async throws {
        try await TemporaryDirectory.with("umbra-notify") { directory in
            let listener = try NotifyListener(path: directory.path + "/notify.sock")
            defer { listener.close() }
            var environment = ProcessInfo.processInfo.environment
            environment["NOTIFY_SOCKET"] = listener.path
            let daemon = try ChildProcess(
                builtProduct("umbra"),
                [
                    "serve", "--data", directory.path + "/data", "--listen", "unix:" + directory.path + "/nbd.sock",
                    "--control", directory.path + "/control.sock", "--volume", "disk:1M", "--log-level", "warning",
                ],
                environment: environment)
            let ready = await onOwnThread { listener.receive() }
            #expect(ready?.hasPrefix("READY=1\n") == true, "\(ready ?? "nothing")")
            #expect(ready?.contains("STATUS=serving 1 volumes") == true, "\(ready ?? "nothing")")
            #expect(daemon.readLine()?.hasPrefix("ready ") == true)
            kill(daemon.processIdentifier, SIGTERM)
            let stopping = await onOwnThread { listener.receive() }
            #expect(stopping == "STOPPING=1")
            #expect(daemon.finish() == 0)
        }
    }

    /// `--log-format json`: every line on stderr is one JSON object with time, level, label and
    /// message; each set gets exactly one line with its duration, hold time and writers; a hundred
    /// NBD writes add no line at all.
    @Test func structuredLogsWithOneLinePerSet() async throws {
        let daemon = try DaemonFixture.start(
            volumes: ["disk:1M"], extraArguments: ["--log-format", "json"], capturingLog: true)
        let client = try daemon.connect("disk")
        for index in 0..<100 { try client.pwrite([UInt8](repeating: UInt8(index), count: 4096), offset: 0) }
        let requester = try await daemon.control()
        var sets: [UUID] = []
        for _ in 0..<2 {
            sets.append(try await requester.createSnapshotSet(CreateSetParams(volumes: ["disk"], writers: false)).set)
        }
        await requester.close()
        #expect(daemon.stop() == 0)
        let lines = daemon.log.split(separator: "\n").map(String.init)
        #expect(!lines.isEmpty && lines.count < 30, "\(lines.count) lines: \(lines)")
        var setLines: [[String: Any]] = []
        for line in lines {
            let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            #expect(object != nil, "not a JSON object: \(line)")
            guard let object else { continue }
            for key in ["time", "level", "label", "message"] { #expect(object[key] is String, "\(key) in \(line)") }
            if object["message"] as? String == "shadow copy set created" { setLines.append(object) }
        }
        #expect(setLines.map { $0["shadow.set"] as? String } == sets.map { $0.uuidString.lowercased() })
        for line in setLines {
            let duration = (line["shadow.duration_ms"] as? String).flatMap(Double.init)
            let hold = (line["shadow.hold_ms"] as? String).flatMap(Double.init)
            #expect(duration != nil && hold != nil, "\(line)")
            // Writes are held for part of the set, never longer than it took.
            if let duration, let hold { #expect(hold > 0 && hold <= duration, "\(line)") }
            #expect(line["shadow.volumes"] as? String == "disk")
            #expect(line["shadow.writers"] as? String == "")
        }
    }

    /// Live reconfiguration: `umbra reload` and SIGHUP re-read the access rules for new
    /// connections while an open one keeps working; a bad file is refused with the reason and the
    /// rules in use stay. The metrics count the reloads by result and the refusals by the rules.
    @Test func reloadAccessRulesWhileAClientStaysConnected() async throws {
        let rulesDirectory = try TemporaryDirectory("umbra-reload")
        defer { rulesDirectory.remove() }
        let rules = rulesDirectory.path + "/access.json"
        func grant(_ volumes: [String]) throws {
            let list = volumes.map { "\"\($0)\"" }.joined(separator: ", ")
            try #"{"rules": [{"unauthenticated": true, "volumes": [\#(list)], "access": "read-write"}]}"#.write(
                toFile: rules, atomically: true, encoding: .utf8)
        }
        try grant(["disk", "other"])
        try await DaemonFixture.with(
            volumes: ["disk:1M", "other:1M"], extraArguments: ["--access", rules, "--metrics", "tcp://127.0.0.1:0"]
        ) { daemon in
            let umbra = builtProduct("umbra")
            let control = ["--control", daemon.controlSocket]
            let staying = try daemon.connect("other")
            try staying.pwrite([UInt8](repeating: 7, count: 4096), offset: 0)

            try grant(["disk"])
            let reload = try ChildProcess(umbra, ["reload", "--json"] + control)
            let answer = reload.readAll()
            #expect(reload.finish() == 0)
            #expect(answer.contains(#""reloaded":["access"]"#), "\(answer)")
            #expect(throws: NBDClientError.self) { _ = try daemon.connect("other") }
            _ = try daemon.connect("disk")
            // The open connection keeps what it negotiated.
            #expect(try staying.pread(count: 4096, offset: 0) == [UInt8](repeating: 7, count: 4096))

            try "{ not json".write(toFile: rules, atomically: true, encoding: .utf8)
            let bad = try ChildProcess(umbra, ["reload"] + control, captureStandardError: true)
            #expect(bad.finish() == 1)
            #expect(bad.standardErrorText.hasPrefix("Reload refused:"), "\(bad.standardErrorText)")
            #expect(bad.standardErrorText.contains("is not valid JSON"), "\(bad.standardErrorText)")
            #expect(throws: NBDClientError.self) { _ = try daemon.connect("other") }
            _ = try daemon.connect("disk")

            // SIGHUP does the same; `status` counts the reloads that took.
            try grant(["disk", "other"])
            let requester = try await daemon.control()
            #expect(try await requester.status().reloads == 1)
            kill(daemon.process.processIdentifier, SIGHUP)
            let giveUp = ContinuousClock.now + .seconds(60)
            while try await requester.status().reloads < 2, ContinuousClock.now < giveUp { await Task.yield() }
            #expect(try await requester.status().reloads == 2)
            _ = try daemon.connect("other")
            await requester.close()
            let metrics = try MetricsTests.metrics(daemon)
            #expect(metrics["umbra_reloads_total{result=\"ok\"}"] == 2)
            #expect(metrics["umbra_reloads_total{result=\"refused\"}"] == 1)
            // Two connections asked for a volume the rules hid (libnbd may ask more than once each).
            #expect((metrics["umbra_nbd_refusals_total{reason=\"access\"}"] ?? 0) >= 2)
            #expect(metrics["umbra_nbd_refusals_total{reason=\"connection-limit\"}"] == nil)
        }
    }

    /// The unit file, with the binary this build made, passes `systemd-analyze verify` without a
    /// word (it exits 0 even on a line it ignores, so any output counts as a failure). The manual
    /// pages it names are checked where they are installed (test-install.sh), not here.
    @Test func theUnitFileVerifies() async throws {
        try await TemporaryDirectory.with("umbra-unit") { directory in
            let template = try String(
                contentsOfFile: repositoryRoot + "/Scripts/systemd/umbra.service.in", encoding: .utf8)
            let binary = URL(fileURLWithPath: builtProduct("umbra")).deletingLastPathComponent().path
            let unit = directory.path + "/umbra.service"
            try template.replacingOccurrences(of: "@BINDIR@", with: binary).write(
                toFile: unit, atomically: true, encoding: .utf8)
            let verify = try ChildProcess(
                "/usr/bin/systemd-analyze", ["verify", "--man=no", unit], captureStandardError: true)
            let output = verify.readAll()
            #expect(verify.finish() == 0)
            #expect(output.isEmpty && verify.standardErrorText.isEmpty, "\(output)\(verify.standardErrorText)")
        }
    }

    /// Completion scripts for bash, zsh and fish come from the binary; bash's parses.
    @Test func completionScripts() async throws {
        for shell in ["bash", "zsh", "fish"] {
            let script = try ChildProcess(builtProduct("umbra"), ["--generate-completion-script", shell])
            let text = script.readAll()
            #expect(script.finish() == 0)
            #expect(text.contains("verify") && text.contains("status") && text.contains("snapshot"), "\(shell)")
            if shell == "bash" {
                try await TemporaryDirectory.with("umbra-completion") { directory in
                    try text.write(toFile: directory.path + "/umbra.bash", atomically: true, encoding: .utf8)
                    let check = try ChildProcess("/bin/bash", ["-n", directory.path + "/umbra.bash"])
                    #expect(check.finish() == 0)
                }
            }
        }
    }

}

/// A bound Unix datagram socket, as systemd's notification socket is.
final class NotifyListener: @unchecked Sendable {
    let path: String
    private let descriptor: Int32

    init(path: String) throws {
        self.path = path
        descriptor = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw FixtureError("socket: \(String(cString: strerror(errno)))") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard bound == 0 else { throw FixtureError("bind \(path): \(String(cString: strerror(errno)))") }
        // A daemon that never notifies fails the test after a minute rather than hanging it.
        var timeout = timeval(tv_sec: 60, tv_usec: 0)
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    /// The next datagram, or nil after a minute without one.
    func receive() -> String? {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
        return count > 0 ? String(decoding: buffer[..<count], as: UTF8.self) : nil
    }

    func close() { Glibc.close(descriptor) }
}
