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
    /// A broker restart reconciles (issue 10 item 4): the real patched QEMU, hooked through the
    /// kernel double to introspector A with lists L, reconnects to a broker whose decision
    /// changed while it was down, and ends where the new decision says. Each test fails with a
    /// broker that only notes "already hooked".
    @Suite("A restart reconciles: the real QEMU's HELLO says what it was hooked with")
    struct RestartReconcileTests {
        let uuid = GuestUUID("7e57ab1e-5eed-4c0d-9abc-0123456789ef")!
        let products = productsDirectory()
        let bound = Duration.seconds(60)

        func secretFile() -> String { temporarySecretFile("reconcile") }

        func introspectorProcess(_ socket: String, _ secret: String) throws -> ChildProcess {
            let child = try ChildProcess(
                products.appendingPathComponent("kvmi-test-introspector"),
                ["--listen", "unix:\(socket)", "--secret-file", secret, "--kvmi", "v12", "--check-commands", "VM_READ_PHYSICAL"])
            #expect(eventually(timeout: bound) { child.log.contains("listening") })
            return child
        }

        /// Static mode; `guests` limits who is introspected (another UUID: this guest is not).
        func brokerProcess(channel: String, tool: String, secret: String, status: String, commands: String = "12,10", guests: [String] = [])
            throws -> ChildProcess
        {
            try ChildProcess(
                products.appendingPathComponent("kvmi-broker"),
                [
                    "run", "--channel-socket", channel, "--introspector", "unix:\(tool)", "--secret-file", secret, "--abi", "v12",
                    "--commands", commands, "--events", "0", "--status-file", status, "--backoff-initial", "0.2", "--backoff-max", "1",
                    "--log-level", "debug", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", try patchedQEMU(),
                    "--control-socket", "",
                ] + guests.flatMap { ["--guest", $0] })
        }

        func status(_ path: String) -> SessionStatus? {
            guard let data = FileManager.default.contents(atPath: path) else { return nil }
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            return (try? decoder.decode(StatusDocument.self, from: data))?.sessions.first
        }

        /// The tool's connections (the test introspector prints one line per connection).
        func connections(_ tool: ChildProcess) -> Int {
            Set(tool.log.components(separatedBy: "\n").compactMap { $0.split(separator: ":").first }.filter { $0.hasPrefix("connection ") }).count
        }

        /// Everything a test needs: tool A, a broker hooked to it with lists 12,10, the real QEMU.
        final class Hooked {
            let secret: String
            let toolSocket: String
            let channel: String
            let statusPath: String
            let tool: ChildProcess
            var broker: ChildProcess
            let qemu: QEMUProcess

            init(secret: String, toolSocket: String, channel: String, statusPath: String, tool: ChildProcess, broker: ChildProcess, qemu: QEMUProcess)
            {
                self.secret = secret
                self.toolSocket = toolSocket
                self.channel = channel
                self.statusPath = statusPath
                self.tool = tool
                self.broker = broker
                self.qemu = qemu
            }

            func cleanUp() {
                qemu.stop()
                broker.kill()
                tool.kill()
                unlink(secret)
                unlink(statusPath)
            }
        }

        func hookedToA() throws -> Hooked {
            let secret = secretFile()
            let toolSocket = temporarySocketPath("toolA")
            let channel = temporarySocketPath("channel")
            let statusPath = "/tmp/kvmib-reconcile-status-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
            let tool = try introspectorProcess(toolSocket, secret)
            let broker = try brokerProcess(channel: channel, tool: toolSocket, secret: secret, status: statusPath)
            #expect(eventually(timeout: bound) { FileManager.default.fileExists(atPath: channel) })
            let qemu = try QEMUProcess(channelSocket: channel, uuid: uuid, name: "reconcile-guest", kernelDouble: try kernelDouble())
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            let hooked = Hooked(
                secret: secret, toolSocket: toolSocket, channel: channel, statusPath: statusPath, tool: tool, broker: broker, qemu: qemu)
            #expect(
                eventually(timeout: bound) { status(statusPath)?.hooked == true }, "broker log:\n\(broker.log)\nQEMU:\n\(qemu.log)")
            #expect(eventually(timeout: bound) { tool.log.contains("unhook-event=enabled") }, "tool log:\n\(tool.log)")
            #expect(connections(tool) == 1)
            return hooked
        }

        /// SIGKILL (no goodbye to QEMU), then a broker with another configuration on the same socket.
        func restart(_ setup: Hooked, _ start: () throws -> ChildProcess) throws {
            setup.broker.kill(SIGKILL)  // returns once it has exited
            unlink(setup.statusPath)
            setup.broker = try start()
        }

        @Test("restart with other lists: SET_ALLOWED with the new lists, the same tool session; the next restart finds them applied")
        func otherLists() throws {
            let setup = try hookedToA()
            defer { setup.cleanUp() }
            try restart(setup) {
                try brokerProcess(channel: setup.channel, tool: setup.toolSocket, secret: setup.secret, status: setup.statusPath, commands: "12")
            }
            let broker = setup.broker
            #expect(
                eventually(timeout: bound) { broker.log.contains("allow-lists changed in place (SET_ALLOWED)") },
                "broker log:\n\(broker.log)\nQEMU:\n\(setup.qemu.log)")
            #expect(broker.log.contains("restart reconciliation: hooked with the decided introspector but other lists; SET_ALLOWED"), "\(broker.log)")
            #expect(eventually(timeout: bound) { status(setup.statusPath)?.state == "hooked (ABI v12)" }, "\(broker.log)")
            // The same session of the same tool: no second handshake, nothing ended.
            #expect(connections(setup.tool) == 1 && !setup.tool.log.contains("ended:"), "\(setup.tool.log)")

            // QEMU stored what SET_ALLOWED carried: the next broker with the same lists has nothing to do.
            try restart(setup) {
                try brokerProcess(channel: setup.channel, tool: setup.toolSocket, secret: setup.secret, status: setup.statusPath, commands: "12")
            }
            let third = setup.broker
            #expect(
                eventually(timeout: bound) {
                    third.log.contains("restart reconciliation: hooked with the decided introspector and lists; nothing to do")
                },
                "broker log:\n\(third.log)")
            #expect(eventually(timeout: bound) { status(setup.statusPath)?.hooked == true })
            #expect(!third.log.contains("SET_ALLOWED") && connections(setup.tool) == 1, "\(third.log)")
        }

        @Test("restart with introspector B: A is let go (PREUNHOOK, UNHOOK), the guest ends hooked to B")
        func otherIntrospector() throws {
            let setup = try hookedToA()
            defer { setup.cleanUp() }
            let socketB = temporarySocketPath("toolB")
            let toolB = try introspectorProcess(socketB, setup.secret)
            defer { toolB.kill() }
            try restart(setup) { try brokerProcess(channel: setup.channel, tool: socketB, secret: setup.secret, status: setup.statusPath) }
            let broker = setup.broker
            #expect(
                eventually(timeout: bound) { connections(toolB) == 1 && status(setup.statusPath)?.hooked == true },
                "broker log:\n\(broker.log)\nQEMU:\n\(setup.qemu.log)\ntool B:\n\(toolB.log)")
            #expect(broker.log.contains("restart reconciliation: hooked with another introspector"), "\(broker.log)")
            #expect(broker.log.contains("guest unhooked for the policy change"), "\(broker.log)")
            #expect(status(setup.statusPath)?.hooks == 1)
            // A's session ended (the kernel double sent it the unhook event), and B's handshake carried this guest.
            #expect(eventually(timeout: bound) { setup.tool.log.contains("ended:") }, "tool A:\n\(setup.tool.log)")
            #expect(connections(setup.tool) == 1)
            #expect(eventually(timeout: bound) { toolB.log.contains("uuid=\(uuid)") }, "tool B:\n\(toolB.log)")
            #expect(setup.qemu.log.contains("PREUNHOOK"), "QEMU:\n\(setup.qemu.log)")
        }

        @Test("restart without introspection for the guest: PREUNHOOK, UNHOOK, RELEASE; the guest is left alone")
        func noLongerIntrospected() throws {
            let setup = try hookedToA()
            defer { setup.cleanUp() }
            try restart(setup) {
                try brokerProcess(
                    channel: setup.channel, tool: setup.toolSocket, secret: setup.secret, status: setup.statusPath,
                    guests: ["00000000-0000-4000-8000-000000000001"])
            }
            let broker = setup.broker
            #expect(
                eventually(timeout: bound) { status(setup.statusPath)?.state == "not introspected" },
                "broker log:\n\(broker.log)\nQEMU:\n\(setup.qemu.log)")
            #expect(status(setup.statusPath)?.hooked == false)
            #expect(
                broker.log.contains("restart reconciliation: hooked, but no longer introspected; PREUNHOOK, UNHOOK, then RELEASE"), "\(broker.log)")
            // RELEASE answered (request type 0x14 = 20), after the unhook.
            #expect(eventually(timeout: bound) { broker.log.contains("RESULT for request type 20 (step none, error 0)") }, "\(broker.log)")
            #expect(eventually(timeout: bound) { setup.tool.log.contains("ended:") }, "tool A:\n\(setup.tool.log)")
            #expect(connections(setup.tool) == 1)
        }
    }

    /// Both channel versions against the daemon, the test process playing QEMU (no timing: each
    /// step waits for the broker's next frame or state).
    @Suite("A restart reconciles: channel versions 1 and 2, the test process playing QEMU")
    struct ReconcileVersionTests {
        let uuid = GuestUUID("7e57ab1e-5eed-4c0d-9abc-0123456789aa")!
        /// What `DaemonChannelTests.startBroker` configures.
        let lists: Channel.AllowLists

        init() throws {
            lists = try Channel.AllowLists(abi: .v12, commands: [-1], events: [0, 5])
        }

        func hello(version: UInt16, flags: Channel.Hello.Flags, applied: Channel.Applied? = nil) -> Channel.Frame {
            Channel.Frame(
                .hello, seq: 1,
                payload: Channel.Hello(
                    version: version, flags: flags, pid: UInt32(getpid()), uuid: uuid, startTime: 1_795_000_000, maxGPA: 0x8000_0000,
                    hookedABI: flags.contains(.hooked) ? .v12 : nil, capV12: 1, capV7: 0, introspectionParameter: -1, name: "demo", applied: applied
                ).encoded())
        }

        func answer(_ qemu: FakeQEMU, _ request: Channel.Frame, hooked: Bool, error: Int32 = 0) {
            qemu.send(
                Channel.Frame(
                    .result, seq: request.seq,
                    payload: Channel.Result(
                        requestType: request.type, step: error == 0 ? .none : .preunhook, hooked: hooked, error: error, failedID: -1
                    )
                    .encoded()))
        }

        /// A new channel once the broker has let go of the previous one (one channel per guest).
        func reconnect(_ server: ChannelServer, _ socketPath: String, closing old: FakeQEMU) async throws -> FakeQEMU {
            old.socket.close()
            #expect(await eventuallyAsync { server.registry.snapshot().isEmpty })
            return try FakeQEMU(connectingTo: socketPath)
        }

        @Test("version 2: HOOK carries what QEMU echoes; an echo of it is left alone, other lists get SET_ALLOWED with the new record")
        func version2() async throws {
            let procRoot = try DaemonChannelTests().fakeProc(cmdlineUUID: uuid)
            defer { try? FileManager.default.removeItem(atPath: procRoot) }
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
            defer { introspector.stop() }
            let (server, broker, socketPath) = try DaemonChannelTests().startBroker(procRoot: procRoot, introspector: introspector.endpoint)
            defer { broker.cancel() }

            var qemu = try FakeQEMU(connectingTo: socketPath)
            qemu.send(hello(version: 2, flags: [.running]))
            let welcome = try #require(qemu.receive())
            #expect(welcome.0.knownType == .welcome && welcome.0.payload.read(UInt16.self, at: 0, order: .little) == 2)
            let (hook, fds) = try #require(qemu.receive())
            fds.forEach { close($0) }
            #expect(hook.knownType == .hook)
            #expect(try Channel.AllowLists(decoding: hook.payload) == lists)
            let applied = try #require(Channel.AllowLists.applied(inPayload: hook.payload))
            #expect(applied.lists == lists.digest)
            answer(qemu, hook, hooked: true)
            #expect(await eventuallyAsync { server.registry.snapshot().first?.hooked == true })

            // The echo: same introspector, same lists. The broker keeps the session as it is.
            qemu = try await reconnect(server, socketPath, closing: qemu)
            qemu.send(hello(version: 2, flags: [.hooked, .running], applied: applied))
            #expect(try #require(qemu.receive()).0.knownType == .welcome)
            #expect(await eventuallyAsync { server.registry.snapshot().first?.state == "hooked (ABI v12)" })

            // Other lists (as a broker with another policy left them): SET_ALLOWED, with the current record.
            qemu = try await reconnect(server, socketPath, closing: qemu)
            let stale = try #require(Channel.Applied(introspector: applied.introspector, lists: [UInt8](repeating: 0x55, count: 32)))
            qemu.send(hello(version: 2, flags: [.hooked, .running], applied: stale))
            #expect(try #require(qemu.receive()).0.knownType == .welcome)
            let (update, _) = try #require(qemu.receive())
            #expect(update.knownType == .setAllowed)
            #expect(try Channel.AllowLists(decoding: update.payload) == lists)
            #expect(Channel.AllowLists.applied(inPayload: update.payload) == applied)
            answer(qemu, update, hooked: true)
            #expect(await eventuallyAsync { server.registry.snapshot().first?.state == "hooked (ABI v12)" })
            #expect(introspector.records.count == 1)

            // Another introspector's record: PREUNHOOK, then (the tool never asked for the event) UNHOOK, then a new HOOK.
            qemu = try await reconnect(server, socketPath, closing: qemu)
            let other = try #require(Channel.Applied(introspector: [UInt8](repeating: 0x66, count: 32), lists: lists.digest))
            qemu.send(hello(version: 2, flags: [.hooked, .running], applied: other))
            #expect(try #require(qemu.receive()).0.knownType == .welcome)
            let (preunhook, _) = try #require(qemu.receive())
            #expect(preunhook.knownType == .preunhook)
            answer(qemu, preunhook, hooked: true, error: ENOENT)
            let (unhook, _) = try #require(qemu.receive())
            #expect(unhook.knownType == .unhook)
            answer(qemu, unhook, hooked: false)
            let (rehook, fds2) = try #require(qemu.receive())
            fds2.forEach { close($0) }
            #expect(rehook.knownType == .hook && Channel.AllowLists.applied(inPayload: rehook.payload) == applied)
            #expect(introspector.waitForRecords(2).count == 2)
        }

        @Test("version 1 still works: WELCOME 1, HOOK without the record; a hooked version 1 HELLO is unknown, so unhooked and hooked again")
        func version1() async throws {
            let procRoot = try DaemonChannelTests().fakeProc(cmdlineUUID: uuid)
            defer { try? FileManager.default.removeItem(atPath: procRoot) }
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
            defer { introspector.stop() }
            let (server, broker, socketPath) = try DaemonChannelTests().startBroker(procRoot: procRoot, introspector: introspector.endpoint)
            defer { broker.cancel() }

            var qemu = try FakeQEMU(connectingTo: socketPath)
            qemu.send(hello(version: 1, flags: [.running]))
            let welcome = try #require(qemu.receive())
            #expect(welcome.0.knownType == .welcome && welcome.0.payload.read(UInt16.self, at: 0, order: .little) == 1)
            let (hook, fds) = try #require(qemu.receive())
            fds.forEach { close($0) }
            #expect(hook.knownType == .hook && hook.payload == lists.encoded())
            answer(qemu, hook, hooked: true)
            #expect(await eventuallyAsync { server.registry.snapshot().first?.hooked == true })

            qemu = try await reconnect(server, socketPath, closing: qemu)
            qemu.send(hello(version: 1, flags: [.hooked, .running]))
            #expect(try #require(qemu.receive()).0.knownType == .welcome)
            let (preunhook, _) = try #require(qemu.receive())
            #expect(preunhook.knownType == .preunhook)
            answer(qemu, preunhook, hooked: true, error: ENOENT)
            let (unhook, _) = try #require(qemu.receive())
            #expect(unhook.knownType == .unhook)
            answer(qemu, unhook, hooked: false)
            let (rehook, fds2) = try #require(qemu.receive())
            fds2.forEach { close($0) }
            #expect(rehook.knownType == .hook && rehook.payload == lists.encoded())
            #expect(introspector.waitForRecords(2).count == 2)
        }
    }
}
