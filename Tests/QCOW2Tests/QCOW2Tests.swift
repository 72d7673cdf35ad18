// qcow2 images checked by QEMU's own tools: what the writer makes passes `qemu-img check`, and
// `qemu-img compare` finds it identical to the raw bytes it was made from, alone and as an overlay
// on a backing file; the reader reads back what the writer wrote and what `qemu-img convert` wrote,
// through the backing chain, and refuses damaged or broken chains with a sentence.

import BlockIO
import Foundation
import QCOW2
import Testing
import UmbraTestSupport

@Suite struct QCOW2Tests {
    static let cluster = 64 * 1024

    /// Runs a QEMU tool; returns its exit status and everything it printed.
    static func run(_ tool: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        let run = try ChildProcess.run("/usr/bin/" + tool, arguments)
        return (run.status, run.output + run.errors)
    }

    /// Raw guest bytes: `size` bytes, with data in some clusters (one of them only partly) and
    /// zeros elsewhere, seeded.
    static func guest(size: Int, seed: UInt64, dataClusters: [Int]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: size)
        var random = SeededRandom(seed: seed)
        for index in dataClusters {
            let start = index * cluster
            let end = min(size, start + (index % 3 == 0 ? cluster / 2 : cluster))
            bytes.withUnsafeMutableBytes { random.fill(UnsafeMutableRawBufferPointer(rebasing: $0[start..<end])) }
        }
        return bytes
    }

    /// Writes `guest` as an image at `path`, every cluster (or only `clusters`) offered to the writer.
    static func writeImage(
        _ guest: [UInt8], to path: String, backing: String? = nil, clusters: [Int]? = nil
    ) throws -> QCOW2Writer {
        let storage = try FileSystemDirectory(path: "/").openExternal(createEmpty(path))
        let writer = try QCOW2Writer(storage: storage, virtualSize: UInt64(guest.count), backingFile: backing)
        let padded = guest + [UInt8](repeating: 0, count: Int(writer.guestClusters) * cluster - guest.count)
        for index in clusters ?? Array(0..<Int(writer.guestClusters)) {
            try padded.withUnsafeBytes {
                try writer.write(
                    firstCluster: UInt64(index),
                    UnsafeRawBufferPointer(rebasing: $0[(index * cluster)..<((index + 1) * cluster)]))
            }
        }
        try writer.finish()
        return writer
    }

    static func createEmpty(_ path: String) throws -> String {
        guard FileManager.default.createFile(atPath: path, contents: nil) else {
            throw QCOW2TestError(description: "cannot create \(path)")
        }
        return path
    }

    @Test func aFullImageIsCleanAndIdentical() async throws {
        try await TemporaryDirectory.with("umbra-qcow2") { directory in
            // Not a whole number of clusters, and past one L2 table's reach would need 512 MiB: the
            // table logic is covered by the small cluster test below.
            let size = 40 * Self.cluster + 8192
            let bytes = Self.guest(size: size, seed: 1, dataClusters: [0, 1, 2, 7, 20, 39, 40])
            let raw = directory.path + "/guest.raw"
            try Data(bytes).write(to: URL(fileURLWithPath: raw))
            let image = directory.path + "/full.qcow2"
            let writer = try Self.writeImage(bytes, to: image)
            // Six clusters hold data (the last one only its first 8 KiB); zeros take no space.
            #expect(writer.dataBytes == UInt64(7 * Self.cluster))

            let check = try Self.run("qemu-img", ["check", image])
            #expect(check.status == 0, "\(check.output)")
            #expect(check.output.contains("No errors were found"), "\(check.output)")
            let compare = try Self.run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", raw, image])
            #expect(compare.status == 0, "\(compare.output)")
            let info = try Self.run("qemu-img", ["info", "--output=json", image])
            #expect(info.output.contains("\"virtual-size\": \(size)"), "\(info.output)")
            // Sparse: the file holds the data and a few clusters of tables, not the whole guest.
            let fileSize = try FileManager.default.attributesOfItem(atPath: image)[.size] as! Int
            #expect(fileSize < 16 * Self.cluster, "\(fileSize)")

            let read = try QCOW2Image.open(path: image)
            #expect(read.virtualSize == UInt64(size) && read.backingFile == nil)
            #expect(try Self.readAll(read).prefix(size) == bytes[...])
        }
    }

    @Test func anOverlayOnABackingFileHoldsOnlyTheChanges() async throws {
        try await TemporaryDirectory.with("umbra-qcow2") { directory in
            let size = 32 * Self.cluster
            let base = Self.guest(size: size, seed: 2, dataClusters: Array(0..<16))
            var next = base
            // Cluster 3 rewritten, cluster 5 zeroed, cluster 20 written where there were zeros.
            next.replaceSubrange(
                (3 * Self.cluster)..<(4 * Self.cluster),
                with: Self.guest(size: Self.cluster, seed: 3, dataClusters: [0]))
            next.replaceSubrange(
                (5 * Self.cluster)..<(6 * Self.cluster), with: [UInt8](repeating: 0, count: Self.cluster))
            next.replaceSubrange(
                (20 * Self.cluster)..<(21 * Self.cluster),
                with: Self.guest(size: Self.cluster, seed: 4, dataClusters: [0]).map { $0 | 1 })
            let raw = directory.path + "/next.raw"
            try Data(next).write(to: URL(fileURLWithPath: raw))
            _ = try Self.writeImage(base, to: directory.path + "/base.qcow2")
            let overlay = directory.path + "/next.qcow2"
            let writer = try Self.writeImage(next, to: overlay, backing: "base.qcow2", clusters: [3, 5, 20])
            #expect(writer.dataBytes == UInt64(2 * Self.cluster))

            let check = try Self.run("qemu-img", ["check", overlay])
            #expect(check.status == 0 && check.output.contains("No errors were found"), "\(check.output)")
            let compare = try Self.run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", raw, overlay])
            #expect(compare.status == 0, "\(compare.output)")
            let chain = try Self.run("qemu-img", ["info", "--backing-chain", overlay])
            #expect(chain.output.contains("backing file: base.qcow2"), "\(chain.output)")
            #expect(chain.output.contains("backing file format: qcow2"), "\(chain.output)")

            let read = try QCOW2Image.open(path: overlay)
            #expect(read.chain.count == 2 && read.backingFile == "base.qcow2" && read.backing != nil)
            #expect(try Self.readAll(read) == next)
            // Cluster 5 reads as zeros though the base holds data there; cluster 4 comes from the base.
            #expect(try !read.holdsData(at: 5 * UInt64(Self.cluster), count: Self.cluster))
            #expect(try read.holdsData(at: 4 * UInt64(Self.cluster), count: Self.cluster))
            #expect(try !read.holdsData(at: 30 * UInt64(Self.cluster), count: Self.cluster))
        }
    }

    /// The reader reads what QEMU wrote, including clusters smaller than Umbra's and a chain QEMU built.
    @Test func readsWhatQemuWrote() async throws {
        try await TemporaryDirectory.with("umbra-qcow2") { directory in
            let size = 4 << 20
            let bytes = Self.guest(size: size, seed: 5, dataClusters: [0, 9, 33, 63])
            let raw = directory.path + "/guest.raw"
            try Data(bytes).write(to: URL(fileURLWithPath: raw))
            let image = directory.path + "/qemu.qcow2"
            let convert = try Self.run(
                "qemu-img", ["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, image])
            #expect(convert.status == 0, "\(convert.output)")
            let read = try QCOW2Image.open(path: image)
            #expect(read.clusterSize == 4096)
            #expect(try Self.readAll(read) == bytes)

            // An overlay QEMU makes on it, written through qemu-io.
            let overlay = directory.path + "/overlay.qcow2"
            _ = try Self.run("qemu-img", ["create", "-f", "qcow2", "-b", "qemu.qcow2", "-F", "qcow2", overlay])
            let io = try Self.run(
                "qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 8192 4096", "-c", "write -z 0 4096", overlay])
            #expect(io.status == 0, "\(io.output)")
            var expected = bytes
            expected.replaceSubrange(8192..<12288, with: [UInt8](repeating: 0x5A, count: 4096))
            expected.replaceSubrange(0..<4096, with: [UInt8](repeating: 0, count: 4096))
            #expect(try Self.readAll(try QCOW2Image.open(path: overlay)) == expected)
        }
    }

    @Test func refusesBrokenImagesWithASentence() async throws {
        try await TemporaryDirectory.with("umbra-qcow2") { directory in
            let bytes = Self.guest(size: 4 * Self.cluster, seed: 6, dataClusters: [1])
            _ = try Self.writeImage(bytes, to: directory.path + "/base.qcow2")
            _ = try Self.writeImage(bytes, to: directory.path + "/top.qcow2", backing: "base.qcow2", clusters: [1])
            try FileManager.default.removeItem(atPath: directory.path + "/base.qcow2")
            #expect {
                try QCOW2Image.open(path: directory.path + "/top.qcow2")
            } throws: { "\($0)".contains("is missing (the chain is broken)") }

            let notAnImage = directory.path + "/text.qcow2"
            try Data(repeating: 0x41, count: 4096).write(to: URL(fileURLWithPath: notAnImage))
            #expect { try QCOW2Image.open(path: notAnImage) } throws: { "\($0)".contains("is not a qcow2 image") }

            // An L1 table pointing past the end of the file.
            let damaged = directory.path + "/damaged.qcow2"
            _ = try Self.writeImage(bytes, to: damaged)
            var contents = try Data(contentsOf: URL(fileURLWithPath: damaged))
            contents.replaceSubrange(40..<48, with: [0, 0, 0, 0x7F, 0, 0, 0, 0])
            try contents.write(to: URL(fileURLWithPath: damaged))
            #expect { try QCOW2Image.open(path: damaged) } throws: { "\($0)".contains("is damaged") }

            // Values chosen to overflow any arithmetic done before they are bounded: refused, no trap.
            let pristine = try Data(contentsOf: URL(fileURLWithPath: directory.path + "/top.qcow2"))
            for (offset, bytes) in [
                (24, [UInt8](repeating: 0xFF, count: 8)),  // the size
                (40, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0]),  // the L1 table's offset
                (8, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xF0]),  // the backing file name's offset
            ] {
                var hostile = pristine
                hostile.replaceSubrange(offset..<(offset + 8), with: bytes)
                let path = directory.path + "/hostile-\(offset).qcow2"
                try hostile.write(to: URL(fileURLWithPath: path))
                #expect { try QCOW2Image.open(path: path) } throws: { "\($0)".contains("is damaged") }
            }
        }
    }

    static func readAll(_ image: QCOW2Image) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(image.virtualSize))
        try bytes.withUnsafeMutableBytes { try image.read(at: 0, into: $0) }
        return bytes
    }
}

struct QCOW2TestError: Error, CustomStringConvertible {
    var description: String
}
