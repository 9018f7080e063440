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

/// A child process whose output goes to a file, stopped by pid when done.
final class ChildProcess {
    let process: SpawnedProcess

    init(_ executable: URL, _ arguments: [String]) throws {
        process = try SpawnedProcess(
            executable.path, arguments, logPath: "/tmp/kvmib-child-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log")
    }

    var log: String { process.log }

    func kill(_ signal: Int32 = SIGTERM) { process.terminate(signal) }

    deinit {
        process.terminate(SIGKILL, grace: 0)
        unlink(process.logPath)
    }
}

extension OSLayerTests {
    /// Faults with real processes: the introspector and the broker are killed and restarted.
    /// QEMU is the real patched one with the KERNEL DOUBLE preloaded (the one stand-in).
    @Suite("Faults: introspector and broker crashes")
    struct FaultTests {
        let uuid = GuestUUID("5c0ffee0-1234-4abc-8def-0123456789ab")!
        let products = productsDirectory()

        func secretFile() -> String { temporarySecretFile("fault") }

        func introspectorProcess(_ socket: String, _ secret: String) throws -> ChildProcess {
            let child = try ChildProcess(
                products.appendingPathComponent("kvmi-test-introspector"),
                ["--listen", "unix:\(socket)", "--secret-file", secret, "--kvmi", "v12", "--check-commands", "VM_READ_PHYSICAL"])
            #expect(eventually { child.log.contains("listening") })
            return child
        }

        func brokerProcess(channel: String, tool: String, secret: String, status: String) throws -> ChildProcess {
            try ChildProcess(
                products.appendingPathComponent("kvmi-broker"),
                [
                    "run", "--channel-socket", channel, "--introspector", "unix:\(tool)", "--secret-file", secret, "--abi", "v12",
                    "--commands", "12,10", "--events", "0", "--status-file", status, "--backoff-initial", "0.2", "--backoff-max", "1",
                    "--log-level", "debug", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", try patchedQEMU(),
                    "--control-socket", "",
                ])
        }

        func status(_ path: String) -> [SessionStatus] {
            guard let data = FileManager.default.contents(atPath: path) else { return [] }
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            return (try? decoder.decode(StatusDocument.self, from: data))?.sessions ?? []
        }

        @Test("the tool is killed: QEMU unhooks; the broker reconnects with back-off once the tool is back")
        func toolKilled() async throws {
            let secret = secretFile()
            defer { unlink(secret) }
            let toolSocket = temporarySocketPath("tool")
            let channel = temporarySocketPath("channel")
            let statusPath = "/tmp/kvmib-fault-status-\(getpid()).json"
            defer { unlink(statusPath) }
            var tool = try introspectorProcess(toolSocket, secret)
            let broker = try brokerProcess(channel: channel, tool: toolSocket, secret: secret, status: statusPath)
            #expect(eventually { FileManager.default.fileExists(atPath: channel) })
            let qemu = try QEMUProcess(channelSocket: channel, uuid: uuid, name: "fault-guest", kernelDouble: try kernelDouble())
            defer { qemu.stop() }
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            #expect(eventually(timeout: .seconds(20)) { status(statusPath).first?.hooked == true }, "broker log:\n\(broker.log)\nQEMU:\n\(qemu.log)")

            tool.kill(SIGKILL)
            #expect(eventually(timeout: .seconds(10)) { status(statusPath).first?.hooked == false }, "broker log:\n\(broker.log)")
            #expect(broker.log.contains("the introspector closed its connection; QEMU unhooked the guest"))
            // While the tool is away the broker keeps trying (the spacing is the back-off's, tested with the real QEMU).
            #expect(eventually { (status(statusPath).first?.failures ?? 0) >= 2 }, "broker log:\n\(broker.log)")
            tool = try introspectorProcess(toolSocket, secret)
            #expect(eventually(timeout: .seconds(10)) { status(statusPath).first?.hooked == true }, "broker log:\n\(broker.log)")
            #expect(eventually { tool.log.contains("version=1") }, "tool log:\n\(tool.log)")
            broker.kill()
        }

        @Test("the broker is SIGKILLed and restarted: QEMU reconnects, reports it is still hooked, nothing is hooked twice")
        func brokerKilled() async throws {
            let secret = secretFile()
            defer { unlink(secret) }
            let toolSocket = temporarySocketPath("tool")
            let channel = temporarySocketPath("channel")
            let statusPath = "/tmp/kvmib-fault-status2-\(getpid()).json"
            defer { unlink(statusPath) }
            let tool = try introspectorProcess(toolSocket, secret)
            var broker = try brokerProcess(channel: channel, tool: toolSocket, secret: secret, status: statusPath)
            #expect(eventually { FileManager.default.fileExists(atPath: channel) })
            let qemu = try QEMUProcess(channelSocket: channel, uuid: uuid, name: "restart-guest", kernelDouble: try kernelDouble())
            defer { qemu.stop() }
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            #expect(eventually(timeout: .seconds(20)) { status(statusPath).first?.hooked == true }, "broker log:\n\(broker.log)\nQEMU:\n\(qemu.log)")
            #expect(eventually { tool.log.contains("unhook-event=enabled") }, "tool log:\n\(tool.log)")
            func connections() -> Int {
                Set(tool.log.components(separatedBy: "\n").compactMap { $0.split(separator: ":").first }.filter { $0.hasPrefix("connection ") }).count
            }
            let handshakes = connections()

            broker.kill(SIGKILL)
            unlink(statusPath)
            broker = try brokerProcess(channel: channel, tool: toolSocket, secret: secret, status: statusPath)
            #expect(eventually(timeout: .seconds(20)) { status(statusPath).first?.hooked == true }, "new broker log:\n\(broker.log)")
            #expect(broker.log.contains("already hooked"), "\(broker.log)")
            // The decision was made at HELLO ("already hooked"): no new handshake, the tool's session still open, the guest hooked once.
            #expect(connections() == handshakes && handshakes == 1, "\(tool.log)")
            #expect(!tool.log.contains("ended:"), "the tool's session ended:\n\(tool.log)")
            #expect(status(statusPath).first?.hooks == 0)
            broker.kill()
            tool.kill()
        }

        @Test("stderr is a full pipe nobody reads: the broker still starts and hooks the guest; the lines come out once it drains")
        func stderrNobodyReads() async throws {
            let secret = secretFile()
            defer { unlink(secret) }
            let toolSocket = temporarySocketPath("tool")
            let channel = temporarySocketPath("channel")
            let statusPath = "/tmp/kvmib-fault-status3-\(getpid()).json"
            defer { unlink(statusPath) }
            // The broker's stdout and stderr: a FIFO this test holds open and fills to the brim, as
            // a stuck log reader (or a journald that stopped reading its stream) would leave it.
            let fifo = "/tmp/kvmib-fault-fifo-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            #expect(mkfifo(fifo, 0o600) == 0)
            defer { unlink(fifo) }
            let pipe = open(fifo, O_RDWR | O_NONBLOCK | O_CLOEXEC)
            #expect(pipe >= 0)
            defer { close(pipe) }
            let chunk = [UInt8](repeating: UInt8(ascii: "."), count: 4096)
            while write(pipe, chunk, chunk.count) > 0 {}
            #expect(errno == EAGAIN)
            let tool = try introspectorProcess(toolSocket, secret)
            let broker = try SpawnedProcess(
                products.appendingPathComponent("kvmi-broker").path,
                [
                    "run", "--channel-socket", channel, "--introspector", "unix:\(toolSocket)", "--secret-file", secret, "--abi", "v12",
                    "--commands", "12,10", "--events", "0", "--status-file", statusPath, "--log-level", "debug", "--libvirt-uri", "",
                    "--insecure-no-libvirt-identity", "--emulator", try patchedQEMU(), "--control-socket", "",
                ], logPath: fifo)
            defer { broker.terminate(SIGKILL, grace: 0) }
            // Logging is the first thing the broker does (the identity-check warning): written
            // synchronously, it would block there, and the socket would never appear.
            #expect(eventually { FileManager.default.fileExists(atPath: channel) })
            let qemu = try QEMUProcess(channelSocket: channel, uuid: uuid, name: "stuck-log-guest", kernelDouble: try kernelDouble())
            defer { qemu.stop() }
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            #expect(eventually(timeout: .seconds(20)) { status(statusPath).first?.hooked == true }, "QEMU:\n\(qemu.log)\ntool:\n\(tool.log)")
            // Drain the pipe: the queued records follow, the audit record of the hook among them.
            var text = ""
            var buffer = [UInt8](repeating: 0, count: 65536)
            #expect(
                eventually {
                    let count = read(pipe, &buffer, buffer.count)
                    if count > 0 { text += String(decoding: buffer[0..<count].filter { $0 != UInt8(ascii: ".") }, as: UTF8.self) }
                    return text.contains("audit: guest hooked")
                }, "broker output so far:\n\(text)")
            #expect(text.contains("IDENTITY CHECK OFF"))
        }
    }
}
