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
    /// Per-guest endpoints (`Endpoint=unix:DIR/{uuid}.sock`, a tool process per guest) and the
    /// UUID the tool and the kernel see. Real libvirtd, the real patched QEMU, the test
    /// introspector; the KERNEL DOUBLE (LD_PRELOAD into QEMU, the one stand-in) records the
    /// UUID each HOOK carried in QEMU's log.
    @Suite("Per-guest endpoints and the UUID the tool and the kernel see")
    struct PerGuestEndpointTests {
        let first = GuestUUID("e0e0e0e0-1111-4111-8111-0123456789ab")!
        let second = GuestUUID("e0e0e0e0-2222-4222-8222-0123456789ab")!
        let impostor = GuestUUID("e0e0e0e0-3333-4333-8333-0123456789ab")!

        func tool(at path: String) throws -> TestIntrospector {
            try TestIntrospector(
                .init(
                    endpoint: .unix(path: path), secret: testSecret,
                    kvmiClient: try KVMIClientPlan(abi: .v12, commands: ["VM_READ_PHYSICAL"], events: ["UNHOOK"])))
        }

        func waitUntilHooked(_ server: ChannelServer, _ uuid: GuestUUID) async -> Bool {
            await eventuallyAsync(timeout: .seconds(60)) { server.registry.snapshot().first { $0.uuid == "\(uuid)" }?.hooked == true }
        }

        @Test("plans carry each guest's expanded endpoint, so pacing (keyed by endpoint) and hand-overs are per guest")
        func plansPerGuest() async throws {
            let tree = try PolicyTree(toolSocket: "/run/acme/{uuid}.sock")
            defer { tree.cleanUp() }
            tree.write("guests.d/50-pg.conf", "[guest pg]\nMatchName=*\nIntrospector=tool\nCommands=\nEvents=\n")
            let store = try PolicyStore(sources: tree.sources)
            let planA = try #require(store.plan(uuid: first, name: "a", identityVerified: true).0)
            let planB = try #require(store.plan(uuid: second, name: "b", identityVerified: true).0)
            #expect(planA.endpoint == .unix(path: "/run/acme/\(first).sock"))
            #expect(planB.endpoint == .unix(path: "/run/acme/\(second).sock"))
            #expect(!planA.sameIntrospector(as: planB))
            #expect(planA.introspectorID != planB.introspectorID)
            // QEMU's own HELLO (no libvirt identity): no plan, and the reason says why.
            let (unverified, reason) = store.plan(uuid: first, name: "a", identityVerified: false)
            #expect(unverified == nil)
            #expect(reason.contains("expanded only from the identity libvirt verified"), "\(reason)")
            // Guest A's turn held at its socket (its tool is gone or slow) does not queue guest B.
            let pacer = HandshakePacer(limit: 1)
            let gate = AsyncStream<Void>.makeStream()
            let holder = Task { try await pacer.paced(planA.endpoint) { for await _ in gate.stream { break } } }
            while pacer.load(of: planA.endpoint).inFlight < 1 { await Task.yield() }
            #expect(try await pacer.paced(planB.endpoint) { 2 } == 2)
            #expect(pacer.load(of: planB.endpoint).queued == 0)
            gate.continuation.finish()
            try await holder.value
        }

        @Test(
            "each guest reaches its own tool socket; a missing socket for one guest holds back no other; handshake and HOOK carry the domain's UUID; a QEMU claiming another UUID reaches no tool"
        )
        func perGuestSockets() async throws {
            try ensureLibvirtd()
            let directory = "\(privateSocketDirectory)/per-guest-\(UInt32.random(in: 0...UInt32.max))"
            mkdir(directory, 0o700)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let tree = try PolicyTree(toolSocket: "\(directory)/{uuid}.sock")
            defer { tree.cleanUp() }
            tree.write(
                "guests.d/50-pg.conf",
                "[guest pg]\nMatchName=\(testDomainName("pg-"))*\nIntrospector=tool\nCommands=VM_READ_PHYSICAL;VM_CONTROL_EVENTS\nEvents=UNHOOK\n")
            let lines = LineCounter()
            var configuration = BrokerConfiguration(
                channelSocketPath: qemuReachableSocketPath("pg-channel"), channelSocketGroup: try StockQEMUAccount.lookUp().kvmGID,
                policy: try PolicyStore(sources: tree.sources))
            configuration.refusals = RateLimitedLog(linesPerWindow: 100_000)
            let (identity, watcherTask) = LibvirtIdentity.start(uri: "qemu:///system", logger: Logger(label: "pg-libvirt"))
            defer {
                watcherTask.cancel()
                identity.watcher.stop()
            }
            configuration.identity = identity
            let server = ChannelServer(configuration: configuration, logger: Logger(label: "pg-broker", factory: { _ in lines }))
            let listener = try server.bind()
            let task = Task { await server.run(listener: listener) }
            defer { task.cancel() }
            let double = try kernelDouble()
            let names = [testDomainName("pg-first"), testDomainName("pg-second")]
            for name in names { removeDomain(name) }
            defer {
                for name in names {
                    removeDomain(name)
                    unlink("/var/log/libvirt/qemu/\(name).log")
                }
            }
            try defineEnrolledDomain(name: names[0], uuid: first, channel: configuration.channelSocketPath, double: double)
            try defineEnrolledDomain(name: names[1], uuid: second, channel: configuration.channelSocketPath, double: double)

            // Only the second guest's tool runs: the first guest's socket does not exist.
            let secondTool = try tool(at: "\(directory)/\(second).sock")
            defer { secondTool.stop() }
            for name in names {
                let (status, _, err) = try virsh(["start", name])
                #expect(status == 0, "\(err)")
            }
            let secondHooked = await waitUntilHooked(server, second)
            var sessions = server.registry.snapshot()
            #expect(secondHooked, "\(sessions) \(lines.messages.suffix(20))")
            let failing = await eventuallyAsync {
                server.registry.snapshot().first { $0.uuid == "\(first)" }?.lastFailure?.contains("\(first).sock") == true
            }
            sessions = server.registry.snapshot()
            #expect(failing, "the first guest fails at its own socket: \(sessions)")
            #expect(sessions.first { $0.uuid == "\(first)" }?.hooked == false)

            // Item 6: the handshake's UUID and the HOOK's UUID are the libvirt domain's.
            #expect(secondTool.records.allSatisfy { $0.handshake?.uuid == second }, "\(secondTool.records)")
            #expect(secondTool.records.first?.handshake?.name == names[1])
            let secondLog = "/var/log/libvirt/qemu/\(names[1]).log"
            #expect(
                eventually {
                    String(decoding: FileManager.default.contents(atPath: secondLog) ?? Data(), as: UTF8.self).contains(
                        "HOOK (v12) uuid \(second) on")
                }, "the kernel double logs the HOOK's UUID")

            // The first guest's tool appears: that guest is hooked at its own socket, with its own UUID.
            let firstTool = try tool(at: "\(directory)/\(first).sock")
            defer { firstTool.stop() }
            let firstHooked = await waitUntilHooked(server, first)
            sessions = server.registry.snapshot()
            #expect(firstHooked, "\(sessions)")
            #expect(firstTool.records.allSatisfy { $0.handshake?.uuid == first }, "\(firstTool.records)")
            #expect(secondTool.records.allSatisfy { $0.handshake?.uuid == second }, "\(secondTool.records)")
            let firstLog = "/var/log/libvirt/qemu/\(names[0]).log"
            #expect(
                eventually {
                    String(decoding: FileManager.default.contents(atPath: firstLog) ?? Data(), as: UTF8.self).contains("HOOK (v12) uuid \(first) on")
                })

            // A patched QEMU outside libvirt whose HELLO (its -uuid) names a UUID libvirt does not
            // run: refused before any decision, so its per-guest socket sees no connection.
            let impostorTool = try tool(at: "\(directory)/\(impostor).sock")
            defer { impostorTool.stop() }
            let qemu = try QEMUProcess(
                channelSocket: configuration.channelSocketPath, uuid: impostor, name: names[0], kernelDouble: double)
            defer { qemu.stop() }
            #expect(eventually { lines.messages.contains { $0.contains("libvirt runs no domain with UUID \(impostor)") } }, "\(lines.messages)")
            #expect(impostorTool.records.isEmpty)
            #expect(server.registry.snapshot().contains { $0.uuid == "\(impostor)" } == false)
        }
    }
}
