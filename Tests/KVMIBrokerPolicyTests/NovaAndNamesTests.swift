import KVMIBrokerCore
import Testing

@testable import KVMIBrokerPolicy

/// `MatchNova*=` rules over OpenStack Nova's metadata, and the KVMI name tables' sources.
@Suite("Nova rules and KVMI names")
struct NovaAndNamesTests {
    static let project = "8e6b2b4ab9e04d5f8d9e3c9c5e1a2b3c"
    static let image = "4a5e2f7c-9b1d-4c3e-8f6a-2b7d9e0c1a3f"

    static let rules = """
        [guest small-demo]
        MatchNovaProject=8E6B2B4A-B9E0-4D5F-8D9E-3C9C5E1A2B3C
        MatchNovaFlavor=m1.*
        Introspector=acme
        Commands=VM_GET_INFO
        Events=UNHOOK

        [guest golden-image]
        MatchNovaImage=\(image)
        Introspector=acme
        Commands=VM_READ_PHYSICAL
        Events=UNHOOK
        Mode=required

        [guest named]
        MatchName=instance-*
        Introspector=other
        Commands=VM_GET_INFO
        Events=UNHOOK

        [guest asked]
        MatchMetadata=wanted
        Introspector=legacy
        Commands=VCPU_PAUSE
        Events=UNHOOK

        """

    func nova(flavor: String = "m1.small", image: String? = nil, project: String = project) -> NovaMetadata {
        NovaMetadata(projectID: project, projectName: "demo", userID: "0d9b", userName: "alice", flavorName: flavor, imageID: image)
    }

    @Test("project id (any case, dashes or not) and flavor glob must both match; Nova rules outrank name rules")
    func projectAndFlavor() throws {
        let (policy, warnings) = try compiled(Self.rules)
        #expect(warnings.isEmpty)
        let facts = GuestFacts(uuid: GuestUUID("00000000-0000-0000-0000-000000000009")!, name: "instance-0000002a", nova: nova())
        let decision = policy.decide(facts)
        #expect(decision.introspector?.name == "acme")
        #expect(decision.matchedBy == .nova)
        #expect(decision.rule?.section == "guest small-demo")
        // Another flavor: the project alone does not match; the name rule decides.
        let large = policy.decide(GuestFacts(uuid: facts.uuid, name: facts.name, nova: nova(flavor: "x1.large")))
        #expect(large.matchedBy == .name)
        #expect(large.introspector?.name == "other")
        // Another project: nothing of Nova's matches.
        #expect(policy.decide(GuestFacts(uuid: facts.uuid, name: "db", nova: nova(project: "ffffffffffffffffffffffffffffffff"))).rule == nil)
    }

    @Test("the image rule is required; our metadata element outranks Nova rules; explain names the rule and shows the facts")
    func imageMetadataAndExplain() throws {
        let (policy, _) = try compiled(Self.rules)
        let uuid = GuestUUID("00000000-0000-0000-0000-000000000009")!
        let booted = policy.decide(GuestFacts(uuid: uuid, name: "db", nova: nova(flavor: "x1.large", image: Self.image)))
        #expect(booted.rule?.section == "guest golden-image")
        #expect(booted.required)
        let asked = policy.decide(GuestFacts(uuid: uuid, name: "db", metadata: GuestMetadata(), nova: nova(image: Self.image)))
        #expect(asked.matchedBy == .metadata)
        let text = policy.explain(uuid: uuid, name: "instance-1", metadata: nil, nova: nova(image: Self.image))
        #expect(text.contains("nova: project \"demo\" (\(Self.project)), flavor \"m1.small\", image \(Self.image)"))
        #expect(text.contains("rule: [guest golden-image] at guests.d/50-g.conf:8 (matched by Nova metadata)"))
        #expect(text.contains("shadows: [guest small-demo] at guests.d/50-g.conf:1"))
        #expect(text.contains("[guest named] at guests.d/50-g.conf:15 (matched by name, outranked by the Nova metadata rule)"))
    }

    @Test("unreadable Nova metadata matches no Nova rule, and the reason says why, escaped")
    func unreadable() throws {
        let (policy, _) = try compiled(Self.rules)
        let broken = NovaMetadata.unreadable(namespace: "http://openstack.org/xmlns/libvirt/nova/2.0", "version 2.0\u{1b}[31m")
        let decision = policy.decide(GuestFacts(uuid: GuestUUID("00000000-0000-0000-0000-000000000009")!, name: "db", nova: broken))
        #expect(!decision.introspected)
        #expect(decision.reason.contains("the domain's Nova metadata cannot be read: version 2.0\\x1b[31m"))
    }

    @Test("Nova namespaces: 1.0, 1.1 and later 1.x are read; other majors are not")
    func namespaces() {
        #expect(NovaMetadata.isReadable(namespace: "http://openstack.org/xmlns/libvirt/nova/1.0"))
        #expect(NovaMetadata.isReadable(namespace: "http://openstack.org/xmlns/libvirt/nova/1.1"))
        #expect(NovaMetadata.isReadable(namespace: "http://openstack.org/xmlns/libvirt/nova/1.2"))
        #expect(!NovaMetadata.isReadable(namespace: "http://openstack.org/xmlns/libvirt/nova/2.0"))
        #expect(!NovaMetadata.isReadable(namespace: "http://openstack.org/xmlns/libvirt/nova/1."))
        #expect(NovaMetadata.canonicalID("8E6B2B4A-B9E0-4D5F-8D9E-3C9C5E1A2B3C") == Self.project)
        #expect(NovaMetadata.canonicalID("default") == "default")
    }

    @Test("v7 names from libkvmi master: 25, the VCPU-scoped GFN commands, libkvmi spellings; numeric ids reach the allow-lists")
    func v7NamesAndNumericIDs() throws {
        #expect(KVMINames.commands(.v7)["VM_GET_PAGE_WRITE_BITMAP"] == 25)
        #expect(KVMINames.commands(.v7)["VCPU_ALLOC_GFN"] == 41)
        #expect(KVMINames.commands(.v7)["VM_GET_NEXT_AVAILABLE_GFN"] == 31)
        #expect(Set(KVMINames.commands(.v7).values).count == KVMINames.commands(.v7).count)
        let (policy, warnings) = try compiled(
            """
            [guest legacy-web]
            MatchName=legacy-*
            Introspector=legacy
            Commands=GET_GUEST_INFO;KVMI_GET_PAGE_WRITE_BITMAP;VM_ALLOC_GFN;45
            Events=UNHOOK;CMD_ERROR

            """)
        #expect(
            warnings.map(\.description) == [
                "guests.d/50-g.conf:4: warning: Commands: command id 45 has no name in ABI v7's table: allowed by number; check that your kernel's kvmi.h defines it"
            ])
        let decision = policy.decide(GuestFacts(uuid: GuestUUID("00000000-0000-0000-0000-000000000009")!, name: "legacy-1"))
        #expect(decision.allowLists == (try Channel.AllowLists(abi: .v7, commands: [5, 25, 41, 45], events: [0, 12])))
        #expect(
            policy.explain(uuid: nil, name: "legacy-1", metadata: nil).contains(
                "v7 (in use) commands: VM_GET_INFO=5 VM_GET_PAGE_WRITE_BITMAP=25 VCPU_ALLOC_GFN=41 #45=45"))
    }
}
