import Foundation

/// The boot-storm bars over a series of runs (issue 9, item 2): all 1,000 guests hooked within
/// 1.5x the floor's time, every run; p99 HELLO -> HOOK within 2x the floor's p99. One run tells
/// little on a machine whose storms vary by a fifth from one to the next: the series says in
/// how many runs each bar held, and the medians with their spread.
struct StormSeries {
    /// The broker's time until all are hooked, at most this times the floor's.
    static let allHookedBar = 1.5
    /// The broker's p99 HELLO -> HOOK, at most this times the floor's.
    static let p99Bar = 2.0

    /// One floor + broker pair. Nil: that side did not hook every guest (a failed run: no bar
    /// held).
    struct Run: Equatable {
        var floorAllHooked: Double?
        var brokerAllHooked: Double?
        var floorP99: Double?
        var brokerP99: Double?
    }

    /// A run in which both sides hooked every guest, in seconds.
    private struct Complete {
        var floorAllHooked: Double
        var brokerAllHooked: Double
        var floorP99: Double
        var brokerP99: Double

        init?(_ run: Run) {
            guard let floorAllHooked = run.floorAllHooked, let brokerAllHooked = run.brokerAllHooked, let floorP99 = run.floorP99,
                let brokerP99 = run.brokerP99, floorAllHooked > 0, floorP99 > 0
            else { return nil }
            self.floorAllHooked = floorAllHooked
            self.brokerAllHooked = brokerAllHooked
            self.floorP99 = floorP99
            self.brokerP99 = brokerP99
        }
    }

    private(set) var runs: [Run] = []

    mutating func append(_ run: Run) { runs.append(run) }

    private var complete: [Complete] { runs.compactMap(Complete.init) }

    /// Runs in which the broker hooked all within `allHookedBar` times the floor's time.
    var allHookedHeld: Int { complete.count { $0.brokerAllHooked <= Self.allHookedBar * $0.floorAllHooked } }

    /// Runs in which the broker's p99 was within `p99Bar` times the floor's.
    var p99Held: Int { complete.count { $0.brokerP99 <= Self.p99Bar * $0.floorP99 } }

    /// The summary printed after the runs: medians (min - max) of both times and of the ratios,
    /// and how many runs held each bar.
    func lines() -> [String] {
        let done = complete
        let allHookedBar = Self.times(Self.allHookedBar)
        let p99Bar = Self.times(Self.p99Bar)
        var lines = [
            "series of \(runs.count) runs (the bars: all hooked within \(allHookedBar) the floor's time and p99 HELLO -> HOOK within \(p99Bar) the floor's p99, every run)"
        ]
        if done.count < runs.count {
            lines.append("runs in which a side did not hook every guest: \(runs.count - done.count) (they hold no bar)")
        }
        if !done.isEmpty {
            lines.append(
                "release -> all hooked: floor \(Self.spread(done.map(\.floorAllHooked), Self.milliseconds)), "
                    + "broker \(Self.spread(done.map(\.brokerAllHooked), Self.milliseconds)), "
                    + "ratio \(Self.spread(done.map { $0.brokerAllHooked / $0.floorAllHooked }, Self.ratio))")
            lines.append(
                "p99 HELLO -> HOOK: floor \(Self.spread(done.map(\.floorP99), Self.milliseconds)), "
                    + "broker \(Self.spread(done.map(\.brokerP99), Self.milliseconds)), "
                    + "ratio \(Self.spread(done.map { $0.brokerP99 / $0.floorP99 }, Self.ratio))")
        }
        lines.append("all hooked within \(allHookedBar) the floor's time: \(allHookedHeld) of \(runs.count) runs")
        lines.append("p99 HELLO -> HOOK within \(p99Bar) the floor's p99: \(p99Held) of \(runs.count) runs")
        return lines
    }

    /// The median of `values` (the mean of the middle two for an even count); at least one.
    static func median(_ values: [Double]) -> Double {
        precondition(!values.isEmpty, "the median of no values")
        let sorted = values.sorted()
        let middle = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
    }

    private static func spread(_ values: [Double], _ format: (Double) -> String) -> String {
        "median \(format(median(values))) (\(format(values.min() ?? 0)) - \(format(values.max() ?? 0)))"
    }

    private static func milliseconds(_ seconds: Double) -> String { String(format: "%.1f ms", seconds * 1e3) }

    private static func ratio(_ ratio: Double) -> String { String(format: "%.2fx", ratio) }

    /// A bar as the issue writes it: "1.5x", "2x".
    private static func times(_ bar: Double) -> String { String(format: "%gx", bar) }
}
