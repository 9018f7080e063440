import Foundation
import KVMIBrokerCore
import KVMIBrokerPolicy
import Testing

@Suite("explain, dump and domain XML")
struct OutputTests {
    static let guests = """
        [guest prod-windows]
        Description=Production Windows guests
        MatchName=prod-win-*
        Introspector=acme
        Commands=@read-only-monitoring;@page-tracking
        Events=@read-only-monitoring;PF
        Mode=required

        [guest pinned]
        MatchUUID=6695eb01-f6a4-8304-79aa-97f2502e193f
        Introspector=acme
        Commands=VM_GET_INFO;VM_READ_PHYSICAL
        Events=UNHOOK

        """

    @Test("explain names the decision, the rule's file:line, the ids per generation and lower-precedence matches")
    func explain() throws {
        let (policy, _) = try compiled(Self.guests)
        let text = policy.explain(uuid: GuestUUID("6695eb01-f6a4-8304-79aa-97f2502e193f"), name: "prod-win-7", metadata: nil)
        #expect(
            text == """
                guest: uuid 6695eb01-f6a4-8304-79aa-97f2502e193f, name "prod-win-7"
                metadata: none
                decision: introspected by 'acme', best-effort
                reason: matched by UUID in [guest pinned] at guests.d/50-g.conf:9: introspected by 'acme' (ABI v12), best-effort
                rule: [guest pinned] at guests.d/50-g.conf:9 (matched by UUID)
                introspector: [introspector acme] at introspectors.d/10-i.conf:1: endpoint unix:/run/acme/kvmi.sock, ABI v12
                allow-lists:
                  v12 (in use) commands: VM_GET_INFO=8 VM_READ_PHYSICAL=12
                  v12 (in use) events: UNHOOK=0
                  v7 commands: VM_GET_INFO=5 VM_READ_PHYSICAL=17
                  v7 events: UNHOOK=0
                  always allowed: GET_VERSION VM_CHECK_COMMAND VM_CHECK_EVENT
                also matched, lower precedence:
                  [guest prod-windows] at guests.d/50-g.conf:1 (matched by name, outranked by the UUID rule)

                """)
        let denied = policy.explain(uuid: nil, name: "test-1", metadata: nil)
        #expect(
            denied == """
                guest: uuid (unknown: UUID rules not consulted), name "test-1"
                metadata: none
                decision: not introspected
                reason: no rule matches: not introspected (deny by default)

                """)
    }

    @Test("explain shows which generation lacks a name")
    func explainGenerations() throws {
        let (policy, _) = try compiled(
            """
            [guest old]
            MatchName=old
            Introspector=legacy
            Commands=VCPU_PAUSE
            Events=UNHOOK;CREATE_VCPU

            """)
        let text = policy.explain(uuid: nil, name: "old", metadata: nil)
        #expect(text.contains("  v12: cannot resolve VCPU_PAUSE, CREATE_VCPU\n"))
        #expect(text.contains("  v7 (in use) commands: VCPU_PAUSE=7\n"))
        #expect(text.contains("  v7 (in use) events: UNHOOK=0 CREATE_VCPU=9\n"))
    }

    @Test("dump is a key file that loads back into the same decisions")
    func dumpRoundTrip() throws {
        let (policy, _) = try compiled(Self.guests + "[guest tagged]\nMatchMetadata=wanted\nCommands=@full-control\nEvents=@full-control\n")
        let dump = policy.dump()
        #expect(dump.contains("# guests.d/50-g.conf:1\n[guest prod-windows]\nDescription=Production Windows guests\nMatchName=prod-win-*\n"))
        #expect(dump.contains("# v12 ids: commands 3,5,7,8,10,11,12,16,17,19,20,23,29; events 0,1,17\n"))
        let sections = dump.components(separatedBy: "\n[guest ")
        let introspectors = sections[0]
        let guests = "[guest " + sections.dropFirst().joined(separator: "\n[guest ")
        let (reloaded, _) = try Policy.compile(files: [("introspectors.d/x.conf", introspectors), ("guests.d/x.conf", guests)])
        for facts in [
            guest("6695eb01-f6a4-8304-79aa-97f2502e193f", "x"), guest("00000000-0000-0000-0000-000000000009", "prod-win-2"),
            guest("00000000-0000-0000-0000-000000000009", "y", GuestMetadata(introspector: "legacy")),
            guest("00000000-0000-0000-0000-000000000009", "z"),
        ] {
            let before = policy.decide(facts)
            let after = reloaded.decide(facts)
            #expect(before.introspected == after.introspected)
            #expect(before.allowLists == after.allowLists)
            #expect(before.introspector?.endpoint == after.introspector?.endpoint)
            #expect(before.required == after.required)
        }
    }

    @Test("GLib is the parser of record: a line only GLib rejects is still placed on its line")
    func glibFallbackLine() throws {
        let root = TemporaryRoot()
        // GLib refuses a key whose name holds '[' without a closing locale bracket; the scanner lets it through.
        let file = root.write("guests.d/10-x.conf", "[guest a]\nMatchName=a\nCom[mands=x\nEvents=UNHOOK\n")
        do {
            _ = try Policy.load(PolicySources(roots: [root.path], requireRootOwnership: false))
            Issue.record("must fail")
        } catch {
            #expect(error.errors.count == 1)
            #expect(error.errors.first?.file == file)
            #expect(error.errors.first?.line == 3)
            print("GLib said: \(error)")
        }
    }
}

@Suite("Introspector sections")
struct IntrospectorTests {
    @Test("every key is read: endpoint, ABI, secret, timeouts, back-off, allowed peers")
    func keys() throws {
        let (policy, warnings) = try compiled(
            "",
            introspectors: """
                [introspector acme]
                Description=ACME\\sscanner
                Endpoint=unix:/run/acme.sock
                ABI=12
                SecretFile=/etc/kvmi-broker/secrets/acme.key
                HandshakeTimeout=2.5
                UnhookTimeout=750ms
                BackoffInitial=1s
                BackoffMax=60
                AllowedPeer=uid:0; user:acme ;

                """)
        #expect(warnings.isEmpty)
        let acme = try #require(policy.introspectors["acme"])
        #expect(acme.summary == "ACME scanner")
        #expect(acme.endpoint == EndpointTemplate(.unix(path: "/run/acme.sock")))
        #expect(acme.abi == .v12)
        #expect(acme.secretFile == "/etc/kvmi-broker/secrets/acme.key")
        #expect(acme.handshakeTimeout == .milliseconds(2500))
        #expect(acme.unhookTimeout == .milliseconds(750))
        #expect(acme.backoff.initial == .seconds(1))
        #expect(acme.backoff.maximum == .seconds(60))
        #expect(acme.allowedPeers == [.uid(0), .user("acme")])
        #expect(acme.location == RuleLocation(file: "introspectors.d/10-i.conf", line: 1, section: "introspector acme"))
    }
}
