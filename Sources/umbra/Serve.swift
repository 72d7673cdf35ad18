// `umbra serve`: the daemon. Opens the data directory (refusing one another process holds), creates
// the `--volume`s that do not exist yet, serves every volume and snapshot over NBD on each
// `--listen` address, and takes requests and writers on the control socket. SIGINT or SIGTERM stops
// it cleanly: no new connections, requests in flight answered, volumes flushed, exit status 0.
//
// `--stdio EXPORT` serves that one export to one client on stdin and stdout instead (a client that
// spawns the server, like `nbdkit -s`: libnbd's nbd_connect_command, nbdinfo's `[ CMD ]`), with no
// listener, no control socket and no ready line, and exits once the client is gone (Serve+Stdio.swift).
//
// Exports follow the store: every durable change the engine reports (a volume or a set created, a
// snapshot deleted or failed, including by the diff-store policy) reconciles the export registry with
// the store's contents. A new snapshot's export therefore exists before `snapshot create` returns.

import ArgumentParser
import BlockIO
import CoreMetrics
import Dispatch
import Foundation
import Logging
import NBDServer
import NIOCore
import NIOPosix
import Prometheus
import RBD
import ShadowCopy
import SnapshotEngine
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the daemon: serve volumes and snapshots over NBD, take requests on the control socket.")

    static let defaultListenAddress = "tcp://127.0.0.1:10809"

    @Option(help: "The data directory (created if missing).")
    var data: String = "./umbra-data"

    @Option(
        help: "Where to serve NBD: tcp://HOST:PORT or unix:PATH. Repeat for several. (default: tcp://127.0.0.1:10809)")
    var listen: [String] = []

    @Option(help: "The control socket (default: DATA/control.sock).")
    var control: String?

    @Option(help: "NAME:SIZE: create this volume at start unless it exists. Repeat for several.")
    var volume: [String] = []

    @Option(
        help: ArgumentHelp(
            "NAME:PATH: serve an existing file or block device as volume NAME (Umbra keeps only metadata and the diff store; deleting the volume leaves the file). Repeat for several.",
            valueName: "name:path"))
    var volumeFile: [String] = []

    @Option(help: "The chunk size of volumes created by --volume or --volume-file.")
    var chunkSize: Size = Size(bytes: VolumeSpec.defaultChunkSize.rawValue)

    @Option(help: "A Ceph configuration file (with its keyring): serve RBD volumes from that cluster.")
    var cephConf: String?

    @Option(help: "The Ceph client name to connect as, without `client.`.")
    var cephID: String = "admin"

    @Option(help: "How long a Ceph request may go unanswered before it fails (EIO to NBD clients), in seconds.")
    var cephTimeout: Int = 30

    @Option(help: "The longest writes may be held while a snapshot set is taken, in seconds.")
    var holdLimit: Double = 10

    @Option(help: "The default Freeze→Thaw limit for writers, in seconds.")
    var freezeTimeout: Double = 60

    @Option(help: "How long a writer may take to answer an event, in seconds.")
    var writerTimeout: Double = 30

    @Option(help: "Threads for blocking disk I/O (copy-on-write copies, syncs, reads the page cache misses).")
    var ioThreads: Int = 4

    @Flag(
        help: """
            Hand every live write to the I/O threads, not only those of 256 KiB and more, instead of writing \
            it into the page cache on the NBD \
            event loop (slower: measured 0.7x on 4 KiB writes; never blocks an event loop when the kernel \
            throttles dirty memory).
            """)
    var offloadWrites = false

    @Flag(
        help: """
            Copy chunks into the diff store by writing them, even where the file system lets the live data \
            and the diff store share blocks (XFS with reflink, Btrfs), where copies are otherwise clones.
            """)
    var writeCopies = false

    @OptionGroup(title: "Limits on NBD clients")
    var limits: ServeLimitOptions

    @Option(help: "PEM certificate (then intermediates) for NBD over TLS (STARTTLS).")
    var tlsCert: String?

    @Option(help: "PEM private key of --tls-cert.")
    var tlsKey: String?

    @Option(help: "PEM CA certificates: clients must present a certificate signed by one (mutual TLS).")
    var tlsCa: String?

    @Option(help: "require: nothing but STARTTLS in plain text (the default with TLS); optional: the client chooses.")
    var tls: TLSModeArgument?

    @Option(help: "TLS pre-shared keys, psktool format (IDENTITY:HEXKEY a line); limits TLS to version 1.2.")
    var tlsPskFile: String?

    @Option(help: "JSON access rules: which clients may see, read and write which volumes (default: all).")
    var access: String?

    @Option(
        help: ArgumentHelp(
            "Serve Prometheus metrics at http://HOST:PORT/metrics (default: none; port 0 picks a free one, shown in the ready line).",
            valueName: "tcp://host:port"))
    var metrics: String?

    @Option(
        help: ArgumentHelp(
            "Serve only EXPORT (a volume or NAME@SNAPSHOT) to one client on stdin and stdout, then exit when it disconnects; no listener, no control socket.",
            valueName: "export"))
    var stdio: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    enum LogFormat: String, ExpressibleByArgument, CaseIterable {
        case text, json
    }

    @Option(help: "Log lines as text, or as one JSON object each (on stderr either way).")
    var logFormat: LogFormat = .text

    func validate() throws {
        let names = try volumeSpecs().map(\.name) + volumeFiles().map(\.name)
        if Set(names).count != names.count { throw ValidationError("Each volume may be named once.") }
        for address in listen { _ = try NBDListenAddress(parsing: address) }
        if let stdio {
            guard !stdio.isEmpty else { throw ValidationError("--stdio needs an export name.") }
            guard listen.isEmpty, control == nil, metrics == nil else {
                throw ValidationError(
                    "--stdio serves stdin and stdout only; it cannot be combined with --listen, --control or --metrics."
                )
            }
        }
        if let metrics {
            do {
                _ = try MetricsEndpoint.parse(metrics)
            } catch {
                throw ValidationError(CLIError(error).description)
            }
        }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("Unknown log level '\(logLevel)'.") }
        guard (1...256).contains(ioThreads) else { throw ValidationError("--io-threads must be from 1 to 256.") }
        try tlsOptions.validate()
        for (name, value) in [
            ("--hold-limit", holdLimit), ("--freeze-timeout", freezeTimeout), ("--writer-timeout", writerTimeout),
        ]
        where !(value > 0 && value <= 3600) {
            throw ValidationError("\(name) must be more than 0 and at most 3600 seconds.")
        }
    }

    var tlsOptions: ServeTLSOptions {
        ServeTLSOptions(
            certificate: tlsCert, key: tlsKey, certificateAuthority: tlsCa, mode: tls, preSharedKeyFile: tlsPskFile)
    }

    func volumeFiles() throws -> [(name: String, path: String)] {
        try volumeFile.map { text in
            guard let colon = text.firstIndex(of: ":"), colon != text.startIndex else {
                throw ValidationError("--volume-file takes NAME:PATH, e.g. disk:/srv/disk.img (got '\(text)').")
            }
            let name = String(text[..<colon])
            guard VolumeSpec.isValidName(name) else {
                throw ValidationError(EngineError.invalidVolumeName(name).description + ".")
            }
            let path = String(text[text.index(after: colon)...])
            guard path.hasPrefix("/") else {
                throw ValidationError("--volume-file needs an absolute path (got '\(path)').")
            }
            return (name, path)
        }
    }

    func volumeSpecs() throws -> [(name: String, size: UInt64)] {
        try volume.map { text in
            guard let colon = text.lastIndex(of: ":") else {
                throw ValidationError("--volume takes NAME:SIZE, e.g. disk:1G (got '\(text)').")
            }
            let name = String(text[..<colon])
            guard VolumeSpec.isValidName(name) else {
                throw ValidationError(EngineError.invalidVolumeName(name).description + ".")
            }
            guard let size = Size.parse(String(text[text.index(after: colon)...])) else {
                throw ValidationError("'\(text[text.index(after: colon)...])' is not a size (use bytes or K, M, G, T).")
            }
            return (name, size.bytes)
        }
    }

    func run() async throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        let format = logFormat
        LoggingSystem.bootstrap { label in
            var handler: any LogHandler =
                format == .json ? JSONLogHandler(label: label) : StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "umbra")
        // Before anything counts: swift-metrics handles made earlier would stay no-ops.
        let registry = metrics == nil ? nil : PrometheusCollectorRegistry()
        if let registry { MetricsEndpoint.bootstrap(registry) }
        do {
            try await serve(logger: logger, metricsRegistry: registry)
        } catch {
            throw CLIError(error)
        }
    }

    /// The listen addresses as bound, for the log and the ready line: a TCP port 0 becomes the port
    /// the kernel chose, so scripts can ask for any free port and learn which one they got.
    static func describe(_ addresses: [String], bound: [SocketAddress]) -> [String] {
        zip(addresses, bound).map { text, address in
            guard case .tcp(let host, 0)? = try? NBDListenAddress(parsing: text), let port = address.port else {
                return text
            }
            return NBDListenAddress.tcp(host: host, port: port).description
        }
    }

    private func serve(logger: Logger, metricsRegistry: PrometheusCollectorRegistry?) async throws {
        let startedAt = ContinuousClock.now
        // From here on SIGINT and SIGTERM stop the daemon cleanly, whenever they arrive.
        TerminationSignal.install()
        // SIGHUP reloads once the daemon serves; before that it must not kill it (its default).
        signal(SIGHUP, SIG_IGN)
        DaemonFiles.restrictNewFiles()
        try DaemonFiles.checkDataDirectory(data, logger: logger)
        // Read before anything opens, so a bad file stops the daemon at once.
        var nbdConfiguration = NBDServer.Configuration()
        nbdConfiguration.recordsMetrics = metricsRegistry != nil
        let reloader = Reloader(tlsOptions: tlsOptions, accessFile: access, logger: logger)
        (nbdConfiguration.tls, nbdConfiguration.accessPolicy) = try reloader.read()
        let only = stdio
        // The default export is the first volume, or with --stdio the one export there is.
        let registry = NBDExportRegistry { sortedNames in
            only == nil ? sortedNames.first { !$0.contains("@") } : sortedNames.first
        }
        let exports = ExportReconciler(registry: registry, logger: logger, only: only)
        var configuration = StoreConfiguration()
        configuration.holdLimit = .milliseconds(Int64(holdLimit * 1000))
        configuration.logger = Logger(label: "umbra.engine")
        configuration.ioThreadCount = max(1, ioThreads)
        configuration.writesLiveDataInline = !offloadWrites
        configuration.clonesCopies = !writeCopies
        configuration.eventHandler = { event in exports.storeChanged(event) }
        let store = try await SnapshotStore.open(path: data, configuration: configuration)
        exports.attach(store)
        var rbd: RBDProvider?
        do {
            rbd = try await openRBD(store: store, exports: exports, logger: logger)
            if let rbd { exports.attach(rbd) }

            let rbdNames = Set(rbd?.volumeNames ?? [])
            if let clash = (try volumeSpecs().map(\.0) + volumeFiles().map(\.0)).first(where: rbdNames.contains) {
                throw CLIError(message: "Volume \(clash) is an RBD volume; --volume and --volume-file cannot name it.")
            }
            for (name, size) in try volumeSpecs() where store.volumes().allSatisfy({ $0.name != name }) {
                try await store.createVolume(
                    VolumeSpec(name: name, size: ByteCount(size), chunkSize: ByteCount(chunkSize.bytes)))
                logger.info("created volume", metadata: ["volume": "\(name)", "size": "\(Size.format(size))"])
            }
            for (name, path) in try volumeFiles() {
                if let existing = store.volumes().first(where: { $0.name == name }) {
                    guard existing.backing == .external(path: path) else {
                        throw CLIError(EngineError.volumeExists(name))
                    }
                    continue
                }
                try await store.createVolume(
                    VolumeSpec(
                        name: name, size: nil, chunkSize: ByteCount(chunkSize.bytes), backing: .external(path: path)))
                logger.info("attached volume", metadata: ["volume": "\(name)", "path": "\(path)"])
            }
            exports.reconcile()
            limits.apply(to: &nbdConfiguration.limits)
            nbdConfiguration.unixSocketSendBufferBytes = Int(limits.unixSendBuffer.bytes)
            limits.raiseDescriptorLimit(logger: logger)
            let nbd = NBDServer(registry: registry, configuration: nbdConfiguration, logger: Logger(label: "umbra.nbd"))
            if let only {
                try await Self.serveStdio(only, nbd: nbd, logger: logger)
                try await store.close()
                await closeRBD(rbd, logger: logger)
                return
            }
            let requested = listen.isEmpty ? [Self.defaultListenAddress] : listen
            let addresses: [String]
            do {
                addresses = Self.describe(requested, bound: try await nbd.listen(on: requested))
            } catch {
                await nbd.shutdown()
                throw error
            }
            let coordinator = ShadowCopyCoordinator(
                provider: ProviderSet(
                    engine: EngineProvider(store: store, exports: exports), others: rbd.map { [$0] } ?? [],
                    holdLimit: configuration.holdLimit),
                clock: ContinuousClock(),
                configuration: CoordinatorConfiguration(
                    eventTimeout: .milliseconds(Int64(writerTimeout * 1000)),
                    freezeWindow: .milliseconds(Int64(freezeTimeout * 1000))),
                logger: Logger(label: "umbra.shadow-copy"))
            let controlPath = control ?? data + "/control.sock"
            // The control socket has an event loop of its own: an NBD loop can block in a buffered
            // write when the kernel throttles dirty memory, and Thaw or Abort must not wait for that.
            let controlLoop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            let requests = DaemonRequests(
                store: store, exports: exports, others: rbd.map { [$0] } ?? [],
                daemon: DaemonFacts(
                    startedAt: startedAt, listeners: addresses, connections: { nbd.openConnections },
                    writers: { await coordinator.listWriters() }, reload: { try reloader.reload(nbd) },
                    reloads: { reloader.count },
                    dataDirectory: (try? absolutePath(data)) ?? data))
            let controlServer: ControlServer
            var metricsEndpoint: MetricsEndpoint?
            do {
                controlServer = try await ControlServer.bind(
                    socketPath: controlPath, coordinator: coordinator, handler: requests, group: controlLoop,
                    logger: Logger(label: "umbra.control"))
                if let metrics, let metricsRegistry {
                    do {
                        metricsEndpoint = try await MetricsEndpoint.start(
                            on: metrics, registry: metricsRegistry,
                            gauges: DaemonGauges(requests: requests, dataPath: data, logger: logger),
                            logger: Logger(label: "umbra.metrics"))
                    } catch {
                        await controlServer.shutdown()
                        throw error
                    }
                }
            } catch {
                await nbd.shutdown()
                try? await controlLoop.shutdownGracefully()
                throw error
            }
            let metricsPart = metricsEndpoint.map { " metrics=\($0.address)" } ?? ""
            for volume in store.volumes() {
                logger.info(
                    volume.copyMethod == .reflink
                        ? "copy-on-write shares blocks with the live data (reflink): copies write no data"
                        : "copy-on-write writes its copies: the file system cannot share blocks between the live data and the diff store",
                    metadata: ["volume": "\(volume.name)", "copyMethod": "\(volume.copyMethod.rawValue)"])
            }
            logger.info(
                "serving",
                metadata: [
                    "volumes": "\((store.volumes().map(\.name) + (rbd?.volumeNames ?? [])).joined(separator: ","))",
                    "nbd": "\(addresses.joined(separator: ","))", "control": "\(controlPath)",
                    "metrics": "\(metricsEndpoint?.address ?? "off")",
                ])
            // SIGHUP re-reads the access rules and TLS files, as `umbra reload` does (from before
            // the daemon says it is ready, so a reload sent on seeing that is never lost).
            let hangups = HangupSignal.install { _ = try? reloader.reload(nbd) }
            defer { hangups.cancel() }
            // One line on stdout says the daemon is ready (scripts wait for it), and so does a
            // notification to systemd when it started the daemon (Type=notify).
            try? FileHandle.standardOutput.write(
                contentsOf: Data(
                    "ready nbd=\(addresses.joined(separator: ","))\(metricsPart) control=\(controlPath)\n".utf8))
            SystemdNotify.send(
                "READY=1\nSTATUS=serving \(store.volumes().count) volumes on \(addresses.joined(separator: ", "))",
                logger: logger)
            let signal = await TerminationSignal.wait()
            SystemdNotify.send("STOPPING=1", logger: logger)
            logger.info("stopping", metadata: ["signal": "\(signal.map { String($0) } ?? "none")"])
            // In order: accept nothing more; answer the requester of a set in progress and abort its
            // writers (the set is rolled back); answer what NBD clients have in flight; make it all
            // durable.
            await nbd.stopAccepting()
            await metricsEndpoint?.shutdown()
            await controlServer.shutdown()
            await nbd.shutdown()
            try await store.close()
            await closeRBD(rbd, logger: logger)
            try? await controlLoop.shutdownGracefully()
            logger.info("stopped")
        } catch {
            try? await store.close()
            await closeRBD(rbd, logger: logger)
            throw error
        }
    }
}

extension Serve {
    /// Closes the RBD images, waiting for the cluster no longer than `--ceph-timeout`.
    fileprivate func closeRBD(_ rbd: RBDProvider?, logger: Logger) async {
        guard let rbd else { return }
        if await !rbd.close(waitingAtMost: .seconds(max(1, cephTimeout))) {
            logger.warning(
                "the Ceph cluster did not answer while the RBD images were closed; stopping without it",
                metadata: ["timeout_s": "\(cephTimeout)"])
        }
    }

    /// Connects to the Ceph cluster of `--ceph-conf` and opens the RBD volumes the data directory
    /// records. Without `--ceph-conf`, refuses to start if there are any (they would vanish unseen).
    fileprivate func openRBD(store: SnapshotStore, exports: ExportReconciler, logger: Logger) async throws
        -> RBDProvider?
    {
        guard let cephConf else {
            let recorded = try RBDProvider.recordedVolumes(in: data)
            guard recorded.isEmpty else {
                throw CLIError(
                    message:
                        "\(data) has RBD volumes (\(recorded.joined(separator: ", "))); start the daemon with --ceph-conf to serve them."
                )
            }
            return nil
        }
        guard FileManager.default.isReadableFile(atPath: cephConf) else {
            throw CLIError(message: "Cannot read the Ceph configuration \(cephConf).")
        }
        let keptSets = Set(try store.snapshots().map(\.setID))
        do {
            let provider = try await RBDProvider.open(
                configurationPath: cephConf, id: cephID, timeout: max(1, cephTimeout), directory: data,
                keptSets: keptSets, logger: Logger(label: "umbra.rbd"), settleExports: { await exports.settle() })
            logger.info(
                "connected to Ceph",
                metadata: [
                    "conf": "\(cephConf)", "client": "client.\(cephID)", "volumes": "\(provider.volumeNames.count)",
                ])
            return provider
        } catch let error as RBDError {
            throw CLIError(message: sentence(error.description))
        }
    }
}

/// SIGINT and SIGTERM, caught from `install()` on. A signal that arrives before anyone waits is
/// kept, so a daemon stopped the instant it said it was ready still stops.
enum TerminationSignal {
    private struct State {
        var installed = false
        var sources: [any DispatchSourceSignal] = []
        var received: Int32?
        var waiters: [UInt64: CheckedContinuation<Int32?, Never>] = [:]
        var nextWaiter: UInt64 = 0
    }

    private static let state = Mutex(State())
    private static let queue = DispatchQueue(label: "umbra.signals")

    /// Starts catching the signals (their default action, dying, is off from here on). Idempotent.
    static func install() {
        state.withLock { state in
            guard !state.installed else { return }
            state.installed = true
            for number in [SIGINT, SIGTERM] {
                // In this order: the source replaces the ignore with its own handling (the other
                // order would ignore the signal for good).
                signal(number, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
                source.setEventHandler { received(number) }
                source.resume()
                state.sources.append(source)
            }
        }
    }

    private static func received(_ number: Int32) {
        let waiters = state.withLock { state in
            if state.received == nil { state.received = number }
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
        for waiter in waiters { waiter.resume(returning: number) }
    }

    /// The first signal received (at once if one already was), or nil if the waiting task is cancelled.
    static func wait() async -> Int32? {
        install()
        let id = state.withLock { state in
            defer { state.nextWaiter += 1 }
            return state.nextWaiter
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Int32?, Never>) in
                let now = state.withLock { state -> Int32?? in
                    if let received = state.received { return .some(received) }
                    if Task.isCancelled { return .some(nil) }
                    state.waiters[id] = continuation
                    return nil
                }
                if let now { continuation.resume(returning: now) }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume(returning: nil)
        }
    }
}

/// What a reload re-reads (the TLS certificates and keys, and the access rules, from the files the
/// command line named) and how often it succeeded.
final class Reloader: Sendable {
    let tlsOptions: ServeTLSOptions
    let accessFile: String?
    let logger: Logger
    private let reloads = Atomic<Int>(0)
    /// One reload at a time, read and apply together: an older read can never be applied last.
    private let reloading = Mutex<Void>(())

    init(tlsOptions: ServeTLSOptions, accessFile: String?, logger: Logger) {
        self.tlsOptions = tlsOptions
        self.accessFile = accessFile
        self.logger = logger
    }

    var count: Int { reloads.load(ordering: .relaxed) }

    /// Reads the files; throws one sentence naming the bad one.
    func read() throws -> (NBDTLSConfiguration?, NBDAccessPolicy?) {
        let tls = try tlsOptions.configuration()
        guard let accessFile else { return (tls, nil) }
        let rules = try AccessRules.load(path: accessFile)
        return (tls, { client, export in rules.access(for: client, toExport: export) })
    }

    /// Reads the files again and hands them to `nbd` for new connections; on any problem the
    /// configuration in use stays and the reason is thrown (and logged).
    func reload(_ nbd: NBDServer) throws -> ReloadResult {
        do {
            try reloading.withLock { _ in
                let (tls, accessPolicy) = try read()
                try nbd.reload(tls: tls, accessPolicy: accessPolicy)
            }
        } catch {
            Counter(label: "umbra_reloads_total", dimensions: [("result", "refused")]).increment()
            let reason = CLIError(error).description
            logger.warning("reload refused; the configuration in use stays", metadata: ["reason": "\(reason)"])
            throw ShadowCopyError(.invalidArgument, "Reload refused: \(reason) The configuration in use stays.")
        }
        reloads.add(1, ordering: .relaxed)
        Counter(label: "umbra_reloads_total", dimensions: [("result", "ok")]).increment()
        var reloaded: [String] = []
        if accessFile != nil { reloaded.append("access") }
        if tlsOptions.certificate != nil || tlsOptions.preSharedKeyFile != nil { reloaded.append("tls") }
        logger.info("reloaded the configuration", metadata: ["reloaded": "\(reloaded.joined(separator: ","))"])
        return ReloadResult(reloaded: reloaded)
    }
}

/// SIGHUP, while the daemon serves: each one runs `handler` (on the signal queue).
enum HangupSignal {
    static func install(_ handler: @escaping @Sendable () -> Void) -> any DispatchSourceSignal {
        signal(SIGHUP, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: SIGHUP, queue: DispatchQueue(label: "umbra.sighup"))
        source.setEventHandler(handler: handler)
        source.resume()
        return source
    }
}
