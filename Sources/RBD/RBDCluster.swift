// A connection to a Ceph cluster through librados, and its pools. librbd's own calls are in
// RBDImage. Every call that waits for the cluster (connecting, creating, removing, listing) blocks
// its thread, so callers run them on threads that may block, never on an event loop.

import CRBD
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A librados or librbd call that failed, with the errno it returned.
public struct RBDError: Error, CustomStringConvertible, Sendable {
    /// What was being done, as a phrase ("opening image rbd/disk").
    public var operation: String
    /// A positive errno.
    public var errno: Int32
    /// Why, when the errno alone would mislead.
    public var reason: String?

    public init(_ operation: String, errno: Int32, reason: String? = nil) {
        self.operation = operation
        self.errno = abs(errno)
        self.reason = reason
    }

    public var description: String {
        if let reason { return "\(operation) failed: \(reason)" }
        let reason =
            switch errno {
            case ENOENT: "it does not exist"
            case ETIMEDOUT: "the cluster did not answer in time"
            case EACCES, EPERM: "permission denied (check the keyring and the client's capabilities)"
            default: String(cString: strerror(errno))
            }
        return "\(operation) failed: \(reason)"
    }

    /// Throws unless `result` (a librados/librbd return value) is zero or positive.
    @discardableResult
    static func check(_ result: Int32, _ operation: @autoclosure () -> String) throws(RBDError) -> Int32 {
        guard result >= 0 else { throw RBDError(operation(), errno: -result) }
        return result
    }
}

/// A connected cluster handle: one per daemon, shared by every image.
public final class RBDCluster: Sendable {
    nonisolated(unsafe) let handle: rados_t
    private let pools = Mutex<[String: RBDPool]>([:])
    /// The configuration file it was read from, for messages.
    public let configurationPath: String

    /// Reads `configurationPath` (and the keyring it names), and connects as `client.ID`. Requests
    /// that the cluster does not answer within `timeout` seconds fail with ETIMEDOUT rather than
    /// hang: connecting, monitor commands and every object operation.
    public init(configurationPath: String, id: String, timeout: Int) throws(RBDError) {
        self.configurationPath = configurationPath
        var cluster: rados_t?
        try RBDError.check(rados_create(&cluster, id), "creating a Ceph client as client.\(id)")
        guard let cluster else { throw RBDError("creating a Ceph client", errno: ENOMEM) }
        do throws(RBDError) {
            try RBDError.check(
                rados_conf_read_file(cluster, configurationPath), "reading the Ceph configuration \(configurationPath)")
            for option in ["rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"] {
                try RBDError.check(rados_conf_set(cluster, option, "\(timeout)"), "setting \(option)")
            }
            // The client's own log would otherwise go wherever ceph.conf says, or to stderr.
            rados_conf_set(cluster, "log_to_stderr", "false")
            let connected = rados_connect(cluster)
            let operation = "connecting to the Ceph cluster of \(configurationPath) as client.\(id)"
            if connected == -ENOENT {
                throw RBDError(
                    operation, errno: ENOENT,
                    reason: "no keyring with a key for client.\(id) was found (see `keyring` in the configuration)")
            }
            try RBDError.check(connected, operation)
        } catch {
            rados_shutdown(cluster)
            throw error
        }
        handle = cluster
    }

    deinit {
        pools.withLock { pools in pools.removeAll() }
        rados_shutdown(handle)
    }

    /// The pool named `name` (one I/O context per pool, kept for the cluster's lifetime).
    public func pool(_ name: String) throws(RBDError) -> RBDPool {
        if let pool = pools.withLock({ $0[name] }) { return pool }
        var context: rados_ioctx_t?
        try RBDError.check(rados_ioctx_create(handle, name, &context), "opening pool \(name)")
        guard let context else { throw RBDError("opening pool \(name)", errno: ENOMEM) }
        let pool = RBDPool(name: name, context: context, cluster: self)
        return pools.withLock { pools in
            if let existing = pools[name] { return existing }
            pools[name] = pool
            return pool
        }
    }
}

/// A pool's I/O context.
public final class RBDPool: Sendable {
    public let name: String
    nonisolated(unsafe) let context: rados_ioctx_t
    /// Kept so that the cluster outlives its pools.
    let cluster: RBDCluster

    init(name: String, context: rados_ioctx_t, cluster: RBDCluster) {
        self.name = name
        self.context = context
        self.cluster = cluster
    }

    deinit { rados_ioctx_destroy(context) }

    /// Creates an image of `size` bytes with the pool's default features (4 MiB objects).
    public func createImage(_ image: String, size: UInt64) throws(RBDError) {
        var order: Int32 = 0
        try RBDError.check(rbd_create(context, image, size, &order), "creating image \(name)/\(image)")
    }

    public func removeImage(_ image: String) throws(RBDError) {
        try RBDError.check(rbd_remove(context, image), "removing image \(name)/\(image)")
    }

    /// Opens `image` for reading and writing, or read-only at one of its snapshots.
    public func open(_ image: String, snapshot: String? = nil) throws(RBDError) -> RBDImage {
        var handle: rbd_image_t?
        let what = snapshot.map { "snapshot \($0) of image \(name)/\(image)" } ?? "image \(name)/\(image)"
        if let snapshot {
            try RBDError.check(rbd_open_read_only(context, image, &handle, snapshot), "opening \(what)")
        } else {
            try RBDError.check(rbd_open(context, image, &handle, nil), "opening \(what)")
        }
        guard let handle else { throw RBDError("opening \(what)", errno: ENOMEM) }
        return RBDImage(handle: handle, pool: self, name: image, snapshot: snapshot)
    }
}
