// `umbra serve --metrics`: the Prometheus endpoint as a user checks it. Scrape, do a known amount of
// I/O and a set, scrape again, and the counters moved by exactly that much; the gauges say what the
// daemon holds; the text passes `promtool check metrics` (Debian's prometheus package; the test fails
// rather than skip without it).

import Foundation
import ShadowCopy
import Testing
import UmbraTestSupport

@Suite struct MetricsTests {
    /// The series of one scrape: `name{labels}` → value.
    struct Scrape {
        let text: String
        let values: [String: Double]

        init(_ text: String) {
            self.text = text
            var values: [String: Double] = [:]
            for line in text.split(separator: "\n") where !line.hasPrefix("#") {
                guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
                    continue
                }
                values[String(line[..<space])] = value
            }
            self.values = values
        }

        subscript(_ series: String) -> Double? { values[series] }

        /// How much `series` grew since `earlier` (a series not there yet counts as 0).
        func delta(_ series: String, since earlier: Scrape) -> Double {
            (values[series] ?? 0) - (earlier.values[series] ?? 0)
        }
    }

    static func scrape(_ daemon: DaemonFixture, path: String = "/metrics") throws -> (status: String, body: String) {
        guard let match = daemon.readyLine.firstMatch(of: /metrics=tcp:\/\/127\.0\.0\.1:(\d+)/), let port = Int(match.1)
        else {
            throw FixtureError("no metrics address in the ready line: \(daemon.readyLine)")
        }
        let socket = try RawNBDSocket(host: "127.0.0.1", port: port)
        #expect(socket.send(Array("GET \(path) HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".utf8)))
        let response = String(decoding: try socket.receiveUntilClosed(), as: UTF8.self)
        guard let split = response.range(of: "\r\n\r\n") else {
            throw FixtureError("not an HTTP response: \(response)")
        }
        let statusLine = response[..<split.lowerBound].components(separatedBy: "\r\n").first ?? ""
        return (statusLine, String(response[split.upperBound...]))
    }

    static func metrics(_ daemon: DaemonFixture) throws -> Scrape {
        let (status, body) = try scrape(daemon)
        #expect(status == "HTTP/1.0 200 OK", "\(status)")
        return Scrape(body)
    }

    /// `promtool check metrics` on `text`: its complaints, or nil if it has none.
    static func promtoolComplaints(_ text: String) throws -> String? {
        let promtool = "/usr/bin/promtool"
        guard FileManager.default.isExecutableFile(atPath: promtool) else {
            Issue.record("promtool is missing: install Debian's prometheus package (Scripts/install-dependencies.sh)")
            return nil
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: promtool)
        process.arguments = ["check", "metrics"]
        let input = Pipe()
        let output = Pipe()
        process.standardInput = input
        process.standardOutput = output
        process.standardError = output
        try process.run()
        try input.fileHandleForWriting.write(contentsOf: Data(text.utf8))
        try input.fileHandleForWriting.close()
        let said = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return process.terminationStatus == 0 ? nil : "exit \(process.terminationStatus): \(said)"
    }

    @Test func countersMoveByWhatWasDoneAndGaugesSayWhatIsHeld() async throws {
        let chunk = 64 * 1024
        try await DaemonFixture.with(
            volumes: ["a:4M", "b:4M"],
            extraArguments: [
                "--metrics", "tcp://127.0.0.1:0", "--max-connections", "2", "--max-connections-per-client", "2",
            ]
        ) { daemon in
            let version = try ChildProcess(builtProduct("umbra"), ["--version"]).readAll()
                .trimmingCharacters(in: .whitespacesAndNewlines)
            let before = try Self.metrics(daemon)
            #expect(before["umbra_build_info{version=\"\(version)\"}"] == 1, "\(version)")
            #expect(before["umbra_snapshots{volume=\"a\"}"] == 0)
            #expect(before["umbra_volume_size_bytes{volume=\"b\"}"] == Double(4 << 20))

            let client = try daemon.connect("a")
            for index in 0..<4 {
                try client.pwrite([UInt8](repeating: UInt8(index + 1), count: chunk), offset: UInt64(index * chunk))
            }
            let requester = try await daemon.control()
            let set = try await requester.createSnapshotSet(CreateSetParams(volumes: ["a", "b"], writers: false))
            // Overwriting the four chunks preserves them: four copies of 64 KiB each.
            for index in 0..<4 {
                try client.pwrite([UInt8](repeating: 0xEE, count: chunk), offset: UInt64(index * chunk))
            }
            _ = try client.pread(count: 4096, offset: 0)
            _ = try client.pread(count: 4096, offset: 8192)
            try client.flush()
            // A snapshot's requests count with its volume.
            let snapshotOfA = try #require(set.snapshots.first { $0.volume == "a" })
            let snapshotClient = try daemon.connect(snapshotOfA.export)
            #expect(try snapshotClient.pread(count: 4096, offset: 0) == [UInt8](repeating: 1, count: 4096))
            // A third connection is over --max-connections: refused, and counted once it is closed.
            let refused = try RawNBDSocket(unixPath: daemon.nbdSocket)
            _ = try refused.receiveUntilClosed()

            let after = try Self.metrics(daemon)
            func delta(_ series: String) -> Double { after.delta(series, since: before) }
            #expect(delta("umbra_nbd_requests_total{volume=\"a\",op=\"write\"}") == 8)
            #expect(delta("umbra_nbd_bytes_total{volume=\"a\",op=\"write\"}") == Double(8 * chunk))
            #expect(delta("umbra_nbd_requests_total{volume=\"a\",op=\"read\"}") == 3)
            #expect(delta("umbra_nbd_bytes_total{volume=\"a\",op=\"read\"}") == 3 * 4096)
            #expect(delta("umbra_nbd_requests_total{volume=\"a\",op=\"flush\"}") == 1)
            #expect(delta("umbra_nbd_request_seconds_count{op=\"write\"}") == 8)
            #expect(delta("umbra_nbd_requests_total{volume=\"b\",op=\"write\"}") == 0)
            #expect(delta("umbra_nbd_errors_total{volume=\"a\",op=\"write\"}") == 0)
            #expect(delta("umbra_cow_copies_total{volume=\"a\"}") == 4)
            #expect(delta("umbra_cow_copied_bytes_total{volume=\"a\"}") == Double(4 * chunk))
            #expect(delta("umbra_sets_total{result=\"committed\"}") == 1)
            #expect(delta("umbra_set_hold_seconds_count") == 1)
            #expect(delta("umbra_nbd_refusals_total{reason=\"connection-limit\"}") == 1)
            #expect(after["umbra_connections"] == 2)
            #expect(after["umbra_snapshots{volume=\"a\"}"] == 1)
            #expect(after["umbra_snapshots{volume=\"b\"}"] == 1)
            #expect(after["umbra_diff_bytes{volume=\"a\"}"] == Double(4 * chunk))
            #expect(after["umbra_writers{state=\"stable\"}"] == 0)
            #expect((after["umbra_oldest_snapshot_age_seconds{volume=\"a\"}"] ?? -1) >= 0)
            #expect(after["umbra_nbd_request_seconds_bucket{op=\"write\",le=\"+Inf\"}"] != nil)
            #expect(try Self.promtoolComplaints(after.text) == nil)

            // Deleting the snapshots takes the age series away and the counts to zero.
            _ = try await requester.deleteSnapshots(ids: [set.set])
            await requester.close()
            try client.shutdown()
            try snapshotClient.shutdown()
            let last = try Self.metrics(daemon)
            #expect(last["umbra_snapshots{volume=\"a\"}"] == 0)
            #expect(last["umbra_oldest_snapshot_age_seconds{volume=\"a\"}"] == nil)
            #expect(try Self.promtoolComplaints(last.text) == nil)
        }
    }

    @Test func onlyGetOfMetricsIsServed() async throws {
        try await DaemonFixture.with(volumes: ["a:1M"], extraArguments: ["--metrics", "tcp://127.0.0.1:0"]) { daemon in
            let elsewhere = try Self.scrape(daemon, path: "/")
            #expect(elsewhere.status == "HTTP/1.0 404 Not Found")
            let withQuery = try Self.scrape(daemon, path: "/metrics?x=1")
            #expect(withQuery.status == "HTTP/1.0 200 OK")
        }
    }

    @Test func aBadAddressIsRefusedAtStart() throws {
        let process = try ChildProcess(
            builtProduct("umbra"), ["serve", "--data", "/nonexistent/never", "--metrics", "http://x"],
            captureStandardError: true)
        #expect(process.finish() != 0)
        #expect(process.standardErrorText.contains("--metrics takes tcp://HOST:PORT"), "\(process.standardErrorText)")
    }
}
