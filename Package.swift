// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "Umbra",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "umbra", targets: ["umbra"]),
        .library(name: "BlockIO", targets: ["BlockIO"]),
        .library(name: "SnapshotEngine", targets: ["SnapshotEngine"]),
        .library(name: "NBDProtocol", targets: ["NBDProtocol"]),
        .library(name: "NBDServer", targets: ["NBDServer"]),
        .library(name: "ShadowCopy", targets: ["ShadowCopy"]),
        .library(name: "QCOW2", targets: ["QCOW2"]),
        .library(name: "RBD", targets: ["RBD"]),
        .library(name: "UmbraTestSupport", targets: ["UmbraTestSupport"]),
        .library(name: "NBDFuzzing", targets: ["NBDFuzzing"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        .target(name: "CBlockIO"),
        // ISA-L's hardware-accelerated CRC-32C (catalog batches and preserved chunks).
        .systemLibrary(
            name: "CISAL",
            pkgConfig: "libisal",
            providers: [.apt(["libisal-dev"])]
        ),
        .target(
            name: "BlockIO",
            dependencies: ["CBlockIO", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .target(
            name: "SnapshotEngine",
            dependencies: [
                "BlockIO", "CISAL", .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ],
            // Debug and test builds check the engine's data structures after every change.
            swiftSettings: [.define("UMBRA_CHECK_INVARIANTS", .when(configuration: .debug))]
        ),
        // qcow2 images: backups are written as ones QEMU's tools read, and restored from them.
        .target(name: "QCOW2", dependencies: ["BlockIO"]),
        .target(
            name: "NBDProtocol",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")]
        ),
        // The fuzz driver (run by Fuzz/ under libFuzzer and by NBDProtocolTests over the corpus).
        .target(
            name: "NBDFuzzing",
            dependencies: ["NBDProtocol", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .target(
            name: "NBDServer",
            dependencies: [
                "BlockIO", "NBDProtocol",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]
        ),
        .target(
            name: "ShadowCopy",
            dependencies: [
                "BlockIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]
        ),
        // librbd and librados (Ceph RBD volumes); librbd-dev ships no pkg-config file.
        .systemLibrary(
            name: "CRBD",
            providers: [.apt(["librbd-dev", "librados-dev"])]
        ),
        // Ceph RBD images through librbd: asynchronous I/O, snapshots, diffs.
        .target(name: "RBD", dependencies: ["CRBD"]),
        .systemLibrary(
            name: "CNBD",
            pkgConfig: "libnbd",
            providers: [.apt(["libnbd-dev"])]
        ),
        .target(
            name: "UmbraTestSupport",
            dependencies: ["BlockIO", "NBDProtocol", "CNBD", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .executableTarget(
            name: "umbra",
            dependencies: [
                "BlockIO", "SnapshotEngine", "NBDProtocol", "NBDServer", "ShadowCopy", "QCOW2", "RBD",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .testTarget(name: "BlockIOTests", dependencies: ["BlockIO", "UmbraTestSupport"]),
        .testTarget(name: "QCOW2Tests", dependencies: ["QCOW2", "BlockIO", "UmbraTestSupport"]),
        .testTarget(
            name: "SnapshotEngineTests",
            dependencies: ["SnapshotEngine", "UmbraTestSupport", .product(name: "Logging", package: "swift-log")]
        ),
        .testTarget(
            name: "NBDProtocolTests",
            dependencies: [
                "NBDProtocol",
                "NBDFuzzing",
                "UmbraTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "NBDServerTests",
            dependencies: [
                "NBDServer",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                "NBDProtocol",
                "UmbraTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "ShadowCopyTests",
            dependencies: [
                "ShadowCopy", "UmbraTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // Tests that run the `umbra` executable as a real process.
        .testTarget(
            name: "UmbraTests",
            dependencies: [
                "umbra", "SnapshotEngine", "BlockIO", "ShadowCopy", "NBDProtocol", "UmbraTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
