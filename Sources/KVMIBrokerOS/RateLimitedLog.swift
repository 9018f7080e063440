import KVMIBrokerCore
import Logging
import Synchronization

/// Logs a repeating message at most `linesPerWindow` times per window, then counts what it
/// dropped and says how many when it logs again: a flood of refused peers cannot flood the
/// log, and nothing is silently lost.
public final class RateLimitedLog: Sendable {
    public let linesPerWindow: Int
    public let window: Duration

    private struct State {
        var windowStart: ContinuousClock.Instant?
        var used = 0
        var suppressed = 0
    }

    private let state = Mutex(State())

    public init(linesPerWindow: Int = 20, window: Duration = .seconds(10)) {
        self.linesPerWindow = linesPerWindow
        self.window = window
    }

    /// Lines dropped since the last one logged.
    public var suppressed: Int { state.withLock { $0.suppressed } }

    /// Whether one more line may be logged now: nil to drop it, else how many were dropped
    /// since the last one (to be said first).
    public func admit(now: ContinuousClock.Instant = .now) -> Int? {
        state.withLock { state -> Int? in
            if state.windowStart.map({ $0.duration(to: now) >= window }) ?? true {
                state.windowStart = now
                state.used = 0
            }
            guard state.used < linesPerWindow else {
                state.suppressed += 1
                return nil
            }
            state.used += 1
            defer { state.suppressed = 0 }
            return state.suppressed
        }
    }

    public func log(_ logger: Logger, level: Logger.Level = .warning, _ message: String, metadata: Logger.Metadata = [:]) {
        guard let dropped = admit() else { return }
        if dropped > 0 { logger.log(level: level, "\(dropped) similar lines were suppressed (rate limit)") }
        logger.log(level: level, "\(message)", metadata: metadata)
    }
}

/// A repeating failure's log (`FailureStreak`): a warning when it starts or changes, a
/// warning summary at a growing, bounded interval, a notice when it recovers; each attempt
/// in between is silent. Thread-safe.
public final class RepeatingFailureLog: Sendable {
    /// What is attempted, for the log line: "writing the status file /run/kvmi-broker/status.json".
    public let activity: String
    private let streak: Mutex<FailureStreak>

    public init(activity: String, firstSummary: Duration = .seconds(60), longestInterval: Duration = .seconds(3600)) {
        self.activity = activity
        self.streak = Mutex(FailureStreak(firstInterval: firstSummary, longestInterval: longestInterval))
    }

    /// Records a failed attempt and logs it if it is news (a start, a change or a summary is due).
    public func failed(_ reason: String, _ logger: Logger?, metadata: Logger.Metadata = [:], now: ContinuousClock.Instant = .now) {
        let report = streak.withLock { $0.failed(reason, at: now) }
        if let report { Self.log(report, activity, logger, metadata) }
    }

    /// Records a successful attempt and logs the recovery if it ends a failure.
    public func succeeded(_ logger: Logger?, metadata: Logger.Metadata = [:], now: ContinuousClock.Instant = .now) {
        let report = streak.withLock { $0.succeeded(at: now) }
        if let report { Self.log(report, activity, logger, metadata) }
    }

    /// Failed attempts in the current streak (0 when it works).
    public var attempts: Int { streak.withLock { $0.attempts } }

    public static func log(_ report: FailureStreak.Report, _ activity: String, _ logger: Logger?, _ metadata: Logger.Metadata = [:]) {
        logger?.log(level: report.isRecovery ? .notice : .warning, "\(report.sentence(activity))", metadata: metadata)
    }
}
