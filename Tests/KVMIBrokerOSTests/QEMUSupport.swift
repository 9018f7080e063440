import Foundation
import KVMIBrokerCore

#if canImport(Glibc)
    import Glibc
#endif

/// The project root (for the build scripts).
let projectRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// Built once per test process and shared.
private final class ArtifactCache: @unchecked Sendable {
    let lock = NSLock()
    var paths: [String: String] = [:]
}
private let builtArtifacts = ArtifactCache()

private func buildOnce(_ key: String, _ build: () throws -> String) throws -> String {
    builtArtifacts.lock.lock()
    defer { builtArtifacts.lock.unlock() }
    if let path = builtArtifacts.paths[key] { return path }
    let path = try build()
    builtArtifacts.paths[key] = path
    return path
}

/// The patched QEMU: `$KVMIB_QEMU` when set (scripts/test sets it), else `qemu-patches/build`
/// builds it (cached by the series' hash; the first build takes minutes). No skip: a missing
/// QEMU is a failure.
func patchedQEMU() throws -> String {
    try buildOnce("qemu") {
        if let path = ProcessInfo.processInfo.environment["KVMIB_QEMU"], FileManager.default.isExecutableFile(atPath: path) { return path }
        let script = projectRoot.appendingPathComponent("qemu-patches/build")
        let (status, out, err) = try runProcess(script, ["--print-path"], timeout: 3600)
        let path = out.split(separator: "\n").last.map(String.init) ?? ""
        guard status == 0, FileManager.default.isExecutableFile(atPath: path) else {
            throw BrokerError(.io, "qemu-patches/build failed (status \(status)): \(err.suffix(2000))")
        }
        return path
    }
}

/// The kernel double's shared library (test equipment), built into .build/kernel-double.
func kernelDouble() throws -> String {
    try buildOnce("double") {
        let out = projectRoot.appendingPathComponent(".build/kernel-double").path
        let (status, _, err) = try runProcess(projectRoot.appendingPathComponent("Tests/KernelDouble/build"), [out], timeout: 300)
        let library = out + "/libkvmi-kernel-double.so"
        guard status == 0, FileManager.default.fileExists(atPath: library) else {
            throw BrokerError(.io, "Tests/KernelDouble/build failed: \(err)")
        }
        return library
    }
}

/// A real QEMU process with the introspection-broker object, paused (-S), KVM, SeaBIOS.
final class QEMUProcess {
    let process = Process()
    let qmpPath: String
    let logPath: String
    let uuid: GuestUUID

    init(channelSocket: String, uuid: GuestUUID, name: String, extraArguments: [String] = [], kernelDouble: String? = nil, objectOptions: String = "")
        throws
    {
        self.uuid = uuid
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        qmpPath = "/tmp/kvmib-qmp-\(tag).sock"
        logPath = "/tmp/kvmib-qemu-\(tag).log"
        process.executableURL = URL(fileURLWithPath: try patchedQEMU())
        process.arguments =
            [
                "-accel", "kvm", "-S", "-L", "/usr/share/seabios", "-m", "64", "-display", "none", "-nodefaults", "-no-user-config",
                "-uuid", "\(uuid)", "-name", "guest=\(name)",
                "-chardev", "socket,id=chr0,path=\(channelSocket),reconnect-ms=200",
                "-object", "introspection-broker,id=vmi0,chardev=chr0\(objectOptions)",
                "-qmp", "unix:\(qmpPath),server=on,wait=off",
            ] + extraArguments
        var environment = ProcessInfo.processInfo.environment
        if let kernelDouble { environment["LD_PRELOAD"] = kernelDouble }
        process.environment = environment
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        process.standardOutput = log
        process.standardError = log
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Open descriptors of the QEMU process.
    var descriptorCount: Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1 }

    func stop() {
        if process.isRunning {
            kill(pid, SIGTERM)
            let deadline = Date().addingTimeInterval(5)
            while process.isRunning && Date() < deadline { usleep(10_000) }
            if process.isRunning { kill(pid, SIGKILL) }
            process.waitUntilExit()
        }
        unlink(qmpPath)
        unlink(logPath)
    }

    deinit { stop() }

    /// Runs one QMP command and returns the raw reply line (events skipped).
    func qmp(_ command: String, timeout: TimeInterval = 120) throws -> String {
        let client = try QMPClient(path: qmpPath)
        return try client.execute(command, timeout: timeout)
    }
}

/// A minimal blocking QMP client for tests.
final class QMPClient {
    let fd: Int32
    private var buffer: [UInt8] = []

    init(path: String, timeout: TimeInterval = 10) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var sun = sockaddr_un()
        sun.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &sun.sun_path) { raw in
            for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
        }
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let result = withUnsafePointer(to: &sun) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if result == 0 { break }
            if Date() > deadline { throw BrokerError(.connectFailed, "cannot connect to QMP", at: path, errno: errno) }
            usleep(20_000)
        }
        _ = try line(timeout: timeout)  // greeting
        _ = try execute("{\"execute\":\"qmp_capabilities\"}", timeout: timeout)
    }

    deinit { close(fd) }

    func execute(_ command: String, timeout: TimeInterval) throws -> String {
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
