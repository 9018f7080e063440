import Testing

@testable import kvmi_bench

/// The series summary of `kvmi-bench scale --runs N`: the counts of runs that held the issue's
/// bars are what benchmarks.md quotes, so they are checked here rather than trusted.
@Suite struct StormSeriesTests {
    private func run(_ floor: Double?, _ broker: Double?, p99 floorP99: Double? = 0.1, _ brokerP99: Double? = 0.1) -> StormSeries.Run {
        StormSeries.Run(floorAllHooked: floor, brokerAllHooked: broker, floorP99: floorP99, brokerP99: brokerP99)
    }

    @Test func countsTheRunsThatHeldEachBar() {
        var series = StormSeries()
        series.append(run(0.140, 0.200, p99: 0.120, 0.180))  // 1.43x, p99 1.5x: both held
        // Exactly 1.5x and 2x (binary fractions, so that the products are exact): both held.
        series.append(run(0.125, 0.1875, p99: 0.125, 0.25))
        series.append(run(0.140, 0.211, p99: 0.120, 0.241))  // just over: neither
        series.append(run(0.130, 0.250, p99: 0.100, 0.150))  // 1.92x, p99 1.5x: only p99
        #expect(series.allHookedHeld == 2)
        #expect(series.p99Held == 3)
        let lines = series.lines()
        #expect(lines.contains("all hooked within 1.5x the floor's time: 2 of 4 runs"))
        #expect(lines.contains("p99 HELLO -> HOOK within 2x the floor's p99: 3 of 4 runs"))
        #expect(lines.contains { $0.hasPrefix("release -> all hooked: floor median 135.0 ms (125.0 ms - 140.0 ms), broker median 205.5 ms") })
    }

    @Test func aRunThatDidNotHookEveryGuestHoldsNoBar() {
        var series = StormSeries()
        series.append(run(0.140, 0.150))
        series.append(run(0.140, nil, p99: 0.1, nil))
        series.append(run(nil, 0.150, p99: nil, 0.1))
        #expect(series.allHookedHeld == 1)
        #expect(series.p99Held == 1)
        let lines = series.lines()
        #expect(lines.contains("runs in which a side did not hook every guest: 2 (they hold no bar)"))
        #expect(lines.contains("all hooked within 1.5x the floor's time: 1 of 3 runs"))
        // The medians are of the complete runs only.
        #expect(lines.contains { $0.hasPrefix("release -> all hooked: floor median 140.0 ms (140.0 ms - 140.0 ms)") })
    }

    @Test func noCompleteRunPrintsNoMedians() {
        var series = StormSeries()
        series.append(run(nil, nil, p99: nil, nil))
        // A floor time of zero is no measurement (and no ratio).
        series.append(run(0, 0.1))
        let lines = series.lines()
        #expect(!lines.contains { $0.hasPrefix("release -> all hooked") })
        #expect(lines.contains("runs in which a side did not hook every guest: 2 (they hold no bar)"))
        #expect(lines.contains("all hooked within 1.5x the floor's time: 0 of 2 runs"))
    }

    @Test func medianOfOddAndEvenCounts() {
        #expect(StormSeries.median([3, 1, 2]) == 2)
        #expect(StormSeries.median([4, 1, 3, 2]) == 2.5)
    }
}
