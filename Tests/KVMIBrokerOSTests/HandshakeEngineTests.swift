import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMITestIntrospector
import Logging
import Testing

#if canImport(Glibc)
    import Glibc
#endif

extension OSLayerTests {
    /// Real sockets, the real engine, the test introspector on its own thread. Serialized,
    /// because the fd-leak checks count this process's descriptors.
    @Suite("Handshake engine against the test introspector")
    struct HandshakeEngineTests {
        let connector = IntrospectorConnector()

        init() {
            // The reactor's epoll and eventfd live for the process; create them before counting.
            _ = IOReactor.shared
        }

        @Test(
            "v7 and v12: the tool gets our identity, we get its cookie, and its first KVMI message is left unread", arguments: ABIGeneration.allCases)
        func completesWithoutOverRead(abi: ABIGeneration) async throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("ok")), secret: testSecret, sendsFirstMessage: true))
            defer { introspector.stop() }
            let outcome = try await connector.connectAndHandshake(to: introspector.endpoint, parameters(abi))
            defer { outcome.descriptor.close() }
            #expect(outcome.bytesSent == abi.handshakeSize)
            #expect(outcome.reply.structSize == 24)
            #expect(outcome.authenticated)
            // What is left in the socket is exactly the GET_VERSION message: nothing was over-read.
            var left = [UInt8](repeating: 0, count: 64)
            let count = recv(outcome.descriptor.raw, &left, left.count, Int32(MSG_DONTWAIT))
            #expect(Array(left.prefix(max(count, 0))) == TestIntrospector.getVersionMessage)
            let record = try #require(introspector.waitForRecords(1).first)
            #expect(record.handshake?.structSize == UInt32(abi.handshakeSize))
            #expect(record.handshake?.uuid == testUUID)
            #expect(record.handshake?.name == "guest-1")
            #expect(record.handshake?.startTime == 1_700_000_000)
            #expect(record.handshake?.maxGPA == (abi == .v12 ? 0x1_0000_0000 : nil))
        }

        @Test("a longer reply is accepted; its tail is consumed and the message behind it is not")
        func longReply() async throws {
            let introspector = try TestIntrospector(
                .init(
                    endpoint: .unix(path: temporarySocketPath("long")), secret: testSecret, behaviour: .longReply(extra: 5000),
                    sendsFirstMessage: true))
            defer { introspector.stop() }
            let outcome = try await connector.connectAndHandshake(to: introspector.endpoint, parameters())
            defer { outcome.descriptor.close() }
            #expect(outcome.reply.structSize == 5024)
            var left = [UInt8](repeating: 0, count: 64)
            let count = recv(outcome.descriptor.raw, &left, left.count, Int32(MSG_DONTWAIT))
            #expect(Array(left.prefix(max(count, 0))) == TestIntrospector.getVersionMessage)
        }

        @Test("a flood after the reply stays in the socket")
        func flood() async throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("flood")), secret: testSecret, behaviour: .flood(bytes: 1 << 20)))
            defer { introspector.stop() }
            let outcome = try await connector.connectAndHandshake(to: introspector.endpoint, parameters())
            defer { outcome.descriptor.close() }
            var next: UInt8 = 0
            #expect(recv(outcome.descriptor.raw, &next, 1, Int32(MSG_DONTWAIT)) == 1)
            #expect(next == 0xEE)
        }

        struct Misbehaviour: Sendable, CustomTestStringConvertible {
            let behaviour: TestIntrospector.Behaviour
            let code: BrokerError.Code
            let text: String
            var testDescription: String { behaviour.description }
        }

        @Test(
            "each misbehaviour ends in a clear reason and leaks no descriptor",
            arguments: [
                Misbehaviour(behaviour: .silent, code: .timedOut, text: "no complete handshake reply within 2 s (0 bytes received)"),
                Misbehaviour(behaviour: .slow(interval: .milliseconds(700)), code: .timedOut, text: "no complete handshake reply within 2 s"),
                Misbehaviour(behaviour: .announcedSize(0), code: .protocolViolation, text: "struct_size 0, less than the 24 bytes"),
                Misbehaviour(behaviour: .announcedSize(3), code: .protocolViolation, text: "struct_size 3, less than the 24 bytes"),
                Misbehaviour(behaviour: .announcedSize(23), code: .protocolViolation, text: "struct_size 23, less than the 24 bytes"),
                Misbehaviour(
                    behaviour: .announcedSize(0xFFFF_FFFF), code: .protocolViolation, text: "struct_size 4294967295, more than the 65536-byte limit"),
                Misbehaviour(behaviour: .wrongCookie, code: .authenticationFailed, text: "cookie rejected"),
                Misbehaviour(
                    behaviour: .closeMidReply(bytes: 10), code: .peerClosed, text: "closed the connection after 10 bytes of its handshake reply"),
            ])
        func misbehaviour(_ case: Misbehaviour) async throws {
            let before = openDescriptorCount()
            do {
                let introspector = try TestIntrospector(
                    .init(endpoint: .unix(path: temporarySocketPath("bad")), secret: testSecret, behaviour: `case`.behaviour))
                defer { introspector.stop() }
                do {
                    let outcome = try await connector.connectAndHandshake(to: introspector.endpoint, parameters())
                    outcome.descriptor.close()
                    Issue.record("handshake with a \(`case`.behaviour) introspector succeeded")
                } catch let error as BrokerError {
                    #expect(error.code == `case`.code)
                    #expect(error.description.contains(`case`.text), "\(error)")
                    #expect(error.location == introspector.endpoint.description, "the error names the endpoint")
                }
            }
            // The introspector's threads close their side asynchronously; ours must be closed already.
            #expect(eventually { openDescriptorCount() == before }, "descriptors before \(before), after \(openDescriptorCount())")
        }

        @Test("connecting to nothing names the endpoint and the errno")
        func nothingListening() async throws {
            let path = temporarySocketPath("none")
            let before = openDescriptorCount()
            await #expect {
                try await connector.connectAndHandshake(to: .unix(path: path), parameters())
            } throws: { error in
                guard let error = error as? BrokerError else { return false }
                return error.code == .connectFailed && error.errno == ENOENT && error.description.hasPrefix("unix:\(path): cannot connect")
            }
            #expect(openDescriptorCount() == before)
        }

        @Test("TCP over IPv4 and IPv6 loopback", arguments: ["127.0.0.1", "::1"])
        func tcp(host: String) async throws {
            let address: IntrospectorEndpoint.IPAddress =
                host == "::1" ? .v6([UInt8](repeating: 0, count: 15) + [1]) : .v4([127, 0, 0, 1])
            let introspector = try TestIntrospector(.init(endpoint: .tcp(host: address, port: 0), secret: testSecret, sendsFirstMessage: true))
            defer { introspector.stop() }
            let endpoint = try IntrospectorEndpoint(parsing: introspector.endpoint.description)
            let outcome = try await connector.connectAndHandshake(to: endpoint, parameters(.v7))
            defer { outcome.descriptor.close() }
            #expect(outcome.authenticated)
            #expect(introspector.waitForRecords(1).first?.handshake?.structSize == 96)
        }

        @Test("without a secret any hash is accepted and reported as unauthenticated")
        func noSecret() async throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("nosecret")), secret: nil, behaviour: .wrongCookie))
            defer { introspector.stop() }
            let outcome = try await connector.connectAndHandshake(to: introspector.endpoint, parameters(secret: nil))
            outcome.descriptor.close()
            #expect(!outcome.authenticated)
        }

        @Test("cancelling a waiting handshake returns at once and closes the socket")
        func cancellation() async throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("cancel")), secret: testSecret, behaviour: .silent))
            defer { introspector.stop() }
            let before = openSocketCount()  // sockets only: the runtime opens timer descriptors when it likes
            let endpoint = introspector.endpoint
            let task = Task { try await IntrospectorConnector().connectAndHandshake(to: endpoint, parameters(timeout: .seconds(30))) }
            // Wait for the event: the handshake is parked in the reactor, waiting for the reply.
            #expect(eventually { IOReactor.shared.footprint.waiters > 0 })
            let start = ContinuousClock.now
            task.cancel()
            let result = await task.result
            // Far below the 30 s handshake timeout: the return came from the cancel, not the clock.
            #expect(start.duration(to: .now) < .seconds(25))
            if case .failure(let error as BrokerError) = result {
                #expect(error.code == .cancelled)
            } else {
                Issue.record("not cancelled: \(result)")
            }
            #expect(eventually { openSocketCount() <= before }, "\(before) -> \(openSocketCount()): \(describeDescriptors())")
        }

        @Test(
            "without a task: cancel delivers `cancelled` before it returns, closes the socket, gives the turn back; a queued attempt never connects")
        func callbackAttemptCancel() async throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("callback")), secret: testSecret, behaviour: .silent))
            defer { introspector.stop() }
            let before = openSocketCount()
            let reactor = IOReactor()
            let pacer = HandshakePacer(limit: 1)
            let connector = IntrospectorConnector(io: AsyncSocketIO(reactor: reactor), pacer: pacer)
            let endpoint = introspector.endpoint
            let outcomes = Mailbox<String>(capacity: 4)
            @Sendable func text(_ name: String, _ result: Result<HandshakeOutcome, BrokerError>) -> String {
                switch result {
                case .success: return "\(name) succeeded"
                case .failure(let error): return "\(name) \(error.code)"
                }
            }
            let first = connector.start(to: endpoint, parameters(timeout: .seconds(60))) { outcomes.post(text("first", $0)) }
            let second = connector.start(to: endpoint, parameters(timeout: .seconds(60))) { outcomes.post(text("second", $0)) }
            #expect(pacer.load(of: endpoint).inFlight == 1 && pacer.load(of: endpoint).queued == 1)
            // The first has sent its request and waits for the reply (the tool never answers).
            #expect(eventually { reactor.footprint.waiters == 1 })
            second.cancel()
            #expect(outcomes.count == 1, "delivered before cancel returned")
            #expect(await outcomes.next() == "second cancelled")
            #expect(pacer.load(of: endpoint).queued == 0)
            first.cancel()
            #expect(await outcomes.next() == "first cancelled")
            #expect(pacer.load(of: endpoint).inFlight == 0)
            #expect(reactor.footprint.waiters == 0 && reactor.footprint.descriptors == 0)
            // The deadline's timer went with it.
            #expect(reactor.timerCount == 0)
            first.cancel()
            #expect(outcomes.count == 0, "one outcome per attempt")
            // One connection reached the tool: the queued attempt never connected.
            #expect(introspector.waitForRecords(1).count == 1)
            #expect(eventually { openSocketCount() <= before }, "\(before) -> \(openSocketCount()): \(describeDescriptors())")
        }

        @Test("a long queue of attempts that each fail at once is served from the reactor's loop, not by recursion through the pacer")
        func queuedFailuresDoNotRecurse() async throws {
            // Nothing listens there: each attempt fails in its first step, as it gets its turn.
            let endpoint = IntrospectorEndpoint.unix(path: temporarySocketPath("nobody"))
            let reactor = IOReactor()
            let pacer = HandshakePacer(limit: 1)
            let connector = IntrospectorConnector(io: AsyncSocketIO(reactor: reactor), pacer: pacer)
            let count = 20_000
            let failed = Counter()
            let done = Mailbox<Bool>(capacity: 1)
            // One turn held while the attempts queue behind it.
            let gate = Mailbox<Bool>(capacity: 1)
            let holder = Task { try await pacer.paced(endpoint) { _ = await gate.next() } }
            #expect(eventually { pacer.load(of: endpoint).inFlight == 1 })
            var attempts: [HandshakeAttempt] = []
            for _ in 0..<count {
                attempts.append(
                    connector.start(to: endpoint, parameters()) { result in
                        if case .failure(let error) = result, error.code == .connectFailed { failed.add() }
                        if failed.value == count { done.post(true) }
                    })
            }
            #expect(pacer.load(of: endpoint).queued == count)
            // The held turn ends: the queue drains, one failure at a time, without a deep stack.
            gate.post(true)
            try await holder.value
            #expect(await done.next() == true)
            #expect(failed.value == count)
            #expect(pacer.load(of: endpoint).inFlight == 0 && pacer.load(of: endpoint).queued == 0)
            #expect(reactor.timerCount == 0 && reactor.footprint.waiters == 0)
        }

        @Test("the next attempt follows the back-off")
        func retriesFollowBackoff() async throws {
            let introspector = try TestIntrospector(
                .init(endpoint: .unix(path: temporarySocketPath("retry")), secret: testSecret, behaviour: .wrongCookie))
            defer { introspector.stop() }
            let backoff = try Backoff(initial: .milliseconds(200), maximum: .seconds(1), multiplier: 2, jitter: 0)
            let retrying = RetryingConnector(backoff: backoff, maximumAttempts: 3, logger: Logger(label: "test"))
            let clock = ContinuousClock()
            let start = clock.now
            let failures = FailureLog()
            await #expect(throws: BrokerError.self) {
                try await retrying.run(to: introspector.endpoint, parameters()) { attempt, error, delay in
                    failures.append(attempt, clock.now, error, delay)
                }
            }
            let log = failures.entries
            #expect(log.map(\.attempt) == [1, 2, 3])
            #expect(log.map(\.delay) == [.milliseconds(200), .milliseconds(400), nil])
            #expect(log.allSatisfy { $0.error.code == .authenticationFailed })
            // Attempt 2 came no sooner than 200 ms after failure 1; attempt 3 no sooner than 400 ms after failure 2.
            #expect(log[0].time.duration(to: log[1].time) >= .milliseconds(200))
            #expect(log[1].time.duration(to: log[2].time) >= .milliseconds(400))
            #expect(start.duration(to: clock.now) >= .milliseconds(600))
            #expect(introspector.waitForRecords(3).count == 3)
        }

        @Test("200 handshakes at once, on a bounded number of threads")
        func concurrent() async throws {
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("many")), secret: testSecret))
            defer { introspector.stop() }
            let threadsBefore = threadCount()
            let endpoint = introspector.endpoint
            let results = await withTaskGroup(of: Bool.self) { group in
                for _ in 0..<200 {
                    group.addTask {
                        guard let outcome = try? await IntrospectorConnector().connectAndHandshake(to: endpoint, parameters(timeout: .seconds(10)))
                        else {
                            return false
                        }
                        outcome.descriptor.close()
                        return true
                    }
                }
                var all: [Bool] = []
                for await result in group { all.append(result) }
                return all
            }
            #expect(results.count == 200 && results.allSatisfy { $0 })
            // The cooperative pool has one thread per core; nothing here may add one per connection.
            #expect(threadCount() <= threadsBefore + ProcessInfo.processInfo.activeProcessorCount + 2)
        }
    }
}

final class FailureLog: @unchecked Sendable {
    struct Entry {
        let attempt: Int
        let time: ContinuousClock.Instant
        let error: BrokerError
        let delay: Duration?
    }
    private let lock = NSLock()
    private var storage: [Entry] = []
    func append(_ attempt: Int, _ time: ContinuousClock.Instant, _ error: BrokerError, _ delay: Duration?) {
        lock.withLock { storage.append(Entry(attempt: attempt, time: time, error: error, delay: delay)) }
    }
    var entries: [Entry] { lock.withLock { storage } }
}

func threadCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? -1
}
