import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerOS
import KVMITestIntrospector
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The example configuration file the project ships.
private let exampleConfig = projectRoot.appendingPathComponent("dist/broker.conf").path

extension OSLayerTests {
    /// The daemon's lifecycle (issue 11 item 3): its parts in a ServiceGroup, SIGTERM's graceful
    /// stop that leaves hooked guests hooked, signals right after READY=1, and broker.conf.
    @Suite("Lifecycle: graceful stop, signals after READY=1, broker.conf")
    struct LifecycleTests {
        let broker = productsDirectory().appendingPathComponent("kvmi-broker")
        let bound = Duration.seconds(60)

        func logPath(_ tag: String) -> String { "/tmp/kvmib-lifecycle-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log" }

        func writeConfig(_ directory: String, _ text: String) -> String {
            let path = directory + "/broker.conf"
            _ = FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
            chmod(path, 0o644)
            return path
        }

        /// Policy mode on a test policy tree, no libvirt, everything under `directory`, as a config file.
        func configText(_ directory: String, policyRoot: String, channel: String = "from-file.sock") -> String {
            """
            # written by LifecycleTests
            [broker]
            channel-socket=\(directory)/\(channel)
            control-socket=\(directory)/control.sock
            metrics-socket=\(directory)/metrics.sock
            libvirt-uri=
            insecure-no-libvirt-identity=true
            emulator=/usr/bin/qemu-system-x86_64
            policy-root=\(policyRoot)
            allow-non-root-owner=\(geteuid() != 0)
            log-level=debug
            stop-timeout=30

            """
        }

        @Test("the example dist/broker.conf parses, names every option once, and its commented values are the defaults")
        func exampleMatchesDefaults() throws {
            let text = try String(contentsOfFile: exampleConfig, encoding: .utf8)
            // As shipped: every key commented out, so no settings.
            #expect(try BrokerConfigFile.parse(Array(text.utf8), path: exampleConfig).isEmpty)
            // Uncommented: each `#key=default` line becomes a setting.
            let uncommented = text.split(separator: "\n", omittingEmptySubsequences: false).map { line in
                line.range(of: #"^#[a-z-]+="#, options: .regularExpression) != nil ? String(line.dropFirst()) : String(line)
            }.joined(separator: "\n")
            let settings = try BrokerConfigFile.parse(Array(uncommented.utf8), path: exampleConfig)
            #expect(Set(settings.keys) == Set(BrokerConfigFile.options.map(\.key)), "keys missing or extra in dist/broker.conf")
            for option in BrokerConfigFile.options {
                let setting = try #require(settings[option.key], "\(option.key)")
                let written = option.kind == .list ? setting.values.joined(separator: ";") : setting.value
                #expect(written == option.defaultValue, "\(option.key): dist/broker.conf says '\(written)', the default is '\(option.defaultValue)'")
            }
            #expect(BrokerConfigFile.options.first { $0.key == "stop-timeout" }?.defaultValue == "\(Int(BrokerDefaults.stopTimeout))")
        }

        @Test(
            "a bad broker.conf is refused at start with file:line and exit status 2, and no socket is created",
            arguments: [
                ("[broker]\nchanel-socket=/tmp/x.sock\n", "2: unknown key 'chanel-socket' (did you mean 'channel-socket'?)"),
                ("[broker]\nhandshakes-per-introspector=many\n", "2: handshakes-per-introspector 'many' is not a whole number"),
                ("[broker]\nlog-level=info\n# a comment\nlog-level=debug\n", "4: log-level is given twice (first on line 2)"),
                ("[daemon]\nlog-level=info\n", "1: unknown section '[daemon]': the file has one [broker] section"),
                ("[broker]\nlog-level=info\n[broker]\n", "3: [broker] is given twice"),
                ("[broker]\n\nlog-level=loud\n", "3: log-level 'loud' is not a level"),
                ("[broker]\nguest=6695eb01-f6a4-8304-79aa-97f2502e193f;nope\n", "2: guest 'nope' is not a UUID"),
                ("[broker]\nstop-timeout=0\n", "2: stop-timeout must be more than 0 and at most 3600 seconds"),
                ("[broker]\nallow-non-root-owner=yes\n", "2: allow-non-root-owner 'yes' is not true or false"),
                ("[broker]\nmetrics-listen=0.0.0.0:9465\n", "2: metrics-listen '0.0.0.0:9465' is not a loopback address"),
                ("log-level=info\n", "1: key 'log-level' appears before any [section] header"),
                ("[broker]\nnot a key\n", "2: 'not a key' is not 'Key=Value'"),
                ("[broker]\nlog-level=\u{1B}[31mred\n", "2: log-level '\\x1b[31mred' is not a level"),
            ])
        func badFile(text: String, expected: String) throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let config = writeConfig(directory, text)
            let (status, out, err) = try runProcess(
                broker,
                [
                    "run", "--config", config, "--channel-socket", directory + "/qemu.sock", "--control-socket", directory + "/control.sock",
                    "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", "/usr/bin/qemu-system-x86_64",
                ])
            #expect(status == 2, "\(err)")
            #expect(out.isEmpty, "\(out)")
            let lines = err.split(separator: "\n")
            #expect(lines.count == 1, "one line: \(err)")
            #expect(err.contains("kvmi-broker run: \(config):\(expected)"), "\(err)")
            #expect(!err.contains("\u{1B}"), "raw file text in the message: \(err)")
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory) == ["broker.conf"], "the broker created something")
        }

        @Test("a --config that does not exist is refused (exit 2); the default path may be missing")
        func missingExplicitFile() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let (status, _, err) = try runProcess(
                broker, ["run", "--config", directory + "/none.conf", "--channel-socket", directory + "/qemu.sock"])
            #expect(status == 2, "\(err)")
            #expect(err.contains("kvmi-broker run: \(directory)/none.conf: cannot read the configuration file: No such file or directory"), "\(err)")
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty)
        }

        @Test("a broker.conf writable by others is refused")
        func writableFile() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let config = writeConfig(directory, "[broker]\nlog-level=info\n")
            chmod(config, 0o666)
            let (status, _, err) = try runProcess(broker, ["run", "--config", config, "--channel-socket", directory + "/qemu.sock"])
            #expect(status == 2, "\(err)")
            #expect(err.contains("\(config): writable by group or others (mode 666)"), "\(err)")
        }

        @Test("the broker takes its options from broker.conf; a command-line option overrides the file's")
        func valuesFromFileAndOverride() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let tree = try PolicyTree(toolSocket: directory + "/tool.sock")
            defer { tree.cleanUp() }
            let config = writeConfig(directory, configText(directory, policyRoot: tree.root))

            // Everything from the file: its sockets, its log level (debug lines), its stop bound.
            let first = try SpawnedProcess(broker.path, ["run", "--config", config], logPath: logPath("file"))
            defer {
                first.terminate(SIGKILL, grace: 0)
                unlink(first.logPath)
            }
            #expect(eventually(timeout: bound) { first.log.contains("ready: the sockets listen") }, "\(first.log)")
            #expect(inode(directory + "/from-file.sock") != nil && inode(directory + "/control.sock") != nil)
            #expect(inode(directory + "/metrics.sock") != nil, "metrics-socket= from the file")
            #expect(first.log.contains("debug"), "log-level=debug from the file: \(first.log)")
            kill(first.pid, SIGTERM)
            #expect(first.wait(timeout: 60) == 0, "\(first.log)")
            #expect(first.log.contains("stop-timeout=30 s"), "\(first.log)")
            #expect(inode(directory + "/from-file.sock") == nil && inode(directory + "/metrics.sock") == nil)

            // The command line wins: another channel socket and log level, the rest from the file.
            let second = try SpawnedProcess(
                broker.path, ["run", "--config", config, "--channel-socket", directory + "/from-flag.sock", "--log-level", "notice"],
                logPath: logPath("flag"))
            defer {
                second.terminate(SIGKILL, grace: 0)
                unlink(second.logPath)
            }
            #expect(eventually(timeout: bound) { second.log.contains("ready: the sockets listen") }, "\(second.log)")
            #expect(inode(directory + "/from-flag.sock") != nil)
            #expect(inode(directory + "/from-file.sock") == nil, "the file's channel-socket= was used despite --channel-socket")
            #expect(inode(directory + "/control.sock") != nil, "control-socket= from the file")
            #expect(!second.log.contains("debug"), "--log-level notice overrides log-level=debug: \(second.log)")
            kill(second.pid, SIGTERM)
            #expect(second.wait(timeout: 60) == 0, "\(second.log)")
        }

        @Test("SIGHUP sent the moment READY=1 arrives is a reload; SIGTERM the moment the next READY=1 arrives is a clean stop")
        func signalsRightAfterReady() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let tree = try PolicyTree(toolSocket: directory + "/tool.sock")
            defer { tree.cleanUp() }
            let config = writeConfig(directory, configText(directory, policyRoot: tree.root))
            let notify = try NotifySocket(path: directory + "/notify.sock")
            var environment = ProcessInfo.processInfo.environment
            environment["NOTIFY_SOCKET"] = notify.path
            let process = try SpawnedProcess(broker.path, ["run", "--config", config], environment: environment, logPath: logPath("ready"))
            defer {
                process.terminate(SIGKILL, grace: 0)
                unlink(process.logPath)
            }
            #expect(notify.next("READY=1") != nil, "no READY=1: \(process.log)")
            kill(process.pid, SIGHUP)
            #expect(notify.next("RELOADING=1") != nil, "the SIGHUP right after READY=1 was lost: \(process.log)")
            #expect(notify.next("READY=1") != nil, "no READY=1 after the reload: \(process.log)")
            kill(process.pid, SIGTERM)
            #expect(notify.next("STOPPING=1") != nil, "the SIGTERM right after READY=1 was lost: \(process.log)")
            #expect(process.wait(timeout: 60) == 0, "\(process.log)")
            #expect(process.log.contains("policy reloaded") && process.log.contains("stopping: the sockets close"), "\(process.log)")
            let significant = notify.messages.filter { !$0.hasPrefix("STATUS=") }.map { NotifySocket.fields($0)[0] }
            #expect(significant == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], "\(notify.messages)")
        }

        @Test(
            "SIGTERM with a hooked guest (real QEMU, kernel double): STOPPING=1, exit 0, socket removed, no UNHOOK or RELEASE; the next broker finds it hooked"
        )
        func stopLeavesGuestHooked() throws {
            let uuid = GuestUUID("5709a11e-5eed-4c0d-9abc-0123456789ef")!
            let products = productsDirectory()
            let secret = temporarySecretFile("lifecycle")
            defer { unlink(secret) }
            let toolSocket = temporarySocketPath("lc-tool")
            let channel = temporarySocketPath("lc-channel")
            let statusPath = "/tmp/kvmib-lifecycle-status-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
            defer { unlink(statusPath) }
            let tool = try ChildProcess(
                products.appendingPathComponent("kvmi-test-introspector"),
                ["--listen", "unix:\(toolSocket)", "--secret-file", secret, "--kvmi", "v12", "--check-commands", "VM_READ_PHYSICAL"])
            #expect(eventually(timeout: bound) { tool.log.contains("listening") })
            let arguments = [
                "run", "--channel-socket", channel, "--introspector", "unix:\(toolSocket)", "--secret-file", secret, "--abi", "v12",
                "--commands", "12,10", "--events", "0", "--status-file", statusPath, "--backoff-initial", "0.2", "--backoff-max", "1",
                "--log-level", "debug", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", try patchedQEMU(),
                "--control-socket", "", "--stop-timeout", "30",
            ]
            let notifyDirectory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: notifyDirectory) }
            let notify = try NotifySocket(path: notifyDirectory + "/notify.sock")
            var environment = ProcessInfo.processInfo.environment
            environment["NOTIFY_SOCKET"] = notify.path
            let first = try SpawnedProcess(broker.path, arguments, environment: environment, logPath: logPath("hooked"))
            defer {
                first.terminate(SIGKILL, grace: 0)
                unlink(first.logPath)
            }
            #expect(notify.next("READY=1") != nil, "\(first.log)")
            let qemu = try QEMUProcess(channelSocket: channel, uuid: uuid, name: "lifecycle-guest", kernelDouble: try kernelDouble())
            defer { qemu.stop() }
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            let hooked = eventually(timeout: bound) {
                (try? String(contentsOfFile: statusPath, encoding: .utf8))?.contains("\"hooked\" : true") == true
            }
            try #require(hooked, "broker log:\n\(first.log)\nQEMU:\n\(qemu.log)")
            #expect(eventually(timeout: bound) { tool.log.contains("unhook-event=enabled") }, "tool log:\n\(tool.log)")

            kill(first.pid, SIGTERM)
            #expect(notify.next("STOPPING=1") != nil, "no STOPPING=1: \(first.log)")
            // Within the bound (30 s): the exit status is 0, not the bound's 1.
            #expect(first.wait(timeout: 60) == 0, "\(first.log)")
            #expect(inode(channel) == nil, "the channel socket is left after SIGTERM")
            #expect(first.log.contains("stopping: the sockets close; hooked guests stay hooked"), "\(first.log)")
            // Nothing asked QEMU to let go: the kernel double saw no PREUNHOOK or UNHOOK, and the tool's session did not end.
            #expect(!qemu.log.contains("PREUNHOOK") && !qemu.log.contains("UNHOOK: unhooked"), "QEMU:\n\(qemu.log)")
            #expect(!first.log.contains("RESULT for request type 20") && !first.log.contains("RESULT for request type 19"), "\(first.log)")
            #expect(!tool.log.contains("ended:"), "tool log:\n\(tool.log)")

            // QEMU reconnects to the next broker, which finds the guest hooked and has nothing to do.
            unlink(statusPath)
            let second = try SpawnedProcess(broker.path, arguments, logPath: logPath("next"))
            defer {
                second.terminate(SIGKILL, grace: 0)
                unlink(second.logPath)
            }
            #expect(
                eventually(timeout: bound) {
                    second.log.contains("restart reconciliation: hooked with the decided introspector and lists; nothing to do")
                },
                "broker log:\n\(second.log)\nQEMU:\n\(qemu.log)")
            #expect(!tool.log.contains("ended:"), "tool log:\n\(tool.log)")
            kill(second.pid, SIGTERM)
            #expect(second.wait(timeout: 60) == 0, "\(second.log)")
        }
    }
}
