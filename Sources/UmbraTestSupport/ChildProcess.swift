import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// The directory holding the test binary, where SwiftPM also puts the package's executables.
public func builtProductsDirectory() -> String {
    let executable =
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    return (executable as NSString).deletingLastPathComponent
}

/// The path of an executable this package builds (e.g. `umbra`).
public func builtProduct(_ name: String) -> String {
    builtProductsDirectory() + "/" + name
}

/// A child process with pipes on its standard input and output, read line by line.
public final class ChildProcess: @unchecked Sendable {
    public let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private var buffer: [UInt8] = []

    public init(_ executable: String, _ arguments: [String], environment: [String: String]? = nil) throws {
        // Writing to a child that was killed must fail with EPIPE, not kill the test process.
        signal(SIGPIPE, SIG_IGN)
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if let environment { process.environment = environment }
        process.standardInput = input
        process.standardOutput = output
        try process.run()
    }

    public var processIdentifier: Int32 { process.processIdentifier }

    /// Writes bytes to the child's standard input (from a background thread, so a full pipe never
    /// blocks the caller while the child waits for its output to be read).
    public func send(_ bytes: [UInt8]) {
        let handle = input.fileHandleForWriting
        Thread.detachNewThread {
            try? handle.write(contentsOf: Data(bytes))
        }
    }

    /// The next line of output, or nil at end of output.
    public func readLine() -> String? {
        let handle = output.fileHandleForReading
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeFirst(newline + 1)
                return line
            }
            let chunk = handle.availableData
            if chunk.isEmpty { return nil }
            buffer.append(contentsOf: chunk)
        }
    }

    /// SIGKILL, then waits for the process to be gone.
    public func kill() {
        Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// Closes standard input and waits for the process to exit; returns its status.
    @discardableResult
    public func finish() -> Int32 {
        try? input.fileHandleForWriting.close()
        process.waitUntilExit()
        return process.terminationStatus
    }
}
