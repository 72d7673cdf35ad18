// swift-tools-version: 6.1
// Umbra's benchmarks: `swift package benchmark` in this directory. A package of its own so that the
// benchmark tooling (and its malloc interposer) stays out of the product's build.
import PackageDescription

let package = Package(
    name: "UmbraBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "Umbra", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
    ],
    targets: [
        .executableTarget(
            name: "EngineBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "SnapshotEngine", package: "Umbra"),
                .product(name: "BlockIO", package: "Umbra"),
            ],
            path: "Benchmarks/EngineBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // What recording one NBD request in the metrics costs (docs/performance.md, "What metrics cost").
        .executableTarget(
            name: "MetricsBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "NBDServer", package: "Umbra"),
                .product(name: "NBDProtocol", package: "Umbra"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            path: "Benchmarks/MetricsBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
