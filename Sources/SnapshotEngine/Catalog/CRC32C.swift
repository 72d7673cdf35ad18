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

    /// The CRC-32C of A followed by B, from A's, B's and B's length (zlib's crc32_combine, for the
    /// Castagnoli polynomial): pieces of a file checksummed out of order make the file's checksum.
    public static func combine(_ first: UInt32, _ second: UInt32, secondLength: UInt64) -> UInt32 {
        guard secondLength > 0 else { return first }
        func times(_ matrix: [UInt32], _ vector: UInt32) -> UInt32 {
            var sum: UInt32 = 0
            var vector = vector
            var row = 0
            while vector != 0 {
                if vector & 1 != 0 { sum ^= matrix[row] }
                vector >>= 1
                row += 1
            }
            return sum
        }
        func square(_ matrix: [UInt32]) -> [UInt32] { matrix.map { times(matrix, $0) } }
        // The operator for one zero bit, then squared to two and four.
        var odd = [UInt32](repeating: 0, count: 32)
        odd[0] = 0x82F6_3B78
        for bit in 1..<32 { odd[bit] = 1 << UInt32(bit - 1) }
        var even = square(odd)
        odd = square(even)
        var crc = first
        var length = secondLength
        while true {
            even = square(odd)
            if length & 1 != 0 { crc = times(even, crc) }
            length >>= 1
            if length == 0 { break }
            odd = square(even)
            if length & 1 != 0 { crc = times(odd, crc) }
            length >>= 1
            if length == 0 { break }
        }
        return crc ^ second
    }
}
