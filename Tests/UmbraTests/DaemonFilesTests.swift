// The daemon's files as another local user would meet them: the control socket and everything in
// the data directory are owner-only, and the daemon refuses paths it does not own or that are
// symbolic links, leaving them as they were.

import Foundation
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

@Suite struct DaemonFilesTests {
    private static func mode(_ path: String) -> mode_t? {
        var status = stat()
        guard lstat(path, &status) == 0 else { return nil }
        return status.st_mode & 0o777
    }

    /// Starts `umbra serve` with `arguments`, expecting it to refuse; returns its stderr.
    private static func refusal(_ arguments: [String]) throws -> String {
        let process = try ChildProcess(
            builtProduct("umbra"), ["serve", "--log-level", "warning"] + arguments,
            captureStandardError: true)
        let status = process.finish()
        #expect(status != 0, "umbra serve \(arguments) should refuse to start")
        return process.standardErrorText
    }

    /// The control socket is 0600 and the data directory and volume files are readable by their owner only.
    @Test func createdFilesAreOwnerOnly() async throws {
        try await DaemonFixture.with(volumes: ["disk:1M"]) { daemon in
            #expect(Self.mode(daemon.controlSocket) == 0o600)
            #expect(Self.mode(daemon.data) == 0o700)
            let entries = try FileManager.default.contentsOfDirectory(atPath: daemon.data)
            #expect(!entries.isEmpty)
            for entry in entries {
                let mode = try #require(Self.mode(daemon.data + "/" + entry))
                #expect(mode & 0o077 == 0, "\(entry) has mode \(String(mode, radix: 8))")
            }
            // The socket works for its owner.
            let control = try await daemon.control()
            await control.close()
        }
    }

    /// A symbolic link at the control socket's path is refused and left alone, as is its target.
    @Test func controlSocketSymlinkIsRefused() throws {
        let directory = try TemporaryDirectory("umbra-files")
        defer { directory.remove() }
        let target = directory.path + "/precious"
        try Data("keep me".utf8).write(to: URL(fileURLWithPath: target))
        let link = directory.path + "/control.sock"
        #expect(symlink(target, link) == 0)
        let message = try Self.refusal([
            "--data", directory.path + "/data", "--listen", "unix:" + directory.path + "/nbd.sock", "--control", link,
        ])
        #expect(message.contains("is a symbolic link"), "stderr: \(message)")
        var status = stat()
        #expect(lstat(link, &status) == 0 && status.st_mode & S_IFMT == S_IFLNK)
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "keep me")
    }

    /// A control socket path in a directory everyone may write to (without the sticky bit) is refused.
    @Test func worldWritableSocketDirectoryIsRefused() throws {
        let directory = try TemporaryDirectory("umbra-files")
        defer { directory.remove() }
        let open = directory.path + "/open"
        #expect(mkdir(open, 0o777) == 0 && chmod(open, 0o777) == 0)
        let message = try Self.refusal([
            "--data", directory.path + "/data", "--listen", "unix:" + directory.path + "/nbd.sock",
            "--control", open + "/control.sock",
        ])
        #expect(message.contains("writable by everyone"), "stderr: \(message)")
    }

    /// A data directory, or a socket at the control path, that belongs to another user is refused and
    /// left as it was. (Making files of another user needs root, which CI runs as.)
    @Test(.enabled(if: geteuid() == 0, "giving files to another user needs root"))
    func pathsOfAnotherUserAreRefused() throws {
        let directory = try TemporaryDirectory("umbra-files")
        defer { directory.remove() }
        let nobody: uid_t = 65534
        let foreign = directory.path + "/foreign-data"
        #expect(mkdir(foreign, 0o700) == 0 && chown(foreign, nobody, gid_t(nobody)) == 0)
        let message = try Self.refusal([
            "--data", foreign, "--listen", "unix:" + directory.path + "/nbd.sock",
            "--control", directory.path + "/control.sock",
        ])
        #expect(message.contains("belongs to uid 65534"), "stderr: \(message)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: foreign).isEmpty)

        // A stale socket file owned by someone else at the control path.
        let socketPath = directory.path + "/their.sock"
        #expect(makeStaleUnixSocket(at: socketPath) && chown(socketPath, nobody, gid_t(nobody)) == 0)
        let second = try Self.refusal([
            "--data", directory.path + "/data", "--listen", "unix:" + directory.path + "/nbd.sock",
            "--control", socketPath,
        ])
        #expect(second.contains("not of this user"), "stderr: \(second)")
        var status = stat()
        #expect(lstat(socketPath, &status) == 0 && status.st_uid == nobody)
    }
}
