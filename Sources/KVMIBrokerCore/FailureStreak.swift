/// A failure that repeats (a connect retried with back-off, a file that cannot be written) as
/// the log tells it: one line when it starts or its reason changes, then a summary at a
/// growing, bounded interval ("still failing after 12 attempts over 1 min 3 s"), and one line
/// when it recovers. Every other attempt is silent. Pure: the caller passes the time.
public struct FailureStreak: Sendable {
    /// What to log for an attempt; nil from `failed`/`succeeded` means nothing.
    public enum Report: Sendable, Equatable {
        /// The first failure after a success (or ever).
        case started(reason: String)
        /// A failure with another reason than the one before, after `attempts` failures so far.
        case changed(reason: String, attempts: Int, over: Duration)
        /// The same failure goes on: `attempts` failures over `over`.
        case stillFailing(reason: String, attempts: Int, over: Duration)
        /// Success after `attempts` failures over `over`.
        case recovered(attempts: Int, over: Duration)
    }

    /// The first summary comes this long after the failure started; each later one twice as
    /// long after the one before, at most `longestInterval`.
    public let firstInterval: Duration
    public let longestInterval: Duration

    public private(set) var attempts = 0
    public private(set) var reason: String?
    private var startedAt: ContinuousClock.Instant?
    private var nextSummary: ContinuousClock.Instant?
    private var interval: Duration

    public init(firstInterval: Duration = .seconds(60), longestInterval: Duration = .seconds(3600)) {
        self.firstInterval = firstInterval
        self.longestInterval = max(firstInterval, longestInterval)
        self.interval = firstInterval
    }

    public var isFailing: Bool { attempts > 0 }

    /// One more failed attempt.
    public mutating func failed(_ reason: String, at now: ContinuousClock.Instant) -> Report? {
        attempts += 1
        guard let startedAt, let previous = self.reason else {
            self.startedAt = now
            self.reason = reason
            interval = firstInterval
            nextSummary = now + firstInterval
            return .started(reason: reason)
        }
        if previous != reason {
            self.reason = reason
            return .changed(reason: reason, attempts: attempts, over: startedAt.duration(to: now))
        }
        guard let due = nextSummary, now >= due else { return nil }
        interval = min(interval * 2, longestInterval)
        nextSummary = now + interval
        return .stillFailing(reason: reason, attempts: attempts, over: startedAt.duration(to: now))
    }

    /// A successful attempt: `.recovered` if it ends a streak, else nil.
    public mutating func succeeded(at now: ContinuousClock.Instant) -> Report? {
        defer { reset() }
        guard let startedAt, attempts > 0 else { return nil }
        return .recovered(attempts: attempts, over: startedAt.duration(to: now))
    }

    /// Forgets the streak without a report (the thing that failed is no longer tried).
    public mutating func reset() {
        attempts = 0
        reason = nil
        startedAt = nil
        nextSummary = nil
        interval = firstInterval
    }
}

extension FailureStreak.Report {
    /// The report as one sentence about `activity` ("connecting to libvirt (qemu:///system)").
    /// The reason texts are the caller's, already safe to log.
    public func sentence(_ activity: String) -> String {
        switch self {
        case .started(let reason):
            return "\(activity) failed: \(reason)"
        case .changed(let reason, let attempts, let over):
            return "\(activity) fails differently now: \(reason) (\(Self.count(attempts, "attempt")) over \(over.humanReadable) so far)"
        case .stillFailing(let reason, let attempts, let over):
            return "\(activity) still failing after \(Self.count(attempts, "attempt")) over \(over.humanReadable): \(reason)"
        case .recovered(let attempts, let over):
            return "\(activity) succeeded after \(Self.count(attempts, "failed attempt")) over \(over.humanReadable)"
        }
    }

    private static func count(_ count: Int, _ noun: String) -> String {
        "\(count) \(noun)\(count == 1 ? "" : "s")"
    }

    /// The failure is over (logged as a notice; the others as warnings).
    public var isRecovery: Bool {
        if case .recovered = self { return true }
        return false
    }
}
