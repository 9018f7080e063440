import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerOS
import KVMIBrokerPolicy
import KVMITestIntrospector
import Logging
import Testing

#if canImport(Glibc)
    import Glibc
#endif

extension OSLayerTests {
    /// `kvmi-broker hook` as libvirt runs it (a process, the domain XML on stdin) against the
    /// broker's control socket: the veto of a required guest whose introspector is unreachable.
    @Suite("libvirt hook and control socket")
    struct HookTests {
        let required = GuestUUID("aaaaaaaa-1111-4111-8111-111111111111")!
        let bestEffort = GuestUUID("bbbbbbbb-2222-4222-8222-222222222222")!
        let reachable = GuestUUID("cccccccc-3333-4333-8333-333333333333")!
        let broker = productsDirectory().appendingPathComponent("kvmi-broker")

        func xml(_ uuid: GuestUUID, _ name: String) -> String {
            "<domain type='kvm'><name>\(name)</name><uuid>\(uuid)</uuid><memory>65536</memory></domain>"
        }

        func tree(reachableSocket: String) throws -> PolicyTree {
            let tree = try PolicyTree(toolSocket: "/tmp/kvmib-nobody-listens-\(getpid()).sock")
            tree.write("introspectors.d/20-up.conf", "[introspector up]\nEndpoint=unix:\(reachableSocket)\nABI=v12\nAuthentication=none\n")
            tree.write(
                "guests.d/50-rules.conf",
                """
                [guest must]
                MatchUUID=\(required)
                Introspector=tool
                Events=UNHOOK
                Commands=VM_READ_PHYSICAL
                Mode=required

                [guest maybe]
                MatchUUID=\(bestEffort)
                Introspector=tool
                Events=UNHOOK
                Commands=VM_READ_PHYSICAL

                [guest fine]
                MatchUUID=\(reachable)
                Introspector=up
                Events=UNHOOK
                Commands=VM_READ_PHYSICAL
                Mode=required

                """)
            return tree
        }

        @Test("prepare: a required guest whose introspector is down is vetoed with one line; others start; other operations never fail")
        func veto() async throws {
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("up")), secret: nil))
            defer { introspector.stop() }
            let tree = try tree(reachableSocket: "\(introspector.endpoint)".replacingOccurrences(of: "unix:", with: ""))
            defer { tree.cleanUp() }
            let store = try PolicyStore(sources: tree.sources)
            let path = temporarySocketPath("control")
            let control = ControlServer(path: path, plans: store, logger: Logger(label: "control"), probeTimeout: .seconds(30))
            let listener = try control.bind()
            let task = Task { await control.run(listener: listener) }
            defer { task.cancel() }

            let (status, out, err) = try runProcess(
                broker, ["hook", "--control-socket", path, "--", "must", "prepare", "begin", "-"], input: xml(required, "must"))
            #expect(status == 1)
            #expect(out.isEmpty)
            let lines = err.split(separator: "\n")
            #expect(lines.count == 1)
            #expect(err.contains("guest must (\(required)) requires introspection by tool") && err.contains("is unreachable"), "\(err)")

            for (uuid, name) in [(bestEffort, "maybe"), (reachable, "fine")] {
                let (ok, _, okErr) = try runProcess(
                    broker, ["hook", "--control-socket", path, "--", name, "start", "begin", "-"], input: xml(uuid, name))
                #expect(ok == 0, "\(name): \(okErr)")
            }
            for operation in ["started", "stopped", "release", "reconnect", "migrate", "restore"] {
                let (code, out, _) = try runProcess(
                    broker, ["hook", "--control-socket", path, "--", "must", operation, "begin", "-"], input: xml(required, "must"))
                #expect(code == 0, "\(operation)")
                #expect(out.isEmpty, "\(operation) printed \(out)")
            }
        }

        @Test("the broker is down: the hook reads the policy itself and vetoes only required guests; reconnect still exits 0")
        func brokerDown() throws {
            let tree = try tree(reachableSocket: "/tmp/none")
            defer { tree.cleanUp() }
            let path = temporarySocketPath("control-down")
            let common = ["hook", "--control-socket", path, "--timeout", "1", "--policy-root", tree.root, "--allow-non-root-owner", "--"]
            let (vetoed, _, err) = try runProcess(broker, common + ["must", "prepare", "begin", "-"], input: xml(required, "must"))
            #expect(vetoed == 1)
            #expect(err.contains("requires introspection per [guest must]") && err.contains("the broker is unreachable"), "\(err)")
            let (allowed, _, _) = try runProcess(broker, common + ["maybe", "prepare", "begin", "-"], input: xml(bestEffort, "maybe"))
            #expect(allowed == 0)
            let (reconnect, out, _) = try runProcess(broker, common + ["must", "reconnect", "begin", "-"], input: xml(required, "must"))
            #expect(reconnect == 0 && out.isEmpty)
        }
    }
}
