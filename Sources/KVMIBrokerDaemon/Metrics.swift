import CoreMetrics
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import Prometheus

/// The broker's metrics, recorded through the swift-metrics API (`Counter`, `Meter`, `Timer`)
/// into a Prometheus registry that `MetricsServer` exposes as text.
///
/// The factory is passed in, never taken from `MetricsSystem`: `kvmi-broker run` bootstraps the
/// metrics system once with the same factory, and a test that runs the daemon in-process gives
/// each broker a registry of its own (bootstrapping twice would trap).
///
/// Label values are policy names (the introspector's `[introspector NAME]`, "command-line" in
/// static mode) and the fixed reasons below, never text from a peer: no guest name or UUID
/// becomes a label, so the number of series is bounded by the policy. Every call here is O(1):
/// a lookup in the registry's table and an atomic increment.
public final class BrokerMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    public let factory: BrokerMetricsFactory

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        self.factory = BrokerMetricsFactory(registry: registry)
        // The unlabelled series exist from the first scrape.
        _ = Counter(label: Name.reloadFailures, factory: factory)
        for state in SessionState.allCases { Gauge(label: Name.sessions, dimensions: [("state", state.rawValue)], factory: factory).record(0) }
    }

    /// Metric names (the documentation's table in `Documentation/service.md` lists them).
    public enum Name {
        public static let sessions = "kvmi_broker_sessions"
        public static let introspectorSessions = "kvmi_broker_introspector_sessions"
        public static let hooks = "kvmi_broker_hooks_total"
        public static let unhooks = "kvmi_broker_unhooks_total"
        public static let failures = "kvmi_broker_failures_total"
        public static let handshakeDuration = "kvmi_broker_handshake_duration_seconds"
        public static let hookDuration = "kvmi_broker_hook_duration_seconds"
        public static let busy = "kvmi_broker_introspector_busy_total"
        public static let unreachable = "kvmi_broker_introspector_unreachable_total"
        public static let policyGeneration = "kvmi_broker_policy_generation"
        public static let reloadFailures = "kvmi_broker_policy_reload_failures_total"
        public static let openDescriptors = "kvmi_broker_open_descriptors"
        public static let descriptorLimit = "kvmi_broker_descriptor_limit"
    }

    /// The `state` label of `kvmi_broker_sessions`: `SessionCounts`' three numbers.
    public enum SessionState: String, CaseIterable, Sendable {
        case hooked
        case waiting
        case notIntrospected = "not_introspected"
    }

    /// Where a session of one introspector stands, for `kvmi_broker_introspector_sessions`.
    public struct Standing: Sendable, Equatable {
        public var introspector: String
        public var hooked: Bool
    }

    // MARK: Sessions

    /// A session moved from `old` to `new` (nil: none, not introspected or ended).
    public func moved(from old: Standing?, to new: Standing?) {
        guard old != new else { return }
        if let old { meter(old).decrement() }
        if let new { meter(new).increment() }
    }

    private func meter(_ standing: Standing) -> Meter {
        Meter(
            label: Name.introspectorSessions,
            dimensions: [("introspector", standing.introspector), ("state", standing.hooked ? "hooked" : "waiting")], factory: factory)
    }

    /// The guest is hooked, `latency` after the trigger (HELLO, resume, reset, retry series).
    public func hooked(introspector: String, latency: Duration?) {
        Counter(label: Name.hooks, dimensions: [("introspector", introspector)], factory: factory).increment()
        if let latency {
            Timer(label: Name.hookDuration, dimensions: [("introspector", introspector)], factory: factory).recordNanoseconds(latency.nanoseconds)
        }
    }

    /// QEMU unhooked the guest; `reason` is one of the fixed reasons in service.md.
    public func unhooked(introspector: String, reason: String) {
        Counter(label: Name.unhooks, dimensions: [("introspector", introspector), ("reason", reason)], factory: factory).increment()
    }

    /// An attempt failed (a back-off retry follows); `reason` is one of the fixed reasons.
    public func failed(introspector: String, reason: String) {
        Counter(label: Name.failures, dimensions: [("introspector", introspector), ("reason", reason)], factory: factory).increment()
    }

    /// A connect and handshake that succeeded, how long it took.
    public func handshake(introspector: String, duration: Duration) {
        Timer(label: Name.handshakeDuration, dimensions: [("introspector", introspector)], factory: factory).recordNanoseconds(duration.nanoseconds)
    }

    /// A connect met the introspector's full listen backlog (counted once per attempt).
    public func busy(introspector: String) {
        Counter(label: Name.busy, dimensions: [("introspector", introspector)], factory: factory).increment()
    }

    /// The introspector could not be reached: a connect failed, or the hook's check of a
    /// required guest found it unreachable.
    public func unreachable(introspector: String) {
        Counter(label: Name.unreachable, dimensions: [("introspector", introspector)], factory: factory).increment()
    }

    // MARK: Policy

    /// The policy generation in force (absent in static mode).
    public func policy(generation: Int) {
        Gauge(label: Name.policyGeneration, factory: factory).record(generation)
    }

    public func reloadFailed() {
        Counter(label: Name.reloadFailures, factory: factory).increment()
    }

    // MARK: Scrape

    /// The exposition: the values computed at scrape time (the session counts, the open
    /// descriptors) are recorded first. `descriptors` is the count of `/proc/self/fd`.
    public func exposition(counts: SessionCounts, descriptors: Int?) -> [UInt8] {
        let values: [(SessionState, Int)] = [(.hooked, counts.hooked), (.waiting, counts.waiting), (.notIntrospected, counts.notIntrospected)]
        for (state, value) in values { Gauge(label: Name.sessions, dimensions: [("state", state.rawValue)], factory: factory).record(value) }
        if let descriptors { Gauge(label: Name.openDescriptors, factory: factory).record(descriptors) }
        Gauge(label: Name.descriptorLimit, factory: factory).record(currentDescriptorLimit().soft)
        var buffer: [UInt8] = []
        buffer.reserveCapacity(8192)
        registry.emit(into: &buffer)
        return buffer
    }

    /// Descriptors this process holds: the entries of `/proc/self/fd` (blocking file I/O, run
    /// off the cooperative pool by the caller). One of them is the directory being read.
    public static func countOpenDescriptors(procRoot: String = "/proc") -> Int? {
        guard let directory = opendir("\(procRoot)/self/fd") else { return nil }
        defer { closedir(directory) }
        var count = 0
        while let entry = readdir(directory) {
            let first = withUnsafeBytes(of: entry.pointee.d_name) { $0.first ?? 0 }
            if first != UInt8(ascii: ".") { count += 1 }
        }
        return max(0, count - 1)
    }

    // MARK: Reasons

    /// The `reason` of a failed handshake: the error's stable code.
    public static func reason(_ error: BrokerError) -> String { error.code.rawValue }

    /// The `reason` of a failed HOOK: the step QEMU reports.
    public static func reason(hookFailedAt step: Channel.Step) -> String {
        switch step {
        case .none: return "hook-failed"
        case .hook: return "hook-refused"
        case .command, .event: return "hook-list-refused"
        case .preunhook, .unhook: return "hook-failed"
        case .fd: return "hook-no-fd"
        case .state: return "hook-qemu-state"
        case .request: return "hook-not-understood"
        }
    }
}

extension Duration {
    /// Whole nanoseconds (for `Timer.recordNanoseconds`), saturating at about 292 years.
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        let (whole, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        return overflow ? .max : whole.addingReportingOverflow(attoseconds / 1_000_000_000).partialValue
    }
}

/// The Prometheus factory with our metrics' help texts and histogram buckets: every name in
/// `help` gets its `# HELP` line (swift-prometheus' own factory registers names without help).
/// Other names (metrics of libraries, if any) go to `PrometheusMetricsFactory` unchanged.
public struct BrokerMetricsFactory: MetricsFactory {
    public let registry: PrometheusCollectorRegistry
    private let fallback: PrometheusMetricsFactory

    /// Latency buckets from 1 ms to 10 s: handshakes take about a millisecond locally and time
    /// out at 10 s by default.
    public static let durationBuckets: [Duration] = [
        .milliseconds(1), .microseconds(2500), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
    ]

    public static let help: [String: String] = [
        BrokerMetrics.Name.sessions: "Guest sessions by state: hooked, waiting (introspected by the policy but not hooked now), not_introspected.",
        BrokerMetrics.Name.introspectorSessions: "Introspected guest sessions by introspector and state (hooked or waiting).",
        BrokerMetrics.Name.hooks: "Guests hooked, by introspector.",
        BrokerMetrics.Name.unhooks: "Guests QEMU unhooked while the session went on, by introspector and reason.",
        BrokerMetrics.Name.failures: "Failed introspection attempts (each followed by a back-off retry), by introspector and reason.",
        BrokerMetrics.Name.handshakeDuration: "Connect and KVMI handshake with the introspector, successful ones, in seconds.",
        BrokerMetrics.Name.hookDuration: "From the trigger (HELLO, resume, reset, first retry) to QEMU's HOOK success, in seconds.",
        BrokerMetrics.Name.busy: "Handshake attempts that met the introspector's full listen backlog (retried), by introspector.",
        BrokerMetrics.Name.unreachable: "Connects to the introspector that failed, by introspector.",
        BrokerMetrics.Name.policyGeneration: "Generation of the allow-policy in force (1 at start, +1 per successful reload).",
        BrokerMetrics.Name.reloadFailures: "Policy reloads refused (the previous policy stayed in force).",
        BrokerMetrics.Name.openDescriptors: "File descriptors the broker holds (entries of /proc/self/fd at scrape time).",
        BrokerMetrics.Name.descriptorLimit: "The broker's soft descriptor limit (RLIMIT_NOFILE).",
    ]

    public init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
        self.fallback = PrometheusMetricsFactory(registry: registry)
    }

    private func descriptor(_ label: String) -> MetricNameDescriptor? {
        Self.help[label].map { MetricNameDescriptor(metricName: label, unitName: "", helpText: $0) }
    }

    public func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        guard let descriptor = descriptor(label) else { return fallback.makeCounter(label: label, dimensions: dimensions) }
        return registry.makeCounter(descriptor: descriptor, labels: dimensions)
    }

    public func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        fallback.makeFloatingPointCounter(label: label, dimensions: dimensions)
    }

    public func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        guard !aggregate, let descriptor = descriptor(label) else {
            return fallback.makeRecorder(label: label, dimensions: dimensions, aggregate: aggregate)
        }
        return registry.makeGauge(descriptor: descriptor, labels: dimensions)
    }

    public func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        guard let descriptor = descriptor(label) else { return fallback.makeMeter(label: label, dimensions: dimensions) }
        return registry.makeGauge(descriptor: descriptor, labels: dimensions)
    }

    public func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        guard let descriptor = descriptor(label) else { return fallback.makeTimer(label: label, dimensions: dimensions) }
        return registry.makeDurationHistogram(descriptor: descriptor, labels: dimensions, buckets: Self.durationBuckets)
    }

    public func destroyCounter(_ handler: any CounterHandler) { fallback.destroyCounter(handler) }
    public func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) { fallback.destroyFloatingPointCounter(handler) }
    public func destroyRecorder(_ handler: any RecorderHandler) { fallback.destroyRecorder(handler) }
    public func destroyMeter(_ handler: any MeterHandler) { fallback.destroyMeter(handler) }
    public func destroyTimer(_ handler: any TimerHandler) { fallback.destroyTimer(handler) }
}
