import NBDProtocol
import NIOCore
import Synchronization
import Testing
import UmbraTestSupport

@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

/// An export whose reads come straight from a file (`.file` results), with a data prefix and a
/// hole in the middle for `.segments`, counting how often the file regions are let go.
private final class FileBackedExport: NBDExport {
    let name = "file"
    let size: UInt64
    let isReadOnly = true
    let descriptor: CInt
    let segmented: Bool
    private let releases = Mutex(0)

    init(path: String, size: Int, segmented: Bool) {
        self.size = UInt64(size)
        self.segmented = segmented
        descriptor = open(path, O_RDONLY)
    }

    deinit { close(descriptor) }

    var releaseCount: Int { releases.withLock { $0 } }

    private func segment(_ offset: Int, _ length: Int) -> NBDFileSegment {
        NBDFileSegment(descriptor: descriptor, offset: UInt64(offset), length: UInt32(length)) {
            self.releases.withLock { $0 += 1 }
        }
    }

    func read(offset: UInt64, length: UInt32, buffers: NBDBufferPool) async throws -> NBDReadResult {
        let start = Int(offset)
        let count = Int(length)
        guard segmented, count >= 3 * 512 else { return .file(segment(start, count)) }
        var head = buffers.buffer(capacity: 512)
        head.writeRepeatingByte(0xEE, count: 512)
        return .segments([.data(head), .zeroes(length: 512), .file(segment(start + 1024, count - 1024))])
    }

    func write(offset: UInt64, data: NBDWritePayload, fua: Bool) async throws {}
    func flush() async throws {}
    func writeZeroes(offset: UInt64, length: UInt32, mayTrim: Bool, fast: Bool, fua: Bool) async throws {}
}

@Suite struct NBDServerFileRegionTests {
    private func withFile(_ body: (String, [UInt8]) async throws -> Void) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        var random = SeededRandom(seed: 11)
        var bytes = [UInt8](repeating: 0, count: 1 << 18)
        bytes.withUnsafeMutableBytes { random.fill($0) }
        let path = directory.path + "/data"
        let descriptor = open(path, O_CREAT | O_WRONLY, 0o600)
        _ = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        close(descriptor)
        try await body(path, bytes)
    }

    /// Reads answered from a file arrive intact (sendfile), with simple and structured replies,
    /// and every region is let go once sent.
    @Test(arguments: [true, false])
    func wholeFileReads(structured: Bool) async throws {
        try await withFile { path, bytes in
            let export = FileBackedExport(path: path, size: bytes.count, segmented: false)
            try await ServerFixture.with([]) { fixture in
                try fixture.registry.add(export)
                let client = try await fixture.connect("file", structuredReplies: structured)
                let read = try await blocking { try client.pread(count: 100_000, offset: 12345) }
                #expect(read == Array(bytes[12345..<112_345]))
                if structured {
                    let df = try await blocking { client.preadStructured(count: 4096, offset: 0, flags: .dontFragment) }
                    #expect(df.bytes == Array(bytes[0..<4096]))
                    #expect(df.chunks.map(\.kind) == [.data])
                } else {
                    #expect(try await blocking { try client.pread(count: 4096, offset: 0) } == Array(bytes[0..<4096]))
                }
            }
            #expect(export.releaseCount == 2)
        }
    }

    /// Mixed data, hole and file segments are sent as separate chunks, or as one with DF.
    @Test func segmentedReads() async throws {
        try await withFile { path, bytes in
            let export = FileBackedExport(path: path, size: bytes.count, segmented: true)
            try await ServerFixture.with([]) { fixture in
                try fixture.registry.add(export)
                let client = try await fixture.connect("file")
                let expected =
                    [UInt8](repeating: 0xEE, count: 512) + [UInt8](repeating: 0, count: 512)
                    + Array(bytes[9216..<16384])
                let read = try await blocking { client.preadStructured(count: 8192, offset: 8192) }
                #expect(read.error == nil)
                #expect(read.bytes == expected)
                #expect(read.chunks.map(\.kind) == [.data, .hole, .data])
                let unfragmented = try await blocking {
                    client.preadStructured(count: 8192, offset: 8192, flags: .dontFragment)
                }
                #expect(unfragmented.bytes == expected)
                #expect(unfragmented.chunks.map(\.kind) == [.data])
            }
            #expect(export.releaseCount == 2)
        }
    }

    /// Several connections (on different event loops) send from the same descriptor at once.
    @Test func concurrentSendsFromOneDescriptor() async throws {
        try await withFile { path, bytes in
            let export = FileBackedExport(path: path, size: bytes.count, segmented: false)
            try await ServerFixture.with([]) { fixture in
                try fixture.registry.add(export)
                let clients = [try await fixture.connect("file"), try await fixture.connect("file")]
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for client in clients {
                        group.addTask {
                            let reads = try await blocking {
                                try (0..<32).map { try client.startRead(count: 8192, offset: UInt64($0) * 8192) }
                            }
                            for read in reads { try await waitForCompletion(client, read.cookie) }
                            for (index, read) in reads.enumerated() {
                                #expect(read.bytes == Array(bytes[index * 8192..<(index + 1) * 8192]))
                            }
                        }
                    }
                    try await group.waitForAll()
                }
            }
            #expect(export.releaseCount == 64)
        }
    }
}
