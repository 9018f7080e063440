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
