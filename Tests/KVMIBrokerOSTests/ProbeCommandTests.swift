import Foundation
import KVMIBrokerCore
import KVMITestIntrospector
import Testing

#if canImport(Glibc)
    import Glibc
#endif

extension OSLayerTests {
    /// `kvmi-broker probe` as a vendor runs it: a real process against a real listener.
    @Suite("kvmi-broker probe")
    struct ProbeCommandTests {
        let broker = productsDirectory().appendingPathComponent("kvmi-broker")

        func secretFile(_ bytes: [UInt8]) -> String {
            let path = "/tmp/kvmib-probe-secret-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
            chmod(path, 0o600)
            return path
        }

        @Test("a good endpoint: exit 0 and a readable account")
        func success() throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("probe")), secret: testSecret, sendsFirstMessage: true))
            defer { introspector.stop() }
            let secret = secretFile(testSecret)
            defer { unlink(secret) }
            let (status, out, err) = try runProcess(
                broker,
                [
                    "probe", introspector.endpoint.description, "--secret-file", secret, "--abi", "v7", "--uuid", testUUID.description, "--name",
                    "vendor-test",
                ])
            #expect(status == 0, "stderr: \(err)")
            #expect(out.contains("sent 96 bytes: uuid=\(testUUID) name=\"vendor-test\""))
            #expect(out.contains("received 24 bytes"))
            #expect(out.contains("cookie accepted (SHA-1 of \(secret), \(testSecret.count) bytes)"))
            #expect(out.contains("8 bytes queued behind the reply, left unread (they belong to KVM): first KVMI header id=2 (KVMI_GET_VERSION)"))
            #expect(out.contains("ok: \(introspector.endpoint) completed the handshake"))
            let record = try #require(introspector.waitForRecords(1).first)
            #expect(record.handshake?.uuid == testUUID && record.handshake?.name == "vendor-test")
        }

        @Test("a wrong cookie: non-zero exit and one line saying so")
        func wrongCookie() throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("probe-bad")), secret: testSecret, behaviour: .wrongCookie))
            defer { introspector.stop() }
            let secret = secretFile(testSecret)
            defer { unlink(secret) }
            let (status, _, err) = try runProcess(broker, ["probe", introspector.endpoint.description, "--secret-file", secret])
            #expect(status == 1)
            let lines = err.split(separator: "\n")
            #expect(lines.count == 1)
            #expect(lines.first?.hasPrefix("kvmi-broker probe: \(introspector.endpoint): cookie rejected") == true, "\(err)")
        }

        @Test(
            "bad arguments are refused before anything is sent",
            arguments: [
                (["probe", "tcp:host.example:1"], "host names are not resolved"),
                (["probe", "unix:/x", "--abi", "v9"], "--abi must be v7 or v12"),
                (["probe", "unix:/x", "--uuid", "nope"], "--uuid 'nope' is not a UUID"),
            ])
        func badArguments(arguments: [String], text: String) throws {
            let (status, _, err) = try runProcess(broker, arguments)
            #expect(status != 0)
            #expect(err.contains(text), "\(err)")
        }
    }
}
