import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One guest's session as the status view shows it.
public struct SessionStatus: Sendable, Codable, Equatable {
    public var uuid: String
    public var name: String
    public var qemuPID: Int32
    public var state: String
    public var hooked: Bool
    public var failures: Int
    public var lastFailure: String?
    /// true while the introspector keeps letting go right after each hook (a crash loop: the
    /// back-off grows instead of resetting); absent otherwise.
    public var flapping: Bool?
    /// true when the decision requires the guest to be introspected (it must not run unmonitored).
    public var required: Bool?
    public var startTime: Int64
    public var since: Date
    /// From the trigger (HELLO, resume, reset, ...) to QEMU's HOOK success, for the last hook.
    public var lastHookMicroseconds: Int64?
    /// Of that: from the HOOK request to QEMU's RESULT (QEMU's ioctls and its main loop).
    public var lastHookRequestMicroseconds: Int64?
    /// Hooks completed by this session.
    public var hooks: Int = 0
    /// How the QEMU's identity was established: "libvirt" (pid-to-domain), or "proc only"
    /// when the libvirt check is off.
    public var identity: String?
    /// The introspector the decision names (nil: not introspected).
    public var introspector: String?
    /// The allow-lists of the decision (sent with HOOK or SET_ALLOWED): ids, `[-1]` for all,
    /// `[]` for the kernel's defaults; nil when the guest is not introspected.
    public var commands: [Int32]?
    public var events: [Int32]?
    /// When this broker hooked the guest, or found it hooked (a HELLO after a restart); nil
    /// while it is not hooked.
    public var hookedSince: Date?
}

/// The broker that wrote a status file: `kvmi-broker status` checks that it still runs.
public struct BrokerStatus: Sendable, Codable, Equatable {
    public var pid: Int32
    /// Field 22 of /proc/PID/stat: tells a pid reused by another process from the broker.
    public var startTime: UInt64?
    public var version: String

    public init(pid: Int32, startTime: UInt64?, version: String) {
        self.pid = pid
        self.startTime = startTime
        self.version = version
    }

    /// This process.
    public static var current: BrokerStatus {
        let pid = getpid()
        return BrokerStatus(pid: pid, startTime: processStartTime(pid), version: BrokerVersion.string)
    }

    /// The start time of process `pid` (nil if it does not exist or /proc cannot say).
    public static func processStartTime(_ pid: Int32, procRoot: String = "/proc") -> UInt64? {
        guard let data = FileManager.default.contents(atPath: "\(procRoot)/\(pid)/stat") else { return nil }
        return PeerVerifier.startTime(stat: Array(data))
    }
}

/// The status file: the broker that writes it and its sessions.
public struct StatusDocument: Sendable, Codable, Equatable {
    public var broker: BrokerStatus
    public var sessions: [SessionStatus]

    public init(broker: BrokerStatus, sessions: [SessionStatus]) {
        self.broker = broker
        self.sessions = sessions
    }
}

/// Sessions keyed by guest UUID: at most one live channel per guest, and the status view.
///
/// Every operation costs O(1) in the number of guests: the status file is written at most
/// once per `statusInterval`, on a thread of its own (not Swift's cooperative pool), from a
/// copy of the table, so a boot storm's claims never wait for JSON encoding.
///
/// A lock, not an actor: the sessions run on the reactor's thread (`IOReactor`'s executor), and
/// an actor runs on the thread of the task that calls it. A task of the control or metrics
/// server (or a test) calling an actor that a session held would have run there, on the
/// reactor's thread, and gone on running there after the call (a task without a preference
/// runs anywhere), so that a blocking call in it would have stopped every socket of the broker.
/// Each operation here is short and never waits while holding the lock.
public final class SessionRegistry: Sendable {
    private struct State {
        var sessions: [GuestUUID: (token: UInt64, status: SessionStatus)] = [:]
        var listeners: [UInt64: @Sendable () -> Void] = [:]
        /// Each live session's input, for tests that must reproduce an ordering (a timeout
        /// handled after the RESULT it was armed for) that timing alone cannot produce reliably.
        var injectors: [GuestUUID: @Sendable (SessionDriver.Input) async -> Void] = [:]
        var nextToken: UInt64 = 1
        var writeScheduled = false
        /// The sessions by what they wait for, kept up to date on every change (the service status).
        var counts = SessionCounts()
        /// Told every change of a session's status (`observe`): for a benchmark that waits for
        /// an event instead of polling the registry.
        var observer: (@Sendable (SessionStatus) -> Void)?
    }

    private let state = Mutex(State())
    private let statusFile: String?
    private let statusInterval: Duration
    private let writer: StatusFileWriter?
    private let notifier: ServiceNotifier?

    /// Writes the status file at once (no sessions yet), so that `kvmi-broker status` works
    /// and a status file that cannot be written is reported at start.
    public init(
        statusFile: String?, statusInterval: Duration = .milliseconds(100), logger: Logger? = nil, broker: BrokerStatus = .current,
        notifier: ServiceNotifier? = nil
    ) {
        self.statusFile = statusFile
        self.statusInterval = statusInterval
        self.writer = statusFile.map { StatusFileWriter(path: $0, logger: logger, broker: broker) }
        self.notifier = notifier
        writer?.enqueue([])
    }

    /// The sessions by what they wait for.
    public var sessionCounts: SessionCounts { state.withLock { $0.counts } }

    /// Moves one session between the counts: `from` leaves (nil: a new session), `to` arrives
    /// (nil: it ended). O(1); the notifier coalesces what it sends.
    private func count(from old: SessionStatus?, to new: SessionStatus?, in state: inout State) {
        let before = state.counts
        if let old { Self.adjust(&state.counts, old, by: -1) }
        if let new { Self.adjust(&state.counts, new, by: 1) }
        if state.counts != before { notifier?.sessionsChanged(state.counts) }
    }

    private static let notIntrospected = GuestSessionMachine.State.notIntrospected.description

    private static func adjust(_ counts: inout SessionCounts, _ status: SessionStatus, by delta: Int) {
        if status.hooked {
            counts.hooked += delta
        } else if status.state == Self.notIntrospected {
            counts.notIntrospected += delta
        } else {
            counts.waiting += delta
        }
    }

    /// Why a claim was refused.
    public enum ClaimRefusal: Error, Sendable, Equatable {
        /// Another QEMU process holds the guest's session.
        case otherProcess(pid: Int32)
        /// This QEMU already has a live channel for the guest: one channel per guest.
        case alreadyConnected
    }

    /// Claims the guest for a new channel: at most one live channel per guest, whichever
    /// process it comes from (QEMU reconnects by itself once its old channel is gone). A
    /// successful claim registers, in the same step, what a policy reload calls
    /// (`onPolicyChange`) and the session's input for tests (`injector`).
    func claim(
        _ uuid: GuestUUID, status: SessionStatus, onPolicyChange: (@Sendable () -> Void)? = nil,
        injector: (@Sendable (SessionDriver.Input) async -> Void)? = nil
    ) -> Result<UInt64, ClaimRefusal> {
        let result = state.withLock { state -> Result<UInt64, ClaimRefusal> in
            if let existing = state.sessions[uuid] {
                return .failure(existing.status.qemuPID == status.qemuPID ? .alreadyConnected : .otherProcess(pid: existing.status.qemuPID))
            }
            let token = state.nextToken
            state.nextToken += 1
            state.sessions[uuid] = (token, status)
            count(from: nil, to: status, in: &state)
            state.listeners[token] = onPolicyChange
            state.injectors[uuid] = injector
            persist(&state)
            return .success(token)
        }
        return result
    }

    public func update(_ uuid: GuestUUID, token: UInt64, _ change: (inout SessionStatus) -> Void) {
        let observed = state.withLock { state -> (SessionStatus, (@Sendable (SessionStatus) -> Void))? in
            guard var entry = state.sessions[uuid], entry.token == token else { return nil }
            let before = entry.status
            change(&entry.status)
            guard entry.status != before else { return nil }
            state.sessions[uuid] = entry
            count(from: before, to: entry.status, in: &state)
            persist(&state)
            return state.observer.map { (entry.status, $0) }
        }
        if let (status, observer) = observed { observer(status) }
    }

    /// Calls `body` with a session's status after each change of it (one observer; nil removes
    /// it). Called on the session's thread, outside the registry's lock: `body` must be quick
    /// and must not wait.
    public func observe(_ body: (@Sendable (SessionStatus) -> Void)?) {
        state.withLock { $0.observer = body }
    }

    /// Hands `input` to the live session of `uuid` (tests only); false when there is none.
    func inject(_ input: SessionDriver.Input, into uuid: GuestUUID) async -> Bool {
        guard let inject = state.withLock({ $0.injectors[uuid] }) else { return false }
        await inject(input)
        return true
    }

    /// Tells every live session that the policy changed; each re-decides from one snapshot.
    public func broadcastPolicyChange() {
        let listeners = state.withLock { Array($0.listeners.values) }
        for notify in listeners { notify() }
    }

    public func release(_ uuid: GuestUUID, token: UInt64) {
        state.withLock { state in
            state.listeners[token] = nil
            guard let entry = state.sessions[uuid], entry.token == token else { return }
            state.sessions[uuid] = nil
            count(from: entry.status, to: nil, in: &state)
            state.injectors[uuid] = nil
            persist(&state)
        }
    }

    public var count: Int { state.withLock { $0.sessions.count } }

    public func snapshot() -> [SessionStatus] {
        Self.sorted(unsortedSnapshot())
    }

    /// The sessions in no order: O(guests) under the lock; the caller sorts outside it, so a
    /// status request holds the sessions' updates up no longer than the copy.
    public func unsortedSnapshot() -> [SessionStatus] {
        state.withLock { $0.sessions.values.map(\.status) }
    }

    static func sorted(_ sessions: [SessionStatus]) -> [SessionStatus] {
        sessions.sorted { $0.name < $1.name || ($0.name == $1.name && $0.uuid < $1.uuid) }
    }

    /// Writes the status file now (tests, shutdown), waiting until it is on disk.
    public func flush() async {
        guard let writer else { return }
        let sessions = state.withLock { state -> [SessionStatus] in
            state.writeScheduled = false
            return state.sessions.values.map(\.status)
        }
        await writer.write(sessions)
    }

    /// Schedules one write within `statusInterval` (bounded staleness); later changes ride along.
    private func persist(_ state: inout State) {
        guard writer != nil, !state.writeScheduled else { return }
        state.writeScheduled = true
        let interval = statusInterval
        Task {
            try? await Task.sleep(for: interval)
            self.writeNow()
        }
    }

    private func writeNow() {
        guard let writer else { return }
        let sessions = state.withLock { state -> [SessionStatus]? in
            guard state.writeScheduled else { return nil }
            state.writeScheduled = false
            return state.sessions.values.map(\.status)
        }
        if let sessions { writer.enqueue(sessions) }
    }
}

/// Encodes and writes the status file on a thread of its own (`WorkThread`), atomically (a temporary file,
/// then rename), and says when writing starts failing (or fails differently), how long it goes
/// on failing, and when it works again (`RepeatingFailureLog`), never a line per write.
final class StatusFileWriter: @unchecked Sendable {
    private let path: String
    private let logger: Logger?
    private let broker: BrokerStatus
    private let thread = WorkThread(name: "kvmib-status", background: true)
    private let failures: RepeatingFailureLog
    /// Each session's JSON object as last written, by UUID (confined to `thread`): only the
    /// sessions that changed are encoded again.
    private var encoded: [String: (status: SessionStatus, object: [UInt8])] = [:]

    init(path: String, logger: Logger?, broker: BrokerStatus = .current) {
        self.path = path
        self.logger = logger
        self.broker = broker
        self.failures = RepeatingFailureLog(activity: "writing the status file \(escapedForLog(path))")
    }

    func enqueue(_ sessions: [SessionStatus]) {
        thread.submit { self.write(sessions) }
    }

    func write(_ sessions: [SessionStatus]) async {
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            thread.submit {
                self.write(sessions)
                done.resume()
            }
        }
    }

    private func write(_ sessions: [SessionStatus]) {
        var problem: String?
        var objects: [[UInt8]] = []
        objects.reserveCapacity(sessions.count)
        var next: [String: (status: SessionStatus, object: [UInt8])] = [:]
        next.reserveCapacity(sessions.count)
        for session in SessionRegistry.sorted(sessions) {
            let object: [UInt8]
            if let cached = encoded[session.uuid], cached.status == session {
                object = cached.object
            } else {
                object = StatusJSON.object(session)
            }
            objects.append(object)
            next[session.uuid] = (session, object)
        }
        encoded = next
        let data = StatusJSON.document(broker: broker, sessions: objects)
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o640)
        if fd < 0 {
            problem = "cannot create \(escapedForLog(temporary)): \(String(cString: strerror(errno)))"
        } else {
            let written = data.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            let writeErrno = written < 0 ? errno : ENOSPC
            close(fd)
            if written != data.count {
                problem = "cannot write \(escapedForLog(temporary)): \(String(cString: strerror(writeErrno)))"
                unlink(temporary)
            } else if rename(temporary, path) != 0 {
                problem = "cannot rename \(escapedForLog(temporary)) to \(escapedForLog(path)): \(String(cString: strerror(errno)))"
                unlink(temporary)
            }
        }
        if let problem {
            failures.failed("\(problem) (`kvmi-broker status` shows stale data until it works)", logger)
        } else {
            failures.succeeded(logger)
        }
    }
}
