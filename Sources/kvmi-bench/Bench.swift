import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMITestIntrospector

/// Benchmarks kept in the project, so that the figures in Documentation/ can be re-measured.
@main
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvmi-bench",
        abstract: "kvmi-broker benchmarks.",
        subcommands: [HandshakeBench.self])
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
