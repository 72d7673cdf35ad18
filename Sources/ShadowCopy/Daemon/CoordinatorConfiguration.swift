// The coordinator's limits: how long writers have to answer, the freeze window, how many may wait.

public struct CoordinatorConfiguration: Sendable, Hashable {
    /// How long a writer has to answer each event.
    public var eventTimeout: Duration
    /// The Freeze→Thaw limit of a set that does not choose its own.
    public var freezeWindow: Duration
    /// The largest Freeze→Thaw limit a requester may choose.
    public var freezeWindowMax: Duration
    /// Writers connected at once.
    public var writersMax: Int
    /// Requesters waiting for the set slot at once.
    public var waitingRequestersMax: Int
    /// The name the daemon gives in `hello`.
    public var serverName: String

    public init(
        eventTimeout: Duration = .seconds(30),
        freezeWindow: Duration = .seconds(60),
        freezeWindowMax: Duration = .seconds(3600),
        writersMax: Int = 256,
        waitingRequestersMax: Int = 64,
        serverName: String = "umbra"
    ) {
        self.eventTimeout = eventTimeout
        self.freezeWindow = freezeWindow
        self.freezeWindowMax = freezeWindowMax
        self.writersMax = writersMax
        self.waitingRequestersMax = waitingRequestersMax
        self.serverName = serverName
    }
}
