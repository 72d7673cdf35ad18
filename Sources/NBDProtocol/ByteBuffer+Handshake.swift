import NIOCore

/// Messages the server sends during the handshake phase.
public enum NBDHandshakeMessage: Hashable, Sendable {
    /// `NBDMAGIC`, `IHAVEOPT`, handshake flags.
    case greeting(NBDHandshakeFlags)
    /// A fixed-newstyle option reply.
    case optionReply(NBDOptionReply)
    /// The answer to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client
    /// negotiated `NO_ZEROES`, 124 bytes of zeroes.
    case exportNameReply(size: UInt64, flags: NBDTransmissionFlags, zeroPadding: Bool)
}

extension NBDHandshakeMessage {
    /// Bytes of zeroes after the `EXPORT_NAME` reply without `NO_ZEROES`.
    public static let exportNameZeroPaddingBytes = 124
}

extension ByteBuffer {
    /// Writes one handshake-phase message.
    @discardableResult
    public mutating func writeNBDHandshakeMessage(_ message: NBDHandshakeMessage) -> Int {
        switch message {
        case .greeting(let flags):
            return writeMultipleIntegers(NBDMagic.initialPassword, NBDMagic.option, flags.rawValue)
        case .optionReply(let reply):
            return writeNBDOptionReply(reply)
        case .exportNameReply(let size, let flags, let zeroPadding):
            var written = writeMultipleIntegers(size, flags.rawValue)
            if zeroPadding {
                written += writeRepeatingByte(0, count: NBDHandshakeMessage.exportNameZeroPaddingBytes)
            }
            return written
        }
    }
}
