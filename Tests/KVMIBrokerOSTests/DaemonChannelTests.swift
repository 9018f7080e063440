import CKVMIBroker
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

/// Plays QEMU's side of the channel from the test process, with blocking calls and a timeout.
final class FakeQEMU {
    let socket: Descriptor
    var fd: Int32 { socket.raw }

    init(connectingTo path: String) throws {
        socket = try connectUnixSocket(path)
    }

    /// True once the broker has closed the channel (within 60 s), frames before it ignored.
    func waitForEnd(timeout: Duration = .seconds(60)) -> Bool {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while ContinuousClock.now < deadline {
            var pollFD = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pollFD, 1, 100) >= 0 else { return false }
            if pollFD.revents == 0 { continue }
            let count = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            if count == 0 || (count < 0 && errno == ECONNRESET) { return true }
        }
        return false
    }

    func send(_ frame: Channel.Frame) {
        let bytes = frame.encoded()
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// The next frame and the descriptors that came with it; nil on timeout or end of stream.
    /// `.zero` looks once without waiting (for "nothing was sent before the barrier").
    func receive(timeout: Duration = .seconds(60)) -> (Channel.Frame, [Int32])? {
        var reader = Channel.FrameReader()
        var received: [Int32] = []
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            let remaining = max(ContinuousClock.now.duration(to: deadline), .zero)
            var pollFD = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pollFD, 1, remaining == .zero ? 0 : Int32(remaining.millisecondsDouble) + 1) > 0 else { return nil }
            var buffer = [UInt8](repeating: 0, count: reader.readLimit)
            var fds = [Int32](repeating: -1, count: 4)
            var count: Int32 = 0
            var truncated: Int32 = 0
            let n = buffer.withUnsafeMutableBytes { kvmib_recv_with_fds(fd, $0.baseAddress, $0.count, &fds, 4, &count, &truncated) }
            received += fds.prefix(Int(count))
            guard n > 0 else { return nil }
            if let frame = try? reader.consume(buffer.prefix(n)) { return (frame, received) }
        }
    }
}

extension OSLayerTests {
    @Suite("Broker daemon: the QEMU channel, with the test process playing QEMU")
    struct DaemonChannelTests {
        let uuid = GuestUUID("0b2ab0f4-7d15-4bd2-9a52-4e6ad33c7b0e")!

        /// The emulator the fake /proc's `exe` names, and the one these brokers are configured with.
        let fakeEmulator = "/usr/bin/qemu-system-x86_64"

        /// A /proc look-alike in which this test process is a QEMU started with `-uuid cmdlineUUID`.
        func fakeProc(cmdlineUUID: GuestUUID?, executable: String = "/usr/bin/qemu-system-x86_64") throws -> String {
            let root = "/tmp/kvmib-proc-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            let directory = "\(root)/\(getpid())"
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try FileManager.default.createSymbolicLink(atPath: "\(directory)/exe", withDestinationPath: executable)
            // The real start time: the broker pins the process image by it.
            try FileManager.default.createSymbolicLink(atPath: "\(directory)/stat", withDestinationPath: "/proc/\(getpid())/stat")
            var cmdline = "qemu-system-x86_64\0-name\0guest=demo\0"
            if let cmdlineUUID { cmdline += "-uuid\0\(cmdlineUUID)\0" }
            _ = FileManager.default.createFile(atPath: "\(directory)/cmdline", contents: Data(cmdline.utf8))
            return root
        }

        func hello(uuid: GuestUUID, pid: Int32 = getpid(), flags: Channel.Hello.Flags = [.running]) -> Channel.Frame {
            Channel.Frame(
                .hello, seq: 1,
                payload: Channel.Hello(
                    flags: flags, pid: UInt32(pid), uuid: uuid, startTime: 1_795_000_000, maxGPA: 0x8000_0000, hookedABI: nil, capV12: 1, capV7: 0,
                    introspectionParameter: -1, name: "demo"
                ).encoded())
        }

        func startBroker(
            procRoot: String, introspector: IntrospectorEndpoint, statusFile: String? = nil,
            configure: (inout BrokerConfiguration) -> Void = { _ in }
        ) throws -> (ChannelServer, Task<Void, Never>, String) {
            let socketPath = temporarySocketPath("channel")
            var configuration = BrokerConfiguration(
                channelSocketPath: socketPath, introspector: introspector, cookie: CookieHash(secret: testSecret),
                allowLists: try Channel.AllowLists(abi: .v12, commands: [-1], events: [0, 5]),
                backoff: try Backoff(initial: .milliseconds(300), maximum: .seconds(1), multiplier: 2, jitter: 0),
                handshakeTimeout: .seconds(2), verifier: PeerVerifier(emulators: [fakeEmulator], procRoot: procRoot), statusFile: statusFile)
            configure(&configuration)
            let server = ChannelServer(configuration: configuration, logger: Logger(label: "test-broker"))
            let listener = try server.bind()
            let task = Task { await server.run(listener: listener) }
            return (server, task, socketPath)
        }

        @Test("HELLO -> WELCOME -> handshake -> HOOK with the tool's socket; ENOTTY is explained, retried only after the back-off")
        func hookFlow() async throws {
            _ = IOReactor.shared
            // Sockets only: the runtime opens timer and event descriptors of its own when it likes.
            let before = openSocketCount()
            let procRoot = try fakeProc(cmdlineUUID: uuid)
            defer { try? FileManager.default.removeItem(atPath: procRoot) }
            let statusFile = "/tmp/kvmib-status-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
            defer { unlink(statusFile) }
            var introspector: TestIntrospector? = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret, sendsFirstMessage: true))
            let (_, broker, socketPath) = try startBroker(procRoot: procRoot, introspector: introspector!.endpoint, statusFile: statusFile)
            do {
                let introspector = introspector!
                let qemu = try FakeQEMU(connectingTo: socketPath)
                qemu.send(hello(uuid: uuid))
                let welcome = try #require(qemu.receive())
                #expect(welcome.0.knownType == .welcome)
                #expect(welcome.0.payload.read(UInt16.self, at: 0, order: .little) == Channel.version)

                // First HOOK: one descriptor, the allow-lists, and the tool's socket with its first message unread.
                let (hook, fds) = try #require(qemu.receive())
                #expect(hook.knownType == .hook)
                #expect(fds.count == 1)
                #expect(try Channel.AllowLists(decoding: hook.payload) == Channel.AllowLists(abi: .v12, commands: [-1], events: [0, 5]))
                var queued = [UInt8](repeating: 0, count: 64)
                let queuedCount = recv(fds[0], &queued, 64, Int32(MSG_DONTWAIT))
                #expect(Array(queued.prefix(max(queuedCount, 0))) == TestIntrospector.getVersionMessage)
                let seen = try #require(introspector.waitForRecords(1).first?.handshake)
                #expect(seen.uuid == uuid && seen.name == "demo" && seen.startTime == 1_795_000_000 && seen.maxGPA == 0x8000_0000)

                // The kernel here has no KVMI: QEMU answers ENOTTY at the HOOK step and closes its copy.
                let failedAt = ContinuousClock.now
                qemu.send(
                    Channel.Frame(
                        .result, seq: hook.seq,
                        payload: Channel.Result(requestType: 0x10, step: .hook, hooked: false, error: ENOTTY, failedID: -1).encoded()))
                fds.forEach { close($0) }
                #expect(eventually { (try? String(contentsOfFile: statusFile, encoding: .utf8))?.contains("no KVM introspection") == true })

                // The retry waits the back-off (300 ms, no jitter), then hooks again with a fresh socket.
                let (again, fds2) = try #require(qemu.receive(timeout: .seconds(5)))
                #expect(again.knownType == .hook && fds2.count == 1)
                #expect(failedAt.duration(to: .now) >= .milliseconds(300))
                #expect(introspector.waitForRecords(2).count == 2)
                qemu.send(
                    Channel.Frame(
                        .result, seq: again.seq,
                        payload: Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
                #expect(eventually { (try? String(contentsOfFile: statusFile, encoding: .utf8))?.contains("\"hooked\" : true") == true })

                // The tool hangs up: QEMU unhooks and says so; the broker reconnects after the back-off.
                let hangupAt = ContinuousClock.now
                fds2.forEach { close($0) }
                qemu.send(
                    Channel.Frame(
                        .event, seq: 1,
                        payload: Channel.Event(kind: .toolHangup, error: 0, startTime: 1_795_000_000, hooked: false, running: true).encoded()))
                let (third, fds3) = try #require(qemu.receive(timeout: .seconds(5)))
                #expect(third.knownType == .hook && fds3.count == 1)
                #expect(hangupAt.duration(to: .now) >= .milliseconds(300))
                fds3.forEach { close($0) }
            }
            broker.cancel()
            await broker.value
            introspector?.stop()
            introspector = nil
            #expect(eventually { openSocketCount() == before }, "before \(before): \(describeDescriptors())")
        }

        @Test(
            "a QEMU that lies about its identity is refused with the reason, and nothing is handshaken",
            arguments: [
                ("uuid", "was started with -uuid"),
                ("pid", "but the socket peer is pid"),
                ("no-uuid", "has no -uuid argument"),
                ("not-qemu", "which is not a configured emulator (/usr/bin/qemu-system-x86_64)"),
            ])
        func liar(kind: String, expected: String) async throws {
            let other = GuestUUID("11111111-2222-4333-8444-555555555555")!
            let procRoot = try fakeProc(
                cmdlineUUID: kind == "no-uuid" ? nil : (kind == "uuid" ? other : uuid),
                executable: kind == "not-qemu" ? "/usr/bin/python3" : "/usr/bin/qemu-system-x86_64")
            defer { try? FileManager.default.removeItem(atPath: procRoot) }
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
            defer { introspector.stop() }
            let (_, broker, socketPath) = try startBroker(procRoot: procRoot, introspector: introspector.endpoint)
            do {
                let qemu = try FakeQEMU(connectingTo: socketPath)
                qemu.send(hello(uuid: uuid, pid: kind == "pid" ? getpid() + 1 : getpid()))
                let (refuse, fds) = try #require(qemu.receive())
                #expect(refuse.knownType == .refuse && fds.isEmpty)
                #expect(refuse.payload.read(Int32.self, at: 0, order: .little) == EPERM)
                let text = String(decoding: refuse.payload.dropFirst(4), as: UTF8.self)
                #expect(text.contains(expected), "\(text)")
                #expect(qemu.waitForEnd(), "the broker closes after REFUSE")
            }
            broker.cancel()
            await broker.value
            #expect(introspector.records.isEmpty, "no handshake for a refused QEMU")
        }
    }
}

extension OSLayerTests.DaemonChannelTests {
    @Test("a guest's session runs on the reactor's thread (an event loop), not handed between threads at each socket event")
    func sessionsRunOnTheReactor() async throws {
        let procRoot = try fakeProc(cmdlineUUID: uuid)
        defer { try? FileManager.default.removeItem(atPath: procRoot) }
        let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
        defer { introspector.stop() }
        let (server, broker, socketPath) = try startBroker(procRoot: procRoot, introspector: introspector.endpoint)
        // The observer is called on the thread of the session whose status changed.
        let threads = Seen<String>()
        server.registry.observe { _ in
            let name = currentThread().name
            threads.value.withLock { $0.append(name) }
        }
        let qemu = try FakeQEMU(connectingTo: socketPath)
        qemu.send(hello(uuid: uuid))
        #expect(qemu.receive()?.0.knownType == .welcome)
        let (hook, fds) = try #require(qemu.receive())
        #expect(hook.knownType == .hook)
        fds.forEach { close($0) }
        let seen = threads.value.withLock { $0 }
        #expect(!seen.isEmpty)
        #expect(Set(seen) == ["kvmib-reactor"], "\(seen)")
        qemu.socket.close()
        broker.cancel()
        await broker.value
    }
}
