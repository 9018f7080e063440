import KVMIBrokerCore
import KVMIBrokerOS
import KVMIBrokerPolicy
import Synchronization

/// What one guest's session does, as decided by the configuration or the policy at one moment.
public struct SessionPlan: Sendable, Equatable {
    public var introspectorName: String
    public var endpoint: IntrospectorEndpoint
    public var cookie: CookieHash?
    public var allowLists: Channel.AllowLists
    public var handshakeTimeout: Duration
    public var unhookTimeout: Duration
    public var backoff: Backoff
    public var required: Bool
    /// The deciding rule, for the audit log (`[guest x] at file:line`).
    public var rule: String
    /// The introspector's `AllowedPeer=`: who may be behind the endpoint. The connector checks
    /// it after connecting: for unix endpoints the listener's uid (SO_PEERCRED; `.user` names
    /// resolved with getpwnam when connecting), for vsock the cid. Empty: no peer check (the
    /// policy requires one for abstract unix names and refuses it for tcp).
    public var allowedPeers: [AllowedPeer]

    public init(
        introspectorName: String, endpoint: IntrospectorEndpoint, cookie: CookieHash?, allowLists: Channel.AllowLists,
        handshakeTimeout: Duration, unhookTimeout: Duration, backoff: Backoff, required: Bool, rule: String, allowedPeers: [AllowedPeer] = []
    ) {
        self.introspectorName = introspectorName
        self.endpoint = endpoint
        self.cookie = cookie
        self.allowLists = allowLists
        self.handshakeTimeout = handshakeTimeout
        self.unhookTimeout = unhookTimeout
        self.backoff = backoff
        self.required = required
        self.rule = rule
        self.allowedPeers = allowedPeers
    }

    /// Same tool, same place, same secret, same ABI, same allowed peers: the session can stay
    /// and only its lists change.
    public func sameIntrospector(as other: SessionPlan) -> Bool {
        introspectorName == other.introspectorName && endpoint == other.endpoint && cookie == other.cookie
            && allowLists.abi == other.allowLists.abi && allowedPeers == other.allowedPeers
    }

    /// What QEMU stores and echoes after a broker restart (channel version 2) to say which
    /// introspector it was hooked with: SHA-256 over what `sameIntrospector` compares except
    /// the secret (QEMU is not given anything derived from it, not even a hash; a secret changed
    /// while the broker was down is therefore not detected at a restart, only by a reload).
    public var introspectorID: [UInt8] {
        var bytes = Array("kvmi-broker introspector\0".utf8)
        // Each field length-prefixed: no choice of names can make two introspectors collide.
        let fields = [introspectorName, "\(endpoint)", "\(allowLists.abi)", cookie == nil ? "no secret" : "secret"] + allowedPeers.map { "\($0)" }
        for field in fields {
            bytes.append(UInt32(field.utf8.count), order: .little)
            bytes += Array(field.utf8)
        }
        return sha256(bytes)
    }

    /// Channel version 2's tail for HOOK and SET_ALLOWED with these lists.
    public func applied(_ lists: Channel.AllowLists) -> Channel.Applied {
        Channel.Applied(introspector: introspectorID, lists: lists.digest)!
    }
}

/// One decision for a guest, with what "not introspected" means made explicit.
public enum PlanDecision: Sendable, Equatable {
    /// Introspect with this plan.
    case introspect(SessionPlan)
    /// Not introspected: the guest may run unmonitored.
    case notIntrospected
    /// The policy requires the guest to be introspected but the decision cannot be served
    /// (conflicting rules, an introspector the policy does not define, names its ABI lacks).
    /// It fails closed: the control server vetoes `prepare`/`start`, and a running guest must
    /// not be released to run unmonitored. `rule` is the deciding rule (`[guest x] at file:line`).
    case requiredButUnservable(rule: String)

    public var plan: SessionPlan? {
        if case .introspect(let plan) = self { return plan }
        return nil
    }
}

extension SessionPlan {
    /// `AllowedPeer` as the connector checks it; nil when the policy names none.
    public var peerRequirement: PeerRequirement? {
        guard !allowedPeers.isEmpty else { return nil }
        var requirement = PeerRequirement()
        for peer in allowedPeers {
            switch peer {
            case .uid(let uid): requirement.uids.insert(uid)
            case .user(let name): requirement.users.append(name)
            case .cid(let cid): requirement.cids.insert(cid)
            }
        }
        return requirement
    }
}

/// Decides sessions: the static configuration, or the allow-policy.
public protocol PlanSource: Sendable {
    /// The decision with "required but unservable" explicit, and the reason (one line, peer
    /// text escaped). `nova`: OpenStack Nova's metadata, for `MatchNova*=` rules.
    /// `identityVerified`: the UUID and name are libvirt's (checked against the peer), not
    /// QEMU's HELLO alone; per-guest endpoints are expanded only then.
    func decide(uuid: GuestUUID, name: String, metadata: GuestMetadata?, nova: NovaMetadata?, identityVerified: Bool) -> (
        PlanDecision, String
    )
}

extension PlanSource {
    /// The plan for a guest (nil: not introspected, which includes "required but unservable":
    /// use `decide` to tell them apart) and the reason, for the audit log.
    public func plan(
        uuid: GuestUUID, name: String, metadata: GuestMetadata? = nil, nova: NovaMetadata? = nil, identityVerified: Bool = false
    ) -> (SessionPlan?, String) {
        let (decision, reason) = decide(uuid: uuid, name: name, metadata: metadata, nova: nova, identityVerified: identityVerified)
        return (decision.plan, reason)
    }

    /// The decision without Nova metadata, for an identity libvirt did not verify (per-guest
    /// endpoints refused).
    public func decide(uuid: GuestUUID, name: String, metadata: GuestMetadata?) -> (PlanDecision, String) {
        decide(uuid: uuid, name: name, metadata: metadata, nova: nil, identityVerified: false)
    }
}

extension BrokerConfiguration: PlanSource {
    /// The decision of the source in force (`plans`), made without boxing this configuration
    /// into an `any PlanSource`: that copied every field of it, several times for each guest.
    func decidePlan(uuid: GuestUUID, name: String, metadata: GuestMetadata?, nova: NovaMetadata?, identityVerified: Bool) -> (
        PlanDecision, String
    ) {
        if let policy { return policy.decide(uuid: uuid, name: name, metadata: metadata, nova: nova, identityVerified: identityVerified) }
        return decide(uuid: uuid, name: name, metadata: metadata, nova: nova, identityVerified: identityVerified)
    }

    /// One fixed endpoint for every guest: never fails closed, a plan or nothing.
    public func decide(uuid: GuestUUID, name: String, metadata: GuestMetadata?, nova: NovaMetadata?, identityVerified: Bool) -> (
        PlanDecision, String
    ) {
        guard introspects(uuid) else { return (.notIntrospected, "not in the --guest list") }
        return (
            .introspect(
                SessionPlan(
                    introspectorName: "command-line", endpoint: introspector, cookie: cookie, allowLists: allowLists,
                    handshakeTimeout: handshakeTimeout, unhookTimeout: .seconds(5), backoff: backoff, required: false, rule: "the command line")),
            "introspected by the command-line configuration"
        )
    }
}

/// The allow-policy in force, swapped atomically on reload. A reload parses every file and
/// loads every secret into a new immutable snapshot first; on any error the old one stays.
public final class PolicyStore: PlanSource {
    public struct Snapshot: Sendable {
        public let policy: Policy
        /// Secret file path -> cookie, loaded with the policy.
        public let cookies: [String: CookieHash]
        public let generation: Int
    }

    private let sources: PolicySources
    private let current: Mutex<Snapshot>
    private let reloadFailed = Atomic<Bool>(false)

    /// The last reload was refused (the snapshot in force is older than the files on disk).
    public var lastReloadFailed: Bool { reloadFailed.load(ordering: .relaxed) }

    /// Loads the policy; throws with every diagnostic (file:line) if it does not load.
    public init(sources: PolicySources) throws(PolicyLoadError) {
        self.sources = sources
        current = Mutex(try Self.load(sources, generation: 1).0)
    }

    public var snapshot: Snapshot { current.withLock { $0 } }

    /// Builds a new snapshot and swaps it in; on failure the old one stays and the error says why.
    public func reload() -> Result<(Snapshot, [PolicyDiagnostic]), PolicyLoadError> {
        let generation = snapshot.generation + 1
        do {
            let (next, warnings) = try Self.load(sources, generation: generation)
            current.withLock { $0 = next }
            reloadFailed.store(false, ordering: .relaxed)
            return .success((next, warnings))
        } catch {
            reloadFailed.store(true, ordering: .relaxed)
            return .failure(error)
        }
    }

    static func load(_ sources: PolicySources, generation: Int) throws(PolicyLoadError) -> (Snapshot, [PolicyDiagnostic]) {
        let (policy, cookies, warnings) = try loadWithSecrets(sources)
        return (Snapshot(policy: policy, cookies: cookies, generation: generation), warnings)
    }

    /// The policy and every secret it names, loaded exactly as the daemon loads them at start
    /// and on SIGHUP: `policy check` and the libvirt hook (with the broker down) use this too.
    /// A secret is held to the policy files' rules (`SecretFile.load` with the sources'
    /// `requireRootOwnership`); an error about it names the `SecretFile=` line.
    public static func loadWithSecrets(_ sources: PolicySources) throws(PolicyLoadError) -> (
        policy: Policy, cookies: [String: CookieHash], warnings: [PolicyDiagnostic]
    ) {
        let (policy, warnings) = try Policy.load(sources)
        var cookies: [String: CookieHash] = [:]
        var problems: [PolicyDiagnostic] = []
        var failed: [String: BrokerError] = [:]
        let ordered = policy.introspectors.values.sorted { ($0.location.file, $0.location.line) < ($1.location.file, $1.location.line) }
        for introspector in ordered {
            guard let path = introspector.secretFile, cookies[path] == nil else { continue }
            var problem = failed[path]
            if problem == nil {
                do {
                    cookies[path] = CookieHash(secret: try SecretFile.load(path, requireRootOwnership: sources.requireRootOwnership))
                } catch {
                    failed[path] = error
                    problem = error
                }
            }
            if let problem {
                problems.append(
                    PolicyDiagnostic(
                        .error, problem.code, file: introspector.location.file,
                        line: introspector.secretFileLine ?? introspector.location.line, "SecretFile=: \(problem)"))
            }
        }
        guard problems.isEmpty else { throw PolicyLoadError(diagnostics: warnings + problems) }
        return (policy, cookies, warnings)
    }

    public func decide(uuid: GuestUUID, name: String, metadata: GuestMetadata?, nova: NovaMetadata?, identityVerified: Bool) -> (
        PlanDecision, String
    ) {
        Self.decide(snapshot, uuid: uuid, name: name, metadata: metadata, nova: nova, identityVerified: identityVerified)
    }

    /// One decision from one snapshot: a session never mixes two policies.
    public static func plan(
        _ snapshot: Snapshot, uuid: GuestUUID, name: String, metadata: GuestMetadata? = nil, nova: NovaMetadata? = nil,
        identityVerified: Bool = false
    ) -> (SessionPlan?, String) {
        let (decision, reason) = decide(snapshot, uuid: uuid, name: name, metadata: metadata, nova: nova, identityVerified: identityVerified)
        return (decision.plan, reason)
    }

    /// The same, with "required but unservable" explicit. The plan's endpoint is the
    /// introspector's, expanded for this guest when it is per guest (so pacing, back-off and
    /// hand-overs are per expanded endpoint).
    public static func decide(
        _ snapshot: Snapshot, uuid: GuestUUID, name: String, metadata: GuestMetadata? = nil, nova: NovaMetadata? = nil,
        identityVerified: Bool = false
    ) -> (PlanDecision, String) {
        let decision = snapshot.policy.decide(
            GuestFacts(uuid: uuid, name: name, metadata: metadata, nova: nova, identityVerified: identityVerified))
        let where_ = decision.rule.map { " by \($0)" } ?? ""
        switch decision.outcome {
        case .introspected:
            guard let introspector = decision.introspector, let lists = decision.allowLists, let endpoint = decision.endpoint else { break }
            let plan = SessionPlan(
                introspectorName: introspector.name, endpoint: endpoint,
                cookie: introspector.secretFile.flatMap { snapshot.cookies[$0] }, allowLists: lists,
                handshakeTimeout: introspector.handshakeTimeout, unhookTimeout: introspector.unhookTimeout, backoff: introspector.backoff,
                required: decision.required, rule: decision.rule.map(\.description) ?? "-", allowedPeers: introspector.allowedPeers)
            let at = introspector.endpoint.isPerGuest ? " at \(escapedForLog(endpoint.description))" : ""
            return (.introspect(plan), "introspected by \(introspector.name)\(at)\(where_) (policy generation \(snapshot.generation))")
        case .requiredButUnservable:
            let rule = decision.rule.map(\.description) ?? "the domain's metadata (required=\"yes\")"
            return (
                .requiredButUnservable(rule: rule),
                "required (fail closed) but cannot be introspected\(where_): \(decision.reason) (policy generation \(snapshot.generation))"
            )
        case .notIntrospected:
            break
        }
        return (.notIntrospected, "not introspected\(where_): \(decision.reason)")
    }
}
