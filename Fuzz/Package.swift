// swift-tools-version: 6.1
// Umbra's libFuzzer target: `Scripts/fuzz.sh [MINUTES]` builds and runs it. A package of its own so
// that the sanitizer flags it needs apply to its build only, never to the product's.
import PackageDescription

let package = Package(
    name: "UmbraFuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "Umbra", path: "..")
    ],
    targets: [
        .executableTarget(
            name: "NBDFuzzTarget",
            dependencies: [.product(name: "NBDFuzzing", package: "Umbra")]
        )
    ],
    swiftLanguageModes: [.v6]
)
