// The seam between the control server and the coordinator: how events reach a writer and answers
// come back, how connections are numbered, and what the server needs from any coordinator.

import Foundation

/// One event on its way to a writer; `requestID` is what the writer's answer must echo.
struct WriterEventDelivery: Sendable, Hashable {
    var requestID: Int64
    var event: WriterEvent
    var params: WriterEventParams
}

typealias WriterSink = @Sendable (WriterEventDelivery) -> Void

/// A writer's answer to an event.
enum WriterAnswer: Sendable, Hashable {
    case success(metadata: JSONValue?)
    case veto(WriterFailure, message: String)
}

/// A requester connection, as the server numbers them.
struct RequesterID: Hashable, Sendable {
    var rawValue: UInt64
}

/// What the server needs from a coordinator, whatever its provider and clock.
protocol SetCoordinating: Actor {
    func registerWriter(
        _ hello: HelloParams,
        id: WriterID,
        confirm: (UUID) -> Void,
        sink: @escaping WriterSink
    ) throws -> UUID
    func writerAnswered(_ writer: WriterID, requestID: Int64, answer: WriterAnswer)
    func writerDisconnected(_ writer: WriterID)
    func createSet(_ params: CreateSetParams, requester: RequesterID) async throws -> SnapshotSetResult
    func completeSet(_ id: UUID, requester: RequesterID) async throws -> SnapshotSetResult
    func abortSet(_ id: UUID, requester: RequesterID) async throws
    func requesterDisconnected(_ requester: RequesterID)
    func listWriters() -> WriterList
    func shutdown() async
}
