#if canImport(Glibc)
    import Glibc
#endif

/// Whether two byte sequences are equal, compared with memcmp (debug builds compare arrays per element).
public func bytesEqual(_ lhs: ArraySlice<UInt8>, _ rhs: ArraySlice<UInt8>) -> Bool {
    guard lhs.count == rhs.count else { return false }
    return lhs.withUnsafeBytes { left in
        rhs.withUnsafeBytes { right in
            left.count == 0 || memcmp(left.baseAddress!, right.baseAddress!, left.count) == 0
        }
    }
}

public func bytesEqual(_ lhs: [UInt8], _ rhs: [UInt8]) -> Bool { bytesEqual(lhs[...], rhs[...]) }

/// Copies `bytes` over `target[offset...]` with memcpy.
public func overwrite(_ target: inout [UInt8], at offset: Int, with bytes: [UInt8]) {
    target.withUnsafeMutableBytes { destination in
        bytes.withUnsafeBytes { source in
            if source.count > 0 {
                (destination.baseAddress! + offset).copyMemory(from: source.baseAddress!, byteCount: source.count)
            }
        }
    }
}
