import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMITestIntrospector
import Logging
import Testing

@testable import KVMIBrokerOS

#if canImport(Glibc)
    import Glibc
#endif

/// A Prometheus text exposition, checked line by line as it is parsed.
struct Exposition {
    struct Sample {
        var name: String
        var labels: [String: String]
        var value: Double
    }

    var samples: [Sample] = []
    var types: [String: String] = [:]
    var helps: Set<String> = []
    /// Lines that are not valid Prometheus text lines, with why.
    var problems: [String] = []

    init(_ text: String) {
        guard text.hasSuffix("\n") else {
            problems.append("the exposition does not end with a line feed")
            return
        }
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast() {
            parse(String(line))
        }
        // Every sample belongs to a family with a TYPE and a HELP line.
        for sample in samples {
            let family = family(of: sample.name)
            if types[family] == nil { problems.append("no # TYPE for \(sample.name)") }
            if !helps.contains(family) { problems.append("no # HELP for \(sample.name)") }
        }
    }

    func family(of name: String) -> String {
        for suffix in ["_bucket", "_sum", "_count"] where name.hasSuffix(suffix) {
            let base = String(name.dropLast(suffix.count))
            if types[base] == "histogram" { return base }
        }
        return name
    }

    static func isName(_ text: Substring) -> Bool {
        guard let first = text.first, first.isASCII, first.isLetter || first == "_" || first == ":" else { return false }
        return text.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == ":") }
    }

    mutating func parse(_ line: String) {
        if line.hasPrefix("# HELP ") {
            let rest = line.dropFirst(7)
            let name = rest.prefix { $0 != " " }
            guard Self.isName(name), rest.count > name.count + 1 else { return problems.append("bad HELP line: \(line)") }
            guard helps.insert(String(name)).inserted else { return problems.append("second HELP for \(name)") }
            return
        }
        if line.hasPrefix("# TYPE ") {
            let parts = line.dropFirst(7).split(separator: " ")
            guard parts.count == 2, Self.isName(parts[0]), ["counter", "gauge", "histogram", "summary", "untyped"].contains(parts[1]) else {
                return problems.append("bad TYPE line: \(line)")
            }
            guard types.updateValue(String(parts[1]), forKey: String(parts[0])) == nil else { return problems.append("second TYPE for \(parts[0])") }
            return
        }
        if line.hasPrefix("#") || line.isEmpty { return problems.append("unexpected line: '\(line)'") }
        // name{label="value",...} value
        var rest = Substring(line)
        let name = rest.prefix { $0 != "{" && $0 != " " }
        guard Self.isName(name) else { return problems.append("bad metric name: \(line)") }
        rest = rest.dropFirst(name.count)
        var labels: [String: String] = [:]
        if rest.first == "{" {
            rest = rest.dropFirst()
            while rest.first != "}" {
                let key = rest.prefix { $0 != "=" }
                guard Self.isName(key) else { return problems.append("bad label name: \(line)") }
                rest = rest.dropFirst(key.count)
                guard rest.hasPrefix("=\"") else { return problems.append("bad label: \(line)") }
                rest = rest.dropFirst(2)
                var value = ""
                while let character = rest.first, character != "\"" {
                    rest = rest.dropFirst()
                    if character == "\\" {
                        guard let escaped = rest.first, ["\\", "\"", "n"].contains(escaped) else {
                            return problems.append("bad escape: \(line)")
                        }
                        value.append(escaped == "n" ? "\n" : escaped)
                        rest = rest.dropFirst()
                    } else {
                        value.append(character)
                    }
                }
                guard rest.first == "\"" else { return problems.append("unterminated label value: \(line)") }
                rest = rest.dropFirst()
                labels[String(key)] = value
                if rest.first == "," { rest = rest.dropFirst() } else if rest.first != "}" { return problems.append("bad label list: \(line)") }
            }
            rest = rest.dropFirst()
        }
        guard rest.first == " " else { return problems.append("no value: \(line)") }
        let fields = rest.dropFirst().split(separator: " ")
        guard (1...2).contains(fields.count), let value = Self.number(fields[0]) else { return problems.append("bad value: \(line)") }
        samples.append(Sample(name: String(name), labels: labels, value: value))
    }

    static func number(_ text: Substring) -> Double? {
        switch text {
        case "+Inf": return .infinity
        case "-Inf": return -.infinity
        case "NaN": return .nan
        default: return Double(text)
        }
    }

    /// The value of the sample `name` with exactly these labels.
    func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        samples.first { $0.name == name && $0.labels == labels }?.value
    }
}

/// One HTTP exchange over a unix socket or TCP, blocking with a bound: the raw response.
func httpExchange(_ endpoint: IntrospectorEndpoint, _ request: [UInt8], timeout: Duration = .seconds(30)) throws -> String {
    let socket: Descriptor
    if case .unix(let path) = endpoint {
        socket = try connectUnixSocket(path)
    } else {
        let address = SocketAddress(endpoint)
        let raw = Glibc.socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        socket = Descriptor(adopting: raw)
        guard address.withPointer({ Glibc.connect(raw, $0, $1) }) == 0 else { throw BrokerError(.connectFailed, "connect", errno: errno) }
    }
    defer { socket.close() }
    _ = request.withUnsafeBytes { kvmib_send_with_fd(socket.raw, $0.baseAddress, $0.count, -1) }
    return readToEnd(socket.raw, timeout: timeout) ?? ""
}

/// Reads until the peer closes (or resets); nil if it does not within `timeout`.
func readToEnd(_ fd: Int32, timeout: Duration = .seconds(30)) -> String? {
    let deadline = ContinuousClock.now.advanced(by: timeout)
    var response: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while ContinuousClock.now < deadline {
        var pollFD = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pollFD, 1, 100) >= 0 else { return nil }
        if pollFD.revents == 0 { continue }
        let count = recv(fd, &buffer, buffer.count, 0)  // poll said readable: data or end of file, no wait
        if count == 0 || (count < 0 && errno == ECONNRESET) { return String(decoding: response, as: UTF8.self) }
        if count > 0 { response += buffer.prefix(count) }
    }
    return nil
}

/// GET /metrics: the status line and the parsed body.
func scrape(_ endpoint: IntrospectorEndpoint) throws -> (status: String, exposition: Exposition) {
    let response = try httpExchange(endpoint, Array("GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n".utf8))
    guard let split = response.range(of: "\r\n\r\n") else { return (response, Exposition("")) }
    let status = response[..<split.lowerBound].components(separatedBy: "\r\n")[0]
    return (status, Exposition(String(response[split.upperBound...])))
}

extension OSLayerTests {
    @Suite("Metrics: Prometheus text exposition on a socket")
    struct MetricsTests {
        let broker = productsDirectory().appendingPathComponent("kvmi-broker")
        let channel = DaemonChannelTests()

        /// The broker of DaemonChannelTests with metrics, and its metrics server on a unix socket.
        func startBroker(procRoot: String, introspector: IntrospectorEndpoint) throws -> (Task<Void, Never>, String, IntrospectorEndpoint) {
            let socketPath = temporarySocketPath("channel")
            var configuration = BrokerConfiguration(
                channelSocketPath: socketPath, introspector: introspector, cookie: CookieHash(secret: testSecret),
                allowLists: try Channel.AllowLists(abi: .v12, commands: [-1], events: [0, 5]),
                backoff: try Backoff(initial: .milliseconds(300), maximum: .seconds(1), multiplier: 2, jitter: 0),
                handshakeTimeout: .seconds(2), verifier: PeerVerifier(emulators: [channel.fakeEmulator], procRoot: procRoot))
            let metrics = BrokerMetrics()
            configuration.metrics = metrics
            let logger = Logger(label: "test-broker")
            let server = ChannelServer(configuration: configuration, logger: logger)
            let metricsPath = temporarySocketPath("metrics")
            let metricsServer = MetricsServer(
                address: .unix(path: metricsPath, group: nil), metrics: metrics, sessions: server.registry, logger: logger)
            let listener = try server.bind()
            let metricsListener = try metricsServer.bind()
            let task = Task {
                await withDiscardingTaskGroup { group in
                    group.addTask { await server.run(listener: listener) }
                    group.addTask { await metricsServer.run(listener: metricsListener) }
                }
            }
            return (task, socketPath, .unix(path: metricsPath))
        }

        /// Scrapes until `condition` holds (each exposition must parse cleanly).
        func eventuallyScraped(_ endpoint: IntrospectorEndpoint, _ condition: (Exposition) -> Bool) -> Exposition? {
            var last: Exposition?
            let met = eventually {
                guard let (status, exposition) = try? scrape(endpoint) else { return false }
                #expect(status == "HTTP/1.0 200 OK")
                #expect(exposition.problems.isEmpty, "\(exposition.problems)")
                last = exposition
                return condition(exposition)
            }
            return met ? last : nil
        }

        @Test("a guest hooked, unhooked by its tool, hooked again, gone; then its introspector unreachable: the counts follow")
        func countsFollowGuests() async throws {
            let procRoot = try channel.fakeProc(cmdlineUUID: channel.uuid)
            defer { try? FileManager.default.removeItem(atPath: procRoot) }
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret, sendsFirstMessage: true))
            let (broker, socketPath, metrics) = try startBroker(procRoot: procRoot, introspector: introspector.endpoint)
            let tool = ["introspector": "command-line"]
            func hooked(_ qemu: FakeQEMU) throws {
                let (hook, fds) = try #require(qemu.receive())
                #expect(hook.knownType == .hook && fds.count == 1)
                fds.forEach { close($0) }
                qemu.send(
                    Channel.Frame(
                        .result, seq: hook.seq,
                        payload: Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1).encoded()))
            }

            // Nothing yet: the session gauges are there, at 0.
            let empty = try #require(eventuallyScraped(metrics) { $0.value("kvmi_broker_sessions", ["state": "hooked"]) == 0 })
            #expect(empty.value("kvmi_broker_sessions", ["state": "waiting"]) == 0)
            #expect(empty.value("kvmi_broker_sessions", ["state": "not_introspected"]) == 0)
            #expect(empty.value("kvmi_broker_open_descriptors") ?? 0 > 0)
            #expect(empty.types["kvmi_broker_hooks_total"] == nil)

            // Hooked.
            let qemu = try FakeQEMU(connectingTo: socketPath)
            qemu.send(channel.hello(uuid: channel.uuid))
            #expect(qemu.receive()?.0.knownType == .welcome)
            try hooked(qemu)
            let first = try #require(eventuallyScraped(metrics) { $0.value("kvmi_broker_sessions", ["state": "hooked"]) == 1 })
            #expect(first.value("kvmi_broker_hooks_total", tool) == 1)
            #expect(first.value("kvmi_broker_introspector_sessions", tool.merging(["state": "hooked"]) { $1 }) == 1)
            #expect(first.value("kvmi_broker_hook_duration_seconds_count", tool) == 1)
            #expect(first.value("kvmi_broker_handshake_duration_seconds_count", tool) == 1)
            #expect(first.types["kvmi_broker_hook_duration_seconds"] == "histogram")
            #expect(first.types["kvmi_broker_hooks_total"] == "counter")
            // Labels name the policy's introspector, never the guest.
            for sample in first.samples { #expect(!sample.labels.values.contains { $0.contains("demo") || $0.contains("\(channel.uuid)") }) }

            // The tool hangs up: unhooked (reason introspector-closed), waiting, then hooked again.
            qemu.send(
                Channel.Frame(
                    .event, seq: 1,
                    payload: Channel.Event(kind: .toolHangup, error: 0, startTime: 1_795_000_000, hooked: false, running: true).encoded()))
            // The counter and the gauges are updated one after the other (a scrape is no
            // transaction): wait until the scrape shows all three.
            let unhooked = try #require(
                eventuallyScraped(metrics) {
                    $0.value("kvmi_broker_unhooks_total", tool.merging(["reason": "introspector-closed"]) { $1 }) == 1
                        && $0.value("kvmi_broker_sessions", ["state": "hooked"]) == 0 && $0.value("kvmi_broker_sessions", ["state": "waiting"]) == 1
                })
            #expect(unhooked.value("kvmi_broker_sessions", ["state": "hooked"]) == 0)
            #expect(unhooked.value("kvmi_broker_sessions", ["state": "waiting"]) == 1)
            try hooked(qemu)
            let again = try #require(eventuallyScraped(metrics) { $0.value("kvmi_broker_hooks_total", tool) == 2 })
            #expect(again.value("kvmi_broker_hook_duration_seconds_count", tool) == 2)

            // The guest leaves: the gauges drop to 0, the counters stay.
            qemu.socket.close()
            let gone = try #require(
                eventuallyScraped(metrics) {
                    $0.value("kvmi_broker_sessions", ["state": "hooked"]) == 0 && $0.value("kvmi_broker_sessions", ["state": "waiting"]) == 0
                        && $0.value("kvmi_broker_introspector_sessions", tool.merging(["state": "hooked"]) { $1 }) == 0
                        && $0.value("kvmi_broker_introspector_sessions", tool.merging(["state": "waiting"]) { $1 }) == 0
                })
            #expect(gone.value("kvmi_broker_sessions", ["state": "waiting"]) == 0)
            #expect(gone.value("kvmi_broker_introspector_sessions", tool.merging(["state": "hooked"]) { $1 }) == 0)
            #expect(gone.value("kvmi_broker_introspector_sessions", tool.merging(["state": "waiting"]) { $1 }) == 0)
            #expect(gone.value("kvmi_broker_hooks_total", tool) == 2)
            #expect(gone.value("kvmi_broker_unhooks_total", tool.merging(["reason": "introspector-closed"]) { $1 }) == 1)

            // The introspector is gone: the guest comes back, waits, and each attempt is a failure by reason.
            introspector.stop()
            let back = try FakeQEMU(connectingTo: socketPath)
            back.send(channel.hello(uuid: channel.uuid))
            #expect(back.receive()?.0.knownType == .welcome)
            let failing = try #require(
                eventuallyScraped(metrics) {
                    $0.value("kvmi_broker_failures_total", tool.merging(["reason": "connect-failed"]) { $1 }) ?? 0 >= 1
                        && $0.value("kvmi_broker_introspector_unreachable_total", tool) ?? 0 >= 1
                        && $0.value("kvmi_broker_sessions", ["state": "waiting"]) == 1
                        && $0.value("kvmi_broker_introspector_sessions", tool.merging(["state": "waiting"]) { $1 }) == 1
                })
            #expect(failing.value("kvmi_broker_introspector_unreachable_total", tool) ?? 0 >= 1)
            #expect(failing.value("kvmi_broker_sessions", ["state": "waiting"]) == 1)
            #expect(failing.value("kvmi_broker_introspector_sessions", tool.merging(["state": "waiting"]) { $1 }) == 1)
            back.socket.close()
            broker.cancel()
            await broker.value
        }

        @Test("a request too large, one too slow and a crowd of silent clients are cut off; scrapes go on being served")
        func boundedRequests() async throws {
            let path = temporarySocketPath("metrics-bounds")
            let server = MetricsServer(
                address: .unix(path: path, group: nil), metrics: BrokerMetrics(), sessions: nil, logger: Logger(label: "test-metrics"),
                requestTimeout: .seconds(2))
            let listener = try server.bind()
            let task = Task { await server.run(listener: listener) }
            let endpoint = IntrospectorEndpoint.unix(path: path)

            // Too slow: half a request line, then nothing. A scrape meanwhile is served; the slow
            // client is cut off (the server closes) without ever getting metrics.
            let slow = try connectUnixSocket(path)
            _ = Array("GET /met".utf8).withUnsafeBytes { kvmib_send_with_fd(slow.raw, $0.baseAddress, $0.count, -1) }
            #expect(try scrape(endpoint).status == "HTTP/1.0 200 OK")
            let slowAnswer = try #require(readToEnd(slow.raw, timeout: .seconds(60)), "the slow client is cut off")
            #expect(!slowAnswer.contains("200 OK"))
            slow.close()

            // Too large: a head that never ends; the server stops reading at its bound and answers 431 or closes.
            let large = try httpExchange(
                endpoint, Array("GET /metrics HTTP/1.0\r\nX-Filler: ".utf8) + Array(repeating: UInt8(ascii: "a"), count: 64 * 1024))
            #expect(large.isEmpty || large.hasPrefix("HTTP/1.0 431"), "\(large)")

            // More silent clients than the server keeps: the oldest are shut down, scrapes still answered.
            let silent = try (0..<(MetricsServer.maximumSilent * 2)).map { _ in try connectUnixSocket(path) }
            let (status, exposition) = try scrape(endpoint)
            #expect(status == "HTTP/1.0 200 OK")
            #expect(exposition.problems.isEmpty, "\(exposition.problems)")
            #expect(readToEnd(silent[0].raw, timeout: .seconds(60)) != nil, "the oldest silent client is shut down")
            silent.forEach { $0.close() }

            // Other requests get their status, not metrics.
            #expect(try httpExchange(endpoint, Array("GET / HTTP/1.0\r\n\r\n".utf8)).hasPrefix("HTTP/1.0 404 "))
            #expect(try httpExchange(endpoint, Array("POST /metrics HTTP/1.0\r\n\r\n".utf8)).hasPrefix("HTTP/1.0 405 "))
            #expect(try httpExchange(endpoint, Array("hello\n\n".utf8)).hasPrefix("HTTP/1.0 400 "))
            #expect(try scrape(endpoint).status == "HTTP/1.0 200 OK")
            task.cancel()
            await task.value
        }

        @Test("kvmi-broker run --metrics-socket: mode 0600, a parsing exposition with HELP and TYPE for every family; none without the option")
        func realBroker() throws {
            let statusFile = "/tmp/kvmib-metrics-status-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
            defer { unlink(statusFile) }
            let metricsPath = temporarySocketPath("metrics-run")
            let common = [
                "run", "--control-socket", "", "--introspector", "unix:/nonexistent", "--commands", "none", "--events", "0", "--status-file",
                statusFile,
                "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", "/bin/true",
            ]
            let child = try ChildProcess(
                broker, common + ["--channel-socket", temporarySocketPath("metrics-channel"), "--metrics-socket", metricsPath])
            #expect(eventually { FileManager.default.fileExists(atPath: metricsPath) }, "\(child.log)")
            var info = stat()
            #expect(lstat(metricsPath, &info) == 0 && info.st_mode & 0o777 == 0o600)
            let (status, exposition) = try scrape(.unix(path: metricsPath))
            #expect(status == "HTTP/1.0 200 OK")
            #expect(exposition.problems.isEmpty, "\(exposition.problems)")
            #expect(exposition.value("kvmi_broker_sessions", ["state": "hooked"]) == 0)
            #expect(exposition.value("kvmi_broker_policy_reload_failures_total") == 0)
            #expect(exposition.value("kvmi_broker_open_descriptors") ?? 0 > 0)
            for (family, _) in exposition.types where family.hasPrefix("kvmi_broker_") { #expect(exposition.helps.contains(family), "\(family)") }
            child.kill()
            #expect(child.process.wait(timeout: 30) == 0, "\(child.log)")
            #expect(!FileManager.default.fileExists(atPath: metricsPath), "the socket is removed at stop")

            // Off by default: no metrics socket, no listener.
            let quiet = try ChildProcess(broker, common + ["--channel-socket", temporarySocketPath("metrics-quiet")])
            #expect(eventually { FileManager.default.fileExists(atPath: statusFile) && quiet.log.contains("ready") }, "\(quiet.log)")
            #expect(!quiet.log.contains("serving metrics"))
            quiet.kill()
            #expect(quiet.process.wait(timeout: 30) == 0, "\(quiet.log)")
        }

        @Test(
            "--metrics-listen on a non-loopback address (or a name) is refused with one line, exit status 2",
            arguments: [
                "0.0.0.0:9465", "10.1.2.3:9465", "[::]:9465", "[2001:db8::1]:9465", "localhost:9465",
            ])
        func nonLoopbackRefused(address: String) throws {
            let (status, out, err) = try runProcess(
                broker,
                [
                    "run", "--channel-socket", temporarySocketPath("metrics-refused"), "--control-socket", "", "--introspector", "unix:/nonexistent",
                    "--commands", "none", "--events", "0", "--status-file", "", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator",
                    "/bin/true", "--metrics-listen", address,
                ])
            #expect(status == 2, "\(err)")
            #expect(out.isEmpty)
            let lines = err.split(separator: "\n", omittingEmptySubsequences: true)
            #expect(lines.count == 1, "one line, no usage text: \(err)")
            #expect(err.hasPrefix("kvmi-broker run: --metrics-listen '\(address)'"), "\(err)")
        }

        @Test("policy mode: the generation gauge follows good reloads, a refused reload counts a failure and leaves it")
        func policyReloads() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let tree = try PolicyTree(toolSocket: directory + "/tool.sock")
            defer { tree.cleanUp() }
            let metricsPath = directory + "/metrics.sock"
            var arguments = [
                "run", "--policy-root", tree.root, "--channel-socket", directory + "/qemu.sock", "--control-socket", directory + "/control.sock",
                "--status-file", "", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator", "/bin/true", "--metrics-socket",
                metricsPath,
            ]
            if geteuid() != 0 { arguments.append("--allow-non-root-owner") }
            let child = try ChildProcess(broker, arguments)
            let endpoint = IntrospectorEndpoint.unix(path: metricsPath)
            #expect(eventually { child.log.contains("ready") }, "\(child.log)")
            let start = try #require(eventuallyScraped(endpoint) { $0.value("kvmi_broker_policy_generation") == 1 }, "\(child.log)")
            #expect(start.value("kvmi_broker_policy_reload_failures_total") == 0)

            // A file with an error: refused, the generation stays.
            tree.write("guests.d/60-bad.conf", "[guest bad]\nMatchName=x*\nIntrospector=tool\nCommands=VM_READ_PHYSICALL\n")
            kill(child.process.pid, SIGHUP)
            let refused = try #require(eventuallyScraped(endpoint) { $0.value("kvmi_broker_policy_reload_failures_total") == 1 }, "\(child.log)")
            #expect(refused.value("kvmi_broker_policy_generation") == 1)

            // Fixed: generation 2.
            tree.remove("guests.d/60-bad.conf")
            kill(child.process.pid, SIGHUP)
            let reloaded = try #require(eventuallyScraped(endpoint) { $0.value("kvmi_broker_policy_generation") == 2 }, "\(child.log)")
            #expect(reloaded.value("kvmi_broker_policy_reload_failures_total") == 1)
            child.kill()
            #expect(child.process.wait(timeout: 30) == 0, "\(child.log)")
        }

        @Test("--metrics-listen 127.0.0.1:PORT serves /metrics over TCP")
        func loopbackServes() throws {
            // A free port: bound by the test, then handed over (the broker sets SO_REUSEADDR).
            let (probe, bound) = try listenSocket(on: .tcp(host: .v4([127, 0, 0, 1]), port: 0))
            probe.close()
            guard case .tcp(_, let port) = bound else { return }
            let child = try ChildProcess(
                broker,
                [
                    "run", "--channel-socket", temporarySocketPath("metrics-tcp"), "--control-socket", "", "--introspector", "unix:/nonexistent",
                    "--commands", "none", "--events", "0", "--status-file", "", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator",
                    "/bin/true", "--metrics-listen", "127.0.0.1:\(port)",
                ])
            #expect(eventually { child.log.contains("ready") }, "\(child.log)")
            let (status, exposition) = try scrape(bound)
            #expect(status == "HTTP/1.0 200 OK", "\(child.log)")
            #expect(exposition.problems.isEmpty, "\(exposition.problems)")
            #expect(exposition.value("kvmi_broker_sessions", ["state": "waiting"]) == 0)
            child.kill()
            #expect(child.process.wait(timeout: 30) == 0, "\(child.log)")
        }
    }
}
