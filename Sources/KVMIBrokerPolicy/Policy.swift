import KVMIBrokerCore

/// Where policy files come from: drop-in roots, each with `introspectors.d/` and `guests.d/`.
public struct PolicySources: Sendable, Equatable {
    /// The vendor defaults first, then the administrator's: `/usr/lib/kvmi-broker`, `/etc/kvmi-broker`.
    public static let defaultRoots = ["/usr/lib/kvmi-broker", "/etc/kvmi-broker"]

    /// Later roots override same-named files of earlier ones.
    public var roots: [String]
    /// Refuse files (and directories) not owned by root. Off for tests and unprivileged checks;
    /// files writable by group or others are refused either way.
    public var requireRootOwnership: Bool

    public init(roots: [String] = PolicySources.defaultRoots, requireRootOwnership: Bool = true) {
        self.roots = roots
        self.requireRootOwnership = requireRootOwnership
    }
}

/// A place in a policy file: the file, the line and the section (`guest prod`).
public struct RuleLocation: Sendable, Hashable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var section: String

    public init(file: String, line: Int, section: String) {
        self.file = file
        self.line = line
        self.section = section
    }

    /// `[guest prod] at /etc/kvmi-broker/guests.d/60-site.conf:12`
    public var description: String { "[\(section)] at \(file):\(line)" }
}

/// An error or warning with the file and line it is about.
public struct PolicyDiagnostic: Sendable, Equatable, CustomStringConvertible {
    public enum Severity: String, Sendable, Equatable {
        case error, warning
    }

    public var severity: Severity
    public var code: BrokerError.Code
    public var file: String?
    public var line: Int?
    public var message: String

    /// Longest message kept: each quoted piece of file text is already bounded (256 bytes), so
    /// this only bounds what another layer (GLib) may have quoted whole.
    public static let messageLimit = 2048

    /// `file` and `message` are escaped (`escapedForLog`): a diagnostic never carries a policy
    /// file's control bytes or an unbounded line to the terminal or the journal.
    public init(_ severity: Severity, _ code: BrokerError.Code = .invalidArgument, file: String?, line: Int?, _ message: String) {
        self.severity = severity
        self.code = code
        self.file = file.map { escapedForLog($0, limit: 4096) }
        self.line = line
        self.message = escapedForLog(message, limit: Self.messageLimit)
    }

    /// `file:line: message` for errors, `file:line: warning: message` for warnings.
    public var description: String {
        var place = ""
        if let file { place = line.map { "\(file):\($0): " } ?? "\(file): " }
        return severity == .error ? place + message : place + "warning: " + message
    }

    /// The same, as the broker's one error type.
    public var brokerError: BrokerError {
        BrokerError(code, message, at: file.map { name in line.map { "\(name):\($0)" } ?? name })
    }
}

/// A policy that did not load: every diagnostic found (errors and warnings), so `check` prints them all.
public struct PolicyLoadError: Error, Sendable, CustomStringConvertible {
    public var diagnostics: [PolicyDiagnostic]

    public init(diagnostics: [PolicyDiagnostic]) { self.diagnostics = diagnostics }

    public var errors: [PolicyDiagnostic] { diagnostics.filter { $0.severity == .error } }

    /// The first error as a BrokerError, its message saying how many there are.
    public var brokerError: BrokerError {
        let errors = self.errors
        guard var first = errors.first?.brokerError else { return BrokerError(.invalidArgument, "the policy did not load") }
        if errors.count > 1 { first.message += " (and \(errors.count - 1) more errors; run 'kvmi-broker policy check')" }
        return first
    }

    public var description: String { diagnostics.map(\.description).joined(separator: "\n") }
}

/// Who may be listening behind an introspector's endpoint.
public enum AllowedPeer: Sendable, Hashable, CustomStringConvertible {
    /// The uid owning the listening unix socket (SO_PEERCRED).
    case uid(UInt32)
    /// A user name, resolved by the daemon when it connects.
    case user(String)
    /// The vsock context id the connection must come back from.
    case cid(UInt32)

    public var description: String {
        switch self {
        case .uid(let uid): return "uid:\(uid)"
        case .user(let name): return "user:\(name)"
        case .cid(let cid): return "cid:\(cid)"
        }
    }
}

/// How the broker authenticates an introspector.
public enum IntrospectorAuthentication: String, Sendable, Equatable {
    /// The handshake cookie: the SHA-1 of `SecretFile=`'s bytes.
    case cookie
    /// `Authentication=none`: whoever answers at the endpoint is trusted (a `check` warning).
    case unauthenticated = "none"
}

/// An `[introspector NAME]` section.
public struct IntrospectorConfig: Sendable, Equatable {
    public var name: String
    /// `Endpoint=`: fixed, or per guest (`{uuid}`, `{name}`), expanded by `Policy.decide`.
    public var endpoint: EndpointTemplate
    /// The shared-secret file; the daemon loads it (the policy only records the path).
    public var secretFile: String?
    /// The line of `SecretFile=` in `location.file`, for errors about the secret itself.
    public var secretFileLine: Int?
    /// `.cookie` with a `secretFile`; `.unauthenticated` only when the section says `Authentication=none`.
    public var authentication: IntrospectorAuthentication
    public var abi: ABIGeneration
    public var handshakeTimeout: Duration
    public var unhookTimeout: Duration
    public var backoff: Backoff
    /// Who may be behind the endpoint (`AllowedPeer=`): for the connector to enforce. Empty for
    /// tcp (refused by the loader) and never empty for an abstract unix name (required there).
    public var allowedPeers: [AllowedPeer]
    public var summary: String?
    public var location: RuleLocation

    public static let defaultHandshakeTimeout = Duration.seconds(10)
    public static let defaultUnhookTimeout = Duration.seconds(5)
}

/// How a guest rule matches.
public enum GuestMatch: Sendable, Equatable {
    case uuids([GuestUUID])
    case names([String])
    /// `wanted` (nil) or `introspector:NAME`.
    case metadata([String?])
    /// OpenStack Nova's metadata: every key given must match.
    case nova(NovaMatch)

    /// The precedence class: UUID rules beat metadata rules beat Nova rules beat name rules.
    public var precedence: MatchClass {
        switch self {
        case .uuids: return .uuid
        case .metadata: return .metadata
        case .nova: return .nova
        case .names: return .name
        }
    }
}

/// A Nova rule's keys (`MatchNovaProject=` and friends). A rule may give several; all must
/// match (project and flavor, say). Within one key any value matches. nil: the key is absent.
public struct NovaMatch: Sendable, Equatable, Hashable {
    /// Keystone project ids, canonical (`NovaMetadata.canonicalID`).
    public var projects: [String]?
    /// Globs over the project name, as `MatchName=`.
    public var projectNames: [String]?
    /// Globs over the flavor name.
    public var flavors: [String]?
    /// Glance image UUIDs.
    public var images: [GuestUUID]?

    public init(projects: [String]? = nil, projectNames: [String]? = nil, flavors: [String]? = nil, images: [GuestUUID]? = nil) {
        self.projects = projects
        self.projectNames = projectNames
        self.flavors = flavors
        self.images = images
    }

    /// Whether the domain's Nova metadata satisfies every key. Unreadable metadata matches nothing.
    public func matches(_ nova: NovaMetadata) -> Bool {
        guard nova.problem == nil else { return false }
        if let projects {
            guard let id = nova.projectID.map(NovaMetadata.canonicalID), projects.contains(id) else { return false }
        }
        if let projectNames, !Self.anyGlob(projectNames, matches: nova.projectName) { return false }
        if let flavors, !Self.anyGlob(flavors, matches: nova.flavorName) { return false }
        if let images {
            guard let image = nova.imageID, images.contains(where: { $0.description == image }) else { return false }
        }
        return true
    }

    /// `MatchNovaProject=a;b with MatchNovaFlavor=m1.*`: for diagnostics (values escaped).
    public var keyText: String {
        var parts: [String] = []
        if let projects { parts.append("MatchNovaProject=\(projects.joined(separator: ";"))") }
        if let projectNames { parts.append("MatchNovaProjectName=\(projectNames.map { escapedForLog($0) }.joined(separator: ";"))") }
        if let flavors { parts.append("MatchNovaFlavor=\(flavors.map { escapedForLog($0) }.joined(separator: ";"))") }
        if let images { parts.append("MatchNovaImage=\(images.map(\.description).joined(separator: ";"))") }
        return parts.joined(separator: " with ")
    }

    /// Globs are checked by the compiler; one that does not compile matches nothing.
    private static func anyGlob(_ globs: [String], matches text: String?) -> Bool {
        guard let text else { return false }
        return globs.contains { glob in (try? NamePattern(glob))?.matches(text) ?? false }
    }
}

/// Precedence classes, strongest first.
public enum MatchClass: Int, Sendable, Comparable, CustomStringConvertible {
    case name = 1
    case nova = 2
    case metadata = 3
    case uuid = 4

    public static func < (lhs: MatchClass, rhs: MatchClass) -> Bool { lhs.rawValue < rhs.rawValue }

    /// The order a decision consults the classes in.
    public static let strongestFirst: [MatchClass] = [.uuid, .metadata, .nova, .name]

    public var description: String {
        switch self {
        case .uuid: return "UUID"
        case .metadata: return "metadata"
        case .nova: return "Nova metadata"
        case .name: return "name"
        }
    }
}

/// The ids a rule's names resolve to for one ABI generation.
public enum ResolvedLists: Sendable, Equatable {
    case resolved(Channel.AllowLists, commands: [String], events: [String])
    /// Names this generation does not have.
    case missing([String])
}

/// A `[guest NAME]` section.
public struct GuestRule: Sendable, Equatable {
    public var name: String
    public var match: GuestMatch
    /// nil: the introspector the domain's metadata names (metadata rules only).
    public var introspector: String?
    /// As written (names and `@groups`).
    public var commands: [String]
    public var events: [String]
    public var required: Bool
    public var summary: String?
    public var location: RuleLocation
    /// The section this one replaced (same name in an earlier file).
    public var replaced: RuleLocation?
    public var resolved: [ABIGeneration: ResolvedLists]
    /// Position in policy order (files in lexicographic order, then lines).
    public var order: Int
}

/// What the broker knows about a guest when it decides.
public struct GuestFacts: Sendable, Hashable {
    public var uuid: GuestUUID
    public var name: String
    public var metadata: GuestMetadata?
    /// OpenStack Nova's element, when the domain has one.
    public var nova: NovaMetadata?
    /// The UUID and name come from libvirt (the broker checked that this QEMU is that domain's),
    /// not from QEMU's unverified HELLO. Only then are per-guest endpoints (`{uuid}`, `{name}`)
    /// expanded; otherwise a guest whose introspector has one is not introspected.
    public var identityVerified: Bool

    public init(
        uuid: GuestUUID, name: String, metadata: GuestMetadata? = nil, nova: NovaMetadata? = nil, identityVerified: Bool = false
    ) {
        self.uuid = uuid
        self.name = name
        self.metadata = metadata
        self.nova = nova
        self.identityVerified = identityVerified
    }
}

/// The policy's answer for one guest.
public struct PolicyDecision: Sendable, Equatable {
    public var introspected: Bool
    public var introspector: IntrospectorConfig?
    /// The introspector's endpoint for this guest (`Endpoint=` with `{uuid}` and `{name}`
    /// expanded). Nil when not introspected, or when `explain` lacks a fact the template needs.
    public var endpoint: IntrospectorEndpoint?
    public var allowLists: Channel.AllowLists?
    /// The guest must not run unmonitored. Also true when a conflict or an unresolvable name
    /// keeps a required rule from applying: the policy fails closed.
    public var required: Bool
    /// The deciding rule; nil when no rule matched.
    public var rule: RuleLocation?
    public var matchedBy: MatchClass?
    /// Rules of the deciding class that gave the guest a different introspector.
    public var conflicts: [RuleLocation]
    /// Rules of the deciding class, same introspector, that the deciding (later) rule shadows.
    public var shadowed: [RuleLocation]
    /// One sentence, for logs and `explain`.
    public var reason: String

    /// What the broker must do with the guest.
    public enum Outcome: Sendable, Equatable {
        /// Connect the decision's introspector with its allow-lists.
        case introspected
        /// Leave the guest alone; it may run unmonitored.
        case notIntrospected
        /// A required rule (or `required="yes"` metadata) applies, but the decision cannot be
        /// served: rules that conflict, an introspector the policy does not define, names its
        /// ABI generation lacks. The policy fails closed: the guest must not start (the control
        /// server vetoes `prepare` and `start`) and must not run unmonitored.
        case requiredButUnservable
    }

    /// `introspected`, `notIntrospected`, or `requiredButUnservable` (`required` without `introspected`).
    public var outcome: Outcome {
        if introspected { return .introspected }
        return required ? .requiredButUnservable : .notIntrospected
    }

    static func denied(_ reason: String) -> PolicyDecision {
        PolicyDecision(
            introspected: false, introspector: nil, endpoint: nil, allowLists: nil, required: false, rule: nil, matchedBy: nil, conflicts: [],
            shadowed: [],
            reason: reason)
    }
}

/// The allow-policy: an immutable value. Reload builds a new one with `load` and swaps it in.
public struct Policy: Sendable {
    public let sources: PolicySources
    public let introspectors: [String: IntrospectorConfig]
    /// Guest rules in policy order.
    public let rules: [GuestRule]
    /// The files read, masked or overridden, in the order they were considered.
    public let files: [PolicyFileEntry]
    let index: RuleIndex
    /// Introspector sections a later file replaced, by name: for `dump`.
    var replacedIntrospectors: [String: RuleLocation] = [:]

    init(sources: PolicySources, introspectors: [String: IntrospectorConfig], rules: [GuestRule], files: [PolicyFileEntry]) {
        self.sources = sources
        self.introspectors = introspectors
        self.rules = rules
        self.files = files
        self.index = RuleIndex(rules)
    }

    /// Reads every file under `sources`, checks it, and builds the policy; throws with every
    /// diagnostic if anything is wrong. Warnings come back with a policy that loaded.
    public static func load(_ sources: PolicySources) throws(PolicyLoadError) -> (Policy, [PolicyDiagnostic]) {
        let collected = PolicyFileCollector.collect(sources)
        var compiler = PolicyCompiler(sources: sources)
        compiler.diagnostics = collected.diagnostics
        return try compiler.compile(collected.files, entries: collected.entries)
    }

    /// Builds a policy from in-memory files (`introspectors.d/…` or `guests.d/…` paths), in the
    /// order given: for tests and benchmarks; no hygiene checks.
    public static func compile(files: [(path: String, contents: String)]) throws(PolicyLoadError) -> (Policy, [PolicyDiagnostic]) {
        var compiler = PolicyCompiler(sources: PolicySources(roots: [], requireRootOwnership: false))
        var sources: [SourceFile] = []
        for file in files {
            let kind: SourceFile.Kind = file.path.contains("introspectors.d/") ? .introspectors : .guests
            sources.append(SourceFile(path: file.path, kind: kind, bytes: Array(file.contents.utf8)))
        }
        sources = sources.filter { $0.kind == .introspectors } + sources.filter { $0.kind == .guests }
        return try compiler.compile(sources, entries: sources.map { PolicyFileEntry(path: $0.path, status: .read, overrides: []) })
    }
}

/// One file the loader considered.
public struct PolicyFileEntry: Sendable, Equatable {
    public enum Status: Sendable, Equatable {
        case read
        /// A symlink to /dev/null: hides same-named files of earlier roots.
        case masked
    }

    public var path: String
    public var status: Status
    /// Same-named files of earlier roots this one hides.
    public var overrides: [String]
}
