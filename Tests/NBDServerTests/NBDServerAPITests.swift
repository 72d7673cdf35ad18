import NBDProtocol
import NIOCore
import Testing

@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

@Suite struct NBDServerAPITests {
    /// Listen addresses parse from `tcp://HOST:PORT` (IPv6 in brackets) and `unix:PATH` and print back.
    @Test func parsesListenAddresses() throws {
        let cases: [(String, NBDListenAddress)] = [
            ("tcp://127.0.0.1:10809", .tcp(host: "127.0.0.1", port: 10809)),
            ("tcp://localhost:0", .tcp(host: "localhost", port: 0)),
            ("tcp://[::1]:65535", .tcp(host: "::1", port: 65535)),
            ("unix:/run/umbra/nbd.sock", .unix(path: "/run/umbra/nbd.sock")),
            ("unix:relative.sock", .unix(path: "relative.sock")),
        ]
        for (text, expected) in cases {
            let parsed = try NBDListenAddress(parsing: text)
            #expect(parsed == expected)
            #expect(parsed.description == text)
        }
    }

    /// Malformed addresses are refused with a reason.
    @Test func refusesBadListenAddresses() {
        let bad = [
            "", "10809", "tcp://", "tcp://host", "tcp://:80", "tcp://host:", "tcp://host:65536", "tcp://host:-1",
            "tcp://host:1x", "tcp://[::1:80", "tcp://[::1]80", "http://host:80", "unix:",
            "unix:" + String(repeating: "p", count: 200),
        ]
        for text in bad {
            #expect(throws: NBDError.self, "\(text)") { try NBDListenAddress(parsing: text) }
        }
    }

    /// Errors become errnos in one place: NBD errors keep theirs, system errors are translated,
    /// cancellation is ESHUTDOWN, anything else (or an undefined errno) is EIO; ENOTSUP and
    /// EOVERFLOW only answer the requests the spec reserves them for.
    @Test func mapsErrorsToErrnos() {
        struct Custom: NBDErrorConvertible { var nbdErrno: NBDErrno }
        struct Opaque: Error {}
        #expect(NBDError.errno(for: NBDError(.enospc, "full")) == .enospc)
        #expect(NBDError.errno(for: Custom(nbdErrno: .eperm)) == .eperm)
        #expect(NBDError.errno(for: Custom(nbdErrno: NBDErrno(rawValue: 999))) == .eio)
        #expect(NBDError.errno(for: IOError(errnoCode: EDQUOT, reason: "quota")) == .enospc)
        #expect(NBDError.errno(for: IOError(errnoCode: EROFS, reason: "ro")) == .eperm)
        #expect(NBDError.errno(for: IOError(errnoCode: EBADF, reason: "bad")) == .eio)
        #expect(NBDError.errno(for: CancellationError()) == .eshutdown)
        #expect(NBDError.errno(for: Opaque()) == .eio)
        #expect(NBDError.errno(for: NBDProtocolError(.invalidOptionPayload, "x")) == .einval)
        let fastZero = NBDRequest(flags: .fastZero, command: .writeZeroes, handle: 1, offset: 0, length: 1)
        let trim = NBDRequest(command: .trim, handle: 1, offset: 0, length: 1)
        let dfRead = NBDRequest(flags: .dontFragment, command: .read, handle: 1, offset: 0, length: 1)
        #expect(NBDError.errno(for: NBDError(.enotsup, "slow"), answering: fastZero) == .enotsup)
        #expect(NBDError.errno(for: NBDError(.enotsup, "no"), answering: trim) == .einval)
        #expect(NBDError.errno(for: NBDError(.eoverflow, "big"), answering: dfRead) == .eoverflow)
        #expect(NBDError.errno(for: NBDError(.eoverflow, "big"), answering: trim) == .einval)
    }

    /// The registry refuses exports it could not advertise, and duplicates.
    @Test func registryValidatesExports() throws {
        let registry = NBDExportRegistry()
        let refused = [
            MemoryExport(name: ""),
            MemoryExport(name: String(repeating: "n", count: 4097)),
            MemoryExport(name: "nul\u{0}"),
            MemoryExport(name: "bad-block", blockSize: NBDBlockSize(minimum: 3, preferred: 4096, maximum: 1 << 20)),
            MemoryExport(name: "bad-context", dirtyBitmaps: [""]),
        ]
        for export in refused {
            #expect(throws: NBDError.self, "\(export.name.prefix(20))") { try registry.add(export) }
        }
        try registry.add(MemoryExport(name: "ok", dirtyBitmaps: ["a"]))
        #expect(throws: NBDError.self) { try registry.add(MemoryExport(name: "ok")) }
        #expect(registry.names == ["ok"])
    }

    /// The default export comes from the registry's policy over the sorted names.
    @Test func defaultExportPolicy() async throws {
        let firstLive = NBDExportRegistry(defaultExport: { names in names.first { !$0.contains("@") } })
        try firstLive.add(MemoryExport(name: "b"))
        try firstLive.add(MemoryExport(name: "a@1"))
        try firstLive.add(MemoryExport(name: "c"))
        #expect(firstLive.export(named: "")?.name == "b")
        let plain = NBDExportRegistry()
        #expect(plain.export(named: "") == nil)
        try plain.add(MemoryExport(name: "z"))
        try plain.add(MemoryExport(name: "y"))
        #expect(plain.export(named: "")?.name == "y")
        #expect(await plain.remove(named: "y"))
        #expect(await !plain.remove(named: "y"))
        #expect(plain.export(named: "")?.name == "z")
    }
}
