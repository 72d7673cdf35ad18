import SystemPackage

/// What went wrong below the engine: a failed system call (with its errno), a simulated crash, or a
/// storage object used after it was closed.
public struct BlockIOError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// A system call failed with this errno.
        case system(Errno)
        /// The simulated machine crashed; nothing more reaches its storage.
        case simulatedCrash
        /// A read or write was asked to go somewhere it cannot (for example past the end of a device).
        case outOfBounds
        /// The file or device was closed.
        case closed
    }

    public var kind: Kind
    /// The call that failed, for people: `pwrite`, `fdatasync`, `open` …
    public var operation: String
    /// The file or directory it was about.
    public var path: String

    public init(_ kind: Kind, operation: String, path: String) {
        self.kind = kind
        self.operation = operation
        self.path = path
    }

    /// The errno for callers that map errors onto a wire protocol.
    public var errno: Errno {
        switch kind {
        case .system(let errno): errno
        case .simulatedCrash: .ioError
        case .outOfBounds: .invalidArgument
        case .closed: .badFileDescriptor
        }
    }

    public var description: String {
        switch kind {
        case .system(let errno): "\(operation) on \(path) failed: \(errno.description)"
        case .simulatedCrash: "\(operation) on \(path) failed: the simulated machine crashed"
        case .outOfBounds: "\(operation) on \(path) failed: the range lies outside the file"
        case .closed: "\(operation) on \(path) failed: the file is closed"
        }
    }
}
