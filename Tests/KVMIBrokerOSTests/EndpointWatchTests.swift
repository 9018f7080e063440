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
    @Suite("Connecting when the tool appears (inotify), and flapping tools; the test process plays QEMU")
    struct EndpointWatchTests {
        let uuid = GuestUUID("6c0ffee0-1d2e-4f30-8a41-5b6c7d8e9f01")!
        let rule = "[guest lab]\nMatchUUID=6c0ffee0-1d2e-4f30-8a41-5b6c7d8e9f01\nIntrospector=tool\nEvents=UNHOOK\nCommands=VM_READ_PHYSICAL\n"

        /// A broker under a policy whose one introspector listens on `toolPath` with the given
        /// back-off; `hookSurvival` as given.
        func startBroker(toolPath: String, backoff: String, hookSurvival: Duration = .seconds(10)) throws -> (
            ChannelServer, PolicyStore, Task<Void, Never>, String, PolicyTree, String
        ) {
            let tree = try PolicyTree(toolSocket: toolPath)
            tree.write(
                "introspectors.d/10-tool.conf", "[introspector tool]\nEndpoint=unix:\(toolPath)\nABI=v12\nSecretFile=\(tree.secret)\n\(backoff)\n")
            tree.write("guests.d/50-lab.conf", rule)
            let store = try PolicyStore(sources: tree.sources)
            let procRoot = try DaemonChannelTests().fakeProc(cmdlineUUID: uuid)
            let socketPath = temporarySocketPath("watch-channel")
            var configuration = BrokerConfiguration(
                channelSocketPath: socketPath, policy: store,
                verifier: PeerVerifier(emulators: ["/usr/bin/qemu-system-x86_64"], procRoot: procRoot))
            configuration.hookSurvival = hookSurvival
            let server = ChannelServer(configuration: configuration, logger: Logger(label: "watch-broker"))
            let listener = try server.bind()
            let task = Task { await server.run(listener: listener) }
            return (server, store, task, socketPath, tree, procRoot)
        }

        /// The session's status once `condition` holds (within the generous bound).
        func status(_ server: ChannelServer, until condition: @escaping (SessionStatus) -> Bool) async -> SessionStatus? {
            var found: SessionStatus?
            _ = await eventuallyAsync {
                found = server.registry.snapshot().first
                return found.map(condition) ?? false
            }
            return found.flatMap { condition($0) ? $0 : nil }
        }

        @Test(
            "an absent unix endpoint: the guest is connected when the tool binds its socket, not after the back-off (1 h here)",
            arguments: [false, true])
        func connectsOnCreate(staleFile: Bool) async throws {
            try await warmUpRuntimeDescriptors()
            let toolPath = temporarySocketPath("late-tool")
            defer { unlink(toolPath) }
            if staleFile {
                // A socket file nobody listens on (a tool that died): connect() meets ECONNREFUSED.
                let stale = try listenSocket(on: .unix(path: toolPath), backlog: 1).0
                stale.close()
                #expect(access(toolPath, F_OK) == 0)
            }
            let (server, _, task, socketPath, tree, procRoot) = try startBroker(toolPath: toolPath, backoff: "BackoffInitial=3600s\nBackoffMax=3600s")
            defer {
                task.cancel()
                tree.cleanUp()
                try? FileManager.default.removeItem(atPath: procRoot)
            }
            let qemu = try FakeQEMU(connectingTo: socketPath)
            qemu.send(DaemonChannelTests().hello(uuid: uuid))
            #expect(qemu.receive()?.0.knownType == .welcome)
            // The first attempt fails: the session now waits an hour, or for the socket.
            let waiting = await status(server) { $0.lastFailure?.contains(staleFile ? "ECONNREFUSED" : "ENOENT") == true }
            #expect(waiting?.state == "waiting to retry (attempt 2 next)", "\(String(describing: waiting))")
            #expect(EndpointWatcher.shared?.footprint.waiters == 1)

            // The tool starts (replacing a stale file): the bind is the create event.
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: toolPath), secret: testSecret))
            defer { introspector.stop() }
            let hook = try #require(qemu.receive(), "no HOOK: the broker did not connect on the socket's creation")
            hook.1.forEach { close($0) }
            #expect(hook.0.knownType == .hook)
            // The tool records a handshake after its reply, so possibly after our HOOK: wait for it.
            let records = introspector.waitForRecords(1)
            #expect(records.count == 1)
            #expect(records.first?.handshake?.uuid == uuid)
            #expect(EndpointWatcher.shared?.footprint.waiters == 0)
            #expect(EndpointWatcher.shared?.footprint.directories == 0)
        }

        @Test("a tool that closes right after every handshake: the back-off grows instead of resetting, and status says flapping")
        func flappingTool() async throws {
            try await warmUpRuntimeDescriptors()
            let toolPath = temporarySocketPath("crash-loop-tool")
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: toolPath), secret: testSecret, behaviour: .closeAfterReply))
            defer { introspector.stop() }
            // Hooks never survive within the test (1 h), the back-off starts small.
            let (server, store, task, socketPath, tree, procRoot) = try startBroker(
                toolPath: toolPath, backoff: "BackoffInitial=10ms\nBackoffMax=3600s", hookSurvival: .seconds(3600))
            defer {
                task.cancel()
                tree.cleanUp()
                try? FileManager.default.removeItem(atPath: procRoot)
            }
            let live = LiveStatusSource(registry: server.registry, policy: store, staticIntrospector: nil, libvirtURI: nil, libvirtConnected: nil)
            let qemu = try FakeQEMU(connectingTo: socketPath)
            qemu.send(DaemonChannelTests().hello(uuid: uuid))
            #expect(qemu.receive()?.0.knownType == .welcome)
            for round in 1...4 {
                let (hook, fds) = try #require(qemu.receive(), "round \(round): no HOOK")
                #expect(hook.knownType == .hook)
                let toolSocket = try #require(fds.first)
                qemu.send(
                    Channel.Frame(
                        .result, seq: hook.seq,
                        payload: Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
                // As QEMU does: watch the tool's socket; it hangs up, so report TOOL_HANGUP.
                var pollFD = pollfd(fd: toolSocket, events: Int16(POLLIN), revents: 0)
                #expect(poll(&pollFD, 1, 60_000) == 1)
                var byte: UInt8 = 0
                #expect(read(toolSocket, &byte, 1) == 0)
                close(toolSocket)
                qemu.send(
                    Channel.Frame(
                        .event, seq: UInt32(100 + round),
                        payload: Channel.Event(kind: .toolHangup, error: 0, startTime: 1_795_000_000, hooked: false, running: true).encoded()))
                // The failures in a row (the back-off's exponent) count up across hooks.
                let after = await status(server) { $0.failures == round && !$0.hooked }
                let seen = server.registry.snapshot().first
                #expect(after != nil, "round \(round): \(String(describing: seen))")
                #expect((after?.flapping == true) == (round >= GuestSessionMachine.flappingThreshold))
            }
            let document = try #require(try? await live.status(guest: nil).get())
            #expect(document.broker.flapping == ["tool"])
            #expect(document.text().contains("; FLAPPING"))
            #expect(document.text().contains("flapping: tool"))
            let json = String(decoding: try LiveStatus.encoder(pretty: true).encode(document), as: UTF8.self)
            #expect(json.contains("\"flapping\" : true"))
            #expect(introspector.waitForRecords(4).count >= 4)
        }
    }
}
