import Foundation
import KVMIBrokerCore
import KVMIBrokerOS

#if canImport(Glibc)
    import Glibc
#endif

/// Test equipment: a real QEMU process with the introspection-broker object, paused (-S), KVM, SeaBIOS,
/// optionally with the kernel double preloaded.
public final class QEMUProcess {
    public let process: SpawnedProcess
    public let qmpPath: String
    public let logPath: String
    public let uuid: GuestUUID

    /// With `runAs`, QEMU runs as that uid and gid with the user's groups (`setpriv`, which execs
    /// it: the pid is QEMU's), as libvirt runs it under another user.
    public init(
        qemu: String, channelSocket: String, uuid: GuestUUID, name: String, extraArguments: [String] = [], kernelDouble: String? = nil,
        objectOptions: String = "", runAs: (uid: uid_t, gid: gid_t)? = nil
    ) throws {
        self.uuid = uuid
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        qmpPath = "/tmp/kvmib-qmp-\(tag).sock"
        logPath = "/tmp/kvmib-qemu-\(tag).log"
        let arguments =
            [
                "-accel", "kvm", "-S", "-L", "/usr/share/seabios", "-m", "64", "-display", "none", "-nodefaults", "-no-user-config",
                "-uuid", "\(uuid)", "-name", "guest=\(name)",
                "-chardev", "socket,id=chr0,path=\(channelSocket),reconnect-ms=200",
                "-object", "introspection-broker,id=vmi0,chardev=chr0\(objectOptions)",
                "-qmp", "unix:\(qmpPath),server=on,wait=off",
            ] + extraArguments
        var environment = ProcessInfo.processInfo.environment
        if let kernelDouble { environment["LD_PRELOAD"] = kernelDouble }
        if let runAs {
            process = try SpawnedProcess(
                "/usr/bin/setpriv", ["--reuid=\(runAs.uid)", "--regid=\(runAs.gid)", "--init-groups", "--", qemu] + arguments,
                environment: environment, logPath: logPath)
        } else {
            process = try SpawnedProcess(qemu, arguments, environment: environment, logPath: logPath)
        }
    }

    public var pid: Int32 { process.pid }

    public var log: String { process.log }

    /// Open descriptors of the QEMU process.
    public var descriptorCount: Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1 }

    public func stop() {
        process.terminate(SIGTERM, grace: 5)
        unlink(qmpPath)
    }

    deinit {
        stop()
        unlink(logPath)
    }

    /// Runs one QMP command and returns the raw reply line (events skipped).
    public func qmp(_ command: String, timeout: TimeInterval = 120) throws -> String {
        let client = try QMPClient(path: qmpPath)
        return try client.execute(command, timeout: timeout)
    }
}

/// A minimal blocking QMP client for tests.
public final class QMPClient {
    private let socket: Descriptor
    public var fd: Int32 { socket.raw }
    private var buffer: [UInt8] = []

    public init(path: String, timeout: TimeInterval = 10) throws {
        // QEMU creates the QMP socket shortly after it starts: retry until the deadline.
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            do {
                socket = try connectUnixSocket(path)
                break
            } catch {
                if Date() > deadline { throw error }
                usleep(20_000)
            }
        }
        _ = try line(timeout: timeout)  // greeting
        _ = try execute("{\"execute\":\"qmp_capabilities\"}", timeout: timeout)
    }

    public func execute(_ command: String, timeout: TimeInterval) throws -> String {
        let bytes = Array((command + "\n").utf8)
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        while true {
            let reply = try line(timeout: timeout)
            if reply.contains("\"return\"") || reply.contains("\"error\"") { return reply }
        }
    }

    private func line(timeout: TimeInterval) throws -> String {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let newline = buffer.firstIndex(of: 10) {
                let text = String(decoding: buffer[..<newline], as: UTF8.self)
                buffer.removeSubrange(...newline)
                return text
            }
            var pollFD = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let remaining = Int32(max(0, deadline.timeIntervalSinceNow) * 1000)
            guard poll(&pollFD, 1, remaining) > 0 else { throw BrokerError(.timedOut, "no QMP reply within \(timeout) s") }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = recv(fd, &chunk, chunk.count, 0)
            guard count > 0 else { throw BrokerError(.peerClosed, "QMP closed") }
            buffer += chunk.prefix(count)
        }
    }
}
