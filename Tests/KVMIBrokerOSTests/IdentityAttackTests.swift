import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerLibvirt
import KVMIBrokerOS
import KVMITestIntrospector
import Logging
import Testing

#if canImport(Glibc)
    import Glibc
#endif

private let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")
private let python = URL(fileURLWithPath: "/usr/bin/python3").resolvingSymlinksInPath().path

/// One attack's world: a directory others may read (a peer of another uid must reach the
/// fixture and the socket), a copy of the fake QEMU fixture in it, and libvirt's test driver
/// whose domains name their QEMU's pid in `run/<name>.pid`, as libvirt's run directory does.
/// The peers are real processes; libvirt's answers (domain, emulator, DAC label, pid) are the
/// test driver's, through the same `LibvirtIdentity` the daemon uses.
struct AttackArena {
    struct Domain {
        var name: String
        var uuid: GuestUUID
        var emulator: String
        /// The `<label>` of a `<seclabel model='dac'>`; nil: none, as the test driver reports.
        var label: String?
    }

    let directory: String
    let fixture: String

    init() throws {
        directory = freshPrivateDirectory()
        chmod(directory, 0o755)
        try FileManager.default.createDirectory(atPath: directory + "/run", withIntermediateDirectories: true)
        fixture = directory + "/fake_qemu_channel.py"
        try FileManager.default.copyItem(atPath: fixtures.appendingPathComponent("fake_qemu_channel.py").path, toPath: fixture)
        chmod(fixture, 0o755)
    }

    var channel: String { directory + "/qemu.sock" }
    var uri: String { "test://\(directory)/node.xml" }
    var locator: QEMUProcessLocator { QEMUProcessLocator(runDirectory: directory + "/run") }

    func define(_ domains: [Domain]) throws {
        let body = domains.map { domain in
            let label = domain.label.map { "<seclabel type='static' model='dac' relabel='no'><label>\($0)</label></seclabel>" } ?? ""
            return """
                <domain type='test'><name>\(domain.name)</name><uuid>\(domain.uuid)</uuid><memory>65536</memory>
                <os><type>hvm</type></os><devices><emulator>\(domain.emulator)</emulator></devices>\(label)</domain>
                """
        }
        try "<node>\(body.joined())</node>".write(toFile: directory + "/node.xml", atomically: true, encoding: .utf8)
    }

    /// libvirt's record of which process is the domain's QEMU (written whole, by rename).
    func recordPID(_ pid: pid_t, of name: String) throws {
        try "\(pid)\n".write(toFile: "\(directory)/run/\(name).pid", atomically: true, encoding: .utf8)
    }

    /// The fixture as a process of its own (through `launcher`, such as setpriv, which execs
    /// and keeps the pid), held before it connects until `open(_:)`.
    func peer(
        _ tag: String, uuid: GuestUUID, mode: String = "hook", executable: String = python, launcher: [String] = [], channel: String? = nil
    ) throws -> (SpawnedProcess, gate: String) {
        let gate = "\(directory)/\(tag).gate"
        let command = launcher + [executable, fixture, channel ?? self.channel, "-uuid", "\(uuid)", mode]
        let process = try SpawnedProcess(
            command[0], Array(command.dropFirst()), environment: ["KVMIB_FAKE_QEMU_GATE": gate], logPath: "\(directory)/\(tag).log")
        return (process, gate)
    }

    func open(_ gate: String) {
        _ = FileManager.default.createFile(atPath: gate, contents: nil)
    }

    /// A peer that libvirt names as the QEMU of `domain`: spawned, recorded, let go.
    func recordedPeer(_ tag: String, of domain: Domain, executable: String = python, launcher: [String] = []) throws -> SpawnedProcess {
        let (process, gate) = try peer(tag, uuid: domain.uuid, executable: executable, launcher: launcher)
        try recordPID(process.pid, of: domain.name)
        open(gate)
        return process
    }

    /// The shared secret in a root-only file of the arena, for a broker run as a process.
    func secretFile() -> String {
        let path = directory + "/secret"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(testSecret), attributes: [.posixPermissions: 0o600]))
        return path
    }

    /// `kvmi-broker run` on the arena's channel in static mode, /proc identity only (the fixture's
    /// interpreter as the emulator), for the tool at `tool`; `extra` options appended.
    func brokerCommand(tool: String, secret: String, _ extra: [String] = []) -> [String] {
        [
            productsDirectory().appendingPathComponent("kvmi-broker").path, "run", "--channel-socket", channel, "--libvirt-uri", "",
            "--insecure-no-libvirt-identity", "--emulator", python, "--control-socket", "", "--status-file", "", "--introspector",
            "unix:\(tool)", "--secret-file", secret, "--commands", "all", "--events", "0", "--log-level", "debug",
        ] + extra
    }

    func cleanUp() { try? FileManager.default.removeItem(atPath: directory) }
}

extension OSLayerTests {
    /// The attack suite for QEMU's identity (issue 10, item 7): each test fails if its hole
    /// comes back. Real processes play the attacker; where libvirt is asked, the test driver
    /// answers (its domains' pids are whatever the test records), so that the check under
    /// attack is the one that must refuse, not libvirt's pid check before it.
    @Suite("Attacks on QEMU's identity, with real processes")
    struct IdentityAttackTests {
        let victim = GuestUUID("a77ac4ed-0000-4000-8000-000000000001")!

        /// A broker with libvirt (the test driver of `arena`) as its identity source, a test
        /// introspector, and a channel socket a peer of group 65534 may reach.
        func withLibvirtBroker(
            _ arena: AttackArena, _ body: (ChannelServer, LineCounter, TestIntrospector) async throws -> Void
        ) async throws {
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
            defer { introspector.stop() }
            var configuration = BrokerConfiguration(
                channelSocketPath: arena.channel, channelSocketGroup: 65534, introspector: introspector.endpoint,
                cookie: CookieHash(secret: testSecret), allowLists: try Channel.AllowLists(abi: .v12, commands: [-1], events: [0]))
            let (identity, watcher) = LibvirtIdentity.start(uri: arena.uri, locator: arena.locator, logger: Logger(label: "attack-libvirt"))
            defer {
                watcher.cancel()
                identity.watcher.stop()
            }
            configuration.identity = identity
            // A peer that arrives before the watcher has connected is told "not now" (EAGAIN).
            #expect(eventually { identity.watcher.isConnected }, "the watcher did not connect to \(arena.uri)")
            let lines = LineCounter()
            let server = ChannelServer(configuration: configuration, logger: Logger(label: "attack-broker", factory: { _ in lines }))
            let listener = try server.bind()
            let broker = Task { await server.run(listener: listener) }
            do {
                try await body(server, lines, introspector)
            } catch {
                broker.cancel()
                await broker.value
                throw error
            }
            broker.cancel()
            await broker.value
        }

        /// Waits for the peer to exit and returns its output.
        func outcome(_ peer: SpawnedProcess) -> String {
            #expect(peer.wait(timeout: 60) != nil, "the peer still runs: \(peer.log)")
            return peer.log
        }

        @Test("a program named qemu-system-x86_64 elsewhere (a copy or a symlink) with a stolen -uuid is not libvirt's emulator")
        func lookAlikeExecutableWithLibvirt() async throws {
            let arena = try AttackArena()
            defer { arena.cleanUp() }
            let target = AttackArena.Domain(name: "kvmib-ident-victim", uuid: victim, emulator: "/usr/bin/qemu-system-x86_64", label: nil)
            let control = AttackArena.Domain(
                name: "kvmib-ident-control", uuid: GuestUUID("a77ac4ed-0000-4000-8000-000000000002")!, emulator: "/usr/bin/python3", label: nil)
            try arena.define([target, control])
            // A working program (Python) under QEMU's name, copied and linked into a directory of its own.
            try FileManager.default.createDirectory(atPath: arena.directory + "/copy", withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: arena.directory + "/link", withIntermediateDirectories: true)
            let copy = arena.directory + "/copy/qemu-system-x86_64"
            let link = arena.directory + "/link/qemu-system-x86_64"
            try FileManager.default.copyItem(atPath: python, toPath: copy)
            try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: python)
            try await withLibvirtBroker(arena) { server, lines, introspector in
                for (tag, executable, runs) in [("copy", copy, copy), ("link", link, python)] {
                    // libvirt (here) even names the impostor as the domain's QEMU: only the executable can tell.
                    let peer = try arena.recordedPeer("impostor-\(tag)", of: target, executable: executable)
                    let output = outcome(peer)
                    #expect(output.contains("REFUSE \(EPERM)"), "\(executable): \(output)")
                    let reason =
                        "QEMU pid \(peer.pid) of guest \(victim) runs \(runs), not the emulator libvirt records for domain kvmib-ident-victim: /usr/bin/qemu-system-x86_64"
                    #expect(lines.messages.contains { $0.contains(reason) }, "\(lines.messages)")
                }
                #expect(introspector.records.isEmpty, "an impostor got a handshake")
                #expect(server.registry.count == 0)
                // The control: a domain whose <emulator> is Python (through a symlink, resolved) accepts Python.
                let genuine = try arena.recordedPeer("genuine", of: control)
                #expect(eventually { genuine.log.contains("HOOK fds=1") }, "\(genuine.log) \(lines.messages)")
            }
        }

        @Test("without libvirt, a program named qemu-system-x86_64 that is not a configured emulator is refused")
        func lookAlikeExecutableWithoutLibvirt() async throws {
            let arena = try AttackArena()
            defer { arena.cleanUp() }
            let copy = arena.directory + "/qemu-system-x86_64"
            try FileManager.default.copyItem(atPath: python, toPath: copy)
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret))
            defer { introspector.stop() }
            for (round, (emulators, expected)) in [(["/usr/bin/qemu-system-x86_64"], "REFUSE \(EPERM)"), ([copy], "HOOK fds=1")].enumerated() {
                let channel = arena.directory + "/qemu-\(round).sock"
                let configuration = BrokerConfiguration(
                    channelSocketPath: channel, introspector: introspector.endpoint, cookie: CookieHash(secret: testSecret),
                    allowLists: try Channel.AllowLists(abi: .v12, commands: [-1], events: [0]), verifier: PeerVerifier(emulators: emulators))
                let lines = LineCounter()
                let server = ChannelServer(configuration: configuration, logger: Logger(label: "attack-broker", factory: { _ in lines }))
                let listener = try server.bind()
                let broker = Task { await server.run(listener: listener) }
                // The control round configures the copy itself: then it is accepted.
                let (peer, gate) = try arena.peer("copy-\(round)", uuid: victim, executable: copy, channel: channel)
                arena.open(gate)
                #expect(eventually { peer.log.contains(expected) }, "\(emulators): \(peer.log) \(lines.messages)")
                if expected.hasPrefix("REFUSE") {
                    let reason = "pid \(peer.pid) runs \(copy), which is not a configured emulator (/usr/bin/qemu-system-x86_64)"
                    #expect(lines.messages.contains { $0.contains(reason) }, "\(lines.messages)")
                }
                peer.terminate(SIGKILL, grace: 0)
                broker.cancel()
                await broker.value
            }
        }

        @Test("a peer of another uid than libvirt runs the domain's QEMU as is refused; the uid libvirt names is accepted")
        func wrongUID() async throws {
            let arena = try AttackArena()
            defer { arena.cleanUp() }
            let asRoot = AttackArena.Domain(name: "kvmib-ident-root", uuid: victim, emulator: "/usr/bin/python3", label: "+0:+0")
            let unlabelled = AttackArena.Domain(
                name: "kvmib-ident-unlabelled", uuid: GuestUUID("a77ac4ed-0000-4000-8000-000000000003")!, emulator: "/usr/bin/python3", label: nil)
            let asNobody = AttackArena.Domain(
                name: "kvmib-ident-nobody", uuid: GuestUUID("a77ac4ed-0000-4000-8000-000000000004")!, emulator: "/usr/bin/python3",
                label: "nobody:nogroup")
            try arena.define([asRoot, unlabelled, asNobody])
            let nobody = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            try await withLibvirtBroker(arena) { _, lines, introspector in
                let first = try arena.recordedPeer("root-domain", of: asRoot, launcher: nobody)
                #expect(outcome(first).contains("REFUSE \(EPERM)"), "\(first.log)")
                #expect(
                    lines.messages.contains {
                        $0.contains(
                            "QEMU pid \(first.pid) of guest \(victim) runs as uid 65534 gid 65534, but libvirt runs domain kvmib-ident-root's QEMU as +0:+0 (uid 0 gid 0)"
                        )
                    }, "\(lines.messages)")
                let second = try arena.recordedPeer("unlabelled", of: unlabelled, launcher: nobody)
                #expect(outcome(second).contains("REFUSE \(EPERM)"), "\(second.log)")
                #expect(
                    lines.messages.contains {
                        $0.contains("but libvirt reports no DAC label for domain kvmib-ident-unlabelled, so only root may be its QEMU")
                    },
                    "\(lines.messages)")
                #expect(introspector.records.isEmpty)
                // The label names nobody:nogroup (resolved by name): that peer is the domain's QEMU.
                let third = try arena.recordedPeer("nobody-domain", of: asNobody, launcher: nobody)
                #expect(eventually { third.log.contains("HOOK fds=1") }, "\(third.log) \(lines.messages)")
                #expect(introspector.waitForRecords(1).count == 1)
            }
        }

        @Test("an impostor with the victim's -uuid that connects first is refused and claims nothing: the real QEMU is then hooked")
        func impostorFirst() async throws {
            let arena = try AttackArena()
            defer { arena.cleanUp() }
            let domain = AttackArena.Domain(name: "kvmib-ident-first", uuid: victim, emulator: "/usr/bin/python3", label: nil)
            try arena.define([domain])
            try await withLibvirtBroker(arena) { _, lines, introspector in
                // The real QEMU exists (libvirt knows its pid) but has not connected yet.
                let (real, gate) = try arena.peer("real", uuid: victim)
                try arena.recordPID(real.pid, of: domain.name)
                // The impostor: the same executable, uid and -uuid; only libvirt's pid tells them apart.
                let (impostor, impostorGate) = try arena.peer("impostor", uuid: victim)
                arena.open(impostorGate)
                #expect(outcome(impostor).contains("REFUSE \(EPERM)"), "\(impostor.log)")
                #expect(
                    lines.messages.contains {
                        $0.contains("domain kvmib-ident-first (\(victim)) runs as QEMU pid \(real.pid), not pid \(impostor.pid)")
                    },
                    "\(lines.messages)")
                arena.open(gate)
                #expect(eventually { real.log.contains("HOOK fds=1") }, "\(real.log) \(lines.messages)")
                let records = introspector.waitForRecords(1)
                #expect(records.count == 1 && records.first?.handshake?.uuid == victim)
            }
        }

        /// The unit keeps one capability (dist/systemd/kvmi-broker.service:
        /// `CapabilityBoundingSet=CAP_SYS_PTRACE`): root without CAP_KILL may not signal a
        /// process of another user, so a liveness check by signal 0 answers EPERM for libvirt's
        /// QEMUs, which run as their own user. Read as "exited", that refused every such QEMU.
        @Test("with only the service's capability (CAP_SYS_PTRACE, no CAP_KILL), a QEMU of another user is admitted and hooked")
        func serviceCapabilitiesOnly() async throws {
            let arena = try AttackArena()
            defer { arena.cleanUp() }
            let secret = arena.secretFile()
            let tool = temporarySocketPath("tool")
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: tool), secret: testSecret))
            defer { introspector.stop() }
            // As the unit runs it: root, CAP_SYS_PTRACE alone, the channel socket's group a
            // supplementary group (here nogroup, the peer's).
            let broker = try SpawnedProcess(
                "/usr/bin/setpriv",
                ["--bounding-set", "-all,+sys_ptrace", "--groups", "65534", "--"]
                    + arena.brokerCommand(tool: tool, secret: secret, ["--socket-group", "nogroup"]),
                logPath: arena.directory + "/broker.log")
            defer { broker.terminate(SIGKILL, grace: 0) }
            #expect(eventually { FileManager.default.fileExists(atPath: arena.channel) }, "\(broker.log)")
            // The broker really runs without CAP_KILL (bit 5) and with CAP_SYS_PTRACE (bit 19).
            let status = (try? String(contentsOfFile: "/proc/\(broker.pid)/status", encoding: .utf8)) ?? ""
            let effective = status.split(separator: "\n").first { $0.hasPrefix("CapEff:") }.flatMap {
                UInt64($0.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces), radix: 16)
            }
            #expect(effective == 1 << 19, "\(status)")
            let (peer, gate) = try arena.peer(
                "nobody", uuid: victim, launcher: ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
            defer { peer.terminate(SIGKILL, grace: 0) }
            arena.open(gate)
            #expect(eventually { peer.log.contains("HOOK fds=1") }, "\(peer.log)\n\(broker.log)")
            #expect(introspector.waitForRecords(1).first?.handshake?.uuid == victim)
        }

        @Test("a reused pid, forced in a new pid namespace: the identity checked for pid P is not given to the next process with pid P")
        func reusedPID() async throws {
            let arena = try AttackArena()
            defer { arena.cleanUp() }
            let secret = arena.secretFile()
            let tool = arena.directory + "/tool.sock"
            // The broker in a pid namespace of its own, where pids can be chosen (clone3 with
            // set_tid): it sees the namespace's pids, in SO_PEERCRED and in its /proc. No
            // introspector yet: the HOOK waits until the pid has been reused.
            let broker = try SpawnedProcess(
                "/usr/bin/unshare",
                ["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL", "--"]
                    + arena.brokerCommand(tool: tool, secret: secret, ["--backoff-initial", "0.2", "--backoff-max", "1"]),
                logPath: arena.directory + "/broker.log")
            defer { broker.terminate(SIGKILL, grace: 0) }
            #expect(eventually { FileManager.default.fileExists(atPath: arena.channel) }, "\(broker.log)")
            let children = (try? String(contentsOfFile: "/proc/\(broker.pid)/task/\(broker.pid)/children", encoding: .utf8)) ?? ""
            let namespaceMember = try #require(children.split(separator: " ").first.map(String.init), "unshare has no child: \(broker.log)")
            let enter = ["--target", namespaceMember, "--pid", "--mount", "--"]

            // The first process: its identity is checked as pid P; it hands the channel to a
            // child and exits.
            let first = try SpawnedProcess(
                "/usr/bin/nsenter", enter + [python, arena.fixture, arena.channel, "-uuid", "\(victim)", "handoff"],
                logPath: arena.directory + "/first.log")
            #expect(first.wait(timeout: 60) == 0, "\(first.log)")
            let welcome = try #require(first.log.split(separator: "\n").first { $0.hasPrefix("welcome pid ") }, "\(first.log)\n\(broker.log)")
            let pid = try #require(Int32(welcome.dropFirst("welcome pid ".count)))

            // The second process gets pid P: the same executable, the same command line, another start time.
            let second = try SpawnedProcess(
                "/usr/bin/nsenter",
                enter + [
                    python, fixtures.appendingPathComponent("spawn_with_pid.py").path, "\(pid)", python, "-c",
                    "import os, time; print('second', os.getpid(), flush=True); time.sleep(600)", arena.channel, "-uuid", "\(victim)",
                ], logPath: arena.directory + "/second.log")
            defer { second.terminate(SIGKILL, grace: 0) }
            #expect(eventually { second.log.contains("second \(pid)\n") }, "the pid was not reused: \(second.log)")

            // Now the introspector: the handshake succeeds, and the HOOK must not go out.
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: tool), secret: testSecret))
            defer { introspector.stop() }
            // With SO_PEERPIDFD the channel names the process that connected (gone); without it the
            // start time tells the new process from it.
            #expect(
                eventually {
                    broker.log.contains("not hooking: QEMU pid \(pid), which connected the channel, has exited")
                        || broker.log.contains("not hooking: pid \(pid) is now another process (its start time changed)")
                }, "\(broker.log)")
            #expect(eventually { first.log.contains("closed") }, "the channel's holder: \(first.log)")
            #expect(!first.log.contains("HOOK"), "the introspector's socket went to the channel's holder: \(first.log)")
        }
    }
}
