// CRC-32C (Castagnoli): the checksum of every catalog batch and of every preserved chunk. ISA-L picks
// the fastest version for the CPU at run time (SSE4.2's crc32 with carry-less multiply folding), tens
// of gigabytes per second, so checksumming each copy costs the write path next to nothing.

import CISAL

public enum CRC32C {
    /// The CRC-32C of `bytes`; `previous` continues a checksum over bytes that came before.
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing previous: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return previous }
        var crc = ~previous
        var start = base
        var remaining = bytes.count
        // ISA-L takes an int length; a chunk is at most 1 MiB, but stay correct for anything.
        while remaining > 0 {
            let piece = min(remaining, 1 << 30)
            crc = crc32_iscsi(
                UnsafeMutablePointer(mutating: start.assumingMemoryBound(to: UInt8.self)), Int32(piece), crc)
            start += piece
            remaining -= piece
        }
        return ~crc
    }

    public static func checksum(_ bytes: [UInt8], continuing previous: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, continuing: previous) }
    }
}
