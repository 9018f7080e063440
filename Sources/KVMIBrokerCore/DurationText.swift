extension Duration {
    /// The duration as people read it, for logs and messages: "0.31 ms", "250 ms", "0.53 s",
    /// "2.5 s", "1 min 3 s", "2 h 5 min" (never `Duration`'s or `Double`'s raw description).
    public var humanReadable: String {
        let seconds = secondsDouble
        guard seconds.isFinite else { return "\(seconds) s" }
        if seconds < 0 { return "-" + (Duration.zero - self).humanReadable }
        if seconds < 0.1 {
            let milliseconds = seconds * 1000
            if milliseconds >= 10 { return "\(Int(milliseconds.rounded())) ms" }
            return Self.decimal(milliseconds, places: milliseconds >= 1 ? 1 : 2) + " ms"
        }
        if seconds < 10 { return Self.decimal(seconds, places: 2) + " s" }
        if seconds < 60 { return Self.decimal(seconds, places: 1) + " s" }
        let whole = Int(seconds.rounded())
        if whole < 3600 { return whole % 60 == 0 ? "\(whole / 60) min" : "\(whole / 60) min \(whole % 60) s" }
        let minutes = (whole + 30) / 60
        if minutes < 24 * 60 { return minutes % 60 == 0 ? "\(minutes / 60) h" : "\(minutes / 60) h \(minutes % 60) min" }
        let hours = (minutes + 30) / 60
        return hours % 24 == 0 ? "\(hours / 24) d" : "\(hours / 24) d \(hours % 24) h"
    }

    /// Seconds given as a Double (command-line options), as people read them.
    public static func humanReadable(seconds: Double) -> String {
        guard seconds.isFinite, abs(seconds) < 1e12 else { return "\(seconds) s" }
        return Duration.nanoseconds(Int64((seconds * 1e9).rounded())).humanReadable
    }

    /// `value` with at most `places` decimals, trailing zeros dropped: 0.5 -> "0.5", 2 -> "2".
    private static func decimal(_ value: Double, places: Int) -> String {
        var scale = 1.0
        for _ in 0..<places { scale *= 10 }
        let scaled = Int64((value * scale).rounded())
        let integer = scaled / Int64(scale)
        var fraction = String(scaled % Int64(scale))
        fraction = String(repeating: "0", count: places - fraction.count) + fraction
        while fraction.hasSuffix("0") { fraction.removeLast() }
        return fraction.isEmpty ? "\(integer)" : "\(integer).\(fraction)"
    }
}
