import NBDProtocol
import Testing
import UmbraTestSupport

@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

private let mib: UInt64 = 1 << 20

private func live(supportsFastZero: Bool = true) -> MemoryExport {
    MemoryExport(
        name: "live",
        blockSize: NBDBlockSize(minimum: 1, preferred: 4096, maximum: 1 << 18),
        supportsFastZero: supportsFastZero,
        dirtyBitmaps: ["aaaa"]
    )
}

private func snapshot() -> MemoryExport {
    MemoryExport(
        name: "live@aaaa", isReadOnly: true, blockSize: NBDBlockSize(minimum: 512, preferred: 4096, maximum: 1 << 18))
}

@Suite struct NBDServerCommandTests {
    /// Written data reads back, with and without FUA, with simple and structured replies.
    @Test(arguments: [true, false])
    func writeThenRead(structured: Bool) async throws {
        let export = live()
        try await ServerFixture.with([export]) { fixture in
            let client = try await fixture.connect("live", structuredReplies: structured)
            var random = SeededRandom(seed: 42)
            var bytes = [UInt8](repeating: 0, count: 70_000)
            bytes.withUnsafeMutableBytes { random.fill($0) }
            let data = bytes
            try await blocking { () throws in
                try client.pwrite(data, offset: 12345)
                try client.pwrite([7, 7], offset: 5, flags: .fua)
                #expect(try client.pread(count: data.count, offset: 12345) == data)
                #expect(try client.pread(count: 2, offset: 5) == [7, 7])
            }
            #expect(export.calls.contains(.write(offset: 5, length: 2, fua: true)))
            #expect(export.calls.contains(.write(offset: 12345, length: 70_000, fua: false)))
        }
    }

    /// FLUSH, TRIM (with FUA), CACHE and WRITE_ZEROES reach the export with their flags.
    @Test func commandsReachTheExport() async throws {
        let export = live()
        try await ServerFixture.with([export]) { fixture in
            let client = try await fixture.connect("live")
            try await blocking { () throws in
                try client.flush()
                try client.trim(count: 8192, offset: 4096, flags: .fua)
                try client.cache(count: 4096, offset: 0)
                try client.zero(count: 4096, offset: 0)
                try client.zero(count: 4096, offset: 8192, flags: .noHole)
                try client.zero(count: 4096, offset: 16384, flags: [.fastZero, .fua])
            }
            #expect(
                export.calls == [
                    .flush,
                    .trim(offset: 4096, length: 8192, fua: true),
                    .cache(offset: 0, length: 4096),
                    .writeZeroes(offset: 0, length: 4096, mayTrim: true, fast: false, fua: false),
                    .writeZeroes(offset: 8192, length: 4096, mayTrim: false, fast: false, fua: false),
                    .writeZeroes(offset: 16384, length: 4096, mayTrim: true, fast: true, fua: true),
                ]
            )
        }
    }

    /// Unallocated ranges come back as OFFSET_HOLE chunks; with DF as one data chunk of zeroes.
    @Test func holesAreSentAsHoles() async throws {
        let export = live()
        export.fill([UInt8](repeating: 9, count: 4096), at: 8192)
        try await ServerFixture.with([export]) { fixture in
            let client = try await fixture.connect("live")
            try await blocking { () throws in
                let read = client.preadStructured(count: 16384, offset: 0)
                let (bytes, chunks) = (read.bytes, read.chunks)
                #expect(read.error == nil)
                #expect(
                    bytes == [UInt8](repeating: 0, count: 8192) + [UInt8](repeating: 9, count: 4096)
                        + [UInt8](repeating: 0, count: 4096))
                #expect(
                    chunks == [
                        .init(offset: 0, length: 8192, kind: .hole),
                        .init(offset: 8192, length: 4096, kind: .data),
                        .init(offset: 12288, length: 4096, kind: .hole),
                    ]
                )
                let whole = client.preadStructured(count: 4096, offset: 65536)
                #expect(whole.chunks == [.init(offset: 65536, length: 4096, kind: .hole)])
                let unfragmented = client.preadStructured(count: 16384, offset: 0, flags: .dontFragment)
                #expect(unfragmented.bytes == bytes)
                #expect(unfragmented.chunks == [.init(offset: 0, length: 16384, kind: .data)])
            }
        }
    }

    /// Holes read as zeroes with simple replies too.
    @Test func holesWithSimpleReplies() async throws {
        let export = live()
        export.fill([1, 2, 3], at: 4096)
        try await ServerFixture.with([export]) { fixture in
            let client = try await fixture.connect("live", structuredReplies: false)
            let bytes = try await blocking { try client.pread(count: 12288, offset: 0) }
            #expect(bytes == [UInt8](repeating: 0, count: 4096) + [1, 2, 3] + [UInt8](repeating: 0, count: 8189))
        }
    }

    /// BLOCK_STATUS answers one chunk per negotiated context, extents from the requested offset;
    /// REQ_ONE gives one extent each.
    @Test func blockStatusPerContext() async throws {
        let export = live()
        try await ServerFixture.with([export]) { fixture in
            let client = try await fixture.connect("live", metaContexts: ["base:allocation", "qemu:dirty-bitmap:aaaa"])
            try await blocking { () throws in
                try client.pwrite([UInt8](repeating: 1, count: 4096), offset: 8192)
                let status = try client.blockStatus(count: 16384, offset: 4096)
                let hole = NBDAllocationFlags.hole.rawValue | NBDAllocationFlags.zero.rawValue
                #expect(
                    status["base:allocation"] == [
                        .init(length: 4096, flags: hole), .init(length: 4096, flags: 0),
                        .init(length: 8192, flags: hole),
                    ])
                #expect(
                    status["qemu:dirty-bitmap:aaaa"] == [
                        .init(length: 4096, flags: 0), .init(length: 4096, flags: 1), .init(length: 8192, flags: 0),
                    ])
                let one = try client.blockStatus(count: 16384, offset: 8192, flags: .requestOne)
                #expect(one["base:allocation"] == [.init(length: 4096, flags: 0)])
                #expect(one["qemu:dirty-bitmap:aaaa"] == [.init(length: 4096, flags: 1)])
            }
        }
    }

    /// Writes, trims and zeroes on a read-only export are EPERM; reads work.
    @Test func readOnlyExportRefusesWrites() async throws {
        try await ServerFixture.with([snapshot()]) { fixture in
            let client = try await fixture.connect("live@aaaa", strict: false)
            #expect(await clientErrno { try client.pwrite([UInt8](repeating: 1, count: 512), offset: 0) } == EPERM)
            #expect(await clientErrno { try client.trim(count: 512, offset: 0) } == EPERM)
            #expect(await clientErrno { try client.zero(count: 512, offset: 0) } == EPERM)
            #expect(await clientErrno { _ = try client.pread(count: 512, offset: 0) } == nil)
            #expect(await clientErrno { try client.flush() } == nil)
        }
    }

    /// Out-of-range, misaligned, oversized and badly flagged requests get the spec's errno, and the
    /// connection keeps working.
    @Test(arguments: [true, false])
    func invalidRequests(structured: Bool) async throws {
        try await ServerFixture.with([live(supportsFastZero: false), snapshot()]) { fixture in
            let client = try await fixture.connect("live", structuredReplies: structured, strict: false)
            #expect(await clientErrno { _ = try client.pread(count: 4096, offset: mib - 100) } == EINVAL)
            #expect(
                await clientErrno { try client.pwrite([UInt8](repeating: 1, count: 4096), offset: mib - 100) } == ENOSPC
            )
            #expect(await clientErrno { try client.zero(count: 4096, offset: mib) } == ENOSPC)
            #expect(await clientErrno { try client.trim(count: 4096, offset: mib) } == EINVAL)
            #expect(await clientErrno { _ = try client.pread(count: (1 << 18) + 1, offset: 0) } == EINVAL)
            #expect(
                await clientErrno { try client.pwrite([UInt8](repeating: 1, count: (1 << 18) + 1), offset: 0) }
                    == EINVAL)
            #expect(await clientErrno { try client.cache(count: (1 << 18) + 1, offset: 0) } == EINVAL)
            #expect(await clientErrno { _ = try client.pread(count: 16, offset: 0, flags: .noHole) } == EINVAL)
            #expect(await clientErrno { try client.zero(count: 4096, offset: 0, flags: .fastZero) } == ENOTSUP)
            if structured {
                #expect(
                    await clientErrno { _ = try client.pread(count: (1 << 18) + 512, offset: 0, flags: .dontFragment) }
                        == EOVERFLOW)
            } else {
                #expect(
                    await clientErrno { _ = try client.pread(count: 16, offset: 0, flags: .dontFragment) } == EINVAL)
            }
            #expect(await clientErrno { _ = try client.blockStatus(count: 4096, offset: 0) } == EINVAL)
            #expect(await clientErrno { _ = try client.pread(count: 16, offset: 0) } == nil)

            let snapshotClient = try await fixture.connect("live@aaaa", structuredReplies: structured, strict: false)
            #expect(await clientErrno { _ = try snapshotClient.pread(count: 512, offset: 100) } == EINVAL)
            #expect(await clientErrno { _ = try snapshotClient.pread(count: 100, offset: 512) } == EINVAL)
            #expect(await clientErrno { _ = try snapshotClient.pread(count: 512, offset: 0, flags: .fua) } == EINVAL)
        }
    }

    /// An export's errors reach the client as their errno (unknown errors as EIO), and a read
    /// error with an offset arrives as an ERROR_OFFSET chunk.
    @Test func exportErrorsBecomeErrnos() async throws {
        struct Opaque: Error {}
        let export = live()
        try await ServerFixture.with([export]) { fixture in
            let client = try await fixture.connect("live")
            export.failNext(.write, with: NBDError(.enospc, "diff store full"))
            #expect(await clientErrno { try client.pwrite([1], offset: 0) } == ENOSPC)
            export.failNext(.flush, with: Opaque())
            #expect(await clientErrno { try client.flush() } == EIO)
            export.failNext(.read, with: NBDError(.eio, "bad sector", offset: 4096 + 512))
            let read = try await blocking { client.preadStructured(count: 8192, offset: 4096) }
            #expect(read.error?.errno == EIO)
            #expect(read.chunks.contains { $0.kind == .error && $0.offset == 4096 + 512 })
            #expect(await clientErrno { _ = try client.pread(count: 16, offset: 0) } == nil)
        }
    }

    /// Zero-length requests are answered without reaching the export.
    @Test func zeroLengthRequests() async throws {
        let export = live()
        try await ServerFixture.with([export]) { fixture in
            let client = try await fixture.connect("live", strict: false)
            try await blocking { () throws in
                #expect(try client.pread(count: 0, offset: 0) == [])
                try client.pwrite([], offset: 0)
                try client.trim(count: 0, offset: 0)
                try client.zero(count: 0, offset: 0)
            }
            #expect(export.calls.isEmpty)
        }
    }
}
