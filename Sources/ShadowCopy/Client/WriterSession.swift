// One writer connection's event handling, apart from the socket so that it reads top to bottom:
// each event in order, the freeze window's self-thaw timer, and the veto a late Thaw gets.

import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// The event handling of one connection, apart from the socket so that it reads top to bottom.
actor WriterSession<Delegate: ShadowCopyWriterDelegate> {
    private let delegate: Delegate
    private let clock: any Clock<Duration>
    private let logger: Logger
    /// The set this writer is frozen for, from a successful Freeze until Thaw or Abort.
    private var frozen: WriterEventContext?
    private var selfThawTimer: Task<Void, Never>?

    init(delegate: Delegate, clock: any Clock<Duration>, logger: Logger) {
        self.delegate = delegate
        self.clock = clock
        self.logger = logger
    }

    /// Runs one event and returns the line that answers it.
    func handle(_ message: IncomingMessage) async -> ByteBuffer {
        guard case .request(let method) = message.kind else {
            return ControlEncoding.result(id: message.id, EmptyResult())
        }
        guard let event = WriterEvent(rawValue: method) else {
            // Events added in later revisions of this protocol version: acknowledge, as the page says.
            return ControlEncoding.result(id: message.id, EmptyResult())
        }
        let context: WriterEventContext
        do {
            let params = try message.params(WriterEventParams.self)
            context = WriterEventContext(
                event: event,
                set: params.set,
                volumes: params.volumes,
                timeout: .milliseconds(params.timeoutMs),
                freezeWindow: params.freezeWindowMs.map { .milliseconds($0) },
                snapshots: params.snapshots ?? [],
                reason: params.reason
            )
        } catch {
            return ControlEncoding.veto(id: message.id, failure: .nonRetryable, message: error.message)
        }
        do {
            switch event {
            case .identify:
                let metadata = try await delegate.onIdentify(context)
                return ControlEncoding.result(id: message.id, IdentifyResult(metadata: metadata))
            case .prepareForBackup: try await delegate.onPrepareForBackup(context)
            case .prepareForSnapshot: try await delegate.onPrepareForSnapshot(context)
            case .freeze:
                try await delegate.onFreeze(context)
                frozen = context
                armSelfThaw(context)
            case .thaw:
                guard takeFrozen(for: context.set) else {
                    throw WriterVeto(.timeout, "The freeze window passed before Thaw; the writer thawed by itself.")
                }
                try await delegate.onThaw(context)
            case .postSnapshot: try await delegate.onPostSnapshot(context)
            case .backupComplete: try await delegate.onBackupComplete(context)
            case .abort:
                _ = takeFrozen(for: context.set)
                await delegate.onAbort(context)
            }
            return ControlEncoding.result(id: message.id, EmptyResult())
        } catch let veto as WriterVeto {
            return ControlEncoding.veto(id: message.id, failure: veto.failure, message: veto.message)
        } catch {
            return ControlEncoding.veto(id: message.id, failure: .nonRetryable, message: "\(error)")
        }
    }

    /// The daemon is gone: an application still frozen is told to abort.
    func connectionLost() async {
        guard let context = frozen else { return }
        _ = takeFrozen(for: context.set)
        logger.debug("connection lost while frozen; aborting", metadata: ["shadow.set": "\(context.set.guidString)"])
        await delegate.onAbort(abortContext(context, reason: "The connection to the daemon was lost while frozen."))
    }

    private func takeFrozen(for set: UUID) -> Bool {
        guard frozen?.set == set else { return false }
        frozen = nil
        selfThawTimer?.cancel()
        selfThawTimer = nil
        return true
    }

    private func armSelfThaw(_ context: WriterEventContext) {
        guard let window = context.freezeWindow else { return }
        selfThawTimer = Task { [clock] in
            do {
                try await clock.sleep(for: window)
            } catch {
                return
            }
            await self.selfThaw(set: context.set)
        }
    }

    private func selfThaw(set: UUID) async {
        guard let context = frozen, context.set == set else { return }
        _ = takeFrozen(for: set)
        await delegate.onAbort(abortContext(context, reason: "The freeze window passed with no Thaw."))
    }

    private func abortContext(_ context: WriterEventContext, reason: String) -> WriterEventContext {
        var context = context
        context.event = .abort
        context.reason = reason
        return context
    }
}
