import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerOS
import KVMITestIntrospector
import Logging
import Testing

#if canImport(Glibc)
    import Glibc
#endif

extension OSLayerTests {
    /// The hooked path end to end: real patched QEMU + the broker + the test introspector in KVMI
    /// client mode + the KERNEL DOUBLE (Tests/KernelDouble, LD_PRELOAD into QEMU), the one
    /// stand-in, because no kernel here has KVMI.
    @Suite("Hooked path through the kernel double")
    struct HookedPathTests {
        let uuid = GuestUUID("7d2b6c1e-55aa-4e0f-9d3c-0a1b2c3d4e5f")!
        // Commands: VM_READ_PHYSICAL 12, VCPU_GET_REGISTERS 7, VM_CONTROL_EVENTS 10. Events: UNHOOK 0, PF 17.
        let commandIDs: [Int32] = [12, 7, 10]
        let eventIDs: [Int32] = [0, 17]

        func plan() throws -> KVMIClientPlan {
            try KVMIClientPlan(
                abi: .v12, commands: ["VM_READ_PHYSICAL", "VCPU_GET_REGISTERS", "VM_WRITE_PHYSICAL", "VM_SET_PAGE_ACCESS"],
                events: ["UNHOOK", "PF", "BREAKPOINT"])
        }

        func startBroker(_ introspector: IntrospectorEndpoint, socketPath: String = temporarySocketPath("hooked")) throws -> (
            ChannelServer, Task<Void, Never>, String
        ) {
            let configuration = BrokerConfiguration(
                channelSocketPath: socketPath, introspector: introspector, cookie: CookieHash(secret: testSecret),
                allowLists: try Channel.AllowLists(abi: .v12, commands: commandIDs, events: eventIDs),
                backoff: try Backoff(initial: .milliseconds(200), maximum: .seconds(2), multiplier: 2, jitter: 0), handshakeTimeout: .seconds(5),
                verifier: PeerVerifier(emulators: [try patchedQEMU()]))
            let server = ChannelServer(configuration: configuration, logger: Logger(label: "hooked-broker"))
            let listener = try server.bind()
            return (server, Task { await server.run(listener: listener) }, socketPath)
        }

        func hooked(_ server: ChannelServer, hooks: Int = 1) async -> Bool {
            await eventuallyAsync { server.registry.snapshot().first.map { $0.hooked && $0.hooks >= hooks } ?? false }
        }

        @Test("hooked; GET_VERSION answered through the broker's socket; commands and events exactly per the allow-lists")
        func hookedAndEnforced() async throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret, kvmiClient: try plan()))
            defer { introspector.stop() }
            let (server, task, socketPath) = try startBroker(introspector.endpoint)
            let qemu = try QEMUProcess(channelSocket: socketPath, uuid: uuid, name: "hooked-guest", kernelDouble: try kernelDouble())
            defer { qemu.stop() }
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            #expect(await hooked(server), "not hooked; QEMU log:\n\(qemu.log)")
            #expect(eventually { introspector.records.first?.kvmi?.unhookEnabled != nil }, "\(introspector.records)")
            let kvmi = try #require(introspector.records.first?.kvmi)
            // The GET_VERSION queued behind the handshake reply reached the kernel: nothing was over-read or lost.
            #expect(kvmi.version == 1)
            #expect(kvmi.checks["command:VM_READ_PHYSICAL"] == 0)
            #expect(kvmi.checks["command:VCPU_GET_REGISTERS"] == 0)
            #expect(kvmi.checks["command:VM_WRITE_PHYSICAL"] == -1, "-KVM_EPERM for a command not on the list")
            #expect(kvmi.checks["command:VM_SET_PAGE_ACCESS"] == -1)
            #expect(kvmi.checks["event:UNHOOK"] == 0)
            #expect(kvmi.checks["event:PF"] == 0)
            #expect(kvmi.checks["event:BREAKPOINT"] == -1)
            #expect(kvmi.unhookEnabled == 0)
            task.cancel()
            await task.value
        }

        @Test("pause: PREUNHOOK, the tool closes, UNHOOK, paused; resume: re-handshake, hooked again")
        func pauseAndResume() async throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret, kvmiClient: try plan()))
            defer { introspector.stop() }
            let (server, task, socketPath) = try startBroker(introspector.endpoint)
            let qemu = try QEMUProcess(channelSocket: socketPath, uuid: uuid, name: "pause-guest", kernelDouble: try kernelDouble())
            defer { qemu.stop() }
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            #expect(await hooked(server), "not hooked; QEMU log:\n\(qemu.log)")
            #expect(eventually { introspector.records.first?.kvmi?.unhookEnabled == 0 })
            let stop = try qemu.qmp(#"{"execute":"stop"}"#)
            #expect(stop.contains("\"return\""), "\(stop)")
            // By the time `stop` returned, the tool got the unhook event and closed.
            #expect(introspector.records.first?.kvmi?.unhookEventReceived == true, "\(String(describing: introspector.records.first?.kvmi))")
            #expect(try qemu.qmp(#"{"execute":"query-status"}"#).contains("\"paused\""))
            #expect(await eventuallyAsync { server.registry.snapshot().first?.state.contains("PAUSED") == true })
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            let rehooked = await hooked(server, hooks: 2)
            let sessions = server.registry.snapshot()
            #expect(rehooked, "\(sessions)")
            #expect(eventually { introspector.records.count == 2 && introspector.records[1].kvmi?.version == 1 })
            task.cancel()
            await task.value
        }
    }
}
