import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMIBrokerPolicy
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The control protocol between the libvirt hook (`kvmi-broker hook`), `kvmi-broker status`
/// and the broker: one JSON request line, one JSON answer line, on a unix socket. The hook's
/// operations are root's; `status` is also open to the `run --control-group` group.
public enum ControlProtocol {
    /// The longest request, and the longest answer to the hook.
    public static let maximumLine = 64 * 1024
    /// The longest status answer (a thousand guests take about 600 KiB).
    public static let maximumStatusAnswer = 64 << 20

    /// What every request has: the operation.
    struct Envelope: Decodable {
        var operation: String
    }

    /// `kvmi-broker status [GUEST]`: read-only.
    public struct StatusRequest: Codable, Sendable, Equatable {
        public var operation = "status"
        /// A guest's UUID or name; nil for every guest.
        public var guest: String?

        public init(guest: String?) { self.guest = guest }
    }

    /// The answer to `status`: the document, or an error and its code (`unknown-guest`,
    /// `permission-denied`, `busy`, `bad-request`).
    public struct StatusAnswer: Codable, Sendable, Equatable {
        public var status: LiveStatus?
        public var error: String?
        public var code: String?

        public init(status: LiveStatus?, error: String?, code: String?) {
            self.status = status
            self.error = error
            self.code = code
        }
    }

    /// `kvmi-broker drain INTROSPECTOR` / `undrain INTROSPECTOR`: root only.
    public struct DrainRequest: Codable, Sendable, Equatable {
        /// "drain" or "undrain".
        public var operation: String
        public var introspector: String
        /// Drain: required guests may be let go too (they then run unmonitored).
        public var allowUnmonitored: Bool?
        /// Drain: answer once every guest that is to be let go has been let go (bounded).
        public var wait: Bool?

        public init(operation: String, introspector: String, allowUnmonitored: Bool? = nil, wait: Bool? = nil) {
            self.operation = operation
            self.introspector = introspector
            self.allowUnmonitored = allowUnmonitored
            self.wait = wait
        }
    }

    /// The answer to `drain`/`undrain`: the progress, or an error and its code
    /// (`unknown-introspector`, `not-draining`, `permission-denied`, `bad-request`).
    public struct DrainAnswer: Codable, Sendable, Equatable {
        public var introspector: String?
        public var draining: Bool?
        public var allowUnmonitored: Bool?
        /// Guests hooked to the introspector when the request came.
        public var hookedBefore: Int?
        /// Guests still hooked to it now, and of those the required ones the drain keeps hooked.
        public var stillHooked: Int?
        public var requiredKept: Int?
        /// Every guest to be let go has been let go.
        public var done: Bool?
        public var error: String?
        public var code: String?

        public init(error: String, code: String) {
            self.error = error
            self.code = code
        }

        public init(introspector: String, draining: Bool, allowUnmonitored: Bool, hookedBefore: Int, stillHooked: Int, requiredKept: Int) {
            self.introspector = introspector
            self.draining = draining
            self.allowUnmonitored = allowUnmonitored
            self.hookedBefore = hookedBefore
            self.stillHooked = stillHooked
            self.requiredKept = requiredKept
            self.done = stillHooked == requiredKept
        }

        /// "2 of 3 guests let go; 1 required guest stays hooked".
        public var progress: String {
            let before = hookedBefore ?? 0
            let kept = requiredKept ?? 0
            let letGo = max(before - (stillHooked ?? 0), 0)
            var text = "\(letGo) of \(max(before - kept, 0)) guest\(before - kept == 1 ? "" : "s") let go"
            if kept > 0 {
                text += "; \(kept) required guest\(kept == 1 ? "" : "s") stay\(kept == 1 ? "s" : "") hooked (--allow-unmonitored lets them go)"
            }
            return text
        }
    }

    /// The refusal of a peer that may not ask what it asked: both the hook (`allow`, `reason`)
    /// and `status` (`error`, `code`) read it.
    struct Refusal: Encodable {
        var allow = false
        var reason: String
        var error: String
        var code = "permission-denied"

        init(_ why: String) {
            reason = why
            error = why
        }
    }

    public struct Request: Codable, Sendable, Equatable {
        /// The libvirt hook operation: prepare, start, started, stopped, release, ...
        public var operation: String
        public var uuid: String
        public var name: String
        /// Our metadata element from the domain XML, when present.
        public var metadataWanted: Bool?
        public var metadataIntrospector: String?
        public var metadataRequired: Bool?
        /// OpenStack Nova's element from the domain XML, when present (absent from older hooks).
        public var nova: NovaMetadata?

        public init(
            operation: String, uuid: String, name: String, metadataWanted: Bool?, metadataIntrospector: String?, metadataRequired: Bool?,
            nova: NovaMetadata? = nil
        ) {
            self.nova = nova
            self.operation = operation
            self.uuid = uuid
            self.name = name
            self.metadataWanted = metadataWanted
            self.metadataIntrospector = metadataIntrospector
            self.metadataRequired = metadataRequired
        }

        public var metadata: GuestMetadata? {
            metadataWanted.map { GuestMetadata(wanted: $0, introspector: metadataIntrospector, required: metadataRequired ?? false) }
        }
    }

    public struct Response: Codable, Sendable, Equatable {
        public var allow: Bool
        /// One line for people (virsh shows it when the start is vetoed).
        public var reason: String

        public init(allow: Bool, reason: String) {
            self.allow = allow
            self.reason = reason
        }
    }
}

/// Serves the hook: root-only (SO_PEERCRED), bounded in size and time. For `prepare` and
/// `start` it vetoes a guest the policy requires to be introspected when its introspector
/// cannot be reached; everything else is allowed and logged. It never calls libvirt (libvirt
/// is waiting for the hook).
///
/// Serves `status` too, to root and to members of `readers` (the socket is then mode 0660 in
/// that group; membership is checked again from SO_PEERCRED's gid and SO_PEERGROUPS). The
/// status is built only when asked (O(guests)), at most `maximumStatusAnswers` at once, and
/// written without blocking: a reader that does not read within `statusWriteTimeout` is
/// dropped.
public final class ControlServer: Sendable {
    let path: String
    let plans: any PlanSource
    let logger: Logger
    let io: AsyncSocketIO
    /// How long a reachability check may take.
    let probeTimeout: Duration
    /// Peers allowed besides root (tests run the hook as the same user).
    let allowedUID: UInt32
    /// The live status; nil: `status` is answered with an error.
    let status: LiveStatusSource?
    /// The group whose members may read the status (nil: root only).
    let readers: (gid: gid_t, name: String)?
    let maximumStatusAnswers = 4
    let statusWriteTimeout: Duration
    private let statusAnswers = Atomic<Int>(0)
    /// Counts an unreachable introspector of a required guest; nil when metrics are off.
    let metrics: BrokerMetrics?
    /// The drains the sessions apply (nil: `drain` is answered with an error).
    let drains: IntrospectorDrains?
    /// The daemon checks QEMUs against libvirt, so the guests it serves have the identity the
    /// hook reports and per-guest endpoints are expanded (and probed) for them. False with
    /// `--insecure-no-libvirt-identity`: the sessions refuse per-guest endpoints, so a required
    /// guest with one is vetoed here too.
    let libvirtIdentity: Bool

    public init(
        path: String, plans: any PlanSource, logger: Logger, probeTimeout: Duration = .seconds(2), io: AsyncSocketIO = AsyncSocketIO(),
        status: LiveStatusSource? = nil, readers: (gid: gid_t, name: String)? = nil, statusWriteTimeout: Duration = .seconds(10),
        metrics: BrokerMetrics? = nil, drains: IntrospectorDrains? = nil, libvirtIdentity: Bool = false
    ) {
        self.metrics = metrics
        self.drains = drains
        self.libvirtIdentity = libvirtIdentity
        self.path = path
        self.plans = plans
        self.logger = logger
        self.io = io
        self.probeTimeout = probeTimeout
        self.allowedUID = getuid()
        self.status = status
        self.readers = readers
        self.statusWriteTimeout = statusWriteTimeout
    }

    /// Binds the control socket, mode 0600 (root only) or 0660 in the readers' group, as
    /// `ServerSocket.bind` does: one broker per socket, a checked directory, no window with a
    /// wider mode.
    public func bind() throws -> Descriptor {
        try ServerSocket.bind(path: path, mode: readers == nil ? 0o600 : 0o660, group: readers?.gid, what: "control socket")
    }

    /// Who the peer is to this socket.
    enum Peer: Equatable {
        /// Root (or the broker's own user): every operation.
        case administrator
        /// A member of the readers' group: `status` only.
        case reader
        case nobody
    }

    func classify(_ connection: Int32, uid: uid_t, gid: gid_t) -> Peer {
        if uid == 0 || uid == allowedUID { return .administrator }
        guard let readers else { return .nobody }
        if gid == readers.gid || kvmib_peer_in_group(connection, readers.gid) == 1 { return .reader }
        return .nobody
    }

    /// Who may read the status, for messages.
    var whoMayRead: String {
        readers.map { "root and members of group \(escapedForLog($0.name, limit: 64)) may" }
            ?? "only root may (the broker runs without --control-group)"
    }

    /// Live control connections at most, and of those at most `maximumSilent` that have not
    /// sent their request yet (the oldest is shut down for a newer one). The hook and `status`
    /// send their line at once; with `--control-group` a non-root member can connect, and
    /// without these bounds it could hold descriptors the channel needs.
    public static let maximumConnections = 256
    public static let maximumSilent = 32
    let admission = ConnectionAdmission(maximumConnections: ControlServer.maximumConnections, maximumGreeting: ControlServer.maximumSilent)
    let clientFailures = RateLimitedLog()

    public func run(listener: Descriptor) async {
        let socketFile = ServerSocket.fileIdentity(path)
        await serveConnections(on: listener, io: io, logger: logger, what: "control", admission: admission) { connection in
            await self.serve(connection)
        }
        ServerSocket.remove(path: path, ifStill: socketFile)
    }

    private func serve(_ connection: Descriptor) async {
        var pid: pid_t = 0
        var uid: uid_t = 0
        var gid: gid_t = 0
        guard kvmib_peer_credentials(connection.raw, &pid, &uid, &gid) == 0 else {
            logger.warning("control socket: cannot tell who the client is (SO_PEERCRED failed); closing")
            return
        }
        let peer = classify(connection.raw, uid: uid, gid: gid)
        let deadline = ContinuousClock.now.advanced(by: .seconds(5))
        do {
            var line: [UInt8] = []
            let ticket = admission.greeting(connection)
            do {
                defer { admission.greeted(ticket) }
                while !line.contains(10) {
                    guard line.count < ControlProtocol.maximumLine else { throw BrokerError(.protocolViolation, "request line too long") }
                    let chunk = try await io.readSome(from: connection.raw, limit: 4096, until: deadline)
                    if chunk.isEmpty { throw BrokerError(.peerClosed, "the client closed before its request") }
                    line += chunk
                }
            }
            let body = Data(line.prefix { $0 != 10 })
            let operation = try JSONDecoder().decode(ControlProtocol.Envelope.self, from: body).operation
            let isStatus = operation == "status"
            guard peer == .administrator || (peer == .reader && isStatus) else {
                let why =
                    isStatus
                    ? "kvmi-broker: uid \(uid) may not read the status: \(whoMayRead)"
                    : "kvmi-broker: the hook's operations are root's; uid \(uid) may only read the status"
                clientFailures.log(
                    logger, "control socket: refusing '\(escapedForLog(operation, limit: 32))' to uid \(uid)",
                    metadata: ["peer.pid": "\(pid)", "peer.uid": "\(uid)"])
                try await write(ControlProtocol.Refusal(why), to: connection, until: deadline)
                return
            }
            if isStatus {
                let request = try JSONDecoder().decode(ControlProtocol.StatusRequest.self, from: body)
                try await answerStatus(request, to: connection)
                return
            }
            if operation == "drain" || operation == "undrain" {
                let request = try JSONDecoder().decode(ControlProtocol.DrainRequest.self, from: body)
                let answer = await answerDrain(request, uid: uid, pid: pid)
                try await write(answer, to: connection, until: .now.advanced(by: .seconds(5)))
                return
            }
            let request = try JSONDecoder().decode(ControlProtocol.Request.self, from: body)
            let response = await answer(request)
            try await write(response, to: connection, until: deadline)
        } catch {
            // Rate-limited: a client that floods the socket with silent connections cannot flood the log.
            clientFailures.log(logger, "control socket: \(escapedForLog("\(error)", limit: 512))", metadata: ["peer.pid": "\(pid)"])
        }
    }

    private func write(
        _ value: some Encodable, to connection: Descriptor, until deadline: ContinuousClock.Instant, encoder: JSONEncoder = JSONEncoder()
    ) async throws {
        var bytes = Array(try encoder.encode(value))
        bytes.append(10)
        try await io.writeAll(bytes, to: connection.raw, until: deadline)
    }

    /// The status (or why not) as one line, written within `statusWriteTimeout` through the
    /// reactor: a slow reader holds one task and its buffer, never a thread.
    private func answerStatus(_ request: ControlProtocol.StatusRequest, to connection: Descriptor) async throws {
        let answer: ControlProtocol.StatusAnswer
        if let status {
            guard statusAnswers.add(1, ordering: .relaxed).newValue <= maximumStatusAnswers else {
                statusAnswers.subtract(1, ordering: .relaxed)
                let busy = ControlProtocol.StatusAnswer(
                    status: nil, error: "the broker is answering \(maximumStatusAnswers) status requests already; try again", code: "busy")
                try await write(busy, to: connection, until: .now.advanced(by: statusWriteTimeout), encoder: LiveStatus.encoder(pretty: false))
                return
            }
            defer { statusAnswers.subtract(1, ordering: .relaxed) }
            switch await status.status(guest: request.guest) {
            case .success(let document):
                answer = .init(status: document, error: nil, code: nil)
            case .failure(let unknown):
                answer = .init(
                    status: nil,
                    error:
                        "no guest session named or with UUID '\(escapedForLog(unknown.guest, limit: 64))' (the broker holds \(unknown.sessions) session\(unknown.sessions == 1 ? "" : "s"))",
                    code: "unknown-guest")
            }
            do {
                try await write(answer, to: connection, until: .now.advanced(by: statusWriteTimeout), encoder: LiveStatus.encoder(pretty: false))
            } catch let error as BrokerError where error.code == .timedOut {
                throw BrokerError(
                    .timedOut,
                    "a status reader did not take its answer within \(Duration.humanReadable(seconds: Double(statusWriteTimeout.components.seconds))); dropped"
                )
            }
        } else {
            answer = .init(status: nil, error: "this broker serves no status on its control socket", code: "bad-request")
            try await write(answer, to: connection, until: .now.advanced(by: statusWriteTimeout), encoder: LiveStatus.encoder(pretty: false))
        }
    }

    /// Drain or undrain an introspector: applied by every session through a re-decision (the
    /// path a policy reload takes), audited; with `wait`, answered once the guests to be let go
    /// have been let go, or after the introspector's unhook timeout and 15 s more.
    func answerDrain(_ request: ControlProtocol.DrainRequest, uid: uid_t, pid: pid_t) async -> ControlProtocol.DrainAnswer {
        guard let drains, let registry = status?.registry else {
            return .init(error: "this broker cannot drain introspectors (it has no session registry)", code: "bad-request")
        }
        let name = request.introspector
        let shown = escapedForLog(name, limit: 64)
        let store = plans as? PolicyStore
        let known = store.map { Set($0.snapshot.policy.introspectors.keys) } ?? ["command-line"]
        let draining = request.operation == "drain"
        guard known.contains(name) || (!draining && drains.drain(of: name) != nil) else {
            return .init(
                error:
                    "no introspector named '\(shown)' in \(store.map { "the policy (generation \($0.snapshot.generation))" } ?? "the static configuration ('command-line')")",
                code: "unknown-introspector")
        }
        func progress() async -> (hooked: Int, required: Int) {
            DrainProgress.count(registry.unsortedSnapshot(), introspector: name)
        }
        let before = await progress()
        let metadata: Logger.Metadata = ["introspector": "\(shown)", "peer.uid": "\(uid)", "peer.pid": "\(pid)"]
        guard draining else {
            guard drains.undrain(name) != nil else { return .init(error: "introspector '\(shown)' is not draining", code: "not-draining") }
            logger.audit.notice("undrain \(shown): guests may be hooked to it again", metadata: metadata)
            registry.broadcastPolicyChange()
            return .init(
                introspector: name, draining: false, allowUnmonitored: false, hookedBefore: before.hooked, stillHooked: before.hooked, requiredKept: 0
            )
        }
        let allowUnmonitored = request.allowUnmonitored ?? false
        drains.drain(name, allowUnmonitored: allowUnmonitored)
        logger.audit.notice(
            "drain \(shown): no new guest is hooked to it; its \(before.hooked) hooked guest\(before.hooked == 1 ? "" : "s") are let go (PREUNHOOK, unhook timeout, UNHOOK)\(allowUnmonitored ? ", required ones too (--allow-unmonitored: they run unmonitored)" : "; required ones stay hooked")",
            metadata: metadata)
        registry.broadcastPolicyChange()
        var now = await progress()
        if request.wait == true {
            let unhookTimeout = store?.snapshot.policy.introspectors[name]?.unhookTimeout ?? .seconds(5)
            let deadline = ContinuousClock.now.advanced(by: unhookTimeout + .seconds(15))
            while now.hooked > (allowUnmonitored ? 0 : now.required), ContinuousClock.now < deadline {
                // Cancelled (the broker stops): answer with the progress so far, at once.
                guard (try? await Task.sleep(for: .milliseconds(100))) != nil else { break }
                now = await progress()
            }
        }
        let answer = ControlProtocol.DrainAnswer(
            introspector: name, draining: true, allowUnmonitored: allowUnmonitored, hookedBefore: before.hooked, stillHooked: now.hooked,
            requiredKept: allowUnmonitored ? 0 : now.required)
        if request.wait == true { logger.audit.notice("drain \(shown): \(answer.progress)", metadata: metadata) }
        return answer
    }

    func answer(_ request: ControlProtocol.Request) async -> ControlProtocol.Response {
        guard let uuid = GuestUUID(request.uuid) else {
            return .init(allow: false, reason: "the hook sent no valid UUID ('\(escapedForLog(request.uuid, limit: 64))')")
        }
        let name = escapedForLog(request.name)
        var logger = self.logger
        logger[metadataKey: "guest.uuid"] = "\(uuid)"
        logger[metadataKey: "guest.name"] = "\(name)"
        let (decided, why) = plans.decide(
            uuid: uuid, name: request.name, metadata: request.metadata, nova: request.nova, identityVerified: libvirtIdentity)
        // A guest being started is not hooked: while its introspector drains, a required one is
        // vetoed here (it would otherwise start and wait unmonitored), a best-effort one starts.
        let (decision, reason) = drains?.apply(decided, reason: why, hooked: false) ?? (decided, why)
        let operation = escapedForLog(request.operation, limit: 32)
        guard request.operation == "prepare" || request.operation == "start" else {
            logger.info("libvirt: \(operation)", metadata: ["policy": "\(reason)"])
            return .init(allow: true, reason: reason)
        }
        let plan: SessionPlan
        switch decision {
        case .notIntrospected:
            logger.audit.notice("libvirt \(operation): \(reason)")
            return .init(allow: true, reason: reason)
        case .requiredButUnservable(let rule):
            // Fail closed: a required guest whose decision cannot be served must not start.
            let why = "kvmi-broker: guest \(name) (\(uuid)) requires introspection per \(rule), but the policy cannot serve it: \(reason)"
            logger.audit.warning("vetoing the start: \(why)", metadata: ["policy.rule": "\(rule)"])
            return .init(allow: false, reason: why)
        case .introspect(let decided):
            plan = decided
        }
        guard plan.required else {
            logger.audit.notice(
                "libvirt \(operation): \(reason) (best-effort)",
                metadata: ["policy.rule": "\(plan.rule)", "introspector": "\(plan.introspectorName)"])
            return .init(allow: true, reason: reason)
        }
        // Required: the introspector must be reachable now, or the guest would run unmonitored.
        do {
            let socket = try await io.connect(to: plan.endpoint, until: .now.advanced(by: probeTimeout))
            socket.close()
            logger.audit.notice(
                "libvirt \(operation): \(reason) (required; introspector reachable)",
                metadata: ["policy.rule": "\(plan.rule)", "introspector": "\(plan.introspectorName)"])
            return .init(allow: true, reason: reason)
        } catch {
            metrics?.unreachable(introspector: plan.introspectorName)
            let why =
                "kvmi-broker: guest \(name) (\(uuid)) requires introspection by \(plan.introspectorName) per \(plan.rule), but \(plan.endpoint) is unreachable: \((error as? BrokerError)?.description ?? "\(error)")"
            logger.audit.warning("vetoing the start: \(why)", metadata: ["policy.rule": "\(plan.rule)", "introspector": "\(plan.introspectorName)"])
            return .init(allow: false, reason: why)
        }
    }
}

/// What `drain --wait` counts as not yet let go: guests hooked to the introspector, and guests
/// still being unhooked (PREUNHOOK sent, QEMU's UNHOOK not yet done: the kernel still holds
/// them, so stopping the tool now would drop hooked guests). An unhooking session shows no
/// introspector any more (the drained decision has none), so every unhooking one counts: a
/// wait may last for another introspector's unhook too, never end too early.
public enum DrainProgress {
    static let unhookingStates: Set<String> = [
        GuestSessionMachine.State.unhooking.description, GuestSessionMachine.State.updating.description,
    ]

    public static func count(_ sessions: [SessionStatus], introspector name: String) -> (hooked: Int, required: Int) {
        var hooked = 0
        var required = 0
        for session in sessions {
            let holding = session.hooked && session.introspector == name
            guard holding || unhookingStates.contains(session.state) else { continue }
            hooked += 1
            if holding && session.required == true { required += 1 }
        }
        return (hooked, required)
    }
}
