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

    public init(
        introspectorName: String, endpoint: IntrospectorEndpoint, cookie: CookieHash?, allowLists: Channel.AllowLists,
        handshakeTimeout: Duration, unhookTimeout: Duration, backoff: Backoff, required: Bool, rule: String
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
    }

    /// Same tool, same place, same secret, same ABI: the session can stay and only its lists change.
    public func sameIntrospector(as other: SessionPlan) -> Bool {
        introspectorName == other.introspectorName && endpoint == other.endpoint && cookie == other.cookie
            && allowLists.abi == other.allowLists.abi
    }
}

/// Decides sessions: the static configuration, or the allow-policy.
public protocol PlanSource: Sendable {
    /// The plan for a guest (nil: not introspected) and the reason, for the audit log.
    func plan(uuid: GuestUUID, name: String, metadata: GuestMetadata?) -> (SessionPlan?, String)
}

extension PlanSource {
    public func plan(uuid: GuestUUID, name: String) -> (SessionPlan?, String) { plan(uuid: uuid, name: name, metadata: nil) }
}

extension BrokerConfiguration: PlanSource {
    public func plan(uuid: GuestUUID, name: String, metadata: GuestMetadata?) -> (SessionPlan?, String) {
        guard introspects(uuid) else { return (nil, "not in the --guest list") }
        return (
            SessionPlan(
                introspectorName: "command-line", endpoint: introspector, cookie: cookie, allowLists: allowLists, handshakeTimeout: handshakeTimeout,
                unhookTimeout: .seconds(5), backoff: backoff, required: false, rule: "the command line"),
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
            return .success((next, warnings))
        } catch {
            return .failure(error)
        }
    }

    static func load(_ sources: PolicySources, generation: Int) throws(PolicyLoadError) -> (Snapshot, [PolicyDiagnostic]) {
        let (policy, warnings) = try Policy.load(sources)
        var cookies: [String: CookieHash] = [:]
        var problems: [PolicyDiagnostic] = []
        for introspector in policy.introspectors.values {
            guard let path = introspector.secretFile, cookies[path] == nil else { continue }
            do {
                cookies[path] = CookieHash(secret: try SecretFile.load(path))
            } catch {
                problems.append(
                    PolicyDiagnostic(.error, error.code, file: introspector.location.file, line: introspector.location.line, "SecretFile: \(error)"))
            }
        }
        guard problems.isEmpty else { throw PolicyLoadError(diagnostics: problems + warnings) }
        return (Snapshot(policy: policy, cookies: cookies, generation: generation), warnings)
    }

    public func plan(uuid: GuestUUID, name: String, metadata: GuestMetadata?) -> (SessionPlan?, String) {
        Self.plan(snapshot, uuid: uuid, name: name, metadata: metadata)
    }

    /// One decision from one snapshot: a session never mixes two policies.
    public static func plan(_ snapshot: Snapshot, uuid: GuestUUID, name: String, metadata: GuestMetadata? = nil) -> (SessionPlan?, String) {
        let decision = snapshot.policy.decide(GuestFacts(uuid: uuid, name: name, metadata: metadata))
        let where_ = decision.rule.map { " by \($0)" } ?? ""
        guard decision.introspected, let introspector = decision.introspector, let lists = decision.allowLists else {
            return (nil, "not introspected\(where_): \(decision.reason)")
        }
        let plan = SessionPlan(
            introspectorName: introspector.name, endpoint: introspector.endpoint, cookie: introspector.secretFile.flatMap { snapshot.cookies[$0] },
            allowLists: lists, handshakeTimeout: introspector.handshakeTimeout, unhookTimeout: introspector.unhookTimeout,
            backoff: introspector.backoff, required: decision.required, rule: decision.rule.map(\.description) ?? "-")
        return (plan, "introspected by \(introspector.name)\(where_) (policy generation \(snapshot.generation))")
    }
}
