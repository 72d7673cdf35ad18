import NBDProtocol
import NIOCore

// Design note. One fuzz input is what a client sends in one session, byte for byte (so a capture
// of a real client is a valid seed, and a crasher can be replayed against a real server). The
// driver plays the server side the way NBDConnectionHandler does: the decoder fed in pieces, the
// handshake and transmission machines, an in-memory catalog, every reply encoded. Requests
// complete after a delay taken from their handle, and the oldest completes whenever the in-flight
// bounds stop reading, so the transmission accounting is exercised. Each input runs twice, whole
// and cut at points derived from its bytes; both runs must send the same bytes, since cutting the
// stream differently must not change what the decoder sees. Broken invariants are reported as
// `NBDFuzzFinding`s; crashes in the code under test are findings by themselves.
//
// The driver lives in its own small library so the fuzz target (Fuzz/) builds only NIOCore,
// NBDProtocol and this, and the regression test replays the same code.

/// A broken invariant found while driving a session.
public struct NBDFuzzFinding: Error, CustomStringConvertible {
    public var description: String
}

/// Drives the server side of NBD sessions from raw client bytes.
public enum NBDSessionFuzzer {
    /// The limits sessions run with: the defaults, with small in-flight bounds so they are reached.
    public static let limits: NBDLimits = {
        var limits = NBDLimits()
        limits.maximumInFlightRequests = 8
        limits.maximumInFlightBytes = 1024 * 1024
        limits.maximumExtentsPerReply = 16
        return limits
    }()

    /// The server's TLS mode for a session: a session that opens with STARTTLS meets any of the three
    /// modes; any other keeps to those a plain-text client can use (so captured real sessions stay
    /// valid ones).
    static func tlsMode(for bytes: [UInt8], seed: UInt64) -> NBDTLSMode {
        var head = ByteBuffer(bytes: bytes.prefix(16))
        let startsWithTLS =
            head.readMultipleIntegers(as: (UInt32, UInt64, UInt32).self).map {
                $0.1 == NBDMagic.option && $0.2 == NBDOption.startTLS.rawValue
            } ?? false
        let modes: [NBDTLSMode] = startsWithTLS ? [.disabled, .optional, .required] : [.disabled, .optional]
        return modes[Int((seed >> 40) % UInt64(modes.count))]
    }

    /// Runs `input` as one client session, whole and in pieces, checks every invariant, and returns
    /// what the session did.
    @discardableResult
    public static func run(_ input: some Collection<UInt8>) throws(NBDFuzzFinding) -> NBDFuzzOutcome {
        let bytes = Array(input)
        let seed = fnv1a(bytes)
        let mode = tlsMode(for: bytes, seed: seed)
        let whole = try NBDFuzzSession(seed: seed, tlsMode: mode).run(bytes, pieces: [bytes.count])
        let pieces = splitSizes(count: bytes.count, seed: seed)
        let split = try NBDFuzzSession(seed: seed, tlsMode: mode).run(bytes, pieces: pieces)
        guard whole == split else {
            throw NBDFuzzFinding(
                description: "the session differs when the input is cut into \(pieces.count) pieces: "
                    + "whole \(whole), cut \(split)")
        }
        return whole
    }

    /// Piece sizes covering `count` bytes: one byte at a time (inputs up to 4 KiB, so big ones stay
    /// fast to run), or pseudo-random sizes up to 64 bytes or 4 KiB, chosen by `seed`.
    static func splitSizes(count: Int, seed: UInt64) -> [Int] {
        var random = seed
        var sizes: [Int] = []
        var remaining = count
        let mode = count <= 4096 ? seed % 3 : 1 + seed % 2
        while remaining > 0 {
            random = random &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            let size: Int
            switch mode {
            case 0: size = 1
            case 1: size = 1 + Int((random >> 33) % 64)
            default: size = 1 + Int((random >> 33) % 4096)
            }
            sizes.append(min(size, remaining))
            remaining -= size
        }
        return sizes
    }

    static func fnv1a(_ bytes: [UInt8]) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        return hash
    }
}

/// The exports a fuzzed session can pick: a live volume and a read-only snapshot with 512-byte
/// alignment, named as `umbra serve` names them (the seed corpus was captured against it, with the
/// snapshot's id replaced by `snapshotID`).
public struct NBDFuzzCatalog: NBDExportCatalog {
    public static let snapshotID = "00000000-0000-4000-8000-000000000001"
    public static let olderSnapshotID = "00000000-0000-4000-8000-000000000000"
    public static let dirtyBitmap = "qemu:dirty-bitmap:"

    public let exports: [NBDExportDescription] = [
        NBDExportDescription(
            name: "disk", description: "Umbra volume disk", size: 64 << 20, isReadOnly: false,
            blockSize: NBDBlockSize(minimum: 1, preferred: 65536, maximum: 32 << 20),
            metaContexts: [dirtyBitmap + olderSnapshotID, dirtyBitmap + snapshotID], supportsFastZero: true),
        NBDExportDescription(
            name: "disk@" + snapshotID, description: "Umbra snapshot of disk", size: 64 << 20, isReadOnly: true,
            blockSize: NBDBlockSize(minimum: 512, preferred: 65536, maximum: 32 << 20),
            metaContexts: [dirtyBitmap + olderSnapshotID]),
    ]

    public init() {}

    public func listExports() -> [NBDExportListing] {
        exports.map { NBDExportListing(name: $0.name, description: $0.description) }
    }

    public func lookUpExport(named name: String, forTransmission: Bool) -> NBDExportDescription? {
        name.isEmpty ? exports.first : exports.first { $0.name == name }
    }
}
