import NBDProtocol
import NIOCore
import Synchronization

// Design note. The registry is the one piece of state shared by all connections, so it is touched
// only when exports come and go and when a connection picks its export (GO/EXPORT_NAME), never per
// request. A connection binds to an export atomically with the lookup (`bind`), under the same lock
// as `remove`, so removal can find every connection of the export it removes and tell each one to
// drain; `remove` returns once they have all closed.

/// Something bound to an export that must let go when the export is removed (a connection).
protocol NBDExportBinding: Sendable {
    /// The export was removed: answer what is in flight, refuse the rest with `ESHUTDOWN` until the
    /// client goes or a grace period passes, then close. The outer future completes once new requests
    /// are refused, the inner one once what was in flight is answered.
    func exportRemoved() -> EventLoopFuture<EventLoopFuture<Void>>
    /// Completes once the binding is gone (the connection closed).
    var closed: EventLoopFuture<Void> { get }
}

/// A removal under way: `draining` completes once every connection of the export refuses new
/// requests with `ESHUTDOWN`, `answered` once they have answered what was in flight, `closed` once
/// they have all closed.
struct NBDExportRemoval {
    var draining: [EventLoopFuture<Void>]
    var answered: [EventLoopFuture<Void>]
    var closed: [EventLoopFuture<Void>]
}

/// The exports a server offers, by name. Exports can be added and removed at any time; a new one is
/// servable as soon as `add` returns.
public final class NBDExportRegistry: Sendable {
    /// Chooses the default export (asked for with the empty name) from the export names, sorted.
    public typealias DefaultExportPolicy = @Sendable (_ sortedNames: [String]) -> String?

    private struct Entry {
        var export: any NBDExport
        var bindings: [UInt64: any NBDExportBinding] = [:]
    }

    private struct State {
        var entries: [String: Entry] = [:]
        var nextBindingID: UInt64 = 0
    }

    private let state = Mutex(State())
    private let defaultExportPolicy: DefaultExportPolicy

    /// - Parameter defaultExport: picks the export served for the empty name; by default the
    ///   first in name order.
    public init(defaultExport: @escaping DefaultExportPolicy = { $0.first }) {
        self.defaultExportPolicy = defaultExport
    }

    /// Adds `export`. Throws if its name is taken or its name, description, contexts or block
    /// size constraints could not be advertised.
    public func add(_ export: any NBDExport) throws(NBDError) {
        if let problem = Self.problem(with: export) {
            throw NBDError(.einval, "export \"\(export.name)\" cannot be served: \(problem)")
        }
        try state.withLock { state throws(NBDError) in
            guard state.entries[export.name] == nil else {
                throw NBDError(.einval, "an export named \"\(export.name)\" already exists")
            }
            state.entries[export.name] = Entry(export: export)
        }
    }

    /// Removes the export called `name`, tells every connection using it to drain, and waits until
    /// they have answered what was in flight. They go on answering `ESHUTDOWN` to anything more
    /// until the client disconnects or `NBDLimits.exportRemovalGraceMilliseconds` pass, then close.
    /// Returns false if there was no such export.
    @discardableResult
    public func remove(named name: String) async -> Bool {
        guard let removal = beginRemoval(named: name) else { return false }
        for future in removal.answered { try? await future.get() }
        return true
    }

    /// Removes the export and tells its connections to drain, without waiting.
    func beginRemoval(named name: String) -> NBDExportRemoval? {
        guard let removed = state.withLock({ $0.entries.removeValue(forKey: name) }) else { return nil }
        let bindings = Array(removed.bindings.values)
        let removals = bindings.map { $0.exportRemoved() }
        return NBDExportRemoval(
            draining: removals.map { $0.map { _ in } }, answered: removals.map { $0.flatMap { $0 } },
            closed: bindings.map(\.closed))
    }

    /// The export called `name`; the empty name means the default export.
    public func export(named name: String) -> (any NBDExport)? {
        state.withLock { state in resolve(name, in: state).map { state.entries[$0]!.export } }
    }

    /// Every export name, sorted.
    public var names: [String] { state.withLock { $0.entries.keys.sorted() } }

    /// Every export, sorted by name.
    public var exports: [any NBDExport] {
        state.withLock { state in state.entries.keys.sorted().map { state.entries[$0]!.export } }
    }

    // MARK: - Connections

    /// Looks `name` up and binds `binding` to the export found, atomically. Returns the export
    /// and the id to unbind with.
    func bind(_ name: String, _ binding: any NBDExportBinding) -> (export: any NBDExport, id: UInt64)? {
        state.withLock { state in
            guard let resolved = resolve(name, in: state) else { return nil }
            state.nextBindingID += 1
            let id = state.nextBindingID
            state.entries[resolved]!.bindings[id] = binding
            return (state.entries[resolved]!.export, id)
        }
    }

    /// Forgets a binding (its connection closed).
    func unbind(exportNamed name: String, id: UInt64) {
        state.withLock { state in _ = state.entries[name]?.bindings.removeValue(forKey: id) }
    }

    private func resolve(_ name: String, in state: State) -> String? {
        if !name.isEmpty { return state.entries[name] == nil ? nil : name }
        guard let chosen = defaultExportPolicy(state.entries.keys.sorted()), state.entries[chosen] != nil else {
            return nil
        }
        return chosen
    }

    private static func problem(with export: any NBDExport) -> String? {
        let limit = NBDLimits.maximumStringBytes
        if export.name.isEmpty { return "the name is empty (reserved for the default export)" }
        if export.name.utf8.count > limit || export.name.utf8.contains(0) {
            return "the name is longer than \(limit) bytes or contains NUL"
        }
        if export.description.utf8.count > limit || export.description.utf8.contains(0) {
            return "the description is longer than \(limit) bytes or contains NUL"
        }
        for context in export.metaContexts {
            // NAMESPACE:LEAF with both parts non-empty (a trailing colon is the query wildcard).
            guard let colon = context.firstIndex(of: ":"), colon != context.startIndex, !context.hasSuffix(":"),
                context.utf8.count <= limit, !context.utf8.contains(0),
                context != NBDMetaContextName.baseAllocation
            else { return "metadata context \"\(context)\" is not NAMESPACE:NAME or is reserved" }
        }
        if Set(export.metaContexts).count != export.metaContexts.count { return "a metadata context is listed twice" }
        if let violation = export.blockSize.violation(exportSize: export.size) { return violation }
        return nil
    }
}
