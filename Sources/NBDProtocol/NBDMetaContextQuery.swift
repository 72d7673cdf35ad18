// Query syntax for metadata contexts (proto.md "Metadata querying", QEMU's docs/interop/nbd.rst).
//
// A query is a full context name (`base:allocation`, `qemu:dirty-bitmap:NAME`) or, for
// `NBD_OPT_LIST_META_CONTEXT` only, a prefix ending in a colon (`base:`, `qemu:`,
// `qemu:dirty-bitmap:`) that lists every context of the export starting with it. During
// `NBD_OPT_SET_META_CONTEXT` such a wildcard selects nothing, as the spec asks of an empty leaf name.
// Queries matching nothing (unknown namespaces, unknown leaf names) are ignored, never errors.

/// Matches metadata context queries against the contexts an export offers.
public enum NBDMetaContextQuery {
    /// The contexts `NBD_OPT_LIST_META_CONTEXT` reports for `queries` (all of them for none),
    /// in the export's order, each once.
    public static func list(queries: [String], available: [String]) -> [String] {
        if queries.isEmpty { return available }
        return available.filter { context in
            queries.contains { query in
                query.hasSuffix(":") ? context.hasPrefix(query) : context == query
            }
        }
    }

    /// The contexts `NBD_OPT_SET_META_CONTEXT` selects for `queries`: exact names only, in the
    /// export's order, each once.
    public static func select(queries: [String], available: [String]) -> [String] {
        available.filter { queries.contains($0) }
    }
}
