import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMITestIntrospector
import Logging
import Testing

@testable import KVMIBrokerDaemon

#if canImport(Glibc)
    import Glibc
#endif

private let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures/fake_qemu_channel.py").path

extension OSLayerTests.DaemonChannelTests {
    /// One test's broker (static mode, this process as a QEMU in a fake /proc) and test
    /// introspector; both are stopped when `body` returns or throws.
    func withBroker(
        tool behaviour: TestIntrospector.Behaviour = .normal, _ body: (ChannelServer, String, TestIntrospector) async throws -> Void
    ) async throws {
        let procRoot = try fakeProc(cmdlineUUID: uuid)
        defer { try? FileManager.default.removeItem(atPath: procRoot) }
        let introspector = try TestIntrospector(
            .init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret, behaviour: behaviour))
        defer { introspector.stop() }
        let (server, broker, socketPath) = try startBroker(procRoot: procRoot, introspector: introspector.endpoint)
        do {
            try await body(server, socketPath, introspector)
        } catch {
            broker.cancel()
            await broker.value
            throw error
        }
        broker.cancel()
        await broker.value
    }

    /// Connects, sends HELLO, and returns the answer frame (WELCOME or REFUSE).
    func greet(_ socketPath: String, uuid: GuestUUID, version: UInt16 = 1) throws -> (FakeQEMU, Channel.Frame?) {
        let qemu = try FakeQEMU(connectingTo: socketPath)
        var frame = hello(uuid: uuid)
        frame.payload.replaceSubrange(0..<2, with: [UInt8(version & 0xFF), UInt8(version >> 8)])
        qemu.send(frame)
        return (qemu, qemu.receive(timeout: .seconds(30))?.0)
    }

    @Test("one live channel per guest: a second channel of the same QEMU is refused while the first lives")
    func secondChannelRefused() async throws {
        try await withBroker { server, socketPath, introspector in
            let (first, welcome) = try greet(socketPath, uuid: uuid)
            #expect(welcome?.knownType == .welcome)
            let (hook, fds) = try #require(first.receive(timeout: .seconds(30)))
            #expect(hook.knownType == .hook && fds.count == 1)
            fds.forEach { close($0) }
            let (_, second) = try greet(socketPath, uuid: uuid)
            #expect(second?.knownType == .refuse)
            #expect(second?.payload.read(Int32.self, at: 0, order: .little) == EBUSY)
            #expect(server.registry.count == 1)
            #expect(introspector.waitForRecords(1).count == 1, "one handshake, not one per channel")
        }
    }

    @Test("a HELLO that announces channel version 0 is refused")
    func versionZeroRefused() async throws {
        try await withBroker { _, socketPath, introspector in
            let (_, answer) = try greet(socketPath, uuid: uuid, version: 0)
            #expect(answer?.knownType == .refuse)
            #expect(answer?.payload.read(Int32.self, at: 0, order: .little) == EPROTONOSUPPORT)
            #expect(introspector.records.isEmpty)
        }
    }

    @Test("a RESULT whose sequence number no request had is a protocol error, not a hook")
    func resultForUnknownRequest() async throws {
        try await withBroker { server, socketPath, introspector in
            let (qemu, welcome) = try greet(socketPath, uuid: uuid)
            #expect(welcome?.knownType == .welcome)
            let (hook, fds) = try #require(qemu.receive(timeout: .seconds(30)))
            fds.forEach { close($0) }
            qemu.send(
                Channel.Frame(
                    .result, seq: hook.seq &+ 41,
                    payload: Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
            #expect(qemu.receive(timeout: .seconds(30)) == nil, "the broker closes the channel")
            #expect(server.registry.snapshot().first?.hooked != true)
        }
    }

    @Test("a RESULT timeout handled after its RESULT is stale: the hooked session stays")
    func staleResultTimeoutIsIgnored() async throws {
        try await withBroker { server, socketPath, introspector in
            let (qemu, welcome) = try greet(socketPath, uuid: uuid)
            #expect(welcome?.knownType == .welcome)
            let (hook, fds) = try #require(qemu.receive(timeout: .seconds(30)))
            fds.forEach { close($0) }
            qemu.send(
                Channel.Frame(
                    .result, seq: hook.seq, payload: Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
            #expect(await eventuallyAsync { server.registry.snapshot().first?.hooked == true })
            // The timer armed for that HOOK fires late, after its RESULT was handled.
            #expect(await server.registry.inject(.resultTimeout(seq: hook.seq), into: uuid))
            // A barrier: a pause is still handled by the same, live session.
            qemu.send(
                Channel.Frame(
                    .event, seq: 1,
                    payload: Channel.Event(kind: .paused, error: 0, startTime: 1_795_000_000, hooked: false, running: false).encoded()))
            #expect(await eventuallyAsync { server.registry.snapshot().first?.state.contains("PAUSED") == true })
            #expect(server.registry.count == 1)
        }
    }

    @Test("a handshake outcome of a superseded attempt is never taken as the current one's")
    func supersededHandshakeIsDropped() async throws {
        let other = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool2")), secret: testSecret))
        defer { other.stop() }
        // A tool that never answers: the session stays in its first attempt.
        try await withBroker(tool: .silent) { server, socketPath, _ in
            let (qemu, welcome) = try greet(socketPath, uuid: uuid)
            #expect(welcome?.knownType == .welcome)
            #expect(await eventuallyAsync { server.registry.snapshot().first?.state.hasPrefix("connecting") == true })
            // A late success from an attempt that was cancelled (attempt ids start at 1 per session; 999 never ran).
            let late = try await IntrospectorConnector().connectAndHandshake(to: other.endpoint, parameters())
            #expect(await server.registry.inject(.handshake(attempt: 999, .success(late)), into: uuid))
            // Barrier: a pause reaches the same session; no HOOK was sent for the stale outcome.
            qemu.send(
                Channel.Frame(
                    .event, seq: 1,
                    payload: Channel.Event(kind: .paused, error: 0, startTime: 1_795_000_000, hooked: false, running: false).encoded()))
            #expect(await eventuallyAsync { server.registry.snapshot().first?.state.contains("PAUSED") == true })
            // The stale outcome was handled before the pause: a HOOK for it would already be here.
            #expect(qemu.receive(timeout: .zero) == nil, "no HOOK for the superseded attempt")
        }
    }

    @Test("connections that never send HELLO cannot keep a real guest out")
    func silentConnectionsDoNotStarveAGuest() async throws {
        let procRoot = try fakeProc(cmdlineUUID: uuid)
        defer { try? FileManager.default.removeItem(atPath: procRoot) }
        let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
        defer { introspector.stop() }
        let socketPath = temporarySocketPath("channel")
        var configuration = BrokerConfiguration(
            channelSocketPath: socketPath, introspector: introspector.endpoint, cookie: CookieHash(secret: testSecret),
            allowLists: try Channel.AllowLists(abi: .v12, commands: [-1], events: [0]),
            verifier: PeerVerifier(emulators: [fakeEmulator], procRoot: procRoot))
        // Only eviction can free room here: a silent peer would otherwise be waited for a minute.
        configuration.helloTimeout = .seconds(60)
        let admission = ConnectionAdmission(maximumConnections: 24, maximumGreeting: 4)
        let server = ChannelServer(configuration: configuration, logger: Logger(label: "test-broker"), admission: admission)
        let listener = try server.bind()
        let broker = Task { await server.run(listener: listener) }
        do {
            // 60 silent connections: more than the broker holds at once.
            var silent: [Descriptor] = []
            for _ in 0..<60 { silent.append(try connectUnixSocket(socketPath, nonBlocking: true)) }
            let (_, welcome) = try greet(socketPath, uuid: uuid)
            #expect(welcome?.knownType == .welcome)
            #expect(admission.counts.evicted > 0)
            #expect(admission.counts.live <= 24)
            silent.forEach { $0.close() }
        }
        broker.cancel()
        await broker.value
    }

    @Test("two channels streaming EVENTs do not keep a third guest from its WELCOME, nor flood the log")
    func eventFloodDoesNotStarve() async throws {
        // The broker compares the peer's real executable path with the configured emulators.
        let python = URL(fileURLWithPath: "/usr/bin/python3").resolvingSymlinksInPath().path
        let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
        defer { introspector.stop() }
        let socketPath = temporarySocketPath("channel")
        // Guests outside the --guest list: WELCOME, RELEASE, and then only events to read.
        let configuration = BrokerConfiguration(
            channelSocketPath: socketPath, introspector: introspector.endpoint, cookie: CookieHash(secret: testSecret),
            allowLists: try Channel.AllowLists(abi: .v12, commands: [-1], events: [0]), guests: [],
            verifier: PeerVerifier(emulators: [python]))
        let lines = LineCounter()
        let server = ChannelServer(configuration: configuration, logger: Logger(label: "test-broker", factory: { _ in lines }))
        let listener = try server.bind()
        let broker = Task { await server.run(listener: listener) }
        var children: [SpawnedProcess] = []
        defer { children.forEach { $0.terminate(SIGKILL, grace: 0) } }
        do {
            for index in 0..<2 {
                let guest = "5eed0000-0000-4000-8000-00000000000\(index)"
                let log = temporarySocketPath("flood-\(index)") + ".log"
                children.append(try SpawnedProcess("/usr/bin/python3", [fixture, socketPath, "-uuid", guest, "flood"], logPath: log))
            }
            for child in children { #expect(eventually(timeout: .seconds(60)) { child.log.contains("welcome") }, "\(child.log)") }
            let before = lines.count
            let floodStarted = ContinuousClock.now
            let third = try SpawnedProcess(
                "/usr/bin/python3", [fixture, socketPath, "-uuid", "5eed0000-0000-4000-8000-0000000000ff", "hello"],
                logPath: temporarySocketPath("third") + ".log")
            #expect(third.wait(timeout: 60) == 0)
            #expect(third.log.contains("WELCOME"), "\(third.log)")
            // Thousands of events arrived meanwhile; the log took a bounded number of lines: each
            // flooding session at most its budget per 10 s window that began.
            let windows = Int(floodStarted.duration(to: .now) / .seconds(10)) + 2
            #expect(lines.count - before <= 2 * (configuration.sessionLogLines + 1) * windows + 20, "\(lines.count - before) log lines")
        }
        children.forEach { $0.terminate(SIGKILL, grace: 0) }
        broker.cancel()
        await broker.value
    }
}

extension OSLayerTests.DaemonChannelTests {
    @Test("a process that sends HELLO and then execs another program is not given the introspector's socket")
    func execAfterHelloIsRefused() async throws {
        let python = URL(fileURLWithPath: "/usr/bin/python3").resolvingSymlinksInPath().path
        let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
        defer { introspector.stop() }
        let socketPath = temporarySocketPath("channel")
        let configuration = BrokerConfiguration(
            channelSocketPath: socketPath, introspector: introspector.endpoint, cookie: CookieHash(secret: testSecret),
            allowLists: try Channel.AllowLists(abi: .v12, commands: [-1], events: [0]), verifier: PeerVerifier(emulators: [python]))
        let lines = LineCounter()
        let server = ChannelServer(configuration: configuration, logger: Logger(label: "test-broker", factory: { _ in lines }))
        let listener = try server.bind()
        let broker = Task { await server.run(listener: listener) }
        let child = try SpawnedProcess(
            "/usr/bin/python3", [fixture, socketPath, "-uuid", "5eed0000-0000-4000-8000-0000000000ee", "exec"],
            logPath: temporarySocketPath("exec") + ".log")
        defer { child.terminate(SIGKILL, grace: 0) }
        #expect(eventually(timeout: .seconds(60)) { lines.messages.contains { $0.contains("not hooking") } }, "\(lines.messages)")
        #expect(lines.messages.contains { $0.contains("exec'd") }, "\(lines.messages)")
        #expect(await eventuallyAsync(timeout: .seconds(60)) { server.registry.count == 0 })
        child.terminate(SIGKILL, grace: 0)
        broker.cancel()
        await broker.value
    }
}

/// Counts log lines (any level) and keeps the first thousand messages.
final class LineCounter: LogHandler, @unchecked Sendable {
    private let lock = NSLock()
    private var lines = 0
    private var kept: [String] = []

    var messages: [String] {
        lock.lock()
        defer { lock.unlock() }
        return kept
    }
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    var count: Int {
        lock.lock()
        defer { lock.unlock() }
        return lines
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        lock.lock()
        lines += 1
        if kept.count < 1000 { kept.append("\(event.message)") }
        lock.unlock()
    }
}

/// `kvmi-broker run` as a process, its QEMUs checked on /proc alone (python3 as the emulator),
/// with a test introspector and a secret file of its own; `launcher` runs before it (prlimit).
private struct BrokerProcess {
    let introspector: TestIntrospector
    let secret: String
    let channel: String
    let process: SpawnedProcess

    init(launcher: [String] = []) throws {
        let python = URL(fileURLWithPath: "/usr/bin/python3").resolvingSymlinksInPath().path
        let toolPath = temporarySocketPath("tool")
        introspector = try TestIntrospector(.init(endpoint: .unix(path: toolPath), secret: testSecret))
        secret = temporarySocketPath("secret")
        #expect(FileManager.default.createFile(atPath: secret, contents: Data(testSecret), attributes: [.posixPermissions: 0o600]))
        channel = temporarySocketPath("channel")
        let broker = productsDirectory().appendingPathComponent("kvmi-broker").path
        let arguments = [
            "run", "--channel-socket", channel, "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--control-socket", "", "--status-file", "",
            "--introspector", "unix:\(toolPath)", "--secret-file", secret, "--commands", "all", "--events", "0", "--emulator", python,
        ]
        let command = launcher.isEmpty ? (broker, arguments) : (launcher[0], Array(launcher.dropFirst()) + ["--", broker] + arguments)
        do {
            process = try SpawnedProcess(command.0, command.1, logPath: temporarySocketPath("broker") + ".log")
        } catch {
            introspector.stop()
            unlink(secret)
            throw error
        }
    }

    /// Kills the broker (if still running) and removes what it was given.
    func remove() {
        process.terminate(SIGKILL, grace: 0)
        introspector.stop()
        unlink(secret)
    }
}

extension OSLayerTests.DaemonChannelTests {
    @Test("at a 256-descriptor limit, 400 silent connections neither crash the broker nor keep a real guest out")
    func silentConnectionsAtTheDescriptorLimit() async throws {
        // The broker raises its soft limit to the hard one: make both 256.
        let running = try BrokerProcess(launcher: ["/usr/bin/prlimit", "--nofile=256:256"])
        defer { running.remove() }
        let (broker, channel) = (running.process, running.channel)
        #expect(eventually { FileManager.default.fileExists(atPath: channel) }, "\(broker.log)")
        var silent: [Descriptor] = []
        for _ in 0..<400 {
            guard let connection = try? connectUnixSocket(channel, nonBlocking: true) else { break }
            silent.append(connection)
        }
        let guest = try SpawnedProcess(
            "/usr/bin/python3", [fixture, channel, "-uuid", "5eed0000-0000-4000-8000-0000000000dd", "hello"],
            logPath: temporarySocketPath("guest") + ".log")
        #expect(guest.wait(timeout: 60) == 0)
        #expect(guest.log.contains("WELCOME"), "guest: \(guest.log)\nbroker: \(broker.log)")
        #expect(broker.isRunning, "the broker died: \(broker.log)")
        silent.forEach { $0.close() }
        broker.terminate(SIGTERM)
    }
}

extension OSLayerTests.DaemonChannelTests {
    @Test("the broker grows its descriptor table before guests connect, so no accept waits for the kernel to grow it")
    func descriptorTableGrownAtStart() throws {
        // The broker raises its soft limit to the hard one it inherits from this process.
        let hard = currentDescriptorLimit().hard
        let running = try BrokerProcess()
        defer { running.remove() }
        let (broker, channel) = (running.process, running.channel)
        try #require(eventually { FileManager.default.fileExists(atPath: channel) || !broker.isRunning }, "\(broker.log)")
        let size = try #require(descriptorTableSize(of: broker.pid), "\(broker.log)")
        // Without the reservation: 64 or 256, as the table starts. With it: room for the
        // reservation (or the whole limit, when that is lower), and no more than the
        // reservation however high the limit (the table is kernel memory the process keeps).
        #expect(size >= min(reservedDescriptorTable, hard), "FDSize \(size), hard limit \(hard)")
        #expect(size <= reservedDescriptorTable, "FDSize \(size), hard limit \(hard)")
        broker.terminate(SIGTERM)
    }

    @Test("turning libvirt's identity check off takes a loudly named option and --emulator; either half alone is refused")
    func identityCheckOffIsExplicit() throws {
        let broker = productsDirectory().appendingPathComponent("kvmi-broker")
        let common = [
            "run", "--control-socket", "", "--status-file", "", "--introspector", "unix:/nonexistent/tool.sock", "--commands", "all", "--events", "0",
        ]
        let (status, _, error) = try runProcess(broker, common + ["--libvirt-uri", ""])
        #expect(status != 0)
        #expect(error.contains("--insecure-no-libvirt-identity"), "\(error)")
        let (status2, _, error2) = try runProcess(broker, common + ["--insecure-no-libvirt-identity"])
        #expect(status2 != 0)
        #expect(error2.contains("needs --libvirt-uri ''"), "\(error2)")
        // Without libvirt's <emulator>, the executables a QEMU may run must be named; with libvirt, they must not.
        let (status3, _, error3) = try runProcess(broker, common + ["--libvirt-uri", "", "--insecure-no-libvirt-identity"])
        #expect(status3 != 0)
        #expect(error3.contains("--insecure-no-libvirt-identity needs --emulator PATH"), "\(error3)")
        let (status4, _, error4) = try runProcess(broker, common + ["--emulator", "/usr/bin/qemu-system-x86_64"])
        #expect(status4 != 0)
        #expect(error4.contains("--emulator applies only with --insecure-no-libvirt-identity"), "\(error4)")
    }
}

/// The size of a process's descriptor table (`FDSize` in /proc/PID/status); nil if unknown.
func descriptorTableSize(of pid: pid_t) -> Int? {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix("FDSize:") {
        return Int(line.dropFirst("FDSize:".count).trimmingCharacters(in: .whitespaces))
    }
    return nil
}
