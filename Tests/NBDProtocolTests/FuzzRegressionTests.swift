import Foundation
import NBDFuzzing
import Testing

// Replays the fuzz seed corpus (real client sessions, Fuzz/Corpus) and every crasher the fuzzer
// found (Fuzz/Crashers) through the fuzz driver; see Scripts/fuzz.sh.

private let fuzzDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Fuzz")

private func inputs(in name: String) -> [URL] {
    let directory = fuzzDirectory.appendingPathComponent(name)
    let files = (try? FileManager.default.contentsOfDirectory(at: directory, includingPropertiesForKeys: nil)) ?? []
    return files.filter { !$0.lastPathComponent.hasPrefix(".") }.sorted { $0.path < $1.path }
}

@Suite("Fuzz regression")
struct FuzzRegressionTests {
    /// Every captured client session runs without a finding and ends the way a well-behaved client
    /// ends it (a disconnect, or an ABORT/closed handshake for the listing and probing tools).
    @Test(arguments: inputs(in: "Corpus"))
    func seedSessionsRunCleanly(file: URL) throws {
        let outcome = try NBDSessionFuzzer.run(Data(contentsOf: file))
        #expect(["disconnected", "handshake closed"].contains(outcome.ending), "\(file.lastPathComponent): \(outcome)")
    }

    /// The corpus is what it says: real sessions that reach transmission and get requests served.
    @Test func seedCorpusCoversTransmission() throws {
        let files = inputs(in: "Corpus")
        #expect(files.count >= 10)
        let served = try files.map { try NBDSessionFuzzer.run(Data(contentsOf: $0)).served }
        #expect(served.filter { $0 > 0 }.count >= 6, "sessions serving requests: \(served)")
    }

    /// Inputs the fuzzer once crashed on run without a finding now.
    @Test(arguments: inputs(in: "Crashers"))
    func crashersStayFixed(file: URL) throws {
        try NBDSessionFuzzer.run(Data(contentsOf: file))
    }

    /// The same bytes give the same session every time (crashers must replay exactly).
    @Test func drivingIsDeterministic() throws {
        let file = try #require(inputs(in: "Corpus").first { $0.lastPathComponent.hasPrefix("qemu-io") })
        let bytes = try Data(contentsOf: file)
        let first = try NBDSessionFuzzer.run(bytes)
        #expect(first.served > 0)
        #expect(try NBDSessionFuzzer.run(bytes) == first)
    }
}
