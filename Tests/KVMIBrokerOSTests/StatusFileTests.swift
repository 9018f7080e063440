import Foundation
import Testing

@testable import KVMIBrokerDaemon

#if canImport(Glibc)
    import Glibc
#endif

@Suite("The status file's JSON")
struct StatusFileTests {
    /// Sessions that exercise every field, both optional states, and strings with each escape.
    static let sessions: [SessionStatus] = [
        SessionStatus(
            uuid: "6b1e5d2a-0000-4000-8000-000000000001", name: "web-01", qemuPID: 4242, state: "hooked (ABI v12)", hooked: true,
            failures: 0, lastFailure: nil, startTime: 1_234_567, since: Date(timeIntervalSince1970: 1_796_339_114.987),
            lastHookMicroseconds: 812, lastHookRequestMicroseconds: 301, hooks: 3, identity: "libvirt", introspector: "acme/\"edr\"",
            commands: [12, 10, -1], events: [0], hookedSince: Date(timeIntervalSince1970: 1_796_339_000.25)),
        SessionStatus(
            uuid: "6b1e5d2a-0000-4000-8000-000000000002", name: "a \"quoted\" \\ name/with\tcontrol\u{01}\u{1f}\n\r\u{08}\u{0c} and ünïcode ✓",
            qemuPID: 7, state: "waiting", hooked: false, failures: 12, lastFailure: "connect: ECONNREFUSED (unix:/run/acme/x.sock)",
            startTime: -1, since: Date(timeIntervalSince1970: 86_400 * 365 + 0.5), lastHookMicroseconds: nil, lastHookRequestMicroseconds: nil,
            hooks: 0, identity: nil),
        SessionStatus(
            uuid: "6b1e5d2a-0000-4000-8000-000000000003", name: "defaults", qemuPID: 8, state: "connecting to the introspector (attempt 1)",
            hooked: false, failures: 0, lastFailure: nil, startTime: 5, since: Date(timeIntervalSince1970: 0), introspector: "acme",
            commands: [], events: []),
    ]

    static let broker = BrokerStatus(pid: 31337, startTime: 98_765, version: "0.9.0")

    static func foundationEncoding(_ document: StatusDocument) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return Array(try encoder.encode(document))
    }

    static func foundationEncoding(_ sessions: [SessionStatus], broker: BrokerStatus = broker) throws -> [UInt8] {
        try foundationEncoding(StatusDocument(broker: broker, sessions: sessions))
    }

    @Test("is byte for byte what JSONEncoder writes (pretty, sorted keys, ISO 8601 dates), with and without sessions and start time")
    func sameAsJSONEncoder() throws {
        let brokers = [Self.broker, BrokerStatus(pid: 1, startTime: nil, version: "0.10.0-\"rc\"/1")]
        for broker in brokers {
            for sessions in [Self.sessions, [], [Self.sessions[1]]] {
                let document = StatusDocument(broker: broker, sessions: sessions)
                let ours = StatusJSON.encode(document)
                let theirs = try Self.foundationEncoding(document)
                #expect(String(decoding: ours, as: UTF8.self) == String(decoding: theirs, as: UTF8.self))
            }
        }
    }

    @Test("reads back with the reader `kvmi-broker status` uses")
    func decodes() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("kvmib-status-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json")
            .path
        defer { unlink(path) }
        #expect(
            FileManager.default.createFile(
                atPath: path, contents: Data(StatusJSON.encode(StatusDocument(broker: Self.broker, sessions: Self.sessions)))))
        let decoded = try StatusReader.read(path).get().document
        #expect(decoded.broker == Self.broker)
        #expect(decoded.sessions.count == 3)
        #expect(decoded.sessions[0].commands == [12, 10, -1] && decoded.sessions[0].events == [0])
        #expect(decoded.sessions[0].hookedSince == Date(timeIntervalSince1970: 1_796_339_000))
        #expect(decoded.sessions[2].commands == [] && decoded.sessions[2].introspector == "acme")
        #expect(decoded.sessions[1].name == Self.sessions[1].name)
        #expect(decoded.sessions[0].lastHookMicroseconds == 812)
        #expect(decoded.sessions[1].lastFailure == Self.sessions[1].lastFailure)
        #expect(decoded.sessions[0].since == Date(timeIntervalSince1970: 1_796_339_114))
    }

    @Test("the writer encodes again exactly the sessions that changed, and drops the ones that left")
    func writerCache() async throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("kvmib-status-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json")
            .path
        defer { unlink(path) }
        let writer = StatusFileWriter(path: path, logger: nil, broker: Self.broker)
        var sessions = Self.sessions
        await writer.write(sessions)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(try Self.foundationEncoding(SessionRegistry.sorted(sessions))))
        sessions[1].state = "hooked (ABI v7)"
        sessions[1].hooked = true
        await writer.write(sessions)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(try Self.foundationEncoding(SessionRegistry.sorted(sessions))))
        await writer.write([sessions[1]])
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(try Self.foundationEncoding([sessions[1]])))
    }
}

@Suite("The live status's text")
struct LiveStatusTextTests {
    @Test("policy mode: the header names generation, files, libvirt and identity checks; peer text is escaped, one line per guest")
    func policyHeaderAndEscaping() {
        let broker = LiveStatus.Broker(
            pid: 812, version: "0.9.0", startedAt: Date(timeIntervalSince1970: 0), uptimeSeconds: 3723, mode: "policy", policyGeneration: 4,
            policyFiles: ["/etc/kvmi-broker/guests.d/10-\u{1b}[31mweb.conf"], lastReloadFailed: true, staticIntrospector: nil,
            identityCheck: true, libvirtURI: "qemu:///system", libvirtConnected: false, controlGroup: "kvmi-status", sessions: 2, hooked: 1,
            waiting: 1, notIntrospected: 0)
        let now = Date(timeIntervalSince1970: 1_000_000)
        var guests = StatusFileTests.sessions
        guests[0].hookedSince = now.addingTimeInterval(-65)
        guests[0].commands = [-1]
        guests[0].events = []
        guests[1].name = "evil\u{1b}]0;title\u{07}\nsecond line"
        let status = LiveStatus(format: 1, broker: broker, guests: Array(guests.prefix(2)))
        let text = status.text(now: now)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        #expect(lines[0] == "kvmi-broker 0.9.0 running as pid 812, up 1 h 2 min", "\(text)")
        #expect(lines[1] == "policy: generation 4 from 1 file (the last reload failed: see the log)", "\(text)")
        #expect(lines[2] == #"    /etc/kvmi-broker/guests.d/10-\x1b[31mweb.conf"#, "\(text)")
        #expect(lines.contains("libvirt: qemu:///system NOT connected (HELLOs are refused until it is)"), "\(text)")
        #expect(lines.contains("identity checks: on (libvirt's pid-to-domain check)"), "\(text)")
        #expect(
            lines.contains {
                $0.hasPrefix("web-01 ") && $0.hasSuffix("introspector acme/\"edr\", commands all, events kernel defaults; hooked for 1 min 5 s")
            }, "\(text)")
        #expect(!text.contains("\u{1b}") && !text.contains("\u{07}"), "no terminal escapes reach the output: \(text)")
        #expect(!lines.contains("second line"), "a name cannot start a line of its own: \(text)")
    }
}
