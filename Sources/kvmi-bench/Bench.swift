import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerOS
import KVMIBrokerPolicy
import KVMITestIntrospector
import Logging

/// Benchmarks kept in the project, so that the figures in Documentation/ can be re-measured.
@main
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvmi-bench",
        abstract: "kvmi-broker benchmarks.",
        version: BrokerVersion.string,
        subcommands: [HandshakeBench.self, HookBench.self, PolicyBench.self, ScaleBench.self])
}

/// Handshake latency over a unix socket: connect + 104-byte struct + 24-byte reply + cookie check,
/// against the test introspector running in this process on its own thread.
struct HandshakeBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "handshake", abstract: "Latency of connect + handshake over a unix socket (p50, p99).")

    @Option(help: "Number of handshakes.")
    var count = 10_000

    @Option(help: "ABI generation.")
    var abi: String = "v12"

    @Option(help: "Handshakes in flight at once (1 = one after another).")
    var concurrency = 1

    func run() async throws {
        guard let generation = ABIGeneration(parsing: abi) else { throw ValidationError("--abi must be v7 or v12") }
        let path = "/tmp/kvmi-bench-\(getpid()).sock"
        let secret = Array("benchmark secret\n".utf8)
        let introspector = try TestIntrospector(.init(endpoint: .unix(path: path), secret: secret))
        defer { introspector.stop() }
        let parameters = HandshakeParameters(
            abi: generation,
            request: HandshakeRequest(uuid: GuestUUID("6695eb01-f6a4-8304-79aa-97f2502e193f")!, name: "bench", startTime: 1, maxGPA: 1 << 31),
            expectedCookie: CookieHash(secret: secret))
        let connector = IntrospectorConnector()
        let endpoint = introspector.endpoint
        // Warm-up: thread start, page faults, first epoll registration.
        for _ in 0..<100 { try await connector.connectAndHandshake(to: endpoint, parameters).descriptor.close() }

        let clock = ContinuousClock()
        let wall = clock.now
        let samples = try await withThrowingTaskGroup(of: [Duration].self) { group in
            let perTask = count / concurrency
            for _ in 0..<concurrency {
                group.addTask {
                    var local: [Duration] = []
                    local.reserveCapacity(perTask)
                    for _ in 0..<perTask {
                        let start = clock.now
                        let outcome = try await connector.connectAndHandshake(to: endpoint, parameters)
                        local.append(start.duration(to: clock.now))
                        outcome.descriptor.close()
                    }
                    return local
                }
            }
            var all: [Duration] = []
            for try await part in group { all += part }
            return all.sorted()
        }
        let elapsed = wall.duration(to: clock.now)
        func percentile(_ p: Double) -> Duration { samples[min(samples.count - 1, Int(Double(samples.count) * p))] }
        print("handshakes: \(samples.count) over unix, ABI \(generation), concurrency \(concurrency), cookie checked")
        print(
            String(
                format: "p50 %.1f us  p99 %.1f us  max %.1f us  mean %.1f us", percentile(0.50).secondsDouble * 1e6,
                percentile(0.99).secondsDouble * 1e6, samples.last!.secondsDouble * 1e6,
                samples.reduce(Duration.zero, +).secondsDouble / Double(samples.count) * 1e6))
        print(String(format: "throughput %.0f handshakes/s", Double(samples.count) / elapsed.secondsDouble))
    }
}

/// QEMU's trigger (HELLO, then RESUMED after each pause) to "hooked": the broker's handshake with
/// the test introspector, HOOK with the fd, QEMU's ioctls, RESULT. Real patched QEMU, with the
/// KERNEL DOUBLE preloaded because no kernel here has KVMI. Compare with Benchmarks/hook-floor.
struct HookBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hook", abstract: "Trigger-to-hooked latency over pause/resume cycles of one real QEMU (through the kernel double).")

    @Option(help: "The patched qemu-system-x86_64 (qemu-patches/build --print-path).")
    var qemu: String

    @Option(help: "The kernel double library (Tests/KernelDouble/build DIR).")
    var double: String

    @Option(help: "Pause/resume cycles (each one hook).")
    var cycles = 300

    func run() async throws {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = .error
            return handler
        }
        // A private directory: the broker refuses to put its socket where others may write.
        var template = Array("/tmp/kvmi-bench-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw BrokerError(.io, "mkdtemp failed", errno: errno) }
        let work = String(cString: made)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let secret = Array("bench secret\n".utf8)
        let introspector = try TestIntrospector(
            .init(
                endpoint: .unix(path: "\(work)/tool.sock"), secret: secret,
                kvmiClient: try KVMIClientPlan(abi: .v12, commands: [], events: [])))
        defer { introspector.stop() }
        let configuration = BrokerConfiguration(
            channelSocketPath: "\(work)/channel.sock", introspector: introspector.endpoint, cookie: CookieHash(secret: secret),
            allowLists: try Channel.AllowLists(abi: .v12, commands: [12, 7, 10], events: [0, 17]),
            // No libvirt here: the patched QEMU is trusted by its executable, as with --emulator.
            verifier: PeerVerifier(emulators: [qemu]))
        let server = ChannelServer(configuration: configuration, logger: Logger(label: "bench"))
        let listener = try server.bind()
        let task = Task { await server.run(listener: listener) }
        defer { task.cancel() }
        let uuid = GuestUUID("9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d")!
        let vm = try QEMUProcess(qemu: qemu, channelSocket: configuration.channelSocketPath, uuid: uuid, name: "bench", kernelDouble: double)
        defer { vm.stop() }
        func waitHooks(_ count: Int) async throws -> SessionStatus {
            let deadline = ContinuousClock.now.advanced(by: .seconds(30))
            while ContinuousClock.now < deadline {
                if let status = await server.registry.snapshot().first, status.hooked, status.hooks >= count { return status }
                try await Task.sleep(for: .milliseconds(2))
            }
            throw BrokerError(.timedOut, "not hooked (\(count)); QEMU log: \(vm.log)")
        }
        let qmp = try QMPClient(path: vm.qmpPath)
        _ = try qmp.execute(#"{"execute":"cont"}"#, timeout: 30)
        let firstStatus = try await waitHooks(1)
        var samples: [Int64] = [firstStatus.lastHookMicroseconds ?? 0]
        var requestSamples: [Int64] = [firstStatus.lastHookRequestMicroseconds ?? 0]
        for cycle in 0..<cycles {
            _ = try qmp.execute(#"{"execute":"stop"}"#, timeout: 30)
            _ = try qmp.execute(#"{"execute":"cont"}"#, timeout: 30)
            let status = try await waitHooks(cycle + 2)
            samples.append(status.lastHookMicroseconds ?? 0)
            requestSamples.append(status.lastHookRequestMicroseconds ?? 0)
        }
        requestSamples.removeFirst()
        requestSamples.sort()
        let first = samples.removeFirst()
        samples.sort()
        print("first hook after the first start: \(first) us")
        print(
            "broker + patched QEMU: \(samples.count) hooks after RESUMED, p50 \(samples[samples.count / 2]) us  p99 \(samples[Int(Double(samples.count) * 0.99)]) us  max \(samples.last ?? 0) us"
        )
        print(
            "  of which HOOK request -> QEMU's RESULT: p50 \(requestSamples[requestSamples.count / 2]) us  p99 \(requestSamples[Int(Double(requestSamples.count) * 0.99)]) us  max \(requestSamples.last ?? 0) us"
        )
    }
}

/// Policy decision time per guest with many rules (UUID, metadata and glob rules mixed).
struct PolicyBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "policy", abstract: "Decision time per guest with N rules.")

    @Option(help: "Number of rules.")
    var rules = 10_000

    @Option(help: "Number of decisions to time.")
    var lookups = 100_000

    func run() throws {
        let result = try PolicyBenchmark.run(rules: rules, lookups: lookups)
        print("policy: \(result.rules) rules loaded in \(format(result.load)); \(result.lookups) decisions, \(result.introspected) introspected")
        print(String(format: "per decision: %.2f us", result.perDecision.secondsDouble * 1e6))
    }
}
