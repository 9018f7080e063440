import CKVMIBroker
import Dispatch
import KVMIBrokerCore
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// How many guests the broker holds, by what they wait for: the numbers the one-line service
/// status shows. Kept up to date by `SessionRegistry` in O(1) per change.
public struct SessionCounts: Sendable, Equatable {
    /// Hooked: the introspector holds the guest.
    public var hooked = 0
    /// Introspected by the policy but not hooked (connecting, hooking, backing off, suspended...).
    public var waiting = 0
    /// Connected, and the policy does not introspect them.
    public var notIntrospected = 0

    public init(hooked: Int = 0, waiting: Int = 0, notIntrospected: Int = 0) {
        self.hooked = hooked
        self.waiting = waiting
        self.notIntrospected = notIntrospected
    }
}

/// systemd's service notification protocol (sd_notify(3), for `Type=notify`) through
/// libsystemd, the reference implementation Debian ships: READY=1 once the broker serves,
/// RELOADING=1 (with MONOTONIC_USEC, which systemd 253 and later want) and READY=1 around a
/// policy reload, STOPPING=1 on SIGTERM/SIGINT, and a one-line STATUS= when it changes.
///
/// Without NOTIFY_SOCKET in the environment (not started by systemd) every call returns at
/// once. The status line is coalesced: at most one message per `statusInterval` whatever the
/// rate of session changes (a boot storm of guests costs one lock and a comparison per change,
/// never a message per change).
public final class ServiceNotifier: Sendable {
    /// Whether someone listens: NOTIFY_SOCKET was set when the broker started.
    public let isEnabled: Bool
    private let statusInterval: Duration
    private let logger: Logger?
    private let queue = DispatchQueue(label: "kvmi-broker.service-notifier")
    private let state = Mutex(State())

    /// What the status line shows: compared, not formatted, on every change.
    private struct Shown: Equatable {
        var counts = SessionCounts()
        /// The policy's generation; nil in static mode (no policy).
        var generation: Int?
        var reloadFailed = false
    }

    private struct State {
        var shown = Shown()
        /// What the last line sent showed (nothing is sent when it is unchanged).
        var sent: Shown?
        var sentAt: ContinuousClock.Instant?
        /// A status message is scheduled; later changes ride along with it.
        var scheduled = false
        /// sd_notify failed once: said once in the log, not on every message.
        var failureLogged = false
    }

    /// - Parameters:
    ///   - generation: the policy generation in force at start, or nil without a policy.
    ///   - statusInterval: the shortest time between two STATUS= messages.
    public init(generation: Int?, statusInterval: Duration = .seconds(1), logger: Logger? = nil) {
        isEnabled = getenv("NOTIFY_SOCKET") != nil
        self.statusInterval = statusInterval
        self.logger = logger
        state.withLock { $0.shown.generation = generation }
    }

    /// READY=1, with the current status line: the sockets listen and discovery has started
    /// (at start), or a reload has completed.
    public func ready() {
        guard isEnabled else { return }
        let shown = state.withLock { state in
            state.sent = state.shown
            state.sentAt = .now
            return state.shown
        }
        send("READY=1\nSTATUS=\(Self.statusLine(shown))")
    }

    /// RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC in µs, which systemd 253 and later
    /// require to match the reload to the request; older ones ignore it). `ready()` follows
    /// when the reload is done, whether it succeeded or not.
    public func reloading() {
        guard isEnabled else { return }
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let microseconds = Int64(now.tv_sec) * 1_000_000 + Int64(now.tv_nsec) / 1000
        send("RELOADING=1\nMONOTONIC_USEC=\(microseconds)")
    }

    /// STOPPING=1: the broker is shutting down (SIGTERM or SIGINT).
    public func stopping() {
        guard isEnabled else { return }
        send("STOPPING=1")
    }

    /// The sessions changed (called by `SessionRegistry` on every change: O(1)).
    public func sessionsChanged(_ counts: SessionCounts) {
        guard isEnabled else { return }
        update { $0.counts = counts }
    }

    /// A reload ended: `generation` is the policy in force; `failed` when the reload was refused.
    public func reloaded(generation: Int?, failed: Bool) {
        guard isEnabled else { return }
        update {
            $0.generation = generation
            $0.reloadFailed = failed
        }
    }

    /// The one-line status, e.g. "12 guests hooked, 3 waiting, 1 not introspected, policy
    /// generation 4".
    static func statusLine(_ counts: SessionCounts, generation: Int?, reloadFailed: Bool) -> String {
        let guests = counts.hooked == 1 ? "guest" : "guests"
        var line = "\(counts.hooked) \(guests) hooked, \(counts.waiting) waiting, \(counts.notIntrospected) not introspected"
        if let generation {
            line += ", policy generation \(generation)"
            if reloadFailed { line += " (the last reload failed: see the log)" }
        } else {
            line += ", static configuration"
        }
        return line
    }

    private static func statusLine(_ shown: Shown) -> String {
        statusLine(shown.counts, generation: shown.generation, reloadFailed: shown.reloadFailed)
    }

    /// Applies `change` and schedules one STATUS= message no sooner than `statusInterval` after
    /// the last one, unless one is scheduled already.
    private func update(_ change: (inout Shown) -> Void) {
        let delay: Duration? = state.withLock { state in
            change(&state.shown)
            guard !state.scheduled, state.shown != state.sent else { return nil }
            state.scheduled = true
            guard let sentAt = state.sentAt else { return .zero }
            let elapsed = sentAt.duration(to: .now)
            return elapsed >= statusInterval ? .zero : statusInterval - elapsed
        }
        guard let delay else { return }
        let (seconds, attoseconds) = delay.components
        let nanoseconds = Int(seconds) * 1_000_000_000 + Int(attoseconds / 1_000_000_000)
        queue.asyncAfter(deadline: .now() + .nanoseconds(nanoseconds)) { self.sendStatus() }
    }

    private func sendStatus() {
        let shown: Shown? = state.withLock { state in
            state.scheduled = false
            guard state.shown != state.sent else { return nil }
            state.sent = state.shown
            state.sentAt = .now
            return state.shown
        }
        if let shown { send("STATUS=\(Self.statusLine(shown))") }
    }

    private func send(_ message: String) {
        let result = kvmib_sd_notify(message)
        guard result < 0 else { return }
        let first = state.withLock { state in
            defer { state.failureLogged = true }
            return !state.failureLogged
        }
        if first {
            logger?.warning(
                "cannot notify systemd (NOTIFY_SOCKET): the service manager may not see the broker's state",
                metadata: ["errno": "\(errnoName(-result))"])
        }
    }
}
