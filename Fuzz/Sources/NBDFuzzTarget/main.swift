import NBDFuzzing

#if canImport(Glibc)
    import Glibc
#endif

// The fuzz target: each input is the bytes a client sends in one session (see NBDSessionFuzzer).
// A broken invariant traps with its description, so libFuzzer keeps the input as a crasher.
//
// SwiftPM links an executable with its own `main` (it renames the module's entry point), so
// libFuzzer's `main` is not used; this one hands the command line to libFuzzer's driver instead.

@_silgen_name("LLVMFuzzerRunDriver")
func runFuzzerDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ testOneInput: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

var argc = CommandLine.argc
var argv = CommandLine.unsafeArgv
let status = runFuzzerDriver(&argc, &argv) { data, count in
    let input = UnsafeBufferPointer(start: data, count: data == nil ? 0 : count)
    do {
        try NBDSessionFuzzer.run(input)
    } catch {
        fatalError("NBD fuzz finding: \(error)")
    }
    return 0
}
exit(status)
