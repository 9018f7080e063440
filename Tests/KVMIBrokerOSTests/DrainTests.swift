import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMIBrokerPolicy
import KVMITestIntrospector
import Logging
import Testing

@testable import KVMIBrokerDaemon

#if canImport(Glibc)
    import Glibc
#endif

extension OSLayerTests {
    @Suite("kvmi-broker drain / undrain (as processes) against a live session; the test process plays QEMU")
    struct DrainTests {
        let uuid = GuestUUID("d4a1e000-0b1c-4d2e-8f30-41526374a5b6")!

        /// Runs `kvmi-broker ARGS` on a thread of its own (the control server answers on this
        /// process's pool).
        func broker(_ arguments: [String]) async throws -> (Int32, String, String) {
            let path = productsDirectory().appendingPathComponent("kvmi-broker")
            let result = await withCheckedContinuation { (done: CheckedContinuation<Result<(Int32, String, String), any Error>, Never>) in
                Thread.detachNewThread { done.resume(returning: Result { try runProcess(path, arguments, timeout: 120) }) }
            }
            return try result.get()
        }

        @Test("drain --wait: PREUNHOOK, the guest let go, no new hook, status says draining, audit; undrain hooks it again")
        func drainAndUndrain() async throws {
            try await warmUpRuntimeDescriptors()
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("drain-tool")), secret: testSecret))
            defer { introspector.stop() }
            let tree = try PolicyTree(toolSocket: "\(introspector.endpoint)".replacingOccurrences(of: "unix:", with: ""))
            defer { tree.cleanUp() }
            tree.write("guests.d/50-lab.conf", "[guest lab]\nMatchUUID=\(uuid)\nIntrospector=tool\nEvents=UNHOOK\nCommands=VM_READ_PHYSICAL\n")
            let requiredGuest = GuestUUID("6b1e5d2a-0000-4000-8000-0000000000aa")!
            tree.write(
                "guests.d/60-vault.conf",
                "[guest vault]\nMatchUUID=\(requiredGuest)\nIntrospector=tool\nMode=required\nEvents=UNHOOK\nCommands=VM_READ_PHYSICAL\n")
            let store = try PolicyStore(sources: tree.sources)
            let procRoot = try DaemonChannelTests().fakeProc(cmdlineUUID: uuid)
            defer { try? FileManager.default.removeItem(atPath: procRoot) }
            let configuration = BrokerConfiguration(
                channelSocketPath: temporarySocketPath("drain-channel"), policy: store,
                verifier: PeerVerifier(emulators: ["/usr/bin/qemu-system-x86_64"], procRoot: procRoot))
            let server = ChannelServer(configuration: configuration, logger: Logger(label: "drain-broker"))
            let serving = Task { [listener = try server.bind()] in await server.run(listener: listener) }
            defer { serving.cancel() }
            let source = LiveStatusSource(
                registry: server.registry, policy: store, staticIntrospector: nil, libvirtURI: nil, libvirtConnected: nil,
                drains: configuration.drains)
            let control = temporarySocketPath("drain-control")
            let controlServer = ControlServer(
                path: control, plans: store, logger: Logger(label: "drain-control"), status: source, drains: configuration.drains)
            let controlling = Task { [listener = try controlServer.bind()] in await controlServer.run(listener: listener) }
            defer { controlling.cancel() }

            let qemu = try FakeQEMU(connectingTo: configuration.channelSocketPath)
            qemu.send(DaemonChannelTests().hello(uuid: uuid))
            #expect(qemu.receive()?.0.knownType == .welcome)
            let (hook, fds) = try #require(qemu.receive())
            fds.forEach { close($0) }
            #expect(hook.knownType == .hook)
            qemu.send(
                Channel.Frame(
                    .result, seq: hook.seq, payload: Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
            #expect(await eventuallyAsync { server.registry.snapshot().first?.hooked == true })

            // An unknown name: a clear error, exit 6, nothing drained.
            let (unknownCode, _, unknownError) = try await broker(["drain", "tol", "--control-socket", control])
            #expect(unknownCode == 6 && unknownError.contains("no introspector named 'tol' in the policy"), "\(unknownError)")
            #expect(configuration.drains.all.isEmpty)

            // drain --wait answers once QEMU has let go: play QEMU meanwhile.
            async let drained = broker(["drain", "tool", "--wait", "--control-socket", control])
            let (preunhook, _) = try #require(qemu.receive())
            #expect(preunhook.knownType == .preunhook)
            qemu.send(
                Channel.Frame(
                    .result, seq: preunhook.seq,
                    payload: Channel.Result(requestType: 0x12, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
            // The tool lets go after PREUNHOOK; QEMU says so.
            qemu.send(
                Channel.Frame(
                    .event, seq: 200,
                    payload: Channel.Event(kind: .toolHangup, error: 0, startTime: 1_795_000_000, hooked: false, running: true).encoded()))
            let (code, out, err) = try await drained
            #expect(code == 0, "\(out) \(err)")
            #expect(out.contains("draining tool: 1 of 1 guest let go"), "\(out)")
            let session = server.registry.snapshot().first
            #expect(session?.state == "not introspected" && session?.hooked == false)
            let status = try #require(try? await source.status(guest: nil).get())
            #expect(status.broker.draining?.map(\.introspector) == ["tool"])
            #expect(status.text().contains("draining: tool for "), "\(status.text())")
            // libvirt's hook while draining: a required guest is vetoed (it would wait unmonitored),
            // a best-effort one starts.
            let vetoed = await controlServer.answer(
                .init(
                    operation: "prepare", uuid: "\(requiredGuest)", name: "vault", metadataWanted: nil, metadataIntrospector: nil,
                    metadataRequired: nil))
            #expect(!vetoed.allow && vetoed.reason.contains("draining"), "\(vetoed.reason)")
            let allowed = await controlServer.answer(
                .init(operation: "prepare", uuid: "\(uuid)", name: "lab", metadataWanted: nil, metadataIntrospector: nil, metadataRequired: nil))
            #expect(allowed.allow, "\(allowed.reason)")
            // No new hook while draining: a reload re-decides, and the drain holds.
            #expect(await server.reloadPolicy())
            #expect(qemu.receive(timeout: .zero) == nil)

            // undrain: hooked again, through a new handshake.
            let (undrainCode, undrainOut, undrainError) = try await broker(["undrain", "tool", "--control-socket", control])
            #expect(undrainCode == 0 && undrainOut.contains("tool is no longer draining"), "\(undrainError)")
            let (again, againFDs) = try #require(qemu.receive())
            againFDs.forEach { close($0) }
            #expect(again.knownType == .hook)
            #expect(configuration.drains.all.isEmpty)
            let (notDraining, _, notDrainingError) = try await broker(["undrain", "tool", "--control-socket", control])
            #expect(notDraining == 6 && notDrainingError.contains("is not draining"), "\(notDrainingError)")
        }

        @Test("drain --wait counts a guest still being unhooked (PREUNHOOK sent, UNHOOK not done) as not let go")
        func unhookingIsNotLetGo() {
            func session(_ state: String, hooked: Bool, introspector: String?, required: Bool? = nil) -> SessionStatus {
                SessionStatus(
                    uuid: "6b1e5d2a-0000-4000-8000-00000000000\(Int.random(in: 0...9))", name: "g", qemuPID: 1, state: state, hooked: hooked,
                    failures: 0, lastFailure: nil, required: required, startTime: 1, since: Date(), introspector: introspector)
            }
            let hooked = GuestSessionMachine.State.hooked(.v12).description
            let unhooking = GuestSessionMachine.State.unhooking.description
            // The drained decision has no introspector: while QEMU unhooks, the session names none.
            #expect(DrainProgress.count([session(unhooking, hooked: false, introspector: nil)], introspector: "tool") == (1, 0))
            #expect(DrainProgress.count([session(hooked, hooked: true, introspector: "tool", required: true)], introspector: "tool") == (1, 1))
            #expect(DrainProgress.count([session(hooked, hooked: true, introspector: "other")], introspector: "tool") == (0, 0))
            #expect(DrainProgress.count([session("not introspected", hooked: false, introspector: nil)], introspector: "tool") == (0, 0))
        }

        @Test("a required guest: kept hooked (or held when not hooked) unless --allow-unmonitored")
        func requiredGuests() throws {
            let plan = SessionPlan(
                introspectorName: "tool", endpoint: .unix(path: "/run/tool.sock"), cookie: nil, allowLists: .kernelDefaults(.v12),
                handshakeTimeout: .seconds(1), unhookTimeout: .seconds(1), backoff: .default, required: true, rule: "[guest lab] at lab.conf:1")
            let drains = IntrospectorDrains()
            #expect(drains.apply(.introspect(plan), reason: "r", hooked: true).0 == .introspect(plan))
            drains.drain("tool", allowUnmonitored: false)
            #expect(drains.apply(.introspect(plan), reason: "r", hooked: true).0 == .introspect(plan))
            #expect(drains.apply(.introspect(plan), reason: "r", hooked: false).0 == .requiredButUnservable(rule: plan.rule))
            drains.drain("tool", allowUnmonitored: true)
            #expect(drains.apply(.introspect(plan), reason: "r", hooked: true).0 == .notIntrospected)
            var bestEffort = plan
            bestEffort.required = false
            drains.drain("tool", allowUnmonitored: false)
            #expect(drains.apply(.introspect(bestEffort), reason: "r", hooked: true).0 == .notIntrospected)
        }
    }
}
