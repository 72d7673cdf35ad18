// The envelope every line carries, JSON-RPC-like and the same in both directions:
// a request `{"id", "method", "params"}`, answered by `{"id", "result"}` or `{"id", "error"}`.
//
// Decoding is two passes over the same bytes: the header (`id`, `method`, whether `error` is there)
// first, then `params` or `result` straight into the type the method calls for, so numbers never pass
// through a Double and unknown fields are ignored, as the versioning rules promise.

import Foundation
import NIOCore

/// A request id: an integer or a string, chosen by whoever sends the request and echoed in the answer.
public enum MessageID: Codable, Hashable, Sendable, CustomStringConvertible {
    case number(Int64)
    case string(String)

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let number = try? container.decode(Int64.self) {
            self = .number(number)
        } else {
            self = .string(try container.decode(String.self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .number(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        }
    }

    public var description: String {
        switch self {
        case .number(let value): "\(value)"
        case .string(let value): "\"\(value)\""
        }
    }
}

/// One received line, with its payload still undecoded.
struct IncomingMessage: Sendable {
    enum Kind: Sendable, Hashable {
        case request(method: String)
        case result
        case error(ShadowCopyError)
    }

    var id: MessageID
    var kind: Kind
    /// The whole line, for the second decoding pass.
    var json: Data

    private struct Header: Decodable {
        var id: MessageID?
        var method: String?
        var error: ShadowCopyError?
        var result: JSONValue?
    }

    private struct ParamsEnvelope<Params: Decodable>: Decodable {
        var params: Params?
    }

    private struct ResultEnvelope<Result: Decodable>: Decodable {
        var result: Result
    }

    /// Parses one line; a line that is not a well-formed message gets the `bad-message` error to send
    /// back (with the id, when one could be read).
    static func parse(_ line: ByteBuffer) -> Result<IncomingMessage, ErrorReply> {
        let json = Data(line.readableBytesView)
        let header: Header
        do {
            header = try ControlJSON.makeDecoder().decode(Header.self, from: json)
        } catch {
            return .failure(
                ErrorReply(id: nil, error: ShadowCopyError(.badMessage, "The message is not a JSON object."))
            )
        }
        guard let id = header.id else {
            return .failure(ErrorReply(id: nil, error: ShadowCopyError(.badMessage, "The message has no id.")))
        }
        if let method = header.method {
            return .success(IncomingMessage(id: id, kind: .request(method: method), json: json))
        }
        if let error = header.error {
            return .success(IncomingMessage(id: id, kind: .error(error), json: json))
        }
        if header.result != nil {
            return .success(IncomingMessage(id: id, kind: .result, json: json))
        }
        return .failure(
            ErrorReply(
                id: id,
                error: ShadowCopyError(.badMessage, "The message has neither a method nor a result nor an error.")
            )
        )
    }

    /// The request's `params` as `Params`; an absent `params` decodes as `{}`.
    func params<Params: Decodable>(_ type: Params.Type) throws(ShadowCopyError) -> Params {
        do {
            if let params = try ControlJSON.makeDecoder().decode(ParamsEnvelope<Params>.self, from: json).params {
                return params
            }
            return try ControlJSON.makeDecoder().decode(Params.self, from: Data("{}".utf8))
        } catch {
            throw ShadowCopyError(.invalidParams, "The params are not valid: \(Self.describe(error))")
        }
    }

    /// The response's `result` as `Result`.
    func result<Result: Decodable>(_ type: Result.Type) throws(ShadowCopyError) -> Result {
        do {
            return try ControlJSON.makeDecoder().decode(ResultEnvelope<Result>.self, from: json).result
        } catch {
            throw ShadowCopyError(.badMessage, "The result is not valid: \(Self.describe(error))")
        }
    }

    /// A short, human reading of a decoding error ("missing field 'volumes'").
    static func describe(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return "\(error)" }
        func path(_ context: DecodingError.Context) -> String {
            let keys = context.codingPath.map(\.stringValue).filter { $0 != "params" && $0 != "result" }
            return keys.isEmpty ? "the object" : "'\(keys.joined(separator: "."))'"
        }
        switch error {
        case .keyNotFound(let key, _): return "missing field '\(key.stringValue)'."
        case .typeMismatch(_, let context): return "\(path(context)) has the wrong type."
        case .valueNotFound(_, let context): return "\(path(context)) is null."
        case .dataCorrupted(let context):
            // Foundation's own wording names Swift types ("Cannot initialize … from invalid …").
            let reason =
                context.debugDescription.hasPrefix("Cannot initialize")
                ? "has a value that is not allowed" : context.debugDescription
            return "\(path(context)): \(reason)."
        @unknown default: return "\(error)"
        }
    }
}

/// An error answer, ready to send.
struct ErrorReply: Error, Sendable {
    var id: MessageID?
    var error: ShadowCopyError
}

enum ControlEncoding {
    private struct Request<Params: Encodable>: Encodable {
        var id: MessageID
        var method: String
        var params: Params
    }

    private struct Response<Result: Encodable>: Encodable {
        var id: MessageID
        var result: Result
    }

    private struct ErrorResponse<Body: Encodable>: Encodable {
        var id: MessageID?
        var error: Body
        enum CodingKeys: String, CodingKey { case id, error }
        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(id, forKey: .id)  // explicit null when unknown
            try container.encode(error, forKey: .error)
        }
    }

    static func request(id: MessageID, method: String, params: some Encodable) -> ByteBuffer {
        line(Request(id: id, method: method, params: params))
    }

    static func result(id: MessageID, _ result: some Encodable) -> ByteBuffer {
        line(Response(id: id, result: result))
    }

    static func error(_ reply: ErrorReply) -> ByteBuffer {
        line(ErrorResponse(id: reply.id, error: reply.error))
    }

    static func veto(id: MessageID, failure: WriterFailure, message: String) -> ByteBuffer {
        line(ErrorResponse(id: id, error: VetoBody(failure: failure, message: message)))
    }

    private static func line(_ value: some Encodable) -> ByteBuffer {
        var data: Data
        do {
            data = try ControlJSON.makeEncoder().encode(value)
        } catch {
            // Our own message types always encode; anything else is a bug worth seeing in the output.
            assertionFailure("control message failed to encode: \(error)")
            data = Data(#"{"id":null,"error":{"code":"internal","message":"A message failed to encode."}}"#.utf8)
        }
        data.append(UInt8(ascii: "\n"))
        return ByteBuffer(bytes: data)
    }
}
