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

    @Option(
        help: ArgumentHelp(
            "A firmware image for the guest (QEMU -bios), e.g. one whose vCPU halts: the C floor runs no guest code.",
            discussion: "Without it the guest runs SeaBIOS, which is still in its POST here and keeps one vCPU busy."))
    var bios: String?

    func run() async throws {
        // The broker's records go through the log writer as the daemon's do (`kvmi-broker run
        // --log-level warning`): the audit trail is written, off the sessions' threads.
        LoggingSystem.bootstrap { label in BrokerLog.handler(label: label, level: .warning, journal: false) }
        defer { BrokerLog.flush() }
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
        let hooks = HookWaiter()
        server.registry.observe { status in hooks.record(status) }
        let task = Task { await server.run(listener: listener) }
        defer { task.cancel() }
        let uuid = GuestUUID("9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d")!
        let vm = try QEMUProcess(
            qemu: qemu, channelSocket: configuration.channelSocketPath, uuid: uuid, name: "bench", extraArguments: bios.map { ["-bios", $0] } ?? [],
            kernelDouble: double)
        defer { vm.stop() }
        let qmpPath = vm.qmpPath
        let cycles = self.cycles
        // QEMU's monitor is driven from a thread of its own, as libvirt drives it from another
        // process, and each hook is awaited as an event: a QMP round trip or a polling loop on
        // one of Swift's two cooperative threads would slow the very sessions being measured.
        let measured = await offCooperativePool { () throws -> ([Int64], [Int64]) in
            let qmp = try QMPClient(path: qmpPath)
            _ = try qmp.execute(#"{"execute":"cont"}"#, timeout: 30)
            var samples: [Int64] = []
            var requestSamples: [Int64] = []
            for cycle in 0...cycles {
                if cycle > 0 {
                    _ = try qmp.execute(#"{"execute":"stop"}"#, timeout: 30)
                    _ = try qmp.execute(#"{"execute":"cont"}"#, timeout: 30)
                }
                guard let hook = hooks.wait(forHooks: cycle + 1, timeout: .seconds(30)) else {
                    throw BrokerError(.timedOut, "not hooked (\(cycle + 1))")
                }
                samples.append(hook.total)
                requestSamples.append(hook.request)
            }
            return (samples, requestSamples)
        }
        let samples: [Int64]
        let requestSamples: [Int64]
        switch measured {
        case .success(let values): (samples, requestSamples) = values
        case .failure(let error): throw BrokerError(.timedOut, "\(error); QEMU log: \(vm.log)")
        }
        var hookSamples = samples
        var qemuSamples = requestSamples
        qemuSamples.removeFirst()
        qemuSamples.sort()
        let first = hookSamples.removeFirst()
        hookSamples.sort()
        print("first hook after the first start: \(first) us")
        print(
            "broker + patched QEMU: \(hookSamples.count) hooks after RESUMED, p50 \(hookSamples[hookSamples.count / 2]) us  p99 \(hookSamples[Int(Double(hookSamples.count) * 0.99)]) us  max \(hookSamples.last ?? 0) us"
        )
        print(
            "  of which HOOK request -> QEMU's RESULT: p50 \(qemuSamples[qemuSamples.count / 2]) us  p99 \(qemuSamples[Int(Double(qemuSamples.count) * 0.99)]) us  max \(qemuSamples.last ?? 0) us"
        )
    }
}

/// The hooks the broker has made so far, as the registry reports them (`SessionRegistry.observe`),
/// for a thread that waits for the next one.
private final class HookWaiter: @unchecked Sendable {
    private let condition = NSCondition()
    // Guarded by `condition`.
    private var hooks = 0
    private var last = (total: Int64(0), request: Int64(0))

    func record(_ status: SessionStatus) {
        guard status.hooked else { return }
        condition.lock()
        if status.hooks > hooks {
            hooks = status.hooks
            last = (status.lastHookMicroseconds ?? 0, status.lastHookRequestMicroseconds ?? 0)
            condition.broadcast()
        }
        condition.unlock()
    }

    /// The timings of hook number `count` once the broker has made it; nil after `timeout`.
    func wait(forHooks count: Int, timeout: Duration) -> (total: Int64, request: Int64)? {
        let deadline = Date(timeIntervalSinceNow: timeout.secondsDouble)
        condition.lock()
        defer { condition.unlock() }
        while hooks < count {
            if !condition.wait(until: deadline) { return nil }
        }
        return last
    }
}

/// Runs `body` on a thread of its own and returns what it returns or throws.
private func offCooperativePool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async -> Result<T, any Error> {
    await withCheckedContinuation { (continuation: CheckedContinuation<Result<T, any Error>, Never>) in
        Thread { continuation.resume(returning: Result { try body() }) }.start()
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
