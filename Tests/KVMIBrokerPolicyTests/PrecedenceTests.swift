import KVMIBrokerCore
import Testing

@testable import KVMIBrokerPolicy

@Suite("Decisions and precedence")
struct PrecedenceTests {
    static let uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f"

    @Test("no rule matches: not introspected")
    func denyByDefault() throws {
        let (policy, _) = try compiled("")
        let decision = policy.decide(guest(Self.uuid, "anything"))
        #expect(!decision.introspected)
        #expect(decision.rule == nil)
        #expect(!decision.required)
        #expect(decision.reason == "no rule matches: not introspected (deny by default)")
    }

    static let threeClasses = """
        [guest by-name]
        MatchName=prod-*
        Introspector=acme
        Commands=VM_GET_INFO
        Events=UNHOOK

        [guest by-metadata]
        MatchMetadata=wanted
        Introspector=other
        Commands=VM_READ_PHYSICAL
        Events=UNHOOK

        [guest by-uuid]
        MatchUUID=\(uuid)
        Introspector=legacy
        Commands=VCPU_PAUSE
        Events=UNHOOK;PAUSE_VCPU
        Mode=required

        """

    @Test("UUID rules beat metadata rules beat name rules, whatever the order in the files")
    func classes() throws {
        let (policy, warnings) = try compiled(Self.threeClasses)
        #expect(warnings.isEmpty)
        let all = policy.decide(guest(Self.uuid, "prod-db", GuestMetadata()))
        #expect(all.introspector?.name == "legacy")
        #expect(all.matchedBy == .uuid)
        #expect(all.required)
        #expect(all.allowLists == (try Channel.AllowLists(abi: .v7, commands: [7], events: [0, 10])))
        #expect(all.rule == RuleLocation(file: "guests.d/50-g.conf", line: 13, section: "guest by-uuid"))
        let metadataAndName = policy.decide(guest("00000000-0000-0000-0000-000000000002", "prod-db", GuestMetadata()))
        #expect(metadataAndName.introspector?.name == "other")
        #expect(metadataAndName.matchedBy == .metadata)
        #expect(!metadataAndName.required)
        let nameOnly = policy.decide(guest("00000000-0000-0000-0000-000000000002", "prod-db"))
        #expect(nameOnly.introspector?.name == "acme")
        #expect(nameOnly.allowLists == (try Channel.AllowLists(abi: .v12, commands: [8], events: [0])))
        #expect(!policy.decide(guest("00000000-0000-0000-0000-000000000002", "test-db")).introspected)
    }

    @Test("a domain that opts out with wanted=no is not matched by metadata rules")
    func optOut() throws {
        let (policy, _) = try compiled(Self.threeClasses)
        let decision = policy.decide(guest("00000000-0000-0000-0000-000000000002", "prod-db", GuestMetadata(wanted: false)))
        #expect(decision.matchedBy == .name)
    }

    @Test("overlapping globs with different introspectors: a decision-time conflict naming both rules, failing closed")
    func decisionTimeConflict() throws {
        let (policy, _) = try compiled(
            """
            [guest prod]
            MatchName=prod-*
            Introspector=acme
            Commands=VM_GET_INFO
            Events=UNHOOK
            Mode=required

            [guest databases]
            MatchName=*-db
            Introspector=other
            Commands=VM_GET_INFO
            Events=UNHOOK

            """)
        let decision = policy.decide(guest(Self.uuid, "prod-db"))
        #expect(!decision.introspected)
        #expect(decision.required, "a required rule is among the conflicting ones: the guest must not start unmonitored")
        #expect(decision.conflicts == [RuleLocation(file: "guests.d/50-g.conf", line: 1, section: "guest prod")])
        #expect(
            decision.reason
                == "conflict between name rules: [guest prod] at guests.d/50-g.conf:1 gives 'acme'; [guest databases] at guests.d/50-g.conf:8 gives 'other': not introspected"
        )
        #expect(policy.decide(guest(Self.uuid, "prod-web")).introspector?.name == "acme")
        #expect(policy.decide(guest(Self.uuid, "test-db")).introspector?.name == "other")
    }

    @Test("same introspector within a class: the latest rule in policy order wins, the others are shadowed")
    func latestWins() throws {
        let (policy, _) = try compiled(
            """
            [guest broad]
            MatchName=*
            Introspector=acme
            Commands=@read-only-monitoring
            Events=UNHOOK

            """,
            extra: [
                (
                    "guests.d/60-site.conf",
                    """
                    [guest narrow]
                    MatchName=prod-*
                    Introspector=acme
                    Commands=@full-control
                    Events=@full-control
                    Mode=required

                    """
                )
            ])
        let decision = policy.decide(guest(Self.uuid, "prod-db"))
        #expect(decision.rule?.file == "guests.d/60-site.conf")
        #expect(decision.shadowed == [RuleLocation(file: "guests.d/50-g.conf", line: 1, section: "guest broad")])
        #expect(decision.required)
        #expect(decision.allowLists?.commands.count == KVMINames.commands(.v12).count - KVMINames.alwaysAllowed.count)
        #expect(policy.decide(guest(Self.uuid, "test")).rule?.section == "guest broad")
    }

    @Test("a section with the same name in a later file replaces the earlier one as a whole")
    func sectionOverride() throws {
        let (policy, _) = try compiled(
            """
            [guest prod]
            MatchName=prod-*
            Introspector=acme
            Commands=@read-only-monitoring
            Events=UNHOOK
            Mode=required

            """,
            extra: [
                (
                    "guests.d/60-site.conf",
                    """
                    [guest prod]
                    MatchName=prod-web-*
                    Introspector=other
                    Commands=VM_GET_INFO
                    Events=UNHOOK

                    """
                )
            ])
        #expect(policy.rules.count == 1)
        #expect(policy.rules[0].replaced == RuleLocation(file: "guests.d/50-g.conf", line: 1, section: "guest prod"))
        #expect(!policy.decide(guest(Self.uuid, "prod-db")).introspected)
        let web = policy.decide(guest(Self.uuid, "prod-web-1"))
        #expect(web.introspector?.name == "other")
        #expect(!web.required)
    }

    @Test("metadata rules may leave the introspector to the domain's metadata")
    func metadataIntrospector() throws {
        let (policy, _) = try compiled(
            """
            [guest tagged]
            MatchMetadata=wanted
            Commands=@read-only-monitoring
            Events=@read-only-monitoring

            [guest legacy-tagged]
            MatchMetadata=introspector:legacy
            Introspector=legacy
            Commands=@read-only-monitoring
            Events=@read-only-monitoring
            Mode=required

            """)
        let acme = policy.decide(guest(Self.uuid, "x", GuestMetadata(introspector: "acme")))
        #expect(acme.introspector?.name == "acme")
        #expect(acme.allowLists?.abi == .v12)
        let legacy = policy.decide(guest(Self.uuid, "x", GuestMetadata(introspector: "legacy")))
        #expect(legacy.introspector?.name == "legacy")
        #expect(legacy.allowLists?.abi == .v7)
        #expect(legacy.rule?.section == "guest legacy-tagged")
        #expect(legacy.shadowed.map(\.section) == ["guest tagged"])
        let unknown = policy.decide(guest(Self.uuid, "x", GuestMetadata(introspector: "nobody")))
        #expect(!unknown.introspected)
        #expect(unknown.reason == "the domain's metadata names introspector 'nobody', which introspectors.d does not define: not introspected")
        let unnamed = policy.decide(guest(Self.uuid, "x", GuestMetadata()))
        #expect(!unnamed.introspected)
        let required = policy.decide(guest(Self.uuid, "x", GuestMetadata(introspector: "acme", required: true)))
        #expect(required.introspected && required.required, "the domain may ask for required, never for more access")
    }

    @Test("names resolve per generation; aliases and prefixes are accepted; always-allowed commands are implicit")
    func resolution() throws {
        let (policy, _) = try compiled(
            """
            [guest g]
            MatchName=g
            Commands=kvmi_vm_get_info;GET_VERSION;@page-tracking
            Events=KVMI_EVENT_PF;UNHOOK
            Introspector=legacy

            """)
        let decision = policy.decide(guest(Self.uuid, "g"))
        #expect(decision.allowLists == (try Channel.AllowLists(abi: .v7, commands: [5, 20, 21, 26], events: [0, 6])))
        guard case .resolved(let v12, let commands, _)? = policy.rules[0].resolved[.v12] else {
            Issue.record("v12 did not resolve")
            return
        }
        #expect(v12.commands == [8, 20])
        #expect(commands == ["VM_GET_INFO", "VM_SET_PAGE_ACCESS"])
    }

    @Test("the shipped groups name only commands and events their generation has")
    func groups() {
        for abi in ABIGeneration.allCases {
            for group in PolicyGroups.names {
                for name in PolicyGroups.commands(group, abi) ?? [] { #expect(KVMINames.commands(abi)[name] != nil, "\(group) \(abi) \(name)") }
                for name in PolicyGroups.events(group, abi) ?? [] { #expect(KVMINames.events(abi)[name] != nil, "\(group) \(abi) \(name)") }
                #expect(PolicyGroups.events(group, abi)?.contains("UNHOOK") == (group != "@page-tracking"))
            }
        }
    }

    @Test("name globs")
    func globs() throws {
        #expect(try NamePattern("prod-*").matches("prod-db"))
        #expect(try !NamePattern("prod-*").matches("test-prod-db"))
        #expect(try NamePattern("*-db").matches("prod-db"))
        #expect(try NamePattern("web-??").matches("web-01"))
        #expect(try !NamePattern("web-??").matches("web-1"))
        #expect(try NamePattern("web-[0-9]*").matches("web-7x"))
        #expect(try !NamePattern("web-[!0-9]*").matches("web-7x"))
        #expect(try NamePattern("caf?").matches("café"))
        #expect(try NamePattern("a*b*c").matches("axxbyyc"))
        #expect(try !NamePattern("a*b*c").matches("axxbyy"))
        #expect(try NamePattern("exact").isLiteral)
    }

    /// 10,000 rules: UUIDs (half), literal names (a quarter), name globs (a quarter), one metadata rule.
    static func manyRules() -> String {
        var text = ""
        for number in 0..<10_000 {
            // Groups, not single names: the compiler looks for a did-you-mean suggestion for every
            // single name, which makes 10,000 of them take seconds to load.
            let body = "Introspector=acme\nCommands=@read-only-monitoring\nEvents=@read-only-monitoring\n\n"
            switch number % 4 {
            case 0, 1: text += "[guest u\(number)]\nMatchUUID=\(numberedUUID(number))\n" + body
            case 2: text += "[guest n\(number)]\nMatchName=vm-\(number)\n" + body
            default: text += "[guest g\(number)]\nMatchName=web-\(number)-*\n" + body
            }
        }
        return text + "[guest meta]\nMatchMetadata=wanted\nIntrospector=acme\nCommands=@read-only-monitoring\nEvents=@read-only-monitoring\n"
    }

    static func numberedUUID(_ number: Int) -> String {
        let hex = String(number, radix: 16)
        return "00000000-0000-4000-8000-" + String(repeating: "0", count: 12 - hex.count) + hex
    }

    /// The decision's cost is asserted as work, not time (a timing figure would fail on a busy
    /// machine; `kvmi-bench policy` measures it): UUIDs and literal names are dictionary lookups,
    /// and a name tries only the globs sharing its literal prefix, a handful of probes in all.
    @Test("10,000 rules: each decision is found through the indexes, trying at most one glob")
    func manyRulesAreIndexed() throws {
        let (policy, warnings) = try compiled(Self.manyRules())
        #expect(warnings.isEmpty, "\(warnings)")
        #expect(policy.rules.count == 10_001)
        #expect(policy.index.byUUID.count == 5_000)
        #expect(policy.index.byLiteralName.count == 2_500)
        #expect(policy.index.globsByPrefix.values.map(\.count).reduce(0, +) == 2_500)

        let cases: [(GuestFacts, String?, MatchClass?)] = [
            (guest(Self.numberedUUID(4), "vm-6"), "guest u4", .uuid),
            (guest(Self.numberedUUID(9_997), "anything"), "guest u9997", .uuid),
            (guest(Self.numberedUUID(2), "vm-6"), "guest n6", .name),
            (guest(Self.numberedUUID(10_001), "web-7-eu"), "guest g7", .name),
            (guest(Self.numberedUUID(10_002), "web-9999-x"), "guest g9999", .name),
            (guest(Self.numberedUUID(10_003), "web-7", GuestMetadata()), "guest meta", .metadata),
            (guest(Self.numberedUUID(10_004), "web-7"), nil, nil),
            (guest(Self.numberedUUID(10_005), "vm-7"), nil, nil),
        ]
        for (facts, section, matchedBy) in cases {
            let decision = policy.decide(facts)
            #expect(decision.rule?.section == section, "\(facts)")
            #expect(decision.matchedBy == matchedBy, "\(facts)")
            #expect(decision.introspected == (section != nil), "\(facts)")
            // The globs a name lookup pattern-matches: those filed under one of its prefixes.
            let name = Array(facts.name.utf8)
            let tried = policy.index.prefixLengths.filter { $0 <= name.count }
                .compactMap { policy.index.globsByPrefix[String(decoding: name.prefix($0), as: UTF8.self)]?.count }
            #expect(tried.reduce(0, +) <= 1, "\(facts): \(tried)")
        }
        // Prefix lengths probed per lookup: "web-7-" to "web-9999-".
        #expect(policy.index.prefixLengths == [6, 7, 8, 9])
    }

    @Test("the policy benchmark of kvmi-bench runs (its timings are reported there, not asserted here)")
    func benchmarkRuns() throws {
        let result = try PolicyBenchmark.run(rules: 100, lookups: 1_000)
        #expect(result.rules == 101 && result.lookups == 1_000)
        #expect(result.introspected > 0 && result.introspected < 1_000)
    }
}
