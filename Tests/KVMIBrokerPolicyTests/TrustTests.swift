import Foundation
import KVMIBrokerCore
import KVMIBrokerPolicy
import Testing

@Suite("Peer and file text in logs (escapedForLog)")
struct EscapingTests {
    @Test("control bytes, DEL, C1 controls, separators and bidi overrides are escaped; the rest is kept")
    func controls() {
        #expect(escapedForLog("plain text, with \\ and 'quotes'") == "plain text, with \\ and 'quotes'")
        #expect(escapedForLog("a\nb\r\tc\u{0}d\u{7F}") == "a\\x0ab\\x0d\\x09c\\x00d\\x7f")
        #expect(escapedForLog("\u{1B}[2J\u{1B}]0;title\u{07}") == "\\x1b[2J\\x1b]0;title\\x07")
        #expect(escapedForLog("x\u{85}y\u{9B}z") == "x\\u{0085}y\\u{009B}z")
        #expect(escapedForLog("line\u{2028}para\u{2029}end") == "line\\u{2028}para\\u{2029}end")
        #expect(escapedForLog("abc\u{202E}fed\u{2066}\u{FEFF}") == "abc\\u{202E}fed\\u{2066}\\u{FEFF}")
        #expect(escapedForLog("café ünïcödé 日本 🙂") == "café ünïcödé 日本 🙂")
    }

    @Test("invalid UTF-8 is shown byte by byte as \\xNN")
    func invalidUTF8() {
        #expect(escapedForLog([0x61, 0xFF, 0x62]) == "a\\xffb")
        #expect(escapedForLog([0xC3]) == "\\xc3", "a sequence cut short")
        #expect(escapedForLog([0xC0, 0xAF]) == "\\xc0\\xaf", "an overlong form")
        #expect(escapedForLog([0xED, 0xA0, 0x80]) == "\\xed\\xa0\\x80", "a surrogate")
        #expect(escapedForLog([0xF4, 0x90, 0x80, 0x80]) == "\\xf4\\x90\\x80\\x80", "above U+10FFFF")
        #expect(escapedForLog(Array("é".utf8)) == "é")
    }

    @Test("the length is bounded with a visible marker, never cutting a character")
    func bounded() {
        let long = String(repeating: "A", count: 1 << 20)
        let shown = escapedForLog(long)
        #expect(shown == String(repeating: "A", count: 256) + "...(\((1 << 20) - 256) more bytes)")
        #expect(escapedForLog("ab€", limit: 3) == "ab...(3 more bytes)", "the 3-byte character does not fit and is not cut")
        #expect(escapedForLog("abc", limit: 3) == "abc")
        #expect(escapedForLog([UInt8](repeating: 0, count: 10), limit: 4) == "\\x00\\x00\\x00\\x00...(6 more bytes)")
    }

    @Test("escaping is idempotent")
    func idempotent() {
        let once = escapedForLog("a\u{1B}b\u{2028}c\u{FF}")
        #expect(escapedForLog(once) == once)
    }
}

@Suite("Policy trust: values, secrets, peers, fail closed")
struct PolicyTrustTests {
    func load(_ root: TemporaryRoot) -> [PolicyDiagnostic] {
        do {
            return try Policy.load(PolicySources(roots: [root.path], requireRootOwnership: false)).1
        } catch {
            return error.diagnostics
        }
    }

    @Test("a megabyte line in an error is shown bounded and escaped")
    func megabyteLine() throws {
        let root = TemporaryRoot()
        let file = root.write("guests.d/50-g.conf", "[guest a]\n\u{1B}[31m" + String(repeating: "x", count: 1 << 20) + "\n")
        let diagnostics = load(root)
        #expect(diagnostics.count == 1)
        let text = try #require(diagnostics.first?.description)
        #expect(text.hasPrefix("\(file):2: '\\x1b[31mxxx"))
        #expect(text.contains("...(\((1 << 20) + 5 - 256) more bytes)' is not 'Key=Value'"), "\(text.prefix(400))")
        #expect(text.utf8.count < 600)
        #expect(!text.unicodeScalars.contains { $0.value < 0x20 })
    }

    @Test("a NUL byte inside a value is refused at its line (GLib would cut the value there)")
    func nulInValue() {
        let root = TemporaryRoot()
        root.write("introspectors.d/10-i.conf", acmeIntrospectors)
        let file = root.path + "/guests.d/50-g.conf"
        root.write(
            "guests.d/50-g.conf",
            bytes: Data("[guest a]\nMatchName=web-*\u{0}\nIntrospector=acme\nCommands=VM_GET_INFO\nEvents=UNHOOK\n".utf8))
        #expect(load(root).map(\.description) == ["\(file):2: the line holds a NUL byte (at byte 16); policy files are text"])
    }

    @Test("every diagnostic's message and file name is escaped, whatever produced it")
    func diagnosticsEscaped() {
        let diagnostic = PolicyDiagnostic(.error, file: "/etc/x\n.conf", line: 3, "bad \u{1B}[2J value\nforged line")
        #expect(diagnostic.description == "/etc/x\\x0a.conf:3: bad \\x1b[2J value\\x0aforged line")
    }

    @Test("AllowedPeer is kept in the introspector's configuration for the connector, deduplicated")
    func allowedPeersKept() throws {
        let (policy, warnings) = try compiled(
            "",
            introspectors: """
                [introspector av]
                Endpoint=unix:@av-kvmi
                ABI=v12
                SecretFile=/etc/kvmi-broker/secrets/av.key
                AllowedPeer=user:av-scanner;uid:0;uid:0

                [introspector svm]
                Endpoint=vsock:3:1234
                ABI=v7
                Authentication=none
                AllowedPeer=cid:3

                """)
        #expect(policy.introspectors["av"]?.allowedPeers == [.user("av-scanner"), .uid(0)])
        #expect(policy.introspectors["av"]?.authentication == .cookie)
        #expect(policy.introspectors["av"]?.secretFileLine == 4)
        #expect(policy.introspectors["svm"]?.allowedPeers == [.cid(3)])
        #expect(policy.introspectors["svm"]?.authentication == .unauthenticated)
        #expect(
            warnings.map(\.description) == [
                "introspectors.d/10-i.conf:10: warning: [introspector svm] has Authentication=none: the introspector is not authenticated; any process that can listen at vsock:3:1234 gets the guests' introspection"
            ])
        #expect(policy.dump().contains("[introspector svm]\nEndpoint=vsock:3:1234\nABI=v7\nAuthentication=none\n"))
    }

    @Test("a user name with control or odd bytes is not an AllowedPeer")
    func badUserName() {
        let root = TemporaryRoot()
        let file = root.write(
            "introspectors.d/10-i.conf",
            "[introspector av]\nEndpoint=unix:/run/av.sock\nABI=v12\nSecretFile=/etc/kvmi-broker/av.key\nAllowedPeer=user:av\u{7F}x\n")
        #expect(load(root).map(\.description) == ["\(file):5: AllowedPeer 'user:av\\x7fx' is not 'uid:NUMBER', 'user:NAME' or 'cid:NUMBER'"])
    }

    static let conflicting = """
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

        """

    @Test("a decision that is required but cannot be served says so explicitly (fail closed)")
    func requiredButUnservable() throws {
        let (policy, _) = try compiled(Self.conflicting)
        let conflict = policy.decide(guest("00000000-0000-0000-0000-000000000001", "prod-db"))
        #expect(conflict.outcome == .requiredButUnservable)
        #expect(policy.decide(guest("00000000-0000-0000-0000-000000000001", "prod-web")).outcome == .introspected)
        #expect(policy.decide(guest("00000000-0000-0000-0000-000000000001", "test")).outcome == .notIntrospected)
        let explained = policy.explain(uuid: nil, name: "prod-db", metadata: nil)
        #expect(explained.contains("decision: not introspected, required (fail closed): the guest must not start (libvirt's hook vetoes it)\n"))

        // A best-effort conflict is just "not introspected".
        let (relaxed, _) = try compiled(Self.conflicting.replacingOccurrences(of: "Mode=required\n", with: ""))
        #expect(relaxed.decide(guest("00000000-0000-0000-0000-000000000001", "prod-db")).outcome == .notIntrospected)

        // Metadata asking for required, naming an introspector the policy lacks: fail closed too.
        let (metadataPolicy, _) = try compiled("[guest tagged]\nMatchMetadata=wanted\nCommands=VM_GET_INFO\nEvents=UNHOOK\n")
        let missing = metadataPolicy.decide(guest("00000000-0000-0000-0000-000000000001", "x", GuestMetadata(introspector: "gone\n", required: true)))
        #expect(missing.outcome == .requiredButUnservable)
        #expect(missing.reason.contains("names introspector 'gone\\x0a'"), "peer text in the reason is escaped: \(missing.reason)")
    }

    @Test("explain escapes the guest's name and metadata")
    func explainEscapes() throws {
        let (policy, _) = try compiled("")
        let text = policy.explain(uuid: nil, name: "evil\u{1B}[2Jname", metadata: GuestMetadata(introspector: "x\ny"))
        #expect(
            text.hasPrefix(
                "guest: uuid (unknown: UUID rules not consulted), name \"evil\\x1b[2Jname\"\nmetadata: <introspection wanted=\"yes\" introspector=\"x\\x0ay\"/>\n"
            ))
    }
}
