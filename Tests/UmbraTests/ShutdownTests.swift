// SIGTERM under traffic: clients connect to and hang up from both the control socket and the NBD
// socket as fast as they can while the daemon stops. Whatever instant the signal lands on, the
// daemon must stop cleanly (exit status 0, never a crash). The default run repeats it a few times;
// `UMBRA_SHUTDOWN_STRESS_SECONDS=N` keeps repeating it for N seconds (the stress mode).

import Foundation
import Synchronization
import Testing
import UmbraTestSupport

#if canImport(Glibc)
    import Glibc
#endif

@Suite(.serialized) struct ShutdownTests {
    static let defaultRounds = 6

    /// SIGTERM while control and NBD clients connect and disconnect throughout: exit status 0 every time.
    @Test func sigtermUnderConnectionStorms() async throws {
        let stressSeconds = ProcessInfo.processInfo.environment["UMBRA_SHUTDOWN_STRESS_SECONDS"].flatMap(Double.init)
        let deadline = stressSeconds.map { Date().addingTimeInterval($0) }
        var round = 0
        var connections = 0
        while deadline.map({ Date() < $0 }) ?? (round < Self.defaultRounds) {
            var random = SeededRandom(seed: UInt64(round) &+ 20_261_128)
            let daemon = try DaemonFixture.start(volumes: ["disk:16M"])
            let storm = ConnectionStorm(
                paths: [daemon.controlSocket, daemon.nbdSocket], helloPath: daemon.controlSocket)
            // Let the storm build for a while (a different moment each round), then signal.
            let warmUp = Int.random(in: 50...800, using: &random)
            while storm.connections < warmUp { usleep(200) }
            kill(daemon.process.processIdentifier, SIGTERM)
            // A guard against a hang, not a time limit on stopping: a stuck daemon fails the round.
            let stopped = daemon.process.waitUntilExit(seconds: 120)
            if !stopped { daemon.process.kill() }
            let made = storm.stop()
            #expect(stopped, "round \(round): umbra serve had not stopped 120 s after SIGTERM")
            let reason = daemon.process.process.terminationReason
            let status = daemon.process.process.terminationStatus
            daemon.directory.remove()
            #expect(
                reason == .exit && status == 0,
                "round \(round): umbra serve ended by \(reason == .exit ? "exit" : "signal") \(status) under a connection storm"
            )
            if reason != .exit || status != 0 { break }
            connections += made
            round += 1
        }
        print("shutdown storm: \(round) clean stops, \(connections) connections made during them")
    }
}

/// Threads that connect to Unix sockets and hang up, over and over, until stopped: one per path, and
/// one more that sends a requester hello on `helloPath` before hanging up.
final class ConnectionStorm: Sendable {
    private let stopping = Atomic<Bool>(false)
    private let made = Atomic<Int>(0)
    private let finished = DispatchSemaphore(value: 0)
    private let threads: Int

    init(paths: [String], helloPath: String) {
        let targets = paths.map { ($0, false) } + [(helloPath, true)]
        threads = targets.count
        for (path, speaksFirst) in targets {
            Thread.detachNewThread { [self] in
                let hello = Array(#"{"id":1,"method":"hello","params":{"version":1,"role":"requester"}}"#.utf8) + [10]
                while !stopping.load(ordering: .relaxed) {
                    guard let socket = try? RawNBDSocket(unixPath: path) else {
                        usleep(100)
                        continue
                    }
                    if speaksFirst { _ = socket.send(hello) }
                    socket.close()
                    made.add(1, ordering: .relaxed)
                }
                finished.signal()
            }
        }
    }

    var connections: Int { made.load(ordering: .relaxed) }

    /// Stops every thread and returns how many connections were made.
    func stop() -> Int {
        stopping.store(true, ordering: .relaxed)
        for _ in 0..<threads { finished.wait() }
        return connections
    }
}
