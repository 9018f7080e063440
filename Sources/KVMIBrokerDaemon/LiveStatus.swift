import Foundation
import KVMIBrokerCore
import KVMIBrokerPolicy
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// What `kvmi-broker status` shows, asked of the running broker over its control socket
/// (`ControlProtocol`, operation `status`). `kvmi-broker status --json` prints this document
/// (pretty, sorted keys, ISO 8601 dates); its fields are documented in service.md, "Live
/// status". New fields may be added; none is renamed or removed without raising `format`.
public struct LiveStatus: Codable, Sendable, Equatable {
    /// The document's format: 1.
    public static let currentFormat = 1

    public var format: Int
    public var broker: Broker
    /// The guest sessions (all of them, or those the GUEST argument names), by name then UUID.
    public var guests: [SessionStatus]

    public struct Broker: Codable, Sendable, Equatable {
        public var pid: Int32
        public var version: String
        public var startedAt: Date
        public var uptimeSeconds: Int64
        /// "policy" (the allow-policy decides) or "static" (`run --introspector`).
        public var mode: String
        /// Policy mode: the generation in force (1 at start, one more per good reload), the
        /// files it was read from, and whether the last reload was refused.
        public var policyGeneration: Int?
        public var policyFiles: [String]?
        public var lastReloadFailed: Bool?
        /// Static mode: the one introspector endpoint.
        public var staticIntrospector: String?
        /// libvirt's pid-to-domain identity check is on (off: `--insecure-no-libvirt-identity`).
        public var identityCheck: Bool
        /// The libvirt URI and whether the broker is connected now (nil with the check off).
        public var libvirtURI: String?
        public var libvirtConnected: Bool?
        /// The group that may read the status (`run --control-group`); nil: root only.
        public var controlGroup: String?
        /// Every session the broker holds, by what it waits for (whatever GUEST selects).
        public var sessions: Int
        public var hooked: Int
        public var waiting: Int
        public var notIntrospected: Int
        /// Introspectors with at least one flapping session (their tool accepts guests and lets
        /// go right after, over and over), by name; absent when none.
        public var flapping: [String]?
        /// Introspectors being drained (`kvmi-broker drain`); absent when none.
        public var draining: [IntrospectorDrains.Drain]?
    }
}

/// The broker's facts the live status shows besides its sessions. Nothing here is computed
/// until a status request comes: the sessions pay nothing for it.
public struct LiveStatusSource: Sendable {
    public var registry: SessionRegistry
    public var policy: PolicyStore?
    public var staticIntrospector: String?
    /// nil: the identity check is off.
    public var libvirtURI: String?
    public var libvirtConnected: (@Sendable () -> Bool)?
    public var controlGroup: String?
    /// The drains in force (nil: none shown).
    public var drains: IntrospectorDrains?
    public let pid: Int32
    public let startedAt: Date
    public let started: ContinuousClock.Instant

    public init(
        registry: SessionRegistry, policy: PolicyStore?, staticIntrospector: String?, libvirtURI: String?,
        libvirtConnected: (@Sendable () -> Bool)?, controlGroup: String? = nil, drains: IntrospectorDrains? = nil
    ) {
        self.drains = drains
        self.registry = registry
        self.policy = policy
        self.staticIntrospector = staticIntrospector
        self.libvirtURI = libvirtURI
        self.libvirtConnected = libvirtConnected
        self.controlGroup = controlGroup
        self.pid = getpid()
        self.startedAt = Date()
        self.started = .now
    }

    /// No session is named by the GUEST argument.
    public struct UnknownGuest: Error, Equatable {
        public var guest: String
        public var sessions: Int
    }

    /// The status now: O(guests) once (a copy inside the registry, the sorting and filtering
    /// outside it).
    public func status(guest: String?) async -> Result<LiveStatus, UnknownGuest> {
        var sessions = registry.unsortedSnapshot()
        var counts = SessionCounts()
        for session in sessions {
            if session.hooked {
                counts.hooked += 1
            } else if session.state == GuestSessionMachine.State.notIntrospected.description {
                counts.notIntrospected += 1
            } else {
                counts.waiting += 1
            }
        }
        let total = sessions.count
        let flapping = Set(sessions.filter { $0.flapping == true }.map { $0.introspector ?? "-" }).sorted()
        if let guest {
            let uuid = GuestUUID(guest).map { "\($0)" }
            sessions = sessions.filter { $0.uuid == uuid || $0.name == guest }
            if sessions.isEmpty { return .failure(UnknownGuest(guest: guest, sessions: total)) }
        }
        let snapshot = policy?.snapshot
        let broker = LiveStatus.Broker(
            pid: pid, version: BrokerVersion.string, startedAt: startedAt, uptimeSeconds: started.duration(to: .now).components.seconds,
            mode: policy == nil ? "static" : "policy", policyGeneration: snapshot?.generation,
            policyFiles: snapshot?.policy.files.filter { $0.status == .read }.map(\.path), lastReloadFailed: policy?.lastReloadFailed,
            staticIntrospector: policy == nil ? staticIntrospector : nil, identityCheck: libvirtURI != nil, libvirtURI: libvirtURI,
            libvirtConnected: libvirtURI == nil ? nil : (libvirtConnected?() ?? false), controlGroup: controlGroup, sessions: total,
            hooked: counts.hooked, waiting: counts.waiting, notIntrospected: counts.notIntrospected, flapping: flapping.isEmpty ? nil : flapping,
            draining: drains.flatMap { $0.all.isEmpty ? nil : $0.all })
        return .success(LiveStatus(format: LiveStatus.currentFormat, broker: broker, guests: SessionRegistry.sorted(sessions)))
    }
}

extension LiveStatus {
    /// The encoder `status --json` uses: a stable document (sorted keys, ISO 8601 dates).
    public static func encoder(pretty: Bool) -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.prettyPrinted, .sortedKeys] : [.sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }

    public static var decoder: JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }

    /// The human text: a header with the broker's facts, then one line per guest (with an
    /// indented line for a failure or an identity that is not libvirt's). Every string that
    /// came from a peer or a file is escaped.
    public func text(now: Date = Date()) -> String {
        func text(_ value: String, _ limit: Int = 128) -> String { escapedForLog(value, limit: limit) }
        var lines: [String] = []
        func age(_ seconds: Double) -> String { seconds < 1 ? "less than 1 s" : Duration.humanReadable(seconds: seconds.rounded(.down)) }
        let uptime = age(Double(broker.uptimeSeconds))
        lines.append("kvmi-broker \(text(broker.version, 32)) running as pid \(broker.pid), up \(uptime)")
        if broker.mode == "policy" {
            let files = broker.policyFiles ?? []
            lines.append(
                "policy: generation \(broker.policyGeneration ?? 0) from \(files.count) file\(files.count == 1 ? "" : "s")\(broker.lastReloadFailed == true ? " (the last reload failed: see the log)" : "")"
            )
            for file in files { lines.append("    \(text(file, 256))") }
        } else {
            lines.append("static configuration: introspector \(text(broker.staticIntrospector ?? "?", 256))")
        }
        if let uri = broker.libvirtURI {
            lines.append(
                "libvirt: \(text(uri, 256)) \(broker.libvirtConnected == true ? "connected" : "NOT connected (HELLOs are refused until it is)")")
            lines.append("identity checks: on (libvirt's pid-to-domain check)")
        } else {
            lines.append("libvirt: not used")
            lines.append("identity checks: OFF (--insecure-no-libvirt-identity: QEMUs are trusted on /proc alone)")
        }
        lines.append(
            "guests: \(broker.sessions) session\(broker.sessions == 1 ? "" : "s"): \(broker.hooked) hooked, \(broker.waiting) waiting, \(broker.notIntrospected) not introspected"
        )
        for drain in broker.draining ?? [] {
            let hooked = guests.filter { $0.hooked && $0.introspector == drain.introspector }
            let kept = hooked.filter { $0.required == true }.count
            lines.append(
                "draining: \(text(drain.introspector, 64)) for \(age(now.timeIntervalSince(drain.since))): \(hooked.count) guest\(hooked.count == 1 ? "" : "s") still hooked\(kept > 0 && !drain.allowUnmonitored ? " (\(kept) required, kept hooked)" : "")\(drain.allowUnmonitored ? "; required guests may run unmonitored" : "")"
            )
        }
        if let flapping = broker.flapping {
            lines.append(
                "flapping: \(flapping.map { text($0, 64) }.joined(separator: ", ")) (the tool lets go right after each hook; the back-off grows)")
        }
        for guest in guests {
            var line = "\(text(guest.name, 64)) \(text(guest.uuid, 40)) qemu pid \(guest.qemuPID): \(text(guest.state))"
            if let introspector = guest.introspector {
                line += "; introspector \(text(introspector, 64))"
                line += ", commands \(Self.list(guest.commands)), events \(Self.list(guest.events))"
            }
            if let since = guest.hookedSince {
                line += "; hooked for \(age(now.timeIntervalSince(since)))"
            }
            if guest.flapping == true { line += "; FLAPPING" }
            lines.append(line)
            if let identity = guest.identity, identity != "libvirt" { lines.append("    identity: \(text(identity, 64))") }
            if let failure = guest.lastFailure { lines.append("    last failure (\(guest.failures) in a row): \(text(failure, 512))") }
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// "all", "kernel defaults" or "2,4,6".
    static func list(_ ids: [Int32]?) -> String {
        guard let ids else { return "-" }
        if ids == [-1] { return "all" }
        if ids.isEmpty { return "kernel defaults" }
        return ids.map(String.init).joined(separator: ",")
    }
}
