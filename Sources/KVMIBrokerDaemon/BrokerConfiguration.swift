import KVMIBrokerCore
import KVMIBrokerOS

/// The daemon's static configuration: one introspector and which guests it introspects.
/// (The allow-policy files replace the guest selection and lists later.)
public struct BrokerConfiguration: Sendable {
    public var channelSocketPath: String
    /// Group allowed to connect (mode 0660); nil keeps the socket root-only (0600).
    public var channelSocketGroup: UInt32?
    public var introspector: IntrospectorEndpoint
    /// SHA-1 of the shared secret; nil accepts any cookie (logged as unauthenticated).
    public var cookie: CookieHash?
    public var allowLists: Channel.AllowLists
    /// Guests to introspect; nil introspects every guest that connects.
    public var guests: Set<GuestUUID>?
    public var backoff: Backoff
    public var handshakeTimeout: Duration
    /// How long QEMU may take to answer a request.
    public var resultTimeout: Duration
    public var verifier: PeerVerifier
    /// Where the per-session status is written as JSON (nil: not written).
    public var statusFile: String?
    /// Who decides sessions: the allow-policy when set, else this static configuration.
    public var policy: PolicyStore?
    /// When set, a HELLO is accepted only if this source (libvirt) confirms the QEMU's identity,
    /// and the guest's name and metadata come from it, not from QEMU.
    public var identity: (any IdentitySource)?

    /// How long a new connection may stay silent before HELLO (QEMU sends it at once).
    public var helloTimeout: Duration = .seconds(2)
    /// Refused peers, logged with a rate limit (a flood of bad connections cannot flood the log).
    public var refusals = RateLimitedLog()
    /// Log lines one session may write per 10 s (a QEMU streaming events cannot flood the log).
    public var sessionLogLines = 30
    /// Handshakes in flight to one introspector at once; the rest queue in arrival order.
    public var handshakesPerIntrospector = BrokerDefaults.handshakesPerIntrospector
    /// Tells systemd the session counts and reload outcomes (STATUS=); nil outside `kvmi-broker run`.
    public var notifier: ServiceNotifier?
    /// Counts sessions, hooks, failures and reloads for `/metrics`; nil when metrics are off.
    public var metrics: BrokerMetrics?

    /// How long a hook must last before it resets the back-off: a tool that lets go sooner
    /// (a crash loop) meets a growing back-off and is shown as flapping (`GuestSessionMachine`).
    public var hookSurvival: Duration = .seconds(10)
    /// Wakes a session whose unix endpoint was absent or refused when the socket appears (nil:
    /// the back-off alone).
    public var endpointWatcher: EndpointWatcher? = .shared

    /// Introspectors being drained (`kvmi-broker drain`), applied to every decision.
    public var drains = IntrospectorDrains()

    /// Test equipment (nil in the daemon): called for each frame a session's reader takes, on
    /// the reactor's thread with the reader's lock held, before the frame is queued. A test
    /// holds the reader there to prove that nothing else waits for that lock (a session's
    /// cancellation handler must not).
    public var frameTaken: (@Sendable () -> Void)?

    /// The source of session decisions in force.
    public var plans: any PlanSource { policy ?? self }

    public init(
        channelSocketPath: String, channelSocketGroup: UInt32? = nil, introspector: IntrospectorEndpoint, cookie: CookieHash?,
        allowLists: Channel.AllowLists, guests: Set<GuestUUID>? = nil, backoff: Backoff = .default, handshakeTimeout: Duration = .seconds(10),
        resultTimeout: Duration = .seconds(10), verifier: PeerVerifier = PeerVerifier(), statusFile: String? = nil
    ) {
        self.channelSocketPath = channelSocketPath
        self.channelSocketGroup = channelSocketGroup
        self.introspector = introspector
        self.cookie = cookie
        self.allowLists = allowLists
        self.guests = guests
        self.backoff = backoff
        self.handshakeTimeout = handshakeTimeout
        self.resultTimeout = resultTimeout
        self.verifier = verifier
        self.statusFile = statusFile
    }

    /// Sessions decided by the allow-policy (the static introspector fields are then unused).
    public init(
        channelSocketPath: String, channelSocketGroup: UInt32? = nil, policy: PolicyStore, resultTimeout: Duration = .seconds(10),
        verifier: PeerVerifier = PeerVerifier(), statusFile: String? = nil
    ) {
        self.init(
            channelSocketPath: channelSocketPath, channelSocketGroup: channelSocketGroup, introspector: .unix(path: "/"), cookie: nil,
            allowLists: .kernelDefaults(.v12), guests: [], resultTimeout: resultTimeout, verifier: verifier, statusFile: statusFile)
        self.policy = policy
    }

    public func introspects(_ uuid: GuestUUID) -> Bool { guests?.contains(uuid) ?? true }
}
