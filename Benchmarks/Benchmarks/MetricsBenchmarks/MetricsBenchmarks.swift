// What recording one NBD request in the metrics costs, with swift-prometheus as the backend (what
// `umbra serve --metrics` bootstraps): the server's exact per-request work (NBDExportMetrics.record,
// two counter increments and one histogram record) and the two clock reads around the request.
// Against the server's whole CPU per 4 KiB request (Scripts/bench/server-cpu.sh, about 10 µs here),
// this gives the share metrics take without the noise of an end-to-end run.

import Benchmark
import CoreMetrics
import NBDProtocol
@_spi(Benchmarks) import NBDServer
import NIOCore
import Prometheus

let benchmarks: @Sendable () -> Void = {
    MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: PrometheusCollectorRegistry()))
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .cpuTotal, .mallocCountTotal],
        timeUnits: .nanoseconds,
        warmupIterations: 10,
        scalingFactor: .mega,
        maxDuration: .seconds(4),
        maxIterations: 30
    )
    let metrics = NBDMetrics().export("disk")

    Benchmark("metrics: one request recorded, clock reads included (per request)") { benchmark in
        for _ in benchmark.scaledIterations {
            let started = NIODeadline.now().uptimeNanoseconds
            metrics.record(
                .read, bytes: 4096, failed: false,
                nanoseconds: Int64(truncatingIfNeeded: NIODeadline.now().uptimeNanoseconds &- started))
        }
    }

    Benchmark("metrics: the two clock reads alone (per request)") { benchmark in
        var sum: UInt64 = 0
        for _ in benchmark.scaledIterations {
            let started = NIODeadline.now().uptimeNanoseconds
            sum &+= NIODeadline.now().uptimeNanoseconds &- started
        }
        blackHole(sum)
    }
}
