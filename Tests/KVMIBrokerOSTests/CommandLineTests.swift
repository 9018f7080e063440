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

/// A number printed as Double's raw description ("0.5335876809753782") or Duration's ("0.5 seconds").
private func rawDurations(in lines: [String]) -> [String] {
    lines.filter { line in
        line.contains(" seconds") || line.range(of: #"[0-9]\.[0-9]{4,}"#, options: .regularExpression) != nil
    }
}

extension OSLayerTests {
    /// What an administrator meets on the command line (issue 11): `--version`, `status` with
    /// each way the status file can be missing or wrong, `install-hook`, and a daemon whose
    /// repeating failures are logged once, summarised, and never as raw numbers.
    @Suite("The command line an administrator meets")
    struct CommandLineTests {
        let broker = productsDirectory().appendingPathComponent("kvmi-broker")

        func temporaryPath(_ tag: String) -> String {
            "/tmp/kvmib-cli-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        }

        /// `status` failed with one line on stderr, no usage text, and `code`.
        func expectStatusFails(_ arguments: [String], code: Int32, saying: [String], launcher: [String] = []) throws {
            let (status, out, err) =
                launcher.isEmpty
                ? try runProcess(broker, ["status"] + arguments)
                : try runProcess(URL(fileURLWithPath: launcher[0]), Array(launcher.dropFirst()) + [broker.path, "status"] + arguments)
            #expect(status == code, "\(err)")
            #expect(out.isEmpty, "\(out)")
            let lines = err.split(separator: "\n", omittingEmptySubsequences: true)
            #expect(lines.count == 1, "one line, no usage text: \(err)")
            #expect(!err.lowercased().contains("usage"), "\(err)")
            for text in saying { #expect(err.contains(text), "\(err)") }
        }

        @Test("--version prints the one version constant")
        func version() throws {
            let (status, out, err) = try runProcess(broker, ["--version"])
            #expect(status == 0, "\(err)")
            #expect(out.trimmingCharacters(in: .whitespacesAndNewlines) == BrokerVersion.string)
            let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../scripts/version").standardized
            let (scriptStatus, scriptOut, scriptErr) = try runProcess(script, [])
            #expect(scriptStatus == 0, "\(scriptErr)")
            #expect(scriptOut == BrokerVersion.string + "\n")
        }

        @Test("status without a status file: one sentence naming the path and --status-file, exit 3, no usage text")
        func statusAbsent() throws {
            let path = temporaryPath("absent") + ".json"
            try expectStatusFails(
                ["--status-file", path], code: 3,
                saying: ["no status file at \(path): the broker is not running or writes its status elsewhere (--status-file)"])
        }

        @Test("status on a directory and on a file it may not read: the errno's sentence, and who may read it")
        func statusUnreadable() throws {
            let directory = temporaryPath("dir")
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            try expectStatusFails(["--status-file", directory], code: 4, saying: ["cannot read the status file \(directory): Is a directory"])
            // Root reads anything: the reader runs as nobody (setpriv), the file is root's, mode 0640.
            chmod(directory, 0o755)
            let file = directory + "/status.json"
            #expect(FileManager.default.createFile(atPath: file, contents: Data("{}".utf8)))
            chown(file, 0, 0)
            chmod(file, 0o640)
            let group = String(cString: getgrgid(0).pointee.gr_name)
            try expectStatusFails(
                ["--status-file", file], code: 4,
                saying: ["cannot read the status file \(file): permission denied", "root or members of its group \(group)"],
                launcher: ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        }

        @Test("status on a file that is not the broker's JSON, or an older broker's: says so")
        func statusUnparsable() throws {
            let path = temporaryPath("garbage") + ".json"
            defer { unlink(path) }
            #expect(FileManager.default.createFile(atPath: path, contents: Data("not json\n".utf8)))
            try expectStatusFails(
                ["--status-file", path], code: 4, saying: ["the status file \(path) is not a status file", "not the broker's JSON"])
            #expect(FileManager.default.createFile(atPath: path, contents: Data("[\n\n]".utf8)))
            try expectStatusFails(["--status-file", path], code: 4, saying: ["no broker section"])
        }

        @Test("status on a file whose broker is gone, or whose pid another process now has: stale, exit 1")
        func statusStale() throws {
            let path = temporaryPath("stale") + ".json"
            defer { unlink(path) }
            // A pid that ran and is reaped: nothing runs as it (the kernel hands pids out in order).
            let (_, gone) = try spawnAndReap()
            #expect(
                FileManager.default.createFile(
                    atPath: path,
                    contents: Data(StatusJSON.encode(StatusDocument(broker: BrokerStatus(pid: gone, startTime: 1, version: "0.9.0"), sessions: [])))))
            try expectStatusFails(["--status-file", path], code: 1, saying: ["stale: written by pid \(gone) which is not running"])
            // This test process runs, but started at another time than the file says.
            let mine = BrokerStatus.current
            let reused = BrokerStatus(pid: mine.pid, startTime: (mine.startTime ?? 0) + 1, version: "0.9.0")
            #expect(FileManager.default.createFile(atPath: path, contents: Data(StatusJSON.encode(StatusDocument(broker: reused, sessions: [])))))
            try expectStatusFails(
                ["--status-file", path], code: 1, saying: ["stale: written by pid \(mine.pid) which is not running (that pid is now another process)"]
            )
        }

        func spawnAndReap() throws -> (Int32, Int32) {
            let child = try SpawnedProcess("/bin/true", [], logPath: "/dev/null")
            let status = child.wait(timeout: 30)
            return (status ?? -1, child.pid)
        }

        /// A broker with libvirt's check off and no QEMU: enough for its start-up and its logs.
        func startBroker(_ extra: [String], statusFile: String, logLevel: String = "info") throws -> ChildProcess {
            try ChildProcess(
                broker,
                [
                    "run", "--channel-socket", temporarySocketPath("cli-channel"), "--control-socket", "", "--introspector", "unix:/nonexistent",
                    "--commands", "none", "--events", "0", "--status-file", statusFile, "--log-level", logLevel,
                ] + extra)
        }

        @Test("a running broker: status names its version and pid; an unwritable status file is logged once, naming path and errno")
        func statusOfRunningBroker() throws {
            let path = temporaryPath("running") + ".json"
            defer { unlink(path) }
            let child = try startBroker(["--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", "/bin/true"], statusFile: path)
            #expect(eventually { FileManager.default.fileExists(atPath: path) }, "\(child.log)")
            let (status, out, err) = try runProcess(broker, ["status", "--status-file", path])
            #expect(status == 0, "\(err)")
            #expect(out == "kvmi-broker \(BrokerVersion.string) running as pid \(child.process.pid): no guest sessions\n")
            child.kill()
            #expect(child.process.wait(timeout: 30) != nil)
            try expectStatusFails(["--status-file", path], code: 1, saying: ["stale: written by pid \(child.process.pid)"])

            let directory = temporaryPath("status-dir")
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            for (unwritable, errno) in [("/nonexistent-\(getpid())/status.json", "No such file or directory"), (directory, "Is a directory")] {
                let broken = try startBroker(
                    ["--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", "/bin/true"], statusFile: unwritable)
                let activity = "writing the status file \(unwritable)"
                #expect(eventually { broken.log.contains(activity) }, "\(broken.log)")
                #expect(broken.log.contains(errno), "\(broken.log)")
                #expect(broken.log.components(separatedBy: activity).count == 2, "logged once: \(broken.log)")
                #expect(broken.process.isRunning, "keeps running: \(broken.log)")
                broken.kill()
            }
        }

        @Test("libvirt unreachable: the failure is logged once, each retry at most once (debug), never twice, never as a raw number")
        func libvirtRetriesLoggedOnce() throws {
            let path = temporaryPath("libvirt") + ".json"
            defer { unlink(path) }
            let uri = "qemu+unix:///system?socket=/tmp/kvmib-no-libvirtd-\(getpid()).sock"
            let child = try startBroker(["--libvirt-uri", uri], statusFile: path, logLevel: "debug")
            #expect(eventually { child.log.contains("attempt 3 failed the same way") }, "\(child.log)")
            let lines = child.log.split(separator: "\n").map(String.init)
            let failures = lines.filter { $0.contains("connecting to libvirt") && $0.contains("failed:") }
            #expect(failures.count == 1, "\(child.log)")
            #expect(failures.first?.contains("warning") == true, "\(child.log)")
            for attempt in 2...3 {
                #expect(lines.filter { $0.contains("attempt \(attempt) failed") }.count == 1, "\(child.log)")
            }
            #expect(!child.log.contains("connectFailed"), "no second line per event: \(child.log)")
            #expect(rawDurations(in: lines).isEmpty, "\(rawDurations(in: lines))")
            child.kill()
        }

        @Test("install-hook writes the installed broker's path, refuses one that is not an executable file, says what it wrote")
        func installHook() throws {
            let hooks = temporaryPath("hooks")
            defer { try? FileManager.default.removeItem(atPath: hooks) }
            let (refused, _, refusal) = try runProcess(broker, ["install-hook", "--hooks-directory", hooks, "--broker-path", "/etc/passwd"])
            #expect(refused != 0)
            #expect(refusal.contains("--broker-path '/etc/passwd' is not an executable file"), "\(refusal)")
            #expect(!FileManager.default.fileExists(atPath: hooks + "/50-kvmi-broker"))
            let (missing, _, missingErr) = try runProcess(
                broker, ["install-hook", "--hooks-directory", hooks, "--broker-path", "/nonexistent/kvmi-broker"])
            #expect(missing != 0 && missingErr.contains("does not exist"), "\(missingErr)")
            let (status, out, err) = try runProcess(
                broker, ["install-hook", "--hooks-directory", hooks, "--broker-path", "/bin/true", "--hook-arguments=--control-socket /run/x.sock"])
            #expect(status == 0, "\(err)")
            let script = try String(contentsOfFile: hooks + "/50-kvmi-broker", encoding: .utf8)
            #expect(script.contains("exec /bin/true hook --control-socket /run/x.sock -- \"$@\"\n"), "\(script)")
            #expect(!script.contains(".build"))
            #expect(out.contains("installed \(hooks)/50-kvmi-broker, which runs: /bin/true hook --control-socket /run/x.sock -- \"$@\""), "\(out)")
        }
    }
}

extension OSLayerTests.DaemonChannelTests {
    @Test("an unreachable introspector: one warning, silent retries (debug only), one notice with the hook that ends it; readable durations")
    func unreachableIntrospectorLoggedOnce() async throws {
        let procRoot = try fakeProc(cmdlineUUID: uuid)
        defer { try? FileManager.default.removeItem(atPath: procRoot) }
        let toolPath = temporarySocketPath("late-tool")
        let lines = LineCounter()
        let socketPath = temporarySocketPath("channel")
        let configuration = BrokerConfiguration(
            channelSocketPath: socketPath, introspector: .unix(path: toolPath), cookie: CookieHash(secret: testSecret),
            allowLists: try Channel.AllowLists(abi: .v12, commands: [-1], events: [0, 5]),
            backoff: try Backoff(initial: .milliseconds(50), maximum: .milliseconds(100), multiplier: 2, jitter: 0.2),
            handshakeTimeout: .seconds(2), verifier: PeerVerifier(emulators: [fakeEmulator], procRoot: procRoot))
        let server = ChannelServer(configuration: configuration, logger: Logger(label: "test-broker") { _ in lines })
        let listener = try server.bind()
        let broker = Task { await server.run(listener: listener) }
        defer { broker.cancel() }
        let qemu = try FakeQEMU(connectingTo: socketPath)
        qemu.send(hello(uuid: uuid))
        #expect(try #require(qemu.receive()).0.knownType == .welcome)
        #expect(eventually { lines.messages.contains { $0.contains("attempt 6 failed") } }, "\(lines.messages)")
        let failed = lines.messages.filter { $0.contains("introspecting the guest failed") }
        #expect(failed.count == 1, "\(lines.messages)")
        #expect(!lines.messages.contains { $0.contains("again, attempt") }, "\(lines.messages)")
        let introspector = try TestIntrospector(.init(endpoint: .unix(path: toolPath), secret: testSecret))
        defer { introspector.stop() }
        let (hook, fds) = try #require(qemu.receive())
        #expect(hook.knownType == .hook)
        fds.forEach { close($0) }
        qemu.send(
            Channel.Frame(
                .result, seq: hook.seq, payload: Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
        #expect(eventually { lines.messages.contains { $0.contains("guest hooked") } }, "\(lines.messages)")
        let hooked = lines.messages.filter { $0.contains("guest hooked") }
        #expect(hooked.count == 1 && hooked[0].contains("failed attempts over"), "\(hooked)")
        #expect(rawDurations(in: lines.messages).isEmpty, "\(rawDurations(in: lines.messages))")
        broker.cancel()
        await broker.value
    }
}
