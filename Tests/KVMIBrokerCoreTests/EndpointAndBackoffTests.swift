import Testing

@testable import KVMIBrokerCore

@Suite("Introspector endpoints")
struct EndpointTests {
    @Test(
        "valid endpoints parse and print back",
        arguments: [
            ("unix:/run/kvmi/tool.sock", "unix:/run/kvmi/tool.sock"),
            ("unix:@abstract-name", "unix:@abstract-name"),
            ("vsock:321:1234", "vsock:321:1234"),
            ("vsock:host:5000", "vsock:2:5000"),
            ("tcp:127.0.0.1:8080", "tcp:127.0.0.1:8080"),
            ("tcp:[::1]:8080", "tcp:[::1]:8080"),
            ("tcp:[fe80::1:2]:1", "tcp:[fe80::1:2]:1"),
        ])
    func parses(input: String, printed: String) throws {
        #expect(try IntrospectorEndpoint(parsing: input).description == printed)
    }

    @Test("vsock keeps the numbers")
    func vsockNumbers() throws {
        #expect(try IntrospectorEndpoint(parsing: "vsock:4294967294:7") == .vsock(cid: 4_294_967_294, port: 7))
    }

    @Test(
        "invalid endpoints name what is wrong",
        arguments: [
            ("nonsense", "expected 'unix:/path'"),
            ("http:1.2.3.4:80", "unknown scheme 'http'"),
            ("unix:", "path is empty"),
            ("unix:relative/path", "must be absolute"),
            ("unix:/run/tool\n.sock", "contains a control character"),
            ("unix:/run/tool\u{202E}kcos.sock", "a bidirectional override"),
            ("unix:/" + String(repeating: "a", count: 107), "is 108 bytes; at most 107"),
            ("vsock:1", "expected 'vsock:CID:PORT'"),
            ("vsock:x:1", "CID 'x' is not a number"),
            ("vsock:4294967295:1", "VMADDR_CID_ANY"),
            ("vsock:3:4294967295", "VMADDR_PORT_ANY"),
            ("vsock:3:-1", "port '-1' is not a number"),
            ("tcp:example.org:80", "host names are not resolved"),
            ("tcp:1.2.3:80", "'1.2.3' is not an IPv4 address"),
            ("tcp:256.1.1.1:80", "'256.1.1.1' is not an IPv4"),
            ("tcp:::1:80", "must be written in brackets"),
            ("tcp:[::1:80", "missing ']'"),
            ("tcp:[::1]80", "expected ':PORT' after ']'"),
            ("tcp:[::g]:80", "'::g' is not an IPv6 address"),
            ("tcp:1.2.3.4:0", "port '0' is not a number from 1 to 65535"),
            ("tcp:1.2.3.4:65536", "port '65536'"),
            ("tcp:1.2.3.4", "expected 'tcp:HOST:PORT'"),
        ])
    func rejects(input: String, expected: String) {
        do {
            _ = try IntrospectorEndpoint(parsing: input)
            Issue.record("'\(input)' was accepted")
        } catch {
            #expect(error.code == .invalidEndpoint)
            // Named as written, escaped where a log must escape it.
            #expect(error.message.contains("'\(escapedForLog(input))'"), "the error names the input: \(error.message)")
            #expect(error.message.contains(expected), "\(error.message)")
        }
    }
}

/// A deterministic generator for jitter tests.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite("Back-off")
struct BackoffTests {
    @Test("doubles from the initial delay up to the maximum")
    func nominal() throws {
        let backoff = try Backoff(initial: .milliseconds(100), maximum: .seconds(1), multiplier: 2, jitter: 0)
        let delays = (1...6).map { backoff.nominalDelay(afterFailures: $0) }
        #expect(delays == [.milliseconds(100), .milliseconds(200), .milliseconds(400), .milliseconds(800), .seconds(1), .seconds(1)])
    }

    @Test("jitter stays within its bounds and varies")
    func jitter() throws {
        let backoff = try Backoff(initial: .seconds(1), maximum: .seconds(60), multiplier: 2, jitter: 0.25)
        var generator = SplitMix(state: 42)
        var seen: Set<Duration> = []
        for _ in 0..<200 {
            let delay = backoff.delay(afterFailures: 3, using: &generator)
            #expect(delay >= .seconds(3) && delay <= .seconds(5))
            seen.insert(delay)
        }
        #expect(seen.count > 100)
    }

    @Test("jitter never exceeds the maximum")
    func capped() throws {
        let backoff = try Backoff(initial: .seconds(1), maximum: .seconds(2), multiplier: 2, jitter: 1)
        var generator = SplitMix(state: 7)
        for _ in 0..<100 { #expect(backoff.delay(afterFailures: 10, using: &generator) <= .seconds(2)) }
    }

    @Test("bad settings are refused with the reason")
    func validation() {
        #expect(throws: BrokerError.self) { try Backoff(initial: .zero, maximum: .seconds(1), multiplier: 2, jitter: 0) }
        #expect(throws: BrokerError.self) { try Backoff(initial: .seconds(2), maximum: .seconds(1), multiplier: 2, jitter: 0) }
        #expect(throws: BrokerError.self) { try Backoff(initial: .seconds(1), maximum: .seconds(2), multiplier: 0.5, jitter: 0) }
        #expect(throws: BrokerError.self) { try Backoff(initial: .seconds(1), maximum: .seconds(2), multiplier: 2, jitter: 1.5) }
    }
}

@Suite("UUIDs")
struct UUIDTests {
    @Test("canonical text round-trips; bad text is refused")
    func roundTrip() {
        let text = "6695eb01-f6a4-8304-79aa-97f2502e193f"
        #expect(GuestUUID(text)?.description == text)
        #expect(GuestUUID(text.uppercased())?.description == text)
        #expect(([0x00, 0x0f, 0xa5, 0xff, 0x10] as [UInt8]).hexString == "000fa5ff10")
        #expect(GuestUUID("6695eb01f6a4830479aa97f2502e193f") == nil)
        #expect(GuestUUID("6695eb01-f6a4-8304-79aa-97f2502e193g") == nil)
        var generator = SplitMix(state: 1)
        let random = GuestUUID.random(using: &generator)
        #expect(random.bytes[6] >> 4 == 4)
        #expect(GuestUUID(random.description) == random)
    }

    @Test("the 16 bytes in canonical order; text of the wrong length, shape or alphabet is refused")
    func bytesAndShapes() {
        let text = "00112233-4455-6677-8899-aabbccddeeff"
        let uuid = GuestUUID(text)
        #expect(uuid?.bytes == [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        #expect(GuestUUID(bytes: uuid?.bytes ?? []) == uuid)
        #expect(GuestUUID(bytes: (uuid?.bytes ?? [])[0..<16]).map { Set([$0, uuid!]).count } == 1)
        #expect(GuestUUID(bytes: [UInt8](repeating: 1, count: 15)) == nil)
        #expect(GuestUUID(bytes: [UInt8](repeating: 1, count: 17)) == nil)
        for bad in [
            String(text.dropLast()), text + "0", "001122334-455-6677-8899-aabbccddeeff", "00112233-4455-6677-8899-aabbccddeef\u{e9}",
            "00112233-4455-6677-8899-aabbccddee-f", "", "------------------------------------",
        ] {
            #expect(GuestUUID(bad) == nil, "\(bad)")
        }
        #expect(GuestUUID.zero.description == "00000000-0000-0000-0000-000000000000")
        #expect(GuestUUID(text)?.hashValue == GuestUUID(text.uppercased())?.hashValue)
    }
}
