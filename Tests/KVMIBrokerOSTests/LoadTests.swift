import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMITestIntrospector
import Logging
import Synchronization
import Testing

@testable import KVMIBrokerDaemon
@testable import KVMIBrokerOS

#if canImport(Glibc)
    import Glibc
#endif

/// A connected pair of non-blocking unix stream sockets.
func socketPair() throws -> (Descriptor, Descriptor) {
    var fds: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
        throw BrokerError(.io, "socketpair failed", errno: errno)
    }
    return (Descriptor(adopting: fds[0]), Descriptor(adopting: fds[1]))
}

/// The channel fixture: QEMU's side as a separate process whose real command line has `-uuid`.
private let fakeQEMUScript = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures/fake_qemu_channel.py")
    .path
private let systemPython = "/usr/bin/python3"

extension OSLayerTests {
    @Suite("Under load: the reactor, admission, pacing and the session's bounds")
    struct LoadTests {
        @Test("a reader and a writer wait on one descriptor at once; both are woken, nothing stays registered")
        func readAndWriteWaitersShareOneDescriptor() async throws {
            let reactor = IOReactor()
            let (near, far) = try socketPair()
            // Fill the send buffer so the writer must wait.
            var chunk = [UInt8](repeating: 7, count: 65_536)
            while send(near.raw, &chunk, chunk.count, Int32(MSG_DONTWAIT)) > 0 {}
            #expect(errno == EAGAIN)
            async let read = reactor.wait(for: .readable, on: near.raw, until: .now.advanced(by: .seconds(60)))
            async let write = reactor.wait(for: .writable, on: near.raw, until: .now.advanced(by: .seconds(60)))
            // Both registered on the same descriptor (one epoll registration, combined mask).
            while reactor.footprint.waiters < 2 { await Task.yield() }
            #expect(reactor.footprint.descriptors == 1)
            // The far side reads everything (the writer may go on) and answers (the reader may go on).
            var sink = [UInt8](repeating: 0, count: 65_536)
            while recv(far.raw, &sink, sink.count, Int32(MSG_DONTWAIT)) > 0 {}
            _ = send(far.raw, "x", 1, 0)
            let (readable, writable) = try await (read, write)
            #expect(readable.contains(.readable))
            #expect(writable.contains(.writable))
            #expect(reactor.footprint.descriptors == 0 && reactor.footprint.waiters == 0)
            // A wait cancelled before it registered ends at once and leaves no token behind.
            let cancelled = Task {
                withUnsafeCurrentTask { $0?.cancel() }
                return try await reactor.wait(for: .readable, on: near.raw, until: nil)
            }
            await #expect(throws: BrokerError.self) { try await cancelled.value }
            #expect(reactor.pendingTokens == 0 && reactor.footprint.waiters == 0)
        }

        @Test("deadlines of waits that ended early do not pile up in the reactor")
        func resolvedDeadlinesAreDropped() async throws {
            let reactor = IOReactor()
            let (near, far) = try socketPair()
            for _ in 0..<2_000 {
                // A one-year deadline per wait, as a channel read had: each wait ends at once.
                async let ready = reactor.wait(for: .readable, on: near.raw, until: .now.advanced(by: .seconds(86_400 * 365)))
                _ = send(far.raw, "x", 1, 0)
                _ = try await ready
                var byte: UInt8 = 0
                _ = recv(near.raw, &byte, 1, 0)
            }
            #expect(reactor.footprint.deadlines < 600, "\(reactor.footprint)")
            #expect(reactor.footprint.waiters == 0)
        }

        @Test("timers fire on the reactor's thread in deadline order; a cancelled one never fires; none stays armed")
        func timersFireInOrderAndCancelledOnesNever() async throws {
            let reactor = IOReactor()
            let fired = Mailbox<String>(capacity: 1)
            let cancelled = Atomic<Bool>(false)
            // Armed from a timer's action, on the reactor's thread, so that none can fire while
            // they are being armed and cancelled: the order below depends on the deadlines only.
            _ = reactor.schedule(at: .now) {
                let now = ContinuousClock.now
                _ = reactor.schedule(at: now.advanced(by: .milliseconds(30))) { fired.post("late") }
                let doomed = reactor.schedule(at: now) { fired.post("cancelled") }
                cancelled.store(reactor.cancel(doomed), ordering: .relaxed)
                _ = reactor.schedule(at: now.advanced(by: .milliseconds(10))) { fired.post("early on \(currentThread().name)") }
            }
            #expect(await fired.next() == "early on kvmib-reactor")
            #expect(await fired.next() == "late")
            let wasCancelled = cancelled.load(ordering: .relaxed)
            #expect(wasCancelled)
            #expect(fired.count == 0)
            #expect(reactor.timerCount == 0)
        }

        @Test("cancelled timers do not pile up in the reactor's deadline heap")
        func cancelledTimersAreDropped() async throws {
            let reactor = IOReactor()
            // A live timer due before all of them keeps the cancelled ones from reaching the
            // heap's top (where each loop turn drops them anyway): only the bulk drop can.
            let live = reactor.schedule(at: .now.advanced(by: .seconds(86_400 * 300))) {}
            for _ in 0..<2_000 {
                // A one-year timer, cancelled at once (as a session's RESULT timer is when the RESULT comes).
                let timer = reactor.schedule(at: .now.advanced(by: .seconds(86_400 * 365))) {}
                #expect(reactor.cancel(timer))
            }
            let fired = Mailbox<Bool>(capacity: 1)
            _ = reactor.schedule(at: .now) { fired.post(true) }
            #expect(await fired.next() == true)
            #expect(reactor.footprint.deadlines < 600, "\(reactor.footprint)")
            #expect(reactor.timerCount == 1)
            #expect(reactor.cancel(live))
            #expect(reactor.timerCount == 0)
        }

        @Test(
            "out of descriptors with guests connected, accept tries again within its bound though no guest leaves; a guest leaving ends the wait at once",
            .timeLimit(.minutes(1)))
        func outOfDescriptorsWaitIsBounded() async throws {
            let reactor = IOReactor()
            let admission = ConnectionAdmission(maximumConnections: 8, maximumGreeting: 2)
            admission.admitted()
            // No connection ends (guests stay for days): the bound ends the wait. Before, accept
            // waited for a guest to leave, though the descriptors that ran out were handshake
            // sockets that close on their own.
            await admission.waitForAnEnd(orAfter: .milliseconds(1), on: reactor)
            #expect(admission.counts.live == 1)
            // A connection that ends wakes it, however long the bound: the waiter is either in
            // place when one of the two ends comes, or finds none live.
            admission.admitted()
            let woken = Mailbox<Bool>(capacity: 1)
            let waiting = Task {
                await admission.waitForAnEnd(orAfter: .seconds(3600), on: reactor)
                woken.post(true)
            }
            admission.ended()
            admission.ended()
            #expect(await woken.next() == true)
            await waiting.value
            #expect(reactor.timerCount == 0)
        }

        @Test("an introspector that accepts one guest at a time, with a backlog of 0: every handshake gets its turn")
        func backlogZeroIntrospector() async throws {
            let path = temporarySocketPath("serial-tool")
            let listener = Descriptor(adopting: socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0))
            defer { unlink(path) }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
            }
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener.raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            #expect(bound == 0)
            #expect(listen(listener.raw, 0) == 0)
            let guests = 12
            // One guest at a time, as libkvmi: accept, read the struct, answer, then the next.
            let served = Tally()
            let tool = Thread {
                for _ in 0..<guests {
                    let connection = accept(listener.raw, nil, nil)
                    guard connection >= 0 else { return }
                    var request = [UInt8](repeating: 0, count: 104)
                    var got = 0
                    while got < 104 {
                        let count = request.withUnsafeMutableBytes { recv(connection, $0.baseAddress! + got, 104 - got, 0) }
                        if count <= 0 { break }
                        got += count
                    }
                    // Counted before the reply: once the last handshake has its reply, every
                    // guest is already counted (counting after it raced the test's end).
                    served.record(0)
                    let reply = HandshakeReply.encoded(cookieHash: CookieHash(secret: testSecret))
                    _ = reply.withUnsafeBytes { send(connection, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    close(connection)
                }
            }
            tool.start()
            let connector = IntrospectorConnector(pacer: HandshakePacer(limit: 4))
            let endpoint = IntrospectorEndpoint.unix(path: path)
            let results = await withTaskGroup(of: Result<Int, BrokerError>.self) { group in
                for _ in 0..<guests {
                    group.addTask {
                        do {
                            return .success(try await connector.connectAndHandshake(to: endpoint, parameters(timeout: .seconds(60))).bytesSent)
                        } catch let error as BrokerError {
                            return .failure(error)
                        } catch {
                            return .failure(BrokerError(.io, "\(error)"))
                        }
                    }
                }
                var all: [Result<Int, BrokerError>] = []
                for await result in group { all.append(result) }
                return all
            }
            let failures = results.compactMap { if case .failure(let error) = $0 { error } else { nil } }
            #expect(failures.isEmpty, "\(failures)")
            #expect(served.values.count == guests)
        }

        @Test("the pacer lets at most `limit` run per introspector and serves the rest in arrival order")
        func pacerBoundsAndOrders() async throws {
            let pacer = HandshakePacer(limit: 2)
            let endpoint = IntrospectorEndpoint.unix(path: "/nonexistent/tool.sock")
            let running = Tally()
            let order = Tally()
            let gate = AsyncStream<Void>.makeStream()
            // Two hold their slots until released; the others queue behind them in order.
            let holders = (0..<2).map { index in
                Task {
                    try await pacer.paced(endpoint) {
                        order.record(index)
                        for await _ in gate.stream { break }
                    }
                }
            }
            // Both holders have started (a slot granted is not yet a body that ran: one that starts
            // only after the gate opens would record after the waiters it let in).
            while order.values.count < 2 { await Task.yield() }
            // Each waiter holds its slot until the test lets it go, so exactly one slot is
            // handed over at a time and the order of the grants is observable (two slots
            // granted together may start in either order on two threads).
            let releases = (0..<8).map { _ in AsyncStream<Void>.makeStream() }
            var waiters: [Task<Void, any Error>] = []
            for index in 2..<8 {
                let release = releases[index].stream
                waiters.append(
                    Task {
                        try await pacer.paced(endpoint) {
                            running.enter()
                            order.record(index)
                            for await _ in release { break }
                            running.leave()
                        }
                    })
                while pacer.load(of: endpoint).queued < index - 1 { await Task.yield() }
            }
            #expect(pacer.load(of: endpoint).inFlight == 2 && pacer.load(of: endpoint).queued == 6)
            gate.continuation.finish()
            for holder in holders { try await holder.value }
            // The two freed slots go to the first two in line.
            try #require(await eventuallyAsync { order.values.count >= 4 })
            #expect(Set(order.values[2..<4]) == [2, 3])
            // From then on every release hands one slot to the next in line.
            for (released, next) in zip(2..<6, 4..<8) {
                releases[released].continuation.finish()
                try #require(await eventuallyAsync { order.values.count >= next + 1 }, "no slot was handed over after \(released) let go")
                #expect(order.values[next] == next)
            }
            for index in 6..<8 { releases[index].continuation.finish() }
            for waiter in waiters { try await waiter.value }
            #expect(running.peak <= 2)
            #expect(pacer.load(of: endpoint).inFlight == 0 && pacer.load(of: endpoint).queued == 0)
        }

        @Test("AllowedPeer is checked before a byte of the handshake is sent")
        func allowedPeerBeforeTheHandshake() async throws {
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("peer-tool")), secret: testSecret))
            defer { introspector.stop() }
            var wrong = parameters(timeout: .seconds(60))
            wrong.allowedPeer = PeerRequirement(uids: [getuid() &+ 4242])
            await #expect {
                try await IntrospectorConnector().connectAndHandshake(to: introspector.endpoint, wrong)
            } throws: { error in
                let error = error as? BrokerError
                return error?.code == .authenticationFailed && error?.message.contains("runs as uid \(getuid())") == true
            }
            // The tool saw a connection and not one byte: not the guest's UUID, not its name.
            let record = try #require(introspector.waitForRecords(1, timeout: .seconds(60)).first)
            #expect(record.handshake == nil)
            #expect(record.error?.contains("after 0 handshake bytes") == true, "\(record.error ?? "-")")
            var right = parameters(timeout: .seconds(60))
            right.allowedPeer = PeerRequirement(users: [String(cString: getpwuid(getuid()).pointee.pw_name)])
            _ = try await IntrospectorConnector().connectAndHandshake(to: introspector.endpoint, right)
        }

        @Test("a cancelled guest leaves the introspector's queue")
        func cancelledWhileQueued() async throws {
            let pacer = HandshakePacer(limit: 1)
            let endpoint = IntrospectorEndpoint.unix(path: "/nonexistent/tool.sock")
            let gate = AsyncStream<Void>.makeStream()
            let holder = Task { try await pacer.paced(endpoint) { for await _ in gate.stream { break } } }
            while pacer.load(of: endpoint).inFlight < 1 { await Task.yield() }
            let queued = Task { try await pacer.paced(endpoint) { 1 } }
            while pacer.load(of: endpoint).queued < 1 { await Task.yield() }
            queued.cancel()
            await #expect(throws: BrokerError.self) { try await queued.value }
            #expect(pacer.load(of: endpoint).queued == 0)
            gate.continuation.finish()
            try await holder.value
            #expect(pacer.load(of: endpoint).inFlight == 0 && pacer.load(of: endpoint).queued == 0)
        }
    }
}

/// Records values and a running count with its peak, from any thread.
final class Tally: Sendable {
    private struct State {
        var values: [Int] = []
        var running = 0
        var peak = 0
    }

    private let state = Mutex(State())

    var values: [Int] { state.withLock { $0.values } }
    var peak: Int { state.withLock { $0.peak } }

    func record(_ value: Int) { state.withLock { $0.values.append(value) } }

    func enter() {
        state.withLock { state in
            state.running += 1
            state.peak = max(state.peak, state.running)
        }
    }

    func leave() { state.withLock { $0.running -= 1 } }
}
