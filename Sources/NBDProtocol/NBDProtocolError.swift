/// A client broke a rule of the protocol. What follows depends on where: a malformed option
/// payload is answered with `NBD_REP_ERR_INVALID`; bad framing (magic numbers, unknown client
/// flags, a payload too large to read past) leaves no reply possible and ends the session with a
/// hard disconnect, which proto.md allows on any violation of a mandatory condition.
public struct NBDProtocolError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Code: Hashable, Sendable {
        /// An option payload that does not parse (answered with `ERR_INVALID`).
        case invalidOptionPayload
        case badOptionMagic
        case badRequestMagic
        case payloadTooLarge
        case unknownClientFlags
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// The errno a request would get for this violation if it could be answered with one.
    public var errno: NBDErrno { .einval }

    public var description: String { message }
}
