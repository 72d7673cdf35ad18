// `umbra serve --stdio EXPORT`: one connection on stdin and stdout. stdout carries the protocol, so
// nothing else may ever be written to it: the server gets duplicates of descriptors 0 and 1, and 0
// and 1 themselves are pointed at /dev/null first, so a stray print cannot corrupt the stream (nor,
// once the connection has closed its descriptors, land in a file that reused the number). Logs go to
// stderr as always. SIGINT/SIGTERM shut the server down the usual way (requests in flight answered,
// the export flushed); otherwise the client's disconnect ends the run.
//
// Clients that spawn their server with systemd socket activation instead (nbdinfo's and nbdcopy's
// `[ CMD ]`: LISTEN_PID is this process, LISTEN_FDS=1, descriptor 3 a listening Unix socket) get the
// same single export on that socket, to as many connections as they open (nbdcopy opens several),
// until SIGTERM, which libnbd sends when it is done; nbdkit behaves the same way.

import Logging
import NBDServer

#if canImport(Glibc)
    import Glibc
#endif

extension Serve {
    static func serveStdio(_ name: String, nbd: NBDServer, logger: Logger) async throws {
        guard nbd.registry.export(named: name) != nil else {
            throw StdioError("there is no volume or snapshot named \"\(name)\" to serve over stdio")
        }
        // A client that goes away mid-reply must not kill the daemon before the export is flushed.
        signal(SIGPIPE, SIG_IGN)
        if let socket = activatedSocket() {
            try await nbd.listen(onListeningDescriptor: socket)
            logger.info("serving on the activation socket", metadata: ["nbd.export": "\(name)"])
            let number = await TerminationSignal.wait()
            logger.info("stopping", metadata: ["signal": "\(number.map { String($0) } ?? "none")"])
            await nbd.shutdown()
            return
        }
        let (input, output) = try takeStandardInputOutput()
        let watcher = Task {
            guard let number = await TerminationSignal.wait() else { return }
            logger.info("stopping", metadata: ["signal": "\(number)"])
            await nbd.shutdown()
        }
        logger.info("serving over stdio", metadata: ["nbd.export": "\(name)"])
        do {
            try await nbd.serveConnection(input: input, output: output)
        } catch {
            watcher.cancel()
            await watcher.value
            throw error
        }
        watcher.cancel()
        await watcher.value
        logger.info("stopped")
    }

    /// The listening socket passed by systemd-style socket activation, if this process was given one.
    private static func activatedSocket() -> CInt? {
        func number(_ name: String) -> Int? { getenv(name).flatMap { Int(String(cString: $0)) } }
        guard number("LISTEN_PID") == Int(getpid()), let count = number("LISTEN_FDS"), count >= 1 else { return nil }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        return 3  // SD_LISTEN_FDS_START
    }

    /// Duplicates of stdin and stdout for the server, with 0 and 1 themselves moved to /dev/null.
    private static func takeStandardInputOutput() throws -> (input: CInt, output: CInt) {
        for descriptor in [STDIN_FILENO, STDOUT_FILENO] {
            var status = stat()
            let kind = fstat(descriptor, &status) == 0 ? status.st_mode & S_IFMT : 0
            guard kind == S_IFSOCK || kind == S_IFIFO else {
                throw StdioError(
                    "--stdio needs stdin and stdout to be a pipe or socket to the NBD client (or socket activation)")
            }
        }
        let input = dup(STDIN_FILENO)
        let output = dup(STDOUT_FILENO)
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        guard input >= 0, output >= 0, null >= 0, dup2(null, STDIN_FILENO) >= 0, dup2(null, STDOUT_FILENO) >= 0
        else {
            throw StdioError("cannot take over stdin and stdout: \(String(cString: strerror(errno)))")
        }
        close(null)
        _ = fcntl(input, F_SETFD, FD_CLOEXEC)
        _ = fcntl(output, F_SETFD, FD_CLOEXEC)
        return (input, output)
    }
}

/// Why `--stdio` cannot serve, in one sentence.
private struct StdioError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
