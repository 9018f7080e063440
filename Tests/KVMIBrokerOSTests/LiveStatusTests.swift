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

extension OSLayerTests {
    /// `kvmi-broker status` asks the running broker over its control socket (issue 11 item 6):
    /// the real broker, the real patched QEMU hooked through the kernel double, and readers of
    /// other uids and groups (setpriv).
    @Suite("Live status: kvmi-broker status asks the running broker")
    struct LiveStatusTests {
        let uuid = GuestUUID("5a7e5a7e-1111-4222-8333-444455556666")!
        let guestName = "status-guest"
        let products = productsDirectory()
        let bound = Duration.seconds(60)
        var brokerPath: URL { products.appendingPathComponent("kvmi-broker") }

        /// A root-owned 0755 directory for the control socket: other uids can reach a socket in
        /// it (the private test directory is 0700), nobody but root can write it.
        func socketDirectory() throws -> String {
            let path = "/tmp/kvmib-status-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            guard mkdir(path, 0o755) == 0, chmod(path, 0o755) == 0 else { throw BrokerError(.io, "mkdir \(path)", errno: errno) }
            return path
        }

        func status(_ arguments: [String], as launcher: [String] = []) throws -> (Int32, String, String) {
            launcher.isEmpty
                ? try runProcess(brokerPath, ["status"] + arguments)
                : try runProcess(URL(fileURLWithPath: launcher[0]), Array(launcher.dropFirst()) + [brokerPath.path, "status"] + arguments)
        }

        /// The JSON document, or nil while the broker does not answer with one.
        func document(_ control: String, _ extra: [String] = []) -> LiveStatus? {
            guard let (code, out, _) = try? status(["--control-socket", control, "--json"] + extra), code == 0 else { return nil }
            return try? LiveStatus.decoder.decode(LiveStatus.self, from: Data(out.utf8))
        }

        /// `status` failed with one line on stderr, no usage text, and `code`.
        func expectFails(_ arguments: [String], code: Int32, saying: [String], as launcher: [String] = []) throws {
            let (status, out, err) = try status(arguments, as: launcher)
            #expect(status == code, "\(err)")
            #expect(out.isEmpty, "\(out)")
            #expect(err.split(separator: "\n").count == 1, "one line: \(err)")
            #expect(!err.lowercased().contains("usage"), "\(err)")
            for text in saying { #expect(err.contains(text), "\(err)") }
        }

        /// A broker with libvirt's check off and no QEMU.
        func idleBroker(control: String, _ extra: [String] = []) throws -> ChildProcess {
            let child = try ChildProcess(
                brokerPath,
                [
                    "run", "--channel-socket", temporarySocketPath("status-channel"), "--control-socket", control, "--introspector",
                    "unix:/nonexistent", "--commands", "none", "--events", "0", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator",
                    "/bin/true",
                ] + extra)
            #expect(eventually(timeout: bound) { child.log.contains("ready: the sockets listen") }, "\(child.log)")
            return child
        }

        @Test("a hooked guest: the header and the guest's state, introspector and lists in text and JSON; GUEST by UUID and by name")
        func hookedGuest() throws {
            let secret = temporarySecretFile("status")
            defer { unlink(secret) }
            let toolSocket = temporarySocketPath("status-tool")
            let channel = temporarySocketPath("status-channel")
            let control = temporarySocketPath("status-control")
            let tool = try ChildProcess(
                products.appendingPathComponent("kvmi-test-introspector"),
                ["--listen", "unix:\(toolSocket)", "--secret-file", secret, "--kvmi", "v12"])
            #expect(eventually(timeout: bound) { tool.log.contains("listening") }, "\(tool.log)")
            let broker = try ChildProcess(
                brokerPath,
                [
                    "run", "--channel-socket", channel, "--control-socket", control, "--introspector", "unix:\(toolSocket)", "--secret-file", secret,
                    "--abi", "v12", "--commands", "12,10", "--events", "0", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator",
                    try patchedQEMU(),
                ])
            #expect(eventually(timeout: bound) { FileManager.default.fileExists(atPath: channel) }, "\(broker.log)")
            let qemu = try QEMUProcess(channelSocket: channel, uuid: uuid, name: guestName, kernelDouble: try kernelDouble())
            defer {
                qemu.stop()
                broker.kill()
                tool.kill()
            }
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            #expect(
                eventually(timeout: bound) { document(control)?.guests.first?.hooked == true }, "broker log:\n\(broker.log)\nQEMU:\n\(qemu.log)")

            // JSON: the broker's facts and the guest's.
            let live = try #require(document(control))
            #expect(live.format == 1)
            #expect(live.broker.pid == broker.process.pid)
            #expect(live.broker.version == BrokerVersion.string)
            #expect(live.broker.mode == "static" && live.broker.staticIntrospector == "unix:\(toolSocket)")
            #expect(live.broker.policyGeneration == nil && live.broker.identityCheck == false && live.broker.libvirtURI == nil)
            #expect(live.broker.sessions == 1 && live.broker.hooked == 1 && live.broker.waiting == 0)
            let guest = try #require(live.guests.first)
            #expect(guest.uuid == "\(uuid)" && guest.name == guestName && guest.qemuPID == qemu.pid)
            #expect(guest.state == "hooked (ABI v12)")
            #expect(guest.introspector == "command-line")
            #expect(guest.commands == [12, 10] && guest.events == [0])
            #expect(guest.hookedSince != nil && guest.hooks == 1 && guest.lastFailure == nil)

            // Text: the header, then one line for the guest.
            let (code, text, err) = try status(["--control-socket", control])
            #expect(code == 0, "\(err)")
            let lines = text.split(separator: "\n").map(String.init)
            #expect(lines.first?.hasPrefix("kvmi-broker \(BrokerVersion.string) running as pid \(broker.process.pid), up ") == true, "\(text)")
            #expect(lines.contains("static configuration: introspector unix:\(toolSocket)"), "\(text)")
            #expect(lines.contains("identity checks: OFF (--insecure-no-libvirt-identity: QEMUs are trusted on /proc alone)"), "\(text)")
            #expect(lines.contains("guests: 1 session: 1 hooked, 0 waiting, 0 not introspected"), "\(text)")
            let guestLine =
                "\(guestName) \(uuid) qemu pid \(qemu.pid): hooked (ABI v12); introspector command-line, commands 12,10, events 0; hooked for "
            #expect(lines.contains { $0.hasPrefix(guestLine) }, "\(text)")

            // GUEST: by UUID (any case) and by name, in text and JSON.
            for selector in ["\(uuid)", "\(uuid)".uppercased(), guestName] {
                #expect(document(control, [selector])?.guests.map(\.uuid) == ["\(uuid)"], "\(selector)")
                let (code, text, err) = try status(["--control-socket", control, selector])
                #expect(code == 0, "\(err)")
                #expect(text.contains(guestLine), "\(text)")
            }
            try expectFails(
                ["--control-socket", control, "no-such-guest"], code: 6,
                saying: ["no guest session named or with UUID 'no-such-guest' (the broker holds 1 session)"])
            try expectFails(["--control-socket", control, "--json", "9a7e5a7e-1111-4222-8333-444455556666"], code: 6, saying: ["no guest session"])
        }

        @Test("no broker: an absent socket and a socket nobody listens on each say so, exit 3, no usage text")
        func noBroker() throws {
            let directory = try socketDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let control = directory + "/control.sock"
            try expectFails(
                ["--control-socket", control], code: 3,
                saying: ["no control socket at \(control): the broker is not running, or it listens elsewhere (give its --control-socket)"])
            // A socket left behind: bound, never listened on.
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                for (index, byte) in control.utf8.enumerated() { raw[index] = byte }
            }
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            #expect(bound == 0)
            try expectFails(["--control-socket", control, "--json"], code: 3, saying: ["nothing listens on \(control): the broker is not running"])
        }

        @Test("permission: a uid outside the group is told who may read (exit 4); a member reads the status but is refused the hook's operations")
        func readersGroup() throws {
            let group = try #require(getgrnam("users"), "the group 'users' (gid 100 on Debian)")
            let gid = group.pointee.gr_gid
            let directory = try socketDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let control = directory + "/control.sock"
            let broker = try idleBroker(control: control, ["--control-group", "users"])
            defer { broker.kill() }
            var info = stat()
            #expect(stat(control, &info) == 0 && info.st_mode & 0o777 == 0o660 && info.st_gid == gid)

            let outsider = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            try expectFails(
                ["--control-socket", control], code: 4,
                saying: ["cannot connect to \(control): permission denied (root and members of group users may read the status)"], as: outsider)

            // A member through a supplementary group (SO_PEERGROUPS), and through its primary group.
            for member in [
                ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--groups=\(gid)"],
                ["/usr/bin/setpriv", "--reuid=65534", "--regid=\(gid)", "--clear-groups"],
            ] {
                let (code, out, err) = try status(["--control-socket", control, "--json"], as: member)
                #expect(code == 0, "\(member): \(err)")
                let live = try LiveStatus.decoder.decode(LiveStatus.self, from: Data(out.utf8))
                #expect(live.broker.pid == broker.process.pid && live.broker.controlGroup == "users")

                // The hook's operation from the same member: refused, not served.
                let request = #"{"operation":"prepare","uuid":"\#(uuid)","name":"intruder"}"#
                let script = """
                    import socket, sys
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(sys.argv[1])
                    s.sendall(sys.argv[2].encode() + b"\\n")
                    data = b""
                    while not data.endswith(b"\\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    sys.stdout.write(data.decode())
                    """
                let (hookCode, answer, hookErr) = try runProcess(
                    URL(fileURLWithPath: member[0]), Array(member.dropFirst()) + ["/usr/bin/python3", "-c", script, control, request])
                #expect(hookCode == 0, "\(hookErr)")
                let response = try JSONDecoder().decode(ControlProtocol.Response.self, from: Data(answer.utf8))
                #expect(response.allow == false, "\(answer)")
                #expect(response.reason.contains("the hook's operations are root's; uid 65534 may only read the status"), "\(answer)")
            }
            #expect(eventually(timeout: bound) { broker.log.components(separatedBy: "refusing 'prepare' to uid 65534").count == 3 }, "\(broker.log)")
            #expect(!broker.log.contains("intruder") && !broker.log.contains("libvirt: prepare"), "not served: \(broker.log)")

            // Without --control-group the socket is root's alone, and the message says so.
            broker.kill()
            #expect(broker.process.wait(timeout: 30) != nil)
            let rootOnly = try idleBroker(control: control)
            defer { rootOnly.kill() }
            try expectFails(
                ["--control-socket", control], code: 4,
                saying: ["permission denied (only root may read the status: the broker runs without --control-group)"],
                as: ["/usr/bin/setpriv", "--reuid=65534", "--regid=\(gid)", "--clear-groups"])
        }

        @Test("a thousand guests: an answer far over 64 KiB arrives whole while a reader that never reads holds no one up and is dropped")
        func largeAnswerAndStuckReader() async throws {
            let registry = SessionRegistry(statusFile: nil)
            let padding = String(repeating: "x", count: 300)
            for index in 0..<1000 {
                let uuid = GuestUUID(String(format: "00000000-0000-4000-8000-%012d", index))!
                let session = SessionStatus(
                    uuid: "\(uuid)", name: "guest-\(index)-\(padding)", qemuPID: Int32(10_000 + index), state: "hooked (ABI v12)", hooked: true,
                    failures: 0, lastFailure: nil, startTime: 1, since: Date(), introspector: "acme", commands: [-1], events: [0], hookedSince: Date()
                )
                _ = registry.claim(uuid, status: session)
            }
            let configuration = BrokerConfiguration(
                channelSocketPath: temporarySocketPath("unused"), introspector: .unix(path: "/nonexistent"), cookie: nil,
                allowLists: .kernelDefaults(.v12))
            let source = LiveStatusSource(
                registry: registry, policy: nil, staticIntrospector: "unix:/nonexistent", libvirtURI: nil, libvirtConnected: nil)
            let control = temporarySocketPath("status-large")
            let server = ControlServer(
                path: control, plans: configuration.plans, logger: Logger(label: "test-control"), status: source, statusWriteTimeout: .seconds(2))
            let listener = try server.bind()
            let serving = Task { await server.run(listener: listener) }
            defer { serving.cancel() }

            // The stuck reader: asks, never reads.
            let stuck = try connectUnixSocket(control)
            defer { stuck.close() }
            let request = Array(#"{"operation":"status"}"#.utf8) + [10]
            #expect(request.withUnsafeBytes { kvmib_send_with_fd(stuck.raw, $0.baseAddress, $0.count, -1) } == request.count)

            // Meanwhile another reader gets all of it: `status` as a process, its output in a file
            // (more than a pipe holds), waited for on a thread of its own, not on the pool that
            // serves the control socket in this process.
            let outFile = "/tmp/kvmib-status-large-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
            defer { unlink(outFile) }
            let command = [
                "-c", #"exec "$0" status --control-socket "$1" --json >"$2""#, brokerPath.path, control, outFile,
            ]
            let result = await withCheckedContinuation { (done: CheckedContinuation<Result<(Int32, String, String), any Error>, Never>) in
                Thread.detachNewThread { done.resume(returning: Result { try runProcess(URL(fileURLWithPath: "/bin/sh"), command) }) }
            }
            let (code, _, err) = try result.get()
            #expect(code == 0, "\(err)")
            let out = try String(contentsOfFile: outFile, encoding: .utf8)
            let live = try LiveStatus.decoder.decode(LiveStatus.self, from: Data(out.utf8))
            #expect(live.guests.count == 1000 && live.broker.sessions == 1000)
            #expect(live.guests.first?.name == "guest-0-\(padding)" && live.guests.last?.commands == [-1])
            #expect(out.utf8.count > 4 * ControlProtocol.maximumLine)

            // The stuck reader is dropped once its write bound passes: the broker closes its end.
            var hangUp = pollfd(fd: stuck.raw, events: 0x2000 /* POLLRDHUP */, revents: 0)
            #expect(eventually(timeout: bound) { poll(&hangUp, 1, 100) > 0 })
            var received = 0
            var buffer = [UInt8](repeating: 0, count: 65536)
            var last: UInt8 = 0
            while true {
                let count = recv(stuck.raw, &buffer, buffer.count, 0)
                guard count > 0 else { break }
                received += count
                last = buffer[count - 1]
            }
            #expect(received < out.utf8.count && last != 10, "dropped before the end of its answer: \(received) bytes")
        }
    }
}
