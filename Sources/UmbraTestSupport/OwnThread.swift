// Blocking work in async tests: a synchronous socket call or a wait on a condition holds its thread
// until it returns. On one of Swift's cooperative threads (two on a 2-core machine) that starves
// every other test running beside it, until handshake timeouts fire in unrelated suites.

import Foundation

/// Runs `body`, which may block, on a thread of its own and returns (or throws) what it did.
public func onOwnThread<Result: Sendable>(_ body: @escaping @Sendable () throws -> Result) async throws -> Result {
    try await withCheckedThrowingContinuation { continuation in
        Thread.detachNewThread { continuation.resume(with: Swift.Result { try body() }) }
    }
}

/// Runs `body`, which may block but cannot fail, on a thread of its own.
public func onOwnThread<Result: Sendable>(_ body: @escaping @Sendable () -> Result) async -> Result {
    await withCheckedContinuation { continuation in
        Thread.detachNewThread { continuation.resume(returning: body()) }
    }
}
