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
        )
    ],
    swiftLanguageModes: [.v6]
)
