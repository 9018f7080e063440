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

/// Polls an async condition until it holds or `timeout` passes.
func eventuallyAsync(timeout: Duration = .seconds(60), _ body: () async -> Bool) async -> Bool {
    let deadline = ContinuousClock.now.advanced(by: timeout)
    while ContinuousClock.now < deadline {
        if await body() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return await body()
}

extension OSLayerTests {
    /// The real patched QEMU (built by qemu-patches/build), a KVM guest started with -S, the real
    /// broker and the test introspector. No kernel double: this machine's kernel has no KVMI.
    @Suite("Real patched QEMU against this machine's kernel")
    struct RealQEMUTests {
        let uuid = GuestUUID("3f0c1a52-9a8e-4c43-b7f4-2a1d6f0e9b11")!

        func broker(introspector: IntrospectorEndpoint, backoff: Backoff) throws -> (ChannelServer, Task<Void, Never>, String) {
            let socketPath = temporarySocketPath("qemu-channel")
            let configuration = BrokerConfiguration(
                channelSocketPath: socketPath, introspector: introspector, cookie: CookieHash(secret: testSecret),
                allowLists: try Channel.AllowLists(abi: .v12, commands: [-1], events: [-1]), backoff: backoff, handshakeTimeout: .seconds(5),
                verifier: PeerVerifier(emulators: [try patchedQEMU()]))
            let server = ChannelServer(configuration: configuration, logger: Logger(label: "real-qemu-broker"))
            let listener = try server.bind()
            return (server, Task { await server.run(listener: listener) }, socketPath)
        }

        @Test("HELLO carries QEMU's identity; HOOK fails with the kernel's ENOTTY; one clear reason; retries follow the back-off; nothing leaks")
        func kernelWithoutKVMI() async throws {
            _ = try patchedQEMU()
            try await warmUpRuntimeDescriptors()
            let before = openSocketCount()
            var introspector: TestIntrospector? = try TestIntrospector(
                .init(
                    endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret,
                    kvmiClient: try KVMIClientPlan(abi: .v12, commands: [], events: [])))
            let backoff = try Backoff(initial: .seconds(1), maximum: .seconds(8), multiplier: 2, jitter: 0)
            let (server, task, socketPath) = try broker(introspector: introspector!.endpoint, backoff: backoff)
            var qemu: QEMUProcess? = try QEMUProcess(channelSocket: socketPath, uuid: uuid, name: "e2e-guest")
            // QEMU accepts HOOK only while the VM runs: start the -S guest.
            _ = try qemu?.qmp(#"{"execute":"cont"}"#)
            do {
                let introspector = introspector!
                let qemu = qemu!
                // The first attempt: the tool sees QEMU's identity, QEMU reports the real errno.
                #expect(
                    await eventuallyAsync { server.registry.snapshot().first?.failures ?? 0 >= 1 },
                    "no failed HOOK reported; QEMU log:\n\(qemu.log)")
                let status = try #require(server.registry.snapshot().first)
                #expect(status.qemuPID == qemu.pid && status.uuid == "\(uuid)" && status.name == "e2e-guest")
                #expect(status.lastFailure?.contains("the host kernel has no KVM introspection") == true, "\(status.lastFailure ?? "-")")
                #expect(status.lastFailure?.contains("ENOTTY") == true)
                let first = try #require(introspector.records.first)
                #expect(first.handshake?.uuid == uuid && first.handshake?.name == "e2e-guest")
                #expect(first.handshake?.structSize == 104 && (first.handshake?.maxGPA ?? 0) >= 64 << 20)
                // The broker closed the introspector connection after the failure (the tool read EOF).
                #expect(
                    eventually { introspector.records.first?.kvmi?.ended?.contains("closed") == true },
                    "\(String(describing: introspector.records.first?.kvmi))")

                // No faster than the back-off: 1 s, then 2 s. QEMU's descriptors stay level.
                #expect(await eventuallyAsync { server.registry.snapshot().first?.failures ?? 0 >= 2 })
                let qemuDescriptors = qemu.descriptorCount
                #expect(await eventuallyAsync { server.registry.snapshot().first?.failures ?? 0 >= 3 })
                // QEMU closes each refused socket: its count comes back (a leak never would).
                #expect(eventually { qemu.descriptorCount <= qemuDescriptors }, "QEMU descriptors \(qemuDescriptors) -> \(qemu.descriptorCount)")
                let times = introspector.records.prefix(3).map(\.acceptedAt)
                #expect(times.count == 3)
                if times.count == 3 {
                    #expect(times[0].duration(to: times[1]) >= .milliseconds(950))
                    #expect(times[1].duration(to: times[2]) >= .milliseconds(1950))
                }
            }
            qemu?.stop()
            qemu = nil
            task.cancel()
            await task.value
            introspector?.stop()
            introspector = nil
            #expect(eventually { openSocketCount() == before }, "broker sockets before \(before): \(describeDescriptors())")
        }

        @Test("a real QEMU whose identity is ambiguous (two different -uuid) is refused and never handshaken")
        func ambiguousIdentity() async throws {
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
            defer { introspector.stop() }
            let (server, task, socketPath) = try broker(introspector: introspector.endpoint, backoff: .default)
            let other = GuestUUID("00000000-1111-4222-8333-444444444444")!
            // QEMU takes the last -uuid; its HELLO carries `uuid`, the command line says both.
            let qemu = try QEMUProcess(channelSocket: socketPath, uuid: other, name: "liar", extraArguments: ["-uuid", "\(uuid)"])
            defer { qemu.stop() }
            // Wait for the refusal itself, then look: a refused QEMU gets no handshake.
            #expect(eventually { qemu.log.contains("refused") }, "QEMU log:\n\(qemu.log)")
            #expect(introspector.records.isEmpty, "a refused QEMU got a handshake")
            #expect(server.registry.snapshot().isEmpty)
            task.cancel()
            await task.value
        }
    }
}
