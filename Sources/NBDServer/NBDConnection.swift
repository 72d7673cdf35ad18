import NBDProtocol
import NIOCore

/// A client connection as seen from outside its event loop: by the registry (to drain it when its
/// export goes away) and by the server (to drain and close it at shutdown).
final class NBDConnection: NBDExportBinding, Sendable {
    let id: UInt64
    let channel: any Channel
    private let handler: NIOLoopBound<NBDConnectionHandler>

    /// Must be created on the channel's event loop.
    init(id: UInt64, channel: any Channel, handler: NBDConnectionHandler) {
        self.id = id
        self.channel = channel
        self.handler = NIOLoopBound(handler, eventLoop: channel.eventLoop)
    }

    var closed: EventLoopFuture<Void> { channel.closeFuture }

    func exportRemoved() -> EventLoopFuture<EventLoopFuture<Void>> {
        channel.eventLoop.submit { self.handler.value.drainForRemoval(on: self.channel.eventLoop) }
    }

    /// Starts draining for a server shutdown. The outer future completes once new requests are
    /// refused, the inner one once nothing is in flight. The connection stays open (answering
    /// `ESHUTDOWN`) until `close()`.
    func drainForShutdown() -> EventLoopFuture<EventLoopFuture<Void>> {
        channel.eventLoop.submit { self.handler.value.drainForShutdown(on: self.channel.eventLoop) }
    }

    /// The export this connection is in transmission with, if any.
    func boundExport() -> EventLoopFuture<(any NBDExport)?> {
        channel.eventLoop.submit { self.handler.value.export }
    }

    func close() -> EventLoopFuture<Void> {
        channel.close().flatMapErrorThrowing { error in
            if let error = error as? ChannelError, error == .alreadyClosed { return }
            throw error
        }
    }
}
