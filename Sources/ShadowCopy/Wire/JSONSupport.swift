// JSON helpers shared by every message type.
//
// GUIDs go on the wire lowercase (INTERFACE.md), but Foundation's `UUID` encodes uppercase, so GUID
// fields are wrapped in `@GUIDCoding` (and its optional and list forms), which write lowercase and read
// either case. `JSONValue` carries what the protocol leaves open: a writer's Identify metadata.

import Foundation

@propertyWrapper
public struct GUIDCoding: Codable, Hashable, Sendable {
    public var wrappedValue: UUID
    public init(wrappedValue: UUID) { self.wrappedValue = wrappedValue }

    public init(from decoder: any Decoder) throws {
        wrappedValue = try UUID.decodeGUID(from: decoder.singleValueContainer())
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(wrappedValue.guidString)
    }
}

@propertyWrapper
public struct OptionalGUIDCoding: Codable, Hashable, Sendable {
    public var wrappedValue: UUID?
    public init(wrappedValue: UUID?) { self.wrappedValue = wrappedValue }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        wrappedValue = container.decodeNil() ? nil : try UUID.decodeGUID(from: container)
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        if let value = wrappedValue { try container.encode(value.guidString) } else { try container.encodeNil() }
    }
}

@propertyWrapper
public struct GUIDListCoding: Codable, Hashable, Sendable {
    public var wrappedValue: [UUID]
    public init(wrappedValue: [UUID]) { self.wrappedValue = wrappedValue }

    public init(from decoder: any Decoder) throws {
        let strings = try decoder.singleValueContainer().decode([String].self)
        wrappedValue = try strings.map { string in
            guard let id = UUID(uuidString: string) else {
                throw DecodingError.dataCorrupted(
                    .init(codingPath: decoder.codingPath, debugDescription: "'\(string)' is not a GUID")
                )
            }
            return id
        }
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(wrappedValue.map(\.guidString))
    }
}

// An absent optional GUID key decodes as nil and a nil one is left out, as for plain optionals.
extension KeyedDecodingContainer {
    public func decode(_ type: OptionalGUIDCoding.Type, forKey key: Key) throws -> OptionalGUIDCoding {
        try decodeIfPresent(type, forKey: key) ?? OptionalGUIDCoding(wrappedValue: nil)
    }
}

extension KeyedEncodingContainer {
    public mutating func encode(_ value: OptionalGUIDCoding, forKey key: Key) throws {
        if value.wrappedValue != nil { try encodeIfPresent(value, forKey: key) }
    }
}

extension UUID {
    /// The GUID as Umbra prints it: lowercase `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    var guidString: String { uuidString.lowercased() }

    fileprivate static func decodeGUID(from container: any SingleValueDecodingContainer) throws -> UUID {
        let string = try container.decode(String.self)
        guard let id = UUID(uuidString: string) else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "'\(string)' is not a GUID")
        }
        return id
    }
}

/// Any JSON value, for the parts of the protocol that are free-form.
public enum JSONValue: Codable, Hashable, Sendable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        switch self {
        case .null: try container.encodeNil()
        case .bool(let value): try container.encode(value)
        case .number(let value): try container.encode(value)
        case .string(let value): try container.encode(value)
        case .array(let value): try container.encode(value)
        case .object(let value): try container.encode(value)
        }
    }
}

/// The one encoder and decoder configuration used for everything on the control socket, so that a
/// CLI printing a result prints exactly what the daemon sent.
public enum ControlJSON {
    public static func makeEncoder() -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }

    public static func makeDecoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }

    /// Encodes `value` as one JSON document, for a CLI's `--json` output.
    public static func string(_ value: some Encodable) throws -> String {
        String(decoding: try makeEncoder().encode(value), as: UTF8.self)
    }
}
