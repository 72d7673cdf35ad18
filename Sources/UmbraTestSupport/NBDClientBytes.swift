import NBDProtocol
import NIOCore

// Client-side NBD byte builders shared by the protocol and server tests.
extension ByteBuffer {
    /// The payload of INFO/GO.
    public static func infoRequest(name: String, infos: [NBDInfoType] = []) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeNBDExportInfoRequest(NBDExportInfoRequest(exportName: name, infoTypes: infos))
        return buffer
    }

    /// The payload of LIST_META_CONTEXT/SET_META_CONTEXT.
    public static func metaContextRequest(name: String, queries: [String]) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeNBDMetaContextRequest(NBDMetaContextRequest(exportName: name, queries: queries))
        return buffer
    }

    /// An option as the client sends it.
    public static func option(_ option: NBDOption, _ payload: ByteBuffer = ByteBuffer()) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeNBDOption(option, payload: payload)
        return buffer
    }

    /// A request header, and its payload if any.
    public static func request(_ request: NBDRequest, payload: [UInt8] = []) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeNBDRequest(request)
        buffer.writeBytes(payload)
        return buffer
    }
}
