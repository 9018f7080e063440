import KVMIBrokerCore
import Testing

@Suite("Repeating failures in the log and durations as people read them")
struct FailureStreakTests {
    @Test("a failure is reported when it starts, when it changes, in summaries at a growing bounded interval, and when it recovers")
    func streak() {
        var streak = FailureStreak(firstInterval: .seconds(60), longestInterval: .seconds(240))
        let start = ContinuousClock.now
        func at(_ seconds: Int) -> ContinuousClock.Instant { start + .seconds(seconds) }
        #expect(streak.succeeded(at: at(0)) == nil)
        #expect(streak.failed("ECONNREFUSED", at: at(0)) == .started(reason: "ECONNREFUSED"))
        // Every retry within the first minute is silent.
        for second in stride(from: 1, to: 60, by: 3) { #expect(streak.failed("ECONNREFUSED", at: at(second)) == nil) }
        let attempts = streak.attempts
        #expect(streak.failed("ECONNREFUSED", at: at(63)) == .stillFailing(reason: "ECONNREFUSED", attempts: attempts + 1, over: .seconds(63)))
        // The next summary is two minutes later, then four, then at most four (the bound).
        #expect(streak.failed("ECONNREFUSED", at: at(182)) == nil)
        #expect(streak.failed("ECONNREFUSED", at: at(183)) != nil)
        #expect(streak.failed("ECONNREFUSED", at: at(422)) == nil)
        #expect(streak.failed("ECONNREFUSED", at: at(423)) != nil)
        #expect(streak.failed("ECONNREFUSED", at: at(662)) == nil)
        #expect(streak.failed("ECONNREFUSED", at: at(663)) != nil)
        // Another reason is news at once.
        let before = streak.attempts
        #expect(streak.failed("ETIMEDOUT", at: at(664)) == .changed(reason: "ETIMEDOUT", attempts: before + 1, over: .seconds(664)))
        #expect(streak.failed("ETIMEDOUT", at: at(665)) == nil)
        #expect(streak.succeeded(at: at(700)) == .recovered(attempts: before + 2, over: .seconds(700)))
        #expect(!streak.isFailing && streak.succeeded(at: at(701)) == nil)
        // A new failure after the recovery starts a new streak.
        #expect(streak.failed("ECONNREFUSED", at: at(710)) == .started(reason: "ECONNREFUSED"))
    }

    @Test("report sentences name the activity, the count and a readable duration")
    func sentences() {
        let activity = "connecting to libvirt (qemu:///system)"
        #expect(FailureStreak.Report.started(reason: "no socket").sentence(activity) == "connecting to libvirt (qemu:///system) failed: no socket")
        #expect(
            FailureStreak.Report.stillFailing(reason: "no socket", attempts: 12, over: .seconds(63)).sentence(activity)
                == "connecting to libvirt (qemu:///system) still failing after 12 attempts over 1 min 3 s: no socket")
        #expect(
            FailureStreak.Report.recovered(attempts: 1, over: .milliseconds(530)).sentence(activity)
                == "connecting to libvirt (qemu:///system) succeeded after 1 failed attempt over 0.53 s")
        #expect(FailureStreak.Report.recovered(attempts: 2, over: .zero).isRecovery)
        #expect(!FailureStreak.Report.started(reason: "x").isRecovery)
    }

    @Test(
        "durations read as people write them, never as a raw Double",
        arguments: [
            (Duration.nanoseconds(310_000), "0.31 ms"), (.microseconds(2_500), "2.5 ms"), (.milliseconds(250), "0.25 s"),
            (.milliseconds(40), "40 ms"), (.nanoseconds(533_587_680), "0.53 s"), (.seconds(2), "2 s"), (.milliseconds(2_500), "2.5 s"),
            (.milliseconds(12_340), "12.3 s"), (.seconds(63), "1 min 3 s"), (.seconds(120), "2 min"), (.seconds(3_725), "1 h 2 min"),
            (.seconds(3_600), "1 h"), (.seconds(90_000), "1 d 1 h"), (.zero, "0 ms"),
        ])
    func humanReadable(duration: Duration, text: String) {
        #expect(duration.humanReadable == text)
    }

    @Test("seconds from a command line read the same way")
    func seconds() {
        #expect(Duration.humanReadable(seconds: 5) == "5 s")
        #expect(Duration.humanReadable(seconds: 0.5335876809753782) == "0.53 s")
    }
}
