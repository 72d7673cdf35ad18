// `umbra serve --stdio EXPORT`: a client spawns the daemon and talks to it over its stdin and stdout
// (libnbd's nbd_connect_command, as nbdsh --connect-command and fuzzers do).

import Foundation
import ShadowCopy
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

@Suite struct StdioTests {
    private func stdioCommand(data: String, export: String, _ extra: [String] = []) -> [String] {
        [builtProduct("umbra"), "serve", "--data", data, "--stdio", export, "--log-level", "warning"] + extra
    }

    /// Data written over stdio is read back, survives the process (flushed when the client leaves),
    /// and the empty export name means the one export served.
    @Test func servesOneConnectionAndPersists() throws {
        let directory = try TemporaryDirectory("umbra-stdio")
        defer { directory.remove() }
        let data = directory.path + "/data"
        let pattern = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        do {
            let client = try NBDTestClient()
            try client.setExportName("disk")
            try client.connect(command: stdioCommand(data: data, export: "disk", ["--volume", "disk:4M"]))
            #expect(try client.size() == 4 << 20)
            #expect(try client.isReadOnly == false)
            try client.pwrite(pattern, offset: 12345)
            // Over a pipe read data goes out as buffers, never sendfile: a big read proves it.
            #expect(try client.pread(count: pattern.count, offset: 12345) == pattern)
            try client.flush()
            try client.shutdown()
        }
        let again = try NBDTestClient()
        try again.setFullInfo(true)  // asks for the name: the empty name is the export served
        try again.connect(command: stdioCommand(data: data, export: "disk"))
        #expect(try again.canonicalExportName() == "disk")
        #expect(try again.pread(count: pattern.count, offset: 12345) == pattern)
        try again.shutdown()
    }

    /// A snapshot served over stdio is read-only and holds the data of when it was taken; a daemon
    /// holding the data directory keeps a stdio server out with a clear error.
    @Test func snapshotOverStdioIsReadOnly() async throws {
        let daemon = try DaemonFixture.start(volumes: ["disk:1M"])
        defer { daemon.directory.remove() }
        let before = [UInt8](repeating: 0x5A, count: 8192)
        let live = try daemon.connect("disk")
        try live.pwrite(before, offset: 0)
        let control = try await daemon.control()
        let set = try await control.createSnapshotSet(CreateSetParams(volumes: ["disk"]))
        await control.close()
        try live.pwrite([UInt8](repeating: 0x11, count: 8192), offset: 0)
        try live.shutdown()
        let export = try #require(set.snapshots.first?.export)

        let refused = try ChildProcess(
            builtProduct("umbra"), ["serve", "--data", daemon.data, "--stdio", "disk"], captureStandardError: true)
        #expect(refused.finish() != 0)
        #expect(refused.standardErrorText.contains("is in use by another Umbra process"))

        kill(daemon.process.processIdentifier, SIGTERM)
        #expect(daemon.process.finish() == 0)

        let snapshot = try NBDTestClient()
        try snapshot.setExportName(export)
        try snapshot.connect(command: stdioCommand(data: daemon.data, export: export))
        #expect(try snapshot.isReadOnly)
        #expect(try snapshot.pread(count: before.count, offset: 0) == before)
        #expect(throws: NBDClientError.self) { try snapshot.pwrite([1], offset: 0) }
        try snapshot.shutdown()
    }

    /// An export that does not exist ends the run at once with a non-zero status and one sentence.
    @Test func unknownExportIsAnError() throws {
        let directory = try TemporaryDirectory("umbra-stdio")
        defer { directory.remove() }
        let process = try ChildProcess(
            builtProduct("umbra"), ["serve", "--data", directory.path + "/data", "--stdio", "nope"],
            captureStandardError: true)
        #expect(process.finish() != 0)
        #expect(process.standardErrorText == "There is no volume or snapshot named \"nope\" to serve over stdio.\n")
        #expect(process.readAll().isEmpty, "nothing but the protocol may go to stdout")
    }

    /// --stdio with --listen is refused before anything starts.
    @Test func stdioWithListenIsRefused() throws {
        let directory = try TemporaryDirectory("umbra-stdio")
        defer { directory.remove() }
        let process = try ChildProcess(
            builtProduct("umbra"),
            ["serve", "--data", directory.path + "/data", "--stdio", "disk", "--listen", "tcp://127.0.0.1:0"],
            captureStandardError: true)
        #expect(process.finish() == 64)
        #expect(process.standardErrorText.contains("cannot be combined with --listen"))
        #expect(!FileManager.default.fileExists(atPath: directory.path + "/data"))
    }
}
