import KVMIBrokerCore

/// Decision time with many rules, for `kvmi-bench policy`.
public enum PolicyBenchmark {
    public struct Result: Sendable {
        public var rules: Int
        public var lookups: Int
        /// Mean time of one `decide`.
        public var perDecision: Duration
        /// Parsing and compiling the generated files.
        public var load: Duration
        /// How many of the looked-up guests were introspected (a sanity figure).
        public var introspected: Int
    }

    /// Generates `rules` guest rules (half by UUID, a quarter by literal name, a quarter by name
    /// glob, and one metadata rule), loads them, and times `lookups` decisions over guests that
    /// hit every class and guests that match nothing.
    public static func run(rules: Int, lookups: Int) throws(PolicyLoadError) -> Result {
        precondition(rules >= 4 && lookups >= 1)
        var generator = SystemRandomNumberGenerator()
        let introspectors = """
            [introspector bench]
            Endpoint=unix:/run/bench.sock
            ABI=v12
            Authentication=none

            """
        var guests = ""
        var uuids: [GuestUUID] = []
        for number in 0..<rules {
            let commands = "Commands=@read-only-monitoring\nEvents=@read-only-monitoring\nIntrospector=bench\n"
            switch number % 4 {
            case 0, 1:
                let uuid = GuestUUID.random(using: &generator)
                uuids.append(uuid)
                guests += "[guest u\(number)]\nMatchUUID=\(uuid)\n\(commands)\n"
            case 2:
                guests += "[guest n\(number)]\nMatchName=vm-\(number)\n\(commands)\n"
            default:
                guests += "[guest g\(number)]\nMatchName=\(["web", "db", "app", "ci", "lab"][number % 5])-\(number)-*\n\(commands)\n"
            }
        }
        guests += "[guest meta]\nMatchMetadata=wanted\n" + "Commands=@read-only-monitoring\nEvents=@read-only-monitoring\nIntrospector=bench\n"
        let clock = ContinuousClock()
        let start = clock.now
        let (policy, _) = try Policy.compile(files: [("introspectors.d/10-bench.conf", introspectors), ("guests.d/50-bench.conf", guests)])
        let load = clock.now - start
        var facts: [GuestFacts] = []
        for number in 0..<min(lookups, 4096) {
            let uuid = number % 4 == 0 && !uuids.isEmpty ? uuids[number % uuids.count] : GuestUUID.random(using: &generator)
            let name = number % 4 == 1 ? "vm-\((number * 4 + 2) % rules)" : number % 4 == 2 ? "db-\(number)-x" : "unmatched-\(number)"
            facts.append(GuestFacts(uuid: uuid, name: name, metadata: number % 8 == 3 ? GuestMetadata() : nil))
        }
        var introspected = 0
        let decisionsStart = clock.now
        for lookup in 0..<lookups where policy.decide(facts[lookup % facts.count]).introspected {
            introspected += 1
        }
        let elapsed = clock.now - decisionsStart
        return Result(rules: rules + 1, lookups: lookups, perDecision: elapsed / lookups, load: load, introspected: introspected)
    }
}
