import NBDProtocol
import NIOCore
import Testing
import UmbraTestSupport

@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

@Suite struct NBDServerLifecycleTests {
    /// A held read does not block later requests on the same connection: they complete first,
    /// and the held one completes once released (replies out of order).
    @Test func slowRequestDoesNotBlockOthers() async throws {
        let export = MemoryExport(name: "live")
        export.fill([UInt8](repeating: 5, count: 4096), at: 0)
        export.fill([UInt8](repeating: 6, count: 4096), at: 8192)
        let gate = export.gateReads(at: 0)
        try await ServerFixture.with([export]) { fixture in
            let client = try await fixture.connect("live")
            let slow = try await blocking { try client.startRead(count: 4096, offset: 0) }
            await gate.waitUntilReached()
            let fast = try await blocking { try client.startRead(count: 4096, offset: 8192) }
            let write = try await blocking { try client.startWrite([1, 2, 3], offset: 20000) }
            try await waitForCompletion(client, fast.cookie)
            try await waitForCompletion(client, write.cookie)
            #expect(fast.bytes == [UInt8](repeating: 6, count: 4096))
            #expect(try !client.isComplete(slow.cookie))
            gate.open()
            try await waitForCompletion(client, slow.cookie)
            #expect(slow.bytes == [UInt8](repeating: 5, count: 4096))
        }
    }

    /// A request held on one connection does not hold up another connection to the same export.
    @Test func slowRequestDoesNotBlockOtherConnections() async throws {
        let export = MemoryExport(name: "live")
        let gate = export.gateReads(at: 0)
        try await ServerFixture.with([export]) { fixture in
            let first = try await fixture.connect("live")
            let second = try await fixture.connect("live")
            let held = try await blocking { try first.startRead(count: 512, offset: 0) }
            await gate.waitUntilReached()
            try await blocking { () throws in
                try second.pwrite([9], offset: 4096, flags: .fua)
                #expect(try second.pread(count: 1, offset: 4096) == [9])
            }
            #expect(try !first.isComplete(held.cookie))
            gate.open()
            try await waitForCompletion(first, held.cookie)
        }
    }

    /// With a bound of two requests in flight the export never sees more than two at once, and
    /// everything completes once the held reads are released.
    @Test func inFlightBoundAppliesBackpressure() async throws {
        var configuration = ServerFixture.defaultConfiguration
        configuration.limits.maximumInFlightRequests = 2
        let export = MemoryExport(name: "live")
        let gates = [export.gateReads(at: 0), export.gateReads(at: 4096)]
        try await ServerFixture.with([export], configuration: configuration) { fixture in
            let client = try await fixture.connect("live")
            let reads = try await blocking {
                try (0..<6).map { try client.startRead(count: 4096, offset: UInt64($0) * 4096) }
            }
            for gate in gates { await gate.waitUntilReached() }
            for gate in gates { gate.open() }
            for read in reads { try await waitForCompletion(client, read.cookie) }
            #expect(export.maximumReadsInFlight == 2)
        }
    }

    /// Removing an export mid-connection: the request in flight is answered, later ones get
    /// ESHUTDOWN, then the connection closes; other exports keep being served.
    @Test func removingAnExportDrainsItsConnections() async throws {
        let snapshot = MemoryExport(name: "live@aaaa", isReadOnly: true)
        snapshot.fill([UInt8](repeating: 3, count: 4096), at: 0)
        let gate = snapshot.gateReads(at: 0)
        let live = MemoryExport(name: "live")
        try await ServerFixture.with([live, snapshot]) { fixture in
            let client = try await fixture.connect("live@aaaa")
            let other = try await fixture.connect("live")
            let held = try await blocking { try client.startRead(count: 4096, offset: 0) }
            await gate.waitUntilReached()

            let removal = try #require(fixture.registry.beginRemoval(named: "live@aaaa"))
            for future in removal.draining { try await future.get() }
            #expect(await clientErrno { _ = try client.pread(count: 512, offset: 4096) } == ESHUTDOWN)
            #expect(await clientErrno { try other.pwrite([1], offset: 0) } == nil)

            gate.open()
            try await waitForCompletion(client, held.cookie)
            #expect(held.bytes == [UInt8](repeating: 3, count: 4096))
            for future in removal.closed { try await future.get() }
            #expect(await clientErrno { _ = try client.pread(count: 512, offset: 0) } != nil)
            #expect(fixture.registry.export(named: "live@aaaa") == nil)
            #expect(await clientErrno { _ = try other.pread(count: 1, offset: 0) } == nil)

            let late = try await fixture.negotiatingClient { try $0.setExportName("live@aaaa") }
            await #expect(throws: NBDClientError.self) { try await blocking { try late.optGo() } }
        }
    }

    /// A new export is servable as soon as it is added.
    @Test func addedExportIsServableAtOnce() async throws {
        try await ServerFixture.with([MemoryExport(name: "live")]) { fixture in
            let added = MemoryExport(name: "live@bbbb", isReadOnly: true)
            added.fill([4, 4], at: 0)
            try fixture.registry.add(added)
            let client = try await fixture.connect("live@bbbb")
            #expect(try await blocking { try client.pread(count: 2, offset: 0) } == [4, 4])
            #expect(throws: NBDError.self) { try fixture.registry.add(MemoryExport(name: "live@bbbb")) }
        }
    }

    /// Graceful shutdown: the request in flight is answered, new ones get ESHUTDOWN, every export
    /// is flushed, then connections close and the socket file is gone.
    @Test func shutdownAnswersInFlightThenFlushes() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let export = MemoryExport(name: "live")
        export.fill([8, 8], at: 0)
        let gate = export.gateReads(at: 0)
        let registry = NBDExportRegistry()
        try registry.add(export)
        let server = NBDServer(registry: registry)
        let path = directory.path + "/s.sock"
        try await server.listen(on: .unix(path: path))
        let client = try await blocking { () -> NBDTestClient in
            let client = try NBDTestClient()
            try client.connect(unixSocket: path)
            return client
        }
        let handshaking = try await blocking { () -> NBDTestClient in
            let client = try NBDTestClient()
            try client.setOptMode(true)
            try client.connect(unixSocket: path)
            return client
        }
        let held = try await blocking { try client.startRead(count: 2, offset: 0) }
        await gate.waitUntilReached()

        let shutdown = await server.beginShutdown()
        #expect(await clientErrno { try client.pwrite([1], offset: 100) } == ESHUTDOWN)
        await #expect(throws: NBDClientError.self) { try await blocking { try handshaking.optGo() } }
        #expect(!export.calls.contains(.flush))
        gate.open()
        try await waitForCompletion(client, held.cookie)
        #expect(held.bytes == [8, 8])
        await server.finishShutdown(shutdown)
        #expect(export.calls.last == .flush)
        #expect(access(path, F_OK) != 0)
        #expect(await clientErrno { _ = try client.pread(count: 1, offset: 0) } != nil)
    }

    /// A request that never completes cannot hold shutdown up beyond the grace period: the
    /// export is still flushed and the connection closed.
    @Test func shutdownDoesNotWaitForeverForAStuckRequest() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let export = MemoryExport(name: "live")
        let gate = export.gateReads(at: 0)
        let registry = NBDExportRegistry()
        try registry.add(export)
        let server = NBDServer(registry: registry)
        let path = directory.path + "/s.sock"
        try await server.listen(on: .unix(path: path))
        let client = try await blocking { () -> NBDTestClient in
            let client = try NBDTestClient()
            try client.connect(unixSocket: path)
            return client
        }
        let stuck = try await blocking { try client.startRead(count: 512, offset: 0) }
        await gate.waitUntilReached()
        await server.shutdown(gracePeriod: .zero)
        #expect(export.calls.last == .flush)
        #expect(await clientErrno { _ = try client.pread(count: 1, offset: 4096) } != nil)
        _ = stuck
        gate.open()
    }

    /// Several listeners at once: two Unix sockets and TCP on an ephemeral port serve the same exports.
    @Test func listensOnSeveralAddresses() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let registry = NBDExportRegistry()
        try registry.add(MemoryExport(name: "live", size: 4096))
        let server = NBDServer(registry: registry)
        let bound = try await server.listen(on: [
            "unix:\(directory.path)/a.sock", "unix:\(directory.path)/b.sock", "tcp://127.0.0.1:0",
        ])
        let port = try #require(bound[2].port)
        for uri in [
            "nbd+unix:///?socket=\(directory.path)/a.sock", "nbd+unix:///?socket=\(directory.path)/b.sock",
            "nbd://127.0.0.1:\(port)/",
        ] {
            let size = try await blocking { () -> UInt64 in
                let client = try NBDTestClient()
                try client.connect(uri: uri)
                return try client.size()
            }
            #expect(size == 4096, "\(uri)")
        }
        await server.shutdown()
    }

    /// Listening on several addresses is all or nothing: a bad one closes those already bound.
    @Test func listeningIsAllOrNothing() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let server = NBDServer(registry: NBDExportRegistry())
        let good = directory.path + "/good.sock"
        await #expect(throws: NBDError.self) {
            try await server.listen(on: ["unix:\(good)", "unix:\(directory.path)/missing-dir/x.sock"])
        }
        #expect(server.localAddresses.isEmpty)
        #expect(access(good, F_OK) != 0)
        await server.shutdown()
    }

    /// A stale socket file is replaced; a live server's socket and a non-socket file are refused.
    @Test func staleSocketFiles() async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/s.sock"
        // A socket bound and then abandoned (nobody listening): stale.
        #expect(makeStaleUnixSocket(at: path))

        let registry = NBDExportRegistry()
        let first = NBDServer(registry: registry)
        try await first.listen(on: .unix(path: path))
        let second = NBDServer(registry: registry)
        await #expect(throws: NBDError.self) { try await second.listen(on: .unix(path: path)) }
        await first.shutdown()

        let file = directory.path + "/plain"
        let descriptor = open(file, O_CREAT | O_WRONLY, 0o600)
        close(descriptor)
        await #expect(throws: NBDError.self) { try await second.listen(on: .unix(path: file)) }
        #expect(access(file, F_OK) == 0)
        await second.shutdown()
    }
}
