/// Exponential back-off with jitter between connection attempts, bounded above.
///
/// The delay after the n-th consecutive failure is `initial * multiplier^(n-1)`, capped at
/// `maximum`, then spread by +/- `jitter` so that hundreds of guests that failed together do
/// not retry together.
public struct Backoff: Sendable, Equatable {
    public var initial: Duration
    public var maximum: Duration
    public var multiplier: Double
    /// Fraction of the delay, 0 to 1, by which it is randomly spread both ways.
    public var jitter: Double

    /// 0.5 s doubling to 30 s, +/- 20 %.
    public static let `default` = Backoff(uncheckedInitial: .milliseconds(500), maximum: .seconds(30), multiplier: 2, jitter: 0.2)

    private init(uncheckedInitial initial: Duration, maximum: Duration, multiplier: Double, jitter: Double) {
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
    }

    public init(initial: Duration, maximum: Duration, multiplier: Double, jitter: Double) throws(BrokerError) {
        guard initial > .zero else { throw BrokerError(.invalidArgument, "back-off initial delay must be positive") }
        guard maximum >= initial else { throw BrokerError(.invalidArgument, "back-off maximum \(maximum) is below the initial delay \(initial)") }
        guard multiplier >= 1 else { throw BrokerError(.invalidArgument, "back-off multiplier must be at least 1, not \(multiplier)") }
        guard (0...1).contains(jitter) else { throw BrokerError(.invalidArgument, "back-off jitter must be between 0 and 1, not \(jitter)") }
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
    }

    /// The delay before the next attempt after `failures` consecutive failures (>= 1).
    public func delay<G: RandomNumberGenerator>(afterFailures failures: Int, using generator: inout G) -> Duration {
        let base = nominalDelay(afterFailures: failures)
        guard jitter > 0 else { return base }
        let factor = Double.random(in: (1 - jitter)...(1 + jitter), using: &generator)
        return min(base * factor, maximum)
    }

    /// The delay before jitter: the bounds tests and logs use.
    public func nominalDelay(afterFailures failures: Int) -> Duration {
        precondition(failures >= 1)
        let initialSeconds = initial.secondsDouble
        let maximumSeconds = maximum.secondsDouble
        var seconds = initialSeconds
        var step = 1
        while step < failures && seconds < maximumSeconds {
            seconds *= multiplier
            step += 1
        }
        return .seconds(min(seconds, maximumSeconds))
    }
}

extension Duration {
    /// Seconds as a Double, for arithmetic and printing.
    public var secondsDouble: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) / 1e18
    }

    /// Milliseconds as a Double, for printing latencies.
    public var millisecondsDouble: Double { secondsDouble * 1000 }
}
