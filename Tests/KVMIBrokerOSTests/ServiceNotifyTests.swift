import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMITestIntrospector
import Testing

@testable import KVMIBrokerDaemon

#if canImport(Glibc)
    import Glibc
#endif

/// The unit file the project ships (dist/systemd), found from this file's place in the tree.
private let unitFile = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("dist/systemd/kvmi-broker.service").path

/// The unit's ExecStart= as arguments: the words after `ExecStart=`, split at spaces (the unit
/// uses no quoting, and this parser refuses any rather than misread it).
func unitExecStart(_ path: String = unitFile) throws -> [String] {
    let text = try String(contentsOfFile: path, encoding: .utf8)
    let lines = text.split(separator: "\n").filter { $0.hasPrefix("ExecStart=") }
    guard lines.count == 1, let line = lines.first else {
        throw BrokerError(.invalidArgument, "expected exactly one ExecStart= line, found \(lines.count)", at: path)
    }
    let command = line.dropFirst("ExecStart=".count)
    guard !command.contains("\""), !command.contains("'"), !command.contains("\\") else {
        throw BrokerError(.invalidArgument, "ExecStart= uses quoting or escapes, which this test's parser does not read", at: path)
    }
    return command.split(separator: " ").map(String.init)
}

/// systemd's side of sd_notify(3): an AF_UNIX datagram socket the broker's NOTIFY_SOCKET names.
final class NotifySocket {
    let path: String
    let descriptor: Int32
    /// Every message received, in order.
    private(set) var messages: [String] = []

    init(path: String) throws {
        self.path = path
        // Through the shim: which Clang module owns SOCK_DGRAM varies with libsystemd's headers.
        descriptor = kvmib_unix_dgram_socket()
        guard descriptor >= 0 else { throw BrokerError(.io, "socket(AF_UNIX, SOCK_DGRAM) failed", at: path, errno: errno) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        precondition(bytes.count < MemoryLayout.size(ofValue: address.sun_path))
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index] = byte }
        }
        let bound = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else {
            let error = errno
            close(descriptor)
            throw BrokerError(.io, "cannot bind the notify socket", at: path, errno: error)
        }
    }

    deinit {
        close(descriptor)
        unlink(path)
    }

    /// Receives until a message carries `field` (e.g. "READY=1" or "STOPPING=1"), waiting at
    /// most `timeout` in all (a generous bound: a passing run returns at once). Returns it, or
    /// nil when none came.
    func next(_ field: String, timeout: Duration = .seconds(60)) -> String? {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            let left = ContinuousClock.now.duration(to: deadline)
            guard left > .zero else { return nil }
            var poller = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            let milliseconds = Int32(min(left.components.seconds * 1000 + 1, 60_000))
            guard poll(&poller, 1, milliseconds) > 0 else { continue }
            var buffer = [UInt8](repeating: 0, count: 4096)
            let count = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { continue }
            let message = String(decoding: buffer[..<count], as: UTF8.self)
            messages.append(message)
            if Self.fields(message).contains(where: { $0 == field || $0.hasPrefix(field) }) { return message }
        }
    }

    /// The message's `KEY=value` lines.
    static func fields(_ message: String) -> [String] { message.split(separator: "\n").map(String.init) }

    /// The value of `key` in `message`, if present.
    static func value(_ key: String, in message: String) -> String? {
        fields(message).first { $0.hasPrefix(key + "=") }.map { String($0.dropFirst(key.count + 1)) }
    }
}

extension OSLayerTests {
    /// The broker under systemd's notification protocol, started with the shipped unit's own
    /// ExecStart= (only the paths changed), and without NOTIFY_SOCKET.
    @Suite("systemd service: the unit's ExecStart, sd_notify READY/RELOADING/STOPPING/STATUS")
    struct ServiceNotifyTests {
        /// The unit's ExecStart with the built binary for /usr/bin/kvmi-broker and, appended,
        /// options pointing the sockets, the status file and the policy at `directory` (the unit
        /// relies on the defaults under /run/kvmi-broker and /etc/kvmi-broker) and turning off
        /// libvirt's identity check (a test cannot count on a libvirtd).
        func brokerCommand(directory: String, policyRoot: String) throws -> (String, [String]) {
            let words = try unitExecStart()
            #expect(words.first == "/usr/bin/kvmi-broker")
            #expect(Array(words.dropFirst()) == ["run", "--socket-group", "kvm"], "the unit's ExecStart changed: update this test's expectations")
            var arguments = Array(words.dropFirst())
            arguments += [
                "--policy-root", policyRoot, "--channel-socket", directory + "/qemu.sock", "--control-socket", directory + "/control.sock",
                "--status-file", directory + "/status.json", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator",
                "/usr/bin/qemu-system-x86_64",
            ]
            if geteuid() != 0 { arguments.append("--allow-non-root-owner") }
            return (productsDirectory().appendingPathComponent("kvmi-broker").path, arguments)
        }

        @Test("READY=1 once the sockets exist; SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1; SIGTERM: STOPPING=1, exit 0")
        func notifyProtocol() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let tree = try PolicyTree(toolSocket: directory + "/tool.sock")
            defer { tree.cleanUp() }
            let notify = try NotifySocket(path: directory + "/notify.sock")
            let (executable, arguments) = try brokerCommand(directory: directory, policyRoot: tree.root)
            var environment = ProcessInfo.processInfo.environment
            environment["NOTIFY_SOCKET"] = notify.path
            let broker = try SpawnedProcess(
                executable, arguments, environment: environment, logPath: "/tmp/kvmib-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log")
            defer {
                broker.terminate(SIGKILL, grace: 0)
                unlink(broker.logPath)
            }

            let ready = try #require(notify.next("READY=1"), "no READY=1; log: \(broker.log)")
            // READY=1 comes after both sockets listen: they exist the moment it arrives.
            #expect(inode(directory + "/qemu.sock") != nil)
            #expect(inode(directory + "/control.sock") != nil)
            #expect(NotifySocket.value("STATUS", in: ready) == "0 guests hooked, 0 waiting, 0 not introspected, policy generation 1", "\(ready)")
            // The unit's --socket-group kvm: QEMU (libvirt-qemu:kvm) may connect, others may not.
            var info = stat()
            #expect(lstat(directory + "/qemu.sock", &info) == 0)
            #expect(info.st_mode & 0o777 == 0o660)
            #expect(info.st_gid == getgrnam("kvm")?.pointee.gr_gid)

            // A changed policy, then SIGHUP: RELOADING=1 (with the monotonic clock), READY=1 after.
            tree.write("guests.d/50-lab.conf", "[guest lab]\nMatchName=lab*\nIntrospector=tool\nEvents=UNHOOK\nCommands=VM_READ_PHYSICAL\n")
            var before = timespec()
            clock_gettime(CLOCK_MONOTONIC, &before)
            kill(broker.pid, SIGHUP)
            let reloading = try #require(notify.next("RELOADING=1"), "no RELOADING=1; log: \(broker.log)")
            let stamp = try #require(NotifySocket.value("MONOTONIC_USEC", in: reloading).flatMap { Int64($0) }, "\(reloading)")
            var after = timespec()
            clock_gettime(CLOCK_MONOTONIC, &after)
            #expect(stamp >= Int64(before.tv_sec) * 1_000_000 + Int64(before.tv_nsec) / 1000)
            #expect(stamp <= Int64(after.tv_sec) * 1_000_000 + Int64(after.tv_nsec) / 1000)
            let reloaded = try #require(notify.next("READY=1"), "no READY=1 after the reload; log: \(broker.log)")
            #expect(NotifySocket.value("STATUS", in: reloaded)?.hasSuffix("policy generation 2") == true, "\(reloaded)")

            kill(broker.pid, SIGTERM)
            #expect(notify.next("STOPPING=1") != nil, "no STOPPING=1; log: \(broker.log)")
            #expect(broker.wait(timeout: 60) == 0, "\(broker.log)")
            // A stopped broker leaves no socket behind (a package removal, a unit stop).
            #expect(inode(directory + "/qemu.sock") == nil && inode(directory + "/control.sock") == nil, "sockets left after SIGTERM")
            let significant = notify.messages.filter { !$0.hasPrefix("STATUS=") }.map { NotifySocket.fields($0)[0] }
            #expect(significant == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], "\(notify.messages)")
        }

        @Test("without NOTIFY_SOCKET the broker starts, serves and stops as before (notification is a no-op)")
        func withoutNotifySocket() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let tree = try PolicyTree(toolSocket: directory + "/tool.sock")
            defer { tree.cleanUp() }
            let (executable, arguments) = try brokerCommand(directory: directory, policyRoot: tree.root)
            var environment = ProcessInfo.processInfo.environment
            environment["NOTIFY_SOCKET"] = nil
            let broker = try SpawnedProcess(
                executable, arguments, environment: environment, logPath: "/tmp/kvmib-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log")
            defer {
                broker.terminate(SIGKILL, grace: 0)
                unlink(broker.logPath)
            }
            // The broker says when it is ready (the journal's line for what READY=1 tells systemd).
            #expect(eventually { broker.log.contains("ready: the sockets listen") }, "\(broker.log)")
            #expect(inode(directory + "/control.sock") != nil)
            let client = try connectUnixSocket(directory + "/qemu.sock")
            client.close()
            kill(broker.pid, SIGHUP)
            #expect(eventually { broker.log.contains("policy reloaded") }, "\(broker.log)")
            kill(broker.pid, SIGTERM)
            #expect(broker.wait(timeout: 60) == 0, "\(broker.log)")
            #expect(!broker.log.contains("cannot notify systemd"), "\(broker.log)")
        }

        @Test("a storm of session changes sends few STATUS= lines (at most one per interval), the last one current")
        func statusIsCoalesced() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let notify = try NotifySocket(path: directory + "/notify.sock")
            setenv("NOTIFY_SOCKET", notify.path, 1)
            defer { unsetenv("NOTIFY_SOCKET") }
            let notifier = ServiceNotifier(generation: 3, statusInterval: .milliseconds(200))
            #expect(notifier.isEnabled)
            notifier.ready()
            #expect(notify.next("READY=1") != nil)
            let start = ContinuousClock.now
            for index in 1...20_000 {
                notifier.sessionsChanged(SessionCounts(hooked: index, waiting: 20_000 - index, notIntrospected: 1))
            }
            let elapsed = start.duration(to: .now)
            let final = "20000 guests hooked, 0 waiting, 1 not introspected, policy generation 3"
            #expect(notify.next("STATUS=\(final)") != nil, "\(notify.messages.suffix(3))")
            let statuses = notify.messages.filter { $0.hasPrefix("STATUS=") }.count
            // One per 200 ms at most while the storm lasted, plus the one after it.
            let bound = Int(elapsed / .milliseconds(200)) + 2
            #expect(statuses <= bound, "\(statuses) STATUS= messages for a storm of \(elapsed)")
        }

        @Test("the registry's counts behind STATUS= follow claims, state changes and releases")
        func registryCounts() async throws {
            let registry = SessionRegistry(statusFile: nil)
            func status(_ uuid: GuestUUID, _ state: String, hooked: Bool = false) -> SessionStatus {
                SessionStatus(
                    uuid: "\(uuid)", name: "g", qemuPID: 1, state: state, hooked: hooked, failures: 0, startTime: 1, since: Date())
            }
            let first = GuestUUID("0a5e0000-0000-4000-8000-000000000001")!
            let second = GuestUUID("0a5e0000-0000-4000-8000-000000000002")!
            guard case .success(let one) = registry.claim(first, status: status(first, "connected")) else { throw CancellationError() }
            #expect(registry.sessionCounts == SessionCounts(hooked: 0, waiting: 1, notIntrospected: 0))
            registry.update(first, token: one) {
                $0.state = "hooked (ABI v12)"
                $0.hooked = true
            }
            #expect(registry.sessionCounts == SessionCounts(hooked: 1, waiting: 0, notIntrospected: 0))
            guard case .success(let two) = registry.claim(second, status: status(second, "connected")) else { throw CancellationError() }
            registry.update(second, token: two) { $0.state = "not introspected" }
            #expect(registry.sessionCounts == SessionCounts(hooked: 1, waiting: 0, notIntrospected: 1))
            // A stale token (an ended session's) changes nothing.
            registry.update(second, token: one) { $0.state = "connecting to the introspector (attempt 1)" }
            registry.release(second, token: one)
            #expect(registry.sessionCounts == SessionCounts(hooked: 1, waiting: 0, notIntrospected: 1))
            registry.release(first, token: one)
            registry.release(second, token: two)
            #expect(registry.sessionCounts == SessionCounts())
        }
    }
}
