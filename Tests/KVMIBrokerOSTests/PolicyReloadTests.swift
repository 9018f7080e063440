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

/// A policy tree in a temporary folder, rewritten by the tests.
struct PolicyTree {
    let root = "/tmp/kvmib-policy-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let secret: String

    init(toolSocket: String) throws {
        try FileManager.default.createDirectory(atPath: root + "/introspectors.d", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: root + "/guests.d", withIntermediateDirectories: true)
        secret = root + "/tool.key"
        _ = FileManager.default.createFile(atPath: secret, contents: Data(testSecret), attributes: [.posixPermissions: 0o600])
        write(
            "introspectors.d/10-tool.conf",
            "[introspector tool]\nEndpoint=unix:\(toolSocket)\nABI=v12\nSecretFile=\(secret)\nUnhookTimeout=1s\nBackoffInitial=200ms\n")
    }

    /// Replaces the file atomically (written beside it, then renamed), as an administrator's editor does.
    func write(_ path: String, _ text: String) {
        let temporary = "\(root)/\(path).tmp-\(UInt32.random(in: 0...UInt32.max))"
        _ = FileManager.default.createFile(atPath: temporary, contents: Data(text.utf8), attributes: [.posixPermissions: 0o644])
        rename(temporary, "\(root)/\(path)")
    }

    func remove(_ path: String) { unlink("\(root)/\(path)") }

    var sources: PolicySources { PolicySources(roots: [root], requireRootOwnership: false) }

    func cleanUp() { try? FileManager.default.removeItem(atPath: root) }
}

extension OSLayerTests {
    @Suite("Policy reload (SIGHUP) against live sessions, the test process playing QEMU")
    struct PolicyReloadTests {
        let uuid = GuestUUID("4b1d2c3e-0f00-4aaa-8bbb-0123456789cd")!

        @Test("reload: changed lists -> SET_ALLOWED; a bad file -> nothing changes; withdrawn -> PREUNHOOK, then UNHOOK after the unhook timeout")
        func reloadDrivesSessions() async throws {
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
            defer { introspector.stop() }
            let tree = try PolicyTree(toolSocket: "\(introspector.endpoint)".replacingOccurrences(of: "unix:", with: ""))
            defer { tree.cleanUp() }
            let rule = "[guest lab]\nMatchUUID=\(uuid)\nIntrospector=tool\nEvents=UNHOOK\nCommands=VM_READ_PHYSICAL;VM_CONTROL_EVENTS\n"
            tree.write("guests.d/50-lab.conf", rule)
            let store = try PolicyStore(sources: tree.sources)
            let planA = try #require(store.plan(uuid: uuid, name: "lab").0)

            let procRoot = try DaemonChannelTests().fakeProc(cmdlineUUID: uuid)
            defer { try? FileManager.default.removeItem(atPath: procRoot) }
            let socketPath = temporarySocketPath("policy-channel")
            let server = ChannelServer(
                configuration: BrokerConfiguration(
                    channelSocketPath: socketPath, policy: store,
                    verifier: PeerVerifier(emulators: ["/usr/bin/qemu-system-x86_64"], procRoot: procRoot)),
                logger: Logger(label: "policy-broker"))
            let listener = try server.bind()
            let task = Task { await server.run(listener: listener) }
            defer { task.cancel() }

            let qemu = try FakeQEMU(connectingTo: socketPath)
            qemu.send(DaemonChannelTests().hello(uuid: uuid))
            #expect(qemu.receive()?.0.knownType == .welcome)
            let (hook, fds) = try #require(qemu.receive())
            fds.forEach { close($0) }
            #expect(hook.knownType == .hook)
            #expect(try Channel.AllowLists(decoding: hook.payload) == planA.allowLists)
            #expect(!planA.allowLists.commands.contains(14))
            qemu.send(
                Channel.Frame(
                    .result, seq: hook.seq, payload: Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
            #expect(await eventuallyAsync { server.registry.snapshot().first?.hooked == true })

            // The lists change: SET_ALLOWED with exactly the new lists, the session stays.
            tree.write("guests.d/50-lab.conf", rule.replacingOccurrences(of: "VM_READ_PHYSICAL;", with: "VM_READ_PHYSICAL;VM_WRITE_PHYSICAL;"))
            #expect(await server.reloadPolicy())
            let planB = try #require(store.plan(uuid: uuid, name: "lab").0)
            #expect(planB.allowLists.commands.contains(14))
            let (update, _) = try #require(qemu.receive())
            #expect(update.knownType == .setAllowed)
            #expect(try Channel.AllowLists(decoding: update.payload) == planB.allowLists)
            qemu.send(
                Channel.Frame(
                    .result, seq: update.seq, payload: Channel.Result(requestType: 0x11, step: .none, hooked: true, error: 0, failedID: -1).encoded())
            )
            #expect(await eventuallyAsync { server.registry.snapshot().first?.state == "hooked (ABI v12)" })

            // A bad file: the reload fails as a whole and nothing reaches QEMU.
            let generation = store.snapshot.generation
            tree.write("guests.d/60-bad.conf", "[guest bad]\nMatchName=x*\nIntrospector=tool\nCommands=VM_READ_PHYSICALL\n")
            #expect(await server.reloadPolicy() == false)
            #expect(store.snapshot.generation == generation)
            // Nothing reached QEMU: the next frame it receives (below) is the PREUNHOOK of the good reload.
            tree.remove("guests.d/60-bad.conf")

            // Withdrawn: PREUNHOOK; the tool does not let go within 1 s, so UNHOOK.
            tree.write("guests.d/50-lab.conf", rule.replacingOccurrences(of: "\(uuid)", with: "00000000-0000-4000-8000-000000000000"))
            #expect(await server.reloadPolicy())
            let (preunhook, _) = try #require(qemu.receive())
            #expect(preunhook.knownType == .preunhook)
            let sentAt = ContinuousClock.now
            qemu.send(
                Channel.Frame(
                    .result, seq: preunhook.seq,
                    payload: Channel.Result(requestType: 0x12, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
            let (unhook, _) = try #require(qemu.receive(timeout: .seconds(5)))
            #expect(unhook.knownType == .unhook)
            #expect(sentAt.duration(to: .now) >= .milliseconds(900))
            qemu.send(
                Channel.Frame(
                    .result, seq: unhook.seq, payload: Channel.Result(requestType: 0x13, step: .none, hooked: false, error: 0, failedID: -1).encoded()
                ))
            #expect(await eventuallyAsync { server.registry.snapshot().first?.state == "not introspected" })
        }

        @Test("reloads racing with decisions: every decision comes whole from one policy, never a mix")
        func noMixedDecisions() async throws {
            let tree = try PolicyTree(toolSocket: "/run/none.sock")
            defer { tree.cleanUp() }
            let ruleA = "[guest lab]\nMatchUUID=\(uuid)\nIntrospector=tool\nEvents=UNHOOK\nCommands=VM_READ_PHYSICAL\n"
            let ruleB = "# policy B\n[guest lab]\nMatchName=la*\nIntrospector=tool\nEvents=UNHOOK;PF\nCommands=VM_WRITE_PHYSICAL;VM_SET_PAGE_ACCESS\n"
            tree.write("guests.d/50-lab.conf", ruleA)
            let store = try PolicyStore(sources: tree.sources)
            let planA = try #require(store.plan(uuid: uuid, name: "lab").0)
            tree.write("guests.d/50-lab.conf", ruleB)
            _ = store.reload()
            let planB = try #require(store.plan(uuid: uuid, name: "lab").0)
            #expect(planA.allowLists != planB.allowLists && planA.rule != planB.rule)
            let uuid = self.uuid
            let mixed = await withTaskGroup(of: Int.self) { group in
                group.addTask {
                    for index in 0..<200 {
                        tree.write("guests.d/50-lab.conf", index % 2 == 0 ? ruleA : ruleB)
                        _ = store.reload()
                    }
                    return 0
                }
                for _ in 0..<4 {
                    group.addTask {
                        var bad = 0
                        for _ in 0..<2000 {
                            let plan = store.plan(uuid: uuid, name: "lab").0
                            if plan != planA && plan != planB { bad += 1 }
                        }
                        return bad
                    }
                }
                var total = 0
                for await count in group { total += count }
                return total
            }
            #expect(mixed == 0)
        }
    }
}
