// An XFS file system with reflink, on a loop device over a sparse image, mounted in a temporary
// directory: the real file system where copy-on-write clones instead of writing. Making one needs
// root, mkfs.xfs (xfsprogs), losetup and mount; `unavailableReason` says which is missing, so a test
// that needs one is reported as skipped with that reason, never as passed.

import Foundation

public final class ReflinkFileSystem: Sendable {
    /// Where the file system is mounted.
    public let path: String
    private let base: TemporaryDirectory
    private let loopDevice: String

    /// Why one cannot be made on this machine, or nil.
    public static let unavailableReason: String? = {
        if geteuid() != 0 { return "making an XFS file system on a loop device needs root" }
        for tool in ["/usr/sbin/mkfs.xfs", "/usr/sbin/losetup", "/usr/bin/mount", "/usr/bin/umount"]
        where !FileManager.default.isExecutableFile(atPath: tool) {
            return "\(tool) is missing (Scripts/install-dependencies.sh installs it)"
        }
        return nil
    }()

    /// Makes and mounts a file system of `size` bytes (sparse: it takes what is written).
    public init(size: UInt64 = 1 << 30) throws {
        if let reason = Self.unavailableReason { throw Failure("cannot make an XFS file system: \(reason)") }
        base = try TemporaryDirectory("umbra-xfs")
        let image = base.path + "/xfs.img"
        path = base.path + "/mnt"
        do {
            _ = FileManager.default.createFile(atPath: image, contents: nil)
            try FileHandle(forWritingTo: URL(fileURLWithPath: image)).truncate(atOffset: size)
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            try ChildProcess.output("/usr/sbin/mkfs.xfs", ["-q", "-m", "reflink=1", image])
            loopDevice = try ChildProcess.output("/usr/sbin/losetup", ["--find", "--show", image])
                .trimmingCharacters(in: .whitespacesAndNewlines)
        } catch {
            base.remove()
            throw error
        }
        do {
            try ChildProcess.output("/usr/bin/mount", [loopDevice, path])
        } catch {
            _ = try? ChildProcess.output("/usr/sbin/losetup", ["--detach", loopDevice])
            base.remove()
            throw error
        }
    }

    /// Unmounts the file system, frees the loop device and removes the image.
    public func remove() {
        _ = try? ChildProcess.output("/usr/bin/umount", [path])
        _ = try? ChildProcess.output("/usr/sbin/losetup", ["--detach", loopDevice])
        base.remove()
    }

    /// Runs `body` with a new file system and removes it afterwards, whatever happens.
    public static func with<T>(_ body: (ReflinkFileSystem) async throws -> T) async throws -> T {
        let fileSystem = try ReflinkFileSystem()
        defer { fileSystem.remove() }
        return try await body(fileSystem)
    }

    /// Whether any extent of the file at `path` shares its blocks with another file (FIEMAP's
    /// SHARED flag, as `filefrag -v` shows it).
    public static func hasSharedExtents(_ path: String) throws -> Bool {
        let output = try ChildProcess.output("/usr/sbin/filefrag", ["-v", path])
        return output.split(separator: "\n").contains { $0.contains("shared") }
    }
}

extension ReflinkFileSystem {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        init(_ description: String) { self.description = description }
    }
}
