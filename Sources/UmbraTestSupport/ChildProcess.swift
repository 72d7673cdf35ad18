import Foundation
import Synchronization

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

    private let errors = Pipe()
    private let collectedErrors = Mutex<[UInt8]>([])
    private let errorsDone = DispatchSemaphore(value: 0)
    private let capturesErrors: Bool

    /// Starts `executable`. With `captureStandardError`, its stderr is collected (read it with
    /// `standardErrorText` after `finish()`); otherwise it goes to this process's stderr.
    public init(
        _ executable: String, _ arguments: [String], environment: [String: String]? = nil,
        captureStandardError: Bool = false
    ) throws {
        // Writing to a child that was killed must fail with EPIPE, not kill the test process.
        signal(SIGPIPE, SIG_IGN)
        capturesErrors = captureStandardError
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if let environment { process.environment = environment }
        process.standardInput = input
        process.standardOutput = output
        if captureStandardError { process.standardError = errors }
        try process.run()
        if captureStandardError {
            let handle = errors.fileHandleForReading
            let done = errorsDone
            Thread.detachNewThread { [self] in
                while true {
                    let chunk = handle.availableData
                    if chunk.isEmpty { break }
                    collectedErrors.withLock { $0.append(contentsOf: chunk) }
                }
                done.signal()
            }
        }
    }

    /// Everything the child wrote to stderr (with `captureStandardError`), once it has exited.
    public var standardErrorText: String {
        guard capturesErrors else { return "" }
        errorsDone.wait()
        errorsDone.signal()
        return String(decoding: collectedErrors.withLock { $0 }, as: UTF8.self)
    }

    /// Runs `executable` to its end: its exit status, what it wrote to stdout (as `readAll` gives
    /// it) and what it wrote to stderr.
    public static func run(_ executable: String, _ arguments: [String]) throws -> (
        status: Int32, output: String, errors: String
    ) {
        let process = try ChildProcess(executable, arguments, captureStandardError: true)
        let output = process.readAll()
        let status = process.finish()
        return (status, output, process.standardErrorText)
    }

    /// Runs `executable` to its end and returns what it wrote to stdout; a non-zero exit status
    /// throws `Failed` with what it wrote to stderr.
    @discardableResult
    public static func output(_ executable: String, _ arguments: [String]) throws -> String {
        let result = try run(executable, arguments)
        guard result.status == 0 else {
            throw Failed(
                description:
                    "\(executable) \(arguments.joined(separator: " ")) failed (\(result.status)): \(result.errors)")
        }
        return result.output
    }

    /// A child that `output` ran exited with a non-zero status.
    public struct Failed: Error, CustomStringConvertible {
        public let description: String
    }

    /// The rest of the child's standard output, until it closes it.
    public func readAll() -> String {
        var lines: [String] = []
        while let line = readLine() { lines.append(line) }
        return lines.joined(separator: "\n")
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

    /// Waits for the process to exit, at most `seconds`; false if it is still running then.
    public func waitUntilExit(seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning {
            if Date() >= deadline { return false }
            usleep(10_000)
        }
        process.waitUntilExit()
        return true
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
