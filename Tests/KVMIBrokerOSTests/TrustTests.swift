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

/// A private directory (mode 0700, ours) for sockets: the broker refuses a directory others can write, such as /tmp.
func freshPrivateDirectory() -> String {
    var template = Array("/tmp/kvmib-trust-XXXXXX".utf8CString)
    let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    precondition(made != nil, "mkdtemp failed")
    return template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
}

/// The inode at `path` (not following a symlink), or nil.
func inode(_ path: String) -> UInt64? {
    var info = stat()
    return lstat(path, &info) == 0 ? UInt64(info.st_ino) : nil
}

/// Runs a process with stdin read from `inputFile`; returns (status, stdout, stderr).
func runProcess(_ executable: URL, _ arguments: [String], inputFile: String, timeout: TimeInterval = 60) throws -> (Int32, String, String) {
    try runProcess(executable, arguments, stdin: .file(inputFile), timeout: timeout)
}

extension OSLayerTests {
    @Suite("Socket hygiene: one broker per socket, a checked directory, the mode from the first moment")
    struct SocketHygieneTests {
        func bindControl(_ path: String) throws -> Descriptor {
            try ControlServer(
                path: path,
                plans: BrokerConfiguration(channelSocketPath: "/", introspector: .unix(path: "/"), cookie: nil, allowLists: .kernelDefaults(.v12)),
                logger: Logger(label: "t")
            ).bind()
        }

        func refusal(_ body: () throws -> Descriptor) -> BrokerError? {
            do {
                let descriptor = try body()
                descriptor.close()
                return nil
            } catch {
                return error as? BrokerError
            }
        }

        @Test("a second broker on the same socket refuses to start; the socket the first serves is left alone")
        func secondBrokerRefused() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let path = directory + "/control.sock"
            // The first broker's socket, listening.
            let (first, _) = try listenSocket(on: .unix(path: path))
            let served = inode(path)
            let error = try #require(refusal { try bindControl(path) })
            #expect(error.code == .busy)
            #expect(
                error.description
                    == "\(path): control socket: another kvmi-broker already serves this socket (it accepts connections); stop it first, or give this one another socket path"
            )
            #expect(inode(path) == served, "the first broker's socket was replaced")
            let client = try connectUnixSocket(path)
            client.close()

            // The first broker is gone, its socket left behind: it is replaced.
            first.close()
            let second = try bindControl(path)
            defer { second.close() }
            #expect(inode(path) != served)
            let again = try connectUnixSocket(path)
            again.close()
            // Now this process serves it: a further bind refuses too.
            #expect(refusal { try bindControl(path) }?.code == .busy)
        }

        @Test("two brokers starting at once: the one that finds the lock taken refuses")
        func startingTogether() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let path = directory + "/control.sock"
            // The other broker, between its check and its rename (another open file description conflicts, as another process's would).
            let lock = open(ServerSocket.lockPath(for: path), O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            defer { close(lock) }
            #expect(lock >= 0 && flock(lock, LOCK_EX | LOCK_NB) == 0)
            let error = try #require(refusal { try bindControl(path) })
            #expect(error.code == .busy)
            #expect(error.message.contains("another kvmi-broker is starting on this socket right now (it holds \(path).lock)"), "\(error)")
            #expect(inode(path) == nil)
            flock(lock, LOCK_UN)
            let bound = try bindControl(path)
            bound.close()
        }

        @Test("a second kvmi-broker run on the same sockets exits with a clear message; the first keeps serving")
        func secondDaemon() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let tree = try PolicyTree(toolSocket: directory + "/tool.sock")
            defer { tree.cleanUp() }
            let broker = productsDirectory().appendingPathComponent("kvmi-broker")
            let arguments = [
                "run", "--policy-root", tree.root, "--allow-non-root-owner", "--channel-socket", directory + "/qemu.sock", "--control-socket",
                directory + "/control.sock", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", "/usr/bin/qemu-system-x86_64",
                "--status-file", "",
            ]
            let first = try ChildProcess(broker, arguments)
            defer { first.kill() }
            #expect(eventually(timeout: .seconds(30)) { inode(directory + "/control.sock") != nil }, "\(first.log)")
            let channel = inode(directory + "/qemu.sock")
            let (status, _, err) = try runProcess(broker, arguments)
            #expect(status != 0)
            #expect(err.contains("channel socket: another kvmi-broker already serves this socket"), "\(err)")
            #expect(inode(directory + "/qemu.sock") == channel)
            #expect(first.process.isRunning)
            let client = try connectUnixSocket(directory + "/qemu.sock")
            client.close()
        }

        @Test("the socket directory must be writable only by root or the broker, and owned by one of them")
        func directoryChecked() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let path = directory + "/control.sock"
            for (mode, who) in [(mode_t(0o775), "group"), (0o757, "others"), (0o1777, "group and others")] {
                chmod(directory, mode)
                let error = try #require(refusal { try bindControl(path) })
                #expect(error.code == .insecureFile)
                #expect(
                    error.message.contains(
                        "the socket directory \(directory) is writable by \(who) (mode \(String(mode, radix: 8).count < 4 ? "0" : "")\(String(mode, radix: 8))): anyone who may write it could replace the socket"
                    ),
                    "\(error)")
                #expect(inode(path) == nil)
            }
            chmod(directory, 0o755)
            if geteuid() == 0 {
                chown(directory, 65534, 65534)
                let error = try #require(refusal { try bindControl(path) })
                #expect(error.message.contains("is owned by uid 65534, not root or the broker's uid 0"), "\(error)")
                chown(directory, 0, 0)
            }
            let link = directory + "-link"
            symlink(directory, link)
            defer { unlink(link) }
            #expect(refusal { try bindControl(link + "/control.sock") }?.message.contains("is a symbolic link or not a directory") == true)
            let fine = try bindControl(path)
            fine.close()
        }

        @Test("what is at the path and is not a socket is left alone")
        func notASocket() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let path = directory + "/control.sock"
            _ = FileManager.default.createFile(atPath: path, contents: Data("keep".utf8))
            #expect(refusal { try bindControl(path) }?.message.contains("the path exists and is a regular file; remove it") == true)
            #expect(FileManager.default.contents(atPath: path) == Data("keep".utf8))
            unlink(path)
            symlink("/etc/passwd", path)
            #expect(refusal { try bindControl(path) }?.message.contains("the path exists and is a symbolic link") == true)
            #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: path)) == "/etc/passwd")
        }

        @Test("sockets get their mode and group before they appear; the umask is not touched; nothing is left behind")
        func modes() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let previous = umask(0)
            defer { umask(previous) }
            let control = try bindControl(directory + "/control.sock")
            defer { control.close() }
            var info = stat()
            #expect(lstat(directory + "/control.sock", &info) == 0 && info.st_mode & S_IFMT == S_IFSOCK)
            #expect(info.st_mode & 0o7777 == 0o600)
            let group = getegid() == 0 ? gid_t(65534) : getegid()
            let server = ChannelServer(
                configuration: BrokerConfiguration(
                    channelSocketPath: directory + "/sub/qemu.sock", channelSocketGroup: group, introspector: .unix(path: "/"), cookie: nil,
                    allowLists: .kernelDefaults(.v12)), logger: Logger(label: "t"))
            let channel = try server.bind()
            defer { channel.close() }
            #expect(lstat(directory + "/sub/qemu.sock", &info) == 0)
            #expect(info.st_mode & 0o7777 == 0o660)
            #expect(info.st_gid == group)
            #expect(lstat(directory + "/sub", &info) == 0 && info.st_mode & 0o7777 == 0o755, "a missing directory is made 0755")
            #expect(umask(0) == 0, "the process umask was changed")
            let left = (try FileManager.default.contentsOfDirectory(atPath: directory)).filter { $0.hasPrefix(".") }
            #expect(left.isEmpty, "\(left)")
        }
    }

    @Suite("The hook: bounded stdin, and fail closed when the policy cannot be served")
    struct HookTrustTests {
        let enrolled = GuestUUID("dddddddd-4444-4444-8444-444444444444")!
        let plain = GuestUUID("eeeeeeee-5555-4555-8555-555555555555")!
        let broker = productsDirectory().appendingPathComponent("kvmi-broker")

        func xml(_ uuid: GuestUUID, _ name: String, metadata: Bool = false, commandLine: Bool = false, filler: Int = 0) -> String {
            let element = metadata ? "<metadata><kvmi:introspection xmlns:kvmi='https://kvmi-broker.org/xmlns/1'/></metadata>" : ""
            let qemu =
                commandLine
                ? "<qemu:commandline><qemu:arg value='-chardev'/><qemu:arg value='socket,id=kvmib0,path=/run/kvmi-broker/qemu.sock,reconnect-ms=1000'/><qemu:arg value='-object'/><qemu:arg value='introspection-broker,id=kvmib-vmi0,chardev=kvmib0'/></qemu:commandline>"
                : ""
            let description = filler > 0 ? "<description>\(String(repeating: "x", count: filler))</description>" : ""
            return
                "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>\(name)</name><uuid>\(uuid)</uuid>\(element)\(description)<memory>65536</memory>\(qemu)</domain>"
        }

        func hook(_ tree: PolicyTree, _ operation: String = "prepare", name: String) -> [String] {
            [
                "hook", "--control-socket", "/tmp/kvmib-no-broker-\(getpid()).sock", "--timeout", "5", "--policy-root", tree.root,
                "--allow-non-root-owner", "--", name, operation, "begin", "-",
            ]
        }

        @Test("broker down and the policy does not load: enrolled guests are vetoed naming the first error; others start")
        func policyDoesNotLoad() throws {
            let tree = try PolicyTree(toolSocket: "/tmp/none.sock")
            defer { tree.cleanUp() }
            tree.write("guests.d/60-bad.conf", "[guest bad]\nMatchName=x*\nIntrospector=tool\nCommands=VM_READ_PHYSICALL\nEvents=UNHOOK\n")
            for (label, document) in [
                ("metadata", xml(enrolled, "tagged", metadata: true)), ("command line", xml(enrolled, "tagged", commandLine: true)),
            ] {
                let (status, out, err) = try runProcess(broker, hook(tree, name: "tagged"), input: document)
                #expect(status == 1, "\(label): \(err)")
                #expect(out.isEmpty)
                #expect(err.contains("guest tagged (\(enrolled)) is enrolled for introspection"), "\(label): \(err)")
                #expect(
                    err.contains(
                        "the policy does not load, so it might require introspection: \(tree.root)/guests.d/60-bad.conf:4: Commands: unknown command 'VM_READ_PHYSICALL'"
                    ), "\(label): \(err)")
                #expect(err.split(separator: "\n").count == 1)
            }
            let (status, _, err) = try runProcess(broker, hook(tree, name: "plain"), input: xml(plain, "plain"))
            #expect(status == 0, "\(err)")
            let (started, _, _) = try runProcess(broker, hook(tree, "started", name: "tagged"), input: xml(enrolled, "tagged", metadata: true))
            #expect(started == 0, "only prepare and start veto")
        }

        @Test("broker down: a missing secret is a policy that does not load, as in the daemon")
        func missingSecret() throws {
            let tree = try PolicyTree(toolSocket: "/tmp/none.sock")
            defer { tree.cleanUp() }
            unlink(tree.secret)
            let (status, _, err) = try runProcess(broker, hook(tree, name: "tagged"), input: xml(enrolled, "tagged", metadata: true))
            #expect(status == 1)
            #expect(err.contains("\(tree.root)/introspectors.d/10-tool.conf:4: SecretFile=:"), "\(err)")
        }

        /// Two UUID rules giving one guest different introspectors is a static error; two
        /// overlapping globs are found at decision time, which is what this needs.
        static let conflictingGlobs = """
            [guest must]
            MatchName=dd-*
            Introspector=tool
            Commands=VM_READ_PHYSICAL
            Events=UNHOOK
            Mode=required

            [guest also]
            MatchName=*-db
            Introspector=up
            Commands=VM_READ_PHYSICAL
            Events=UNHOOK

            """

        func conflictTree() throws -> PolicyTree {
            let tree = try PolicyTree(toolSocket: "/tmp/none.sock")
            tree.write("introspectors.d/20-up.conf", "[introspector up]\nEndpoint=unix:/tmp/none-up.sock\nABI=v12\nAuthentication=none\n")
            tree.write("guests.d/50-rules.conf", Self.conflictingGlobs)
            return tree
        }

        @Test("required but unservable (rules that conflict): the broker vetoes with one reason; so does the hook with the broker down")
        func unservable() async throws {
            let tree = try conflictTree()
            defer { tree.cleanUp() }
            let store = try PolicyStore(sources: tree.sources)
            let (decision, _) = store.decide(uuid: enrolled, name: "dd-db", metadata: nil)
            #expect(decision == .requiredButUnservable(rule: "[guest also] at \(tree.root)/guests.d/50-rules.conf:8"))
            #expect(store.plan(uuid: enrolled, name: "dd-db").0 == nil)

            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let path = directory + "/control.sock"
            let control = ControlServer(path: path, plans: store, logger: Logger(label: "control"), probeTimeout: .seconds(1))
            let listener = try control.bind()
            let task = Task { await control.run(listener: listener) }
            defer { task.cancel() }
            let (status, out, err) = try runProcess(
                broker, ["hook", "--control-socket", path, "--", "dd-db", "prepare", "begin", "-"], input: xml(enrolled, "dd-db"))
            #expect(status == 1)
            #expect(out.isEmpty)
            #expect(err.split(separator: "\n").count == 1)
            #expect(
                err.contains(
                    "guest dd-db (\(enrolled)) requires introspection per [guest also] at \(tree.root)/guests.d/50-rules.conf:8, but the policy cannot serve it"
                )
                    && err.contains("conflict between name rules"), "\(err)")
            let (other, _, _) = try runProcess(
                broker, ["hook", "--control-socket", path, "--", "web", "prepare", "begin", "-"], input: xml(plain, "web"))
            #expect(other == 0)

            let (down, _, downErr) = try runProcess(broker, hook(tree, name: "dd-db"), input: xml(enrolled, "dd-db"))
            #expect(down == 1)
            #expect(
                downErr.contains("requires introspection per [guest also]") && downErr.contains("fail closed: conflict between name rules"),
                "\(downErr)")
        }

        @Test("a flood of silent control connections is bounded (the oldest are shut down) and the hook is still answered")
        func silentControlFlood() async throws {
            let tree = try conflictTree()
            defer { tree.cleanUp() }
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let path = directory + "/control.sock"
            let control = ControlServer(path: path, plans: try PolicyStore(sources: tree.sources), logger: Logger(label: "control"))
            let listener = try control.bind()
            let task = Task { await control.run(listener: listener) }
            defer { task.cancel() }
            let silent = try (0..<(ControlServer.maximumSilent * 3)).map { _ in try connectUnixSocket(path) }
            defer { silent.forEach { $0.close() } }
            // The server shuts the oldest silent ones down: each sees end of file without ever sending.
            func closedByServer(_ socket: Descriptor) -> Bool {
                var pollFD = pollfd(fd: socket.raw, events: Int16(POLLIN), revents: 0)
                guard poll(&pollFD, 1, 0) == 1 else { return false }
                var byte: UInt8 = 0
                return recv(socket.raw, &byte, 1, 0) <= 0
            }
            let bounded = eventually { silent.filter(closedByServer).count >= silent.count - ControlServer.maximumSilent }
            #expect(bounded, "\(silent.filter(closedByServer).count) of \(silent.count) silent connections shut down")
            // The broker itself answers (its veto), not the hook's broker-down fallback.
            let (status, _, err) = try runProcess(
                broker, ["hook", "--control-socket", path, "--", "dd-db", "prepare", "begin", "-"], input: xml(enrolled, "dd-db"))
            #expect(status == 1 && err.contains("but the policy cannot serve it") && !err.contains("the broker is unreachable"), "\(err)")
        }

        @Test("stdin larger than 4 MiB: refused unread; vetoed if what was read shows enrolment, else let start")
        func oversizedInput() throws {
            let tree = try PolicyTree(toolSocket: "/tmp/none.sock")
            defer { tree.cleanUp() }
            let file = "/tmp/kvmib-hook-input-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).xml"
            defer { unlink(file) }
            _ = FileManager.default.createFile(atPath: file, contents: Data(xml(enrolled, "big", metadata: true, filler: 5 << 20).utf8))
            let (status, out, err) = try runProcess(broker, hook(tree, name: "big"), inputFile: file)
            #expect(status == 1)
            #expect(out.isEmpty)
            #expect(
                err
                    == "kvmi-broker: the domain XML on stdin is larger than 4 MiB, and what was read shows the domain is enrolled for introspection (our metadata namespace): refusing to start it unchecked\n"
            )
            _ = FileManager.default.createFile(atPath: file, contents: Data(xml(plain, "big", filler: 5 << 20).utf8))
            let (allowed, _, warning) = try runProcess(broker, hook(tree, name: "big"), inputFile: file)
            #expect(allowed == 0)
            #expect(warning.contains("larger than 4 MiB; what was read shows no kvmi-broker enrolment: not vetoing"), "\(warning)")
        }

        @Test("a writer that never closes stdin does not hold the hook beyond its --timeout")
        func stdinNeverCloses() throws {
            for (document, expected) in [("<domain><metadata><x xmlns='https://kvmi-broker.org/xmlns/1'", Int32(1)), ("<domain><name>a", 0)] {
                let process = Process()
                process.executableURL = broker
                process.arguments = ["hook", "--control-socket", "/tmp/kvmib-none.sock", "--timeout", "1", "--", "a", "start", "begin", "-"]
                let input = Pipe()
                let err = Pipe()
                process.standardInput = input
                process.standardError = err
                try process.run()
                input.fileHandleForWriting.write(Data(document.utf8))
                // The write end stays open: the hook must give up on its own.
                let exited = eventually(timeout: .seconds(30)) { !process.isRunning }
                if !exited { process.terminate() }
                process.waitUntilExit()
                try input.fileHandleForWriting.close()
                #expect(exited, "the hook still waits for stdin")
                #expect(process.terminationStatus == expected)
                let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                #expect(
                    text.contains("the domain XML on stdin did not end within the --timeout of 1 s (\(document.utf8.count) bytes read)"), "\(text)")
            }
        }

        @Test("peer text from the XML reaches stderr escaped")
        func escapedName() throws {
            let tree = try PolicyTree(toolSocket: "/tmp/none.sock")
            defer { tree.cleanUp() }
            tree.write(
                "guests.d/50-rules.conf",
                "[guest must]\nMatchUUID=\(enrolled)\nIntrospector=tool\nCommands=VM_READ_PHYSICAL\nEvents=UNHOOK\nMode=required\n")
            let (status, _, err) = try runProcess(broker, hook(tree, name: "x"), input: xml(enrolled, "evil&#27;[2J&#10;forged"))
            #expect(status == 1)
            #expect(err.contains("guest evil\\x1b[2J\\x0aforged (\(enrolled)) requires introspection per [guest must]"), "\(err)")
            #expect(err.split(separator: "\n").count == 1)
        }
    }

    @Suite("Secrets: loaded with the policy exactly as the daemon does")
    struct PolicySecretTests {
        let broker = productsDirectory().appendingPathComponent("kvmi-broker")

        @Test("a reload refused for a bad secret names the SecretFile= line, and the old policy stays")
        func reloadNamesTheLine() throws {
            let tree = try PolicyTree(toolSocket: "/tmp/none.sock")
            defer { tree.cleanUp() }
            let store = try PolicyStore(sources: tree.sources)
            for (mode, text) in [(mode_t(0o644), "accessible by others (mode 0644)"), (0o660, "writable by its group (mode 0660)")] {
                chmod(tree.secret, mode)
                guard case .failure(let error) = store.reload() else {
                    Issue.record("a reload with a mode \(String(mode, radix: 8)) secret succeeded")
                    continue
                }
                #expect(error.errors.count == 1)
                let line = try #require(error.errors.first?.description)
                #expect(line.hasPrefix("\(tree.root)/introspectors.d/10-tool.conf:4: SecretFile=: \(tree.secret): secret file is \(text)"), "\(line)")
                #expect(store.snapshot.generation == 1)
            }
        }

        @Test("policy check loads every secret: missing or world-readable is an error at its line; Authentication=none is a warning")
        func checkLoadsSecrets() throws {
            let tree = try PolicyTree(toolSocket: "/tmp/none.sock")
            defer { tree.cleanUp() }
            let check = ["policy", "check", "--root", tree.root, "--allow-non-root-owner"]
            let (ok, out, _) = try runProcess(broker, check)
            #expect(ok == 0, "\(out)")
            chmod(tree.secret, 0o604)
            let (readable, _, readableErr) = try runProcess(broker, check)
            #expect(readable == 1)
            #expect(
                readableErr.contains("\(tree.root)/introspectors.d/10-tool.conf:4: SecretFile=: \(tree.secret): secret file is accessible by others"),
                "\(readableErr)")
            unlink(tree.secret)
            let (missing, _, missingErr) = try runProcess(broker, check)
            #expect(missing == 1)
            #expect(
                missingErr.contains("\(tree.root)/introspectors.d/10-tool.conf:4: SecretFile=: \(tree.secret): cannot open secret file"),
                "\(missingErr)")

            tree.write("introspectors.d/10-tool.conf", "[introspector tool]\nEndpoint=unix:/tmp/none.sock\nABI=v12\nAuthentication=none\n")
            let (open, _, warning) = try runProcess(broker, check)
            #expect(open == 0)
            #expect(
                warning.contains(
                    "\(tree.root)/introspectors.d/10-tool.conf:4: warning: [introspector tool] has Authentication=none: the introspector is not authenticated"
                ),
                "\(warning)")
            let (strict, _, _) = try runProcess(broker, check + ["--strict"])
            #expect(strict == 1)
        }
    }

    @Suite("kvmi-broker run: static mode has no allow-all default; the modes' options do not mix")
    struct RunOptionTests {
        let broker = productsDirectory().appendingPathComponent("kvmi-broker")

        @Test("static mode needs --commands and --events; options of the other mode are refused in one line")
        func options() throws {
            let common = ["run", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--control-socket", "", "--status-file", ""]
            let cases: [([String], String)] = [
                (
                    ["--introspector", "unix:/tmp/x.sock"],
                    "static mode (--introspector) needs --commands and --events given explicitly: there is no allow-all default"
                ),
                (["--introspector", "unix:/tmp/x.sock", "--commands", "all"], "static mode (--introspector) needs --events given explicitly"),
                (
                    ["--introspector", "unix:/tmp/x.sock", "--commands", "all", "--events", "0", "--policy-root", "/etc/kvmi-broker"],
                    "--policy-root is a policy-mode option; static mode (--introspector) does not read the policy"
                ),
                (["--secret-file", "/etc/x.key", "--guest", "\(testUUID)"], "--secret-file, --guest are static-mode options (with --introspector)"),
                (["--commands", "all"], "--commands is a static-mode option (with --introspector)"),
            ]
            for (arguments, message) in cases {
                let (status, _, err) = try runProcess(broker, common + arguments)
                #expect(status != 0, "\(arguments)")
                #expect(err.contains(message), "\(arguments): \(err)")
            }
        }
    }
}
