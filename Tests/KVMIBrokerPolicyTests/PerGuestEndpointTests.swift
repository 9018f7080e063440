import KVMIBrokerCore
import Testing

@testable import KVMIBrokerPolicy

@Suite("Per-guest endpoints in the policy")
struct PerGuestEndpointTests {
    let perGuest = """
        [introspector acme]
        Endpoint=unix:/run/acme/{name}-{uuid}.sock
        ABI=v12
        SecretFile=/etc/kvmi-broker/secrets/acme.key

        """
    let uuid = "6a1f0c2e-9b3d-4e5f-8a7b-1c2d3e4f5a6b"

    func facts(_ name: String, verified: Bool = true) -> GuestFacts {
        GuestFacts(uuid: GuestUUID(uuid)!, name: name, identityVerified: verified)
    }

    @Test("each guest gets its own endpoint, from its UUID and name")
    func expandedPerGuest() throws {
        let (policy, _) = try compiled("[guest web]\nMatchName=web-*\nIntrospector=acme\nCommands=\nEvents=\n", introspectors: perGuest)
        #expect(policy.introspectors["acme"]?.endpoint.isPerGuest == true)
        let decision = policy.decide(facts("web-1"))
        #expect(decision.outcome == .introspected)
        #expect(decision.endpoint == .unix(path: "/run/acme/web-1-\(uuid).sock"))
        let other = policy.decide(GuestFacts(uuid: GuestUUID("00000000-0000-0000-0000-000000000002")!, name: "web-2", identityVerified: true))
        #expect(other.endpoint == .unix(path: "/run/acme/web-2-00000000-0000-0000-0000-000000000002.sock"))
    }

    @Test("a fixed endpoint is the decision's endpoint, verified identity or not")
    func fixedUnchanged() throws {
        let (policy, _) = try compiled("[guest web]\nMatchName=web-*\nIntrospector=acme\nCommands=\nEvents=\n")
        #expect(policy.decide(facts("web-1", verified: false)).endpoint == .unix(path: "/run/acme/kvmi.sock"))
        #expect(policy.decide(facts("web-1", verified: false)).outcome == .introspected)
    }

    @Test("without libvirt's verified identity a per-guest endpoint is not expanded: not introspected, required fails closed")
    func unverifiedIdentity() throws {
        let (policy, _) = try compiled(
            "[guest web]\nMatchName=web-*\nIntrospector=acme\nCommands=\nEvents=\n[guest db]\nMatchName=db\nIntrospector=acme\nCommands=\nEvents=\nMode=required\n",
            introspectors: perGuest)
        let web = policy.decide(facts("web-1", verified: false))
        #expect(web.outcome == .notIntrospected)
        #expect(web.endpoint == nil)
        #expect(web.reason.contains("expanded only from the identity libvirt verified"), "\(web.reason)")
        #expect(web.reason.contains("[guest web] at guests.d/50-g.conf:1"), "\(web.reason)")
        let db = policy.decide(facts("db", verified: false))
        #expect(db.outcome == .requiredButUnservable)
    }

    @Test("a name the expansion refuses: not introspected (required: fail closed), the reason names the guest UUID, the rule and why")
    func refusedName() throws {
        let (policy, _) = try compiled(
            "[guest all]\nMatchName=*\nIntrospector=acme\nCommands=\nEvents=\nMode=required\n", introspectors: perGuest)
        let decision = policy.decide(facts("../etc"))
        #expect(decision.outcome == .requiredButUnservable)
        #expect(decision.endpoint == nil)
        #expect(decision.reason.contains("guest \(uuid)"), "\(decision.reason)")
        #expect(decision.reason.contains("contains '/'"), "\(decision.reason)")
        #expect(decision.reason.contains("[guest all] at guests.d/50-g.conf:1"), "\(decision.reason)")
    }

    @Test("placeholders outside unix paths, unknown ones, and abstract templates without AllowedPeer are file:line errors")
    func loadErrors() {
        let cases = [
            ("[introspector acme]\nEndpoint=vsock:3:{uuid}\nABI=v12\nAuthentication=none\n", "introspectors.d/10-i.conf:2: ", "only in unix:"),
            ("[introspector acme]\nEndpoint=tcp:127.0.0.1:{name}\nABI=v12\nAuthentication=none\n", "introspectors.d/10-i.conf:2: ", "only in unix:"),
            (
                "[introspector acme]\nABI=v12\nEndpoint=unix:/run/{id}.sock\nAuthentication=none\n", "introspectors.d/10-i.conf:3: ",
                "unknown placeholder"
            ),
            (
                "[introspector acme]\nEndpoint=unix:@acme-{uuid}\nABI=v12\nAuthentication=none\n", "introspectors.d/10-i.conf:2: ",
                "unix:@acme-{uuid} needs AllowedPeer"
            ),
        ]
        for (text, place, why) in cases {
            #expect {
                _ = try Policy.compile(files: [("introspectors.d/10-i.conf", text)])
            } throws: { error in
                guard let error = error as? PolicyLoadError else { return false }
                return error.errors.contains { $0.description.hasPrefix(place) && $0.description.contains(why) }
            }
        }
    }

    @Test("explain shows the template and the value for the guest")
    func explain() throws {
        let (policy, _) = try compiled("[guest web]\nMatchName=web-*\nIntrospector=acme\nCommands=\nEvents=\n", introspectors: perGuest)
        let full = policy.explain(uuid: GuestUUID(uuid), name: "web-1", metadata: nil)
        #expect(full.contains("endpoint unix:/run/acme/{name}-{uuid}.sock (per guest), ABI v12"), "\(full)")
        #expect(full.contains("endpoint for this guest: unix:/run/acme/web-1-\(uuid).sock"), "\(full)")
        let nameOnly = policy.explain(uuid: nil, name: "web-1", metadata: nil)
        #expect(nameOnly.contains("endpoint for this guest: unknown: {name} and {uuid} needs the guest's UUID and name"), "\(nameOnly)")
        let refused = policy.explain(uuid: GuestUUID(uuid), name: "web-a\u{1B}/b", metadata: nil)
        #expect(refused.contains("decision: not introspected"), "\(refused)")
        #expect(refused.contains("endpoint for this guest: none"), "\(refused)")
        #expect(!refused.contains("\u{1B}"))
        // dump writes the template back as it was written, so the dump loads again.
        #expect(policy.dump().contains("Endpoint=unix:/run/acme/{name}-{uuid}.sock"))
    }
}
