import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import UmbraTestSupport

@testable import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

/// Threads for libnbd's blocking calls, so they never block Swift's cooperative pool (which
/// the code under test may need).
let clientThreads: NIOThreadPool = {
    let pool = NIOThreadPool(numberOfThreads: 8)
    pool.start()
    return pool
}()

/// Runs a blocking client call off the cooperative pool.
func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await clientThreads.runIfActive(body)
}

/// The errno of a failed client call, or nil if it succeeded.
func clientErrno(_ body: @escaping @Sendable () throws -> Void) async -> Int32? {
    do {
        try await blocking(body)
        return nil
    } catch let error as NBDClientError {
        return error.errno
    } catch {
        return -1
    }
}

/// A private temporary directory, removed (with everything in it) by `remove()`.
struct TemporaryDirectory {
    let path: String

    init() {
        var template = Array("/tmp/umbra-nbd-XXXXXX".utf8CString)
        let created = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(created != nil, "mkdtemp failed")
        path = String(cString: template.withUnsafeBufferPointer { $0.baseAddress! })
    }

    func remove() {
        if let directory = opendir(path) {
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) {
                    String(cString: $0.bindMemory(to: CChar.self).baseAddress!)
                }
                if name != "." && name != ".." { unlink(path + "/" + name) }
            }
            closedir(directory)
        }
        rmdir(path)
    }
}

/// A real server on a Unix socket in a temporary directory.
struct ServerFixture: Sendable {
    let server: NBDServer
    let registry: NBDExportRegistry
    let socketPath: String

    /// The server's defaults, but no handshake timeout: a test paused between two options on a
    /// loaded machine must not be cut off (tests of the timeout pass their own configuration).
    static var defaultConfiguration: NBDServer.Configuration {
        var configuration = NBDServer.Configuration()
        configuration.limits.handshakeTimeoutMilliseconds = 0
        return configuration
    }

    /// Starts a server with `exports`, runs `body`, then shuts the server down and cleans up.
    static func with(
        _ exports: [MemoryExport],
        configuration: NBDServer.Configuration = ServerFixture.defaultConfiguration,
        _ body: (ServerFixture) async throws -> Void
    ) async throws {
        let directory = TemporaryDirectory()
        defer { directory.remove() }
        let registry = NBDExportRegistry()
        for export in exports { try registry.add(export) }
        var logger = Logger(label: "nbd-test")
        logger.logLevel = .critical
        let server = NBDServer(registry: registry, configuration: configuration, logger: logger)
        let socketPath = directory.path + "/nbd.sock"
        try await server.listen(on: .unix(path: socketPath))
        let fixture = ServerFixture(server: server, registry: registry, socketPath: socketPath)
        do {
            try await body(fixture)
        } catch {
            await server.shutdown()
            throw error
        }
        await server.shutdown()
    }

    /// A client connected (GO done) to `export`.
    func connect(
        _ export: String = "",
        structuredReplies: Bool = true,
        metaContexts: [String] = [],
        strict: Bool = true
    ) async throws -> NBDTestClient {
        let socketPath = self.socketPath
        return try await blocking {
            let client = try NBDTestClient()
            try client.setExportName(export)
            try client.setRequestStructuredReplies(structuredReplies)
            for context in metaContexts { try client.addMetaContext(context) }
            if !strict { try client.setStrictMode(0) }
            try client.connect(unixSocket: socketPath)
            return client
        }
    }

    /// A client stopped in option haggling (libnbd's opt mode).
    func negotiatingClient(
        structuredReplies: Bool = true,
        configure: @escaping @Sendable (NBDTestClient) throws -> Void = { _ in }
    ) async throws -> NBDTestClient {
        let socketPath = self.socketPath
        return try await blocking {
            let client = try NBDTestClient()
            try client.setOptMode(true)
            try client.setRequestStructuredReplies(structuredReplies)
            try configure(client)
            try client.connect(unixSocket: socketPath)
            return client
        }
    }
}

/// Waits, making progress on the connection, until `client` reports `cookie` complete or failed.
func waitForCompletion(_ client: NBDTestClient, _ cookie: Int64) async throws {
    try await blocking {
        while try !client.isComplete(cookie) { try client.poll() }
    }
}
