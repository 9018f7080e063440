import CKVMIBroker
import KVMIBrokerCore
import Synchronization
import Testing

@testable import KVMIBrokerOS

#if canImport(Glibc)
    import Glibc
#endif

@Suite("A session's channel reader: a readiness callback on the reactor, paused and resumed, stopped")
struct ChannelReaderTests {
    /// What a reader delivered, as text, in order.
    private struct Fixture {
        let reactor = IOReactor()
        let near: Descriptor
        let far: Descriptor
        let delivered = Mailbox<String>(capacity: 64)
        let reader: ChannelReader

        /// `pauseAfter`: the frame seq after which `deliver` asks for a pause.
        init(pauseAfter: UInt32? = nil) throws {
            (near, far) = try socketPair()
            let delivered = delivered
            reader = ChannelReader(ChannelSocket(near, io: AsyncSocketIO(reactor: reactor))) { event, _ in
                switch event {
                case .frame(let frame):
                    delivered.post("\(frame.seq) on \(currentThread().name)")
                    return frame.seq != pauseAfter
                case .closed(let error):
                    delivered.post("closed \(error.map { "\($0.code)" } ?? "cleanly")")
                    return false
                }
            }
        }

        func send(_ seqs: ClosedRange<UInt32>) {
            // EVENT's smallest payload (24 bytes: its header, no event data).
            let bytes = seqs.flatMap { Channel.Frame(.event, seq: $0, payload: [UInt8](repeating: 0, count: 24)).encoded() }
            #expect(Glibc.send(far.raw, bytes, bytes.count, 0) == bytes.count)
        }

        /// Returns once the reactor has finished the turn it is in (a timer's action runs after
        /// that turn's readiness callbacks): whatever a callback was going to deliver is delivered.
        func reactorTurn() async {
            let done = Mailbox<Bool>(capacity: 1)
            _ = reactor.schedule(at: .now) { done.post(true) }
            _ = await done.next()
        }
    }

    @Test("frames come in order on the reactor's thread; paused, nothing is armed until resumed; the end comes once")
    func orderPauseResumeEnd() async throws {
        let fixture = try Fixture(pauseAfter: 2)
        fixture.send(1...3)
        fixture.reader.start()
        #expect(await fixture.delivered.next() == "1 on kvmib-reactor")
        #expect(await fixture.delivered.next() == "2 on kvmib-reactor")
        // Frame 3 came in the same read as 1 and 2, but the paused reader delivers nothing and
        // waits for nothing.
        await fixture.reactorTurn()
        #expect(fixture.delivered.count == 0)
        #expect(fixture.reactor.footprint.waiters == 0)
        // Resumed, it delivers frame 3 from what it read, with nothing more from the socket,
        // still on the reactor's thread (two turns: the first has run the resumption's).
        fixture.reader.resume()
        await fixture.reactorTurn()
        await fixture.reactorTurn()
        try #require(fixture.delivered.count == 1)
        #expect(await fixture.delivered.next() == "3 on kvmib-reactor")
        fixture.send(4...4)
        #expect(await fixture.delivered.next() == "4 on kvmib-reactor")
        // Paused with frame 6 still in the socket: nothing is read until resumed.
        let paused = try Fixture(pauseAfter: 5)
        paused.send(5...5)
        paused.reader.start()
        #expect(await paused.delivered.next() == "5 on kvmib-reactor")
        paused.send(6...6)
        await paused.reactorTurn()
        #expect(paused.delivered.count == 0 && paused.reactor.footprint.waiters == 0)
        paused.reader.resume()
        #expect(await paused.delivered.next() == "6 on kvmib-reactor")
        paused.reader.stop()
        fixture.far.close()
        #expect(await fixture.delivered.next() == "closed cleanly")
        await fixture.reactorTurn()
        #expect(fixture.delivered.count == 0)
        #expect(fixture.reactor.footprint.descriptors == 0 && fixture.reactor.footprint.waiters == 0)
    }

    @Test("frames QEMU sent right behind HELLO: what the socket's receive read past HELLO goes to the reader, in order")
    func framesBehindHello() async throws {
        let fixture = try Fixture()
        let socket = ChannelSocket(fixture.near, io: AsyncSocketIO(reactor: fixture.reactor))
        let hello = Channel.Frame(.hello, seq: 1, payload: [UInt8](repeating: 0, count: Channel.Hello.sizeV1))
        let behind = (2...3).flatMap { Channel.Frame(.event, seq: UInt32($0), payload: [UInt8](repeating: 0, count: 24)).encoded() }
        let bytes = hello.encoded() + behind + Array(Channel.Frame(.event, seq: 4, payload: [UInt8](repeating: 0, count: 24)).encoded().prefix(10))
        #expect(Glibc.send(fixture.far.raw, bytes, bytes.count, 0) == bytes.count)
        #expect(try await socket.receive(until: nil) == hello)
        // The rest of frame 4 comes from the socket, after what was read with HELLO.
        let rest = Array(Channel.Frame(.event, seq: 4, payload: [UInt8](repeating: 0, count: 24)).encoded().dropFirst(10))
        #expect(Glibc.send(fixture.far.raw, rest, rest.count, 0) == rest.count)
        fixture.far.close()
        let delivered = Mailbox<String>(capacity: 8)
        let reader = ChannelReader(socket) { event, _ in
            switch event {
            case .frame(let frame): delivered.post("\(frame.seq) on \(currentThread().name)")
            case .closed(let error): delivered.post("closed \(error.map { "\($0.code)" } ?? "cleanly")")
            }
            return true
        }
        reader.start()
        try #require(await delivered.next() == "2 on kvmib-reactor")
        try #require(await delivered.next() == "3 on kvmib-reactor")
        try #require(await delivered.next() == "4 on kvmib-reactor")
        #expect(await delivered.next() == "closed cleanly")
        reader.stop()
    }

    @Test("stop between start and the reactor's turn that would deliver frames read with HELLO: nothing is delivered, no timer stays")
    func stopBeforeTheTurn() async throws {
        let fixture = try Fixture()
        let socket = ChannelSocket(fixture.near, io: AsyncSocketIO(reactor: fixture.reactor))
        let hello = Channel.Frame(.hello, seq: 1, payload: [UInt8](repeating: 0, count: Channel.Hello.sizeV1))
        let bytes = hello.encoded() + Channel.Frame(.event, seq: 2, payload: [UInt8](repeating: 0, count: 24)).encoded()
        #expect(Glibc.send(fixture.far.raw, bytes, bytes.count, 0) == bytes.count)
        #expect(try await socket.receive(until: nil) == hello)
        let delivered = Mailbox<String>(capacity: 8)
        let reader = ChannelReader(socket) { event, _ in
            if case .frame(let frame) = event { delivered.post("\(frame.seq)") }
            return true
        }
        let timersBefore = fixture.reactor.timerCount
        // On the reactor's thread, so that its turn cannot come between the two calls.
        let done = Mailbox<Bool>(capacity: 1)
        _ = fixture.reactor.schedule(at: .now) {
            reader.start()
            reader.stop()
            done.post(true)
        }
        _ = await done.next()
        // The turn `start` asked for was cancelled with the reading.
        #expect(fixture.reactor.timerCount == timersBefore)
        await fixture.reactorTurn()
        await fixture.reactorTurn()
        #expect(delivered.count == 0)
        #expect(fixture.reactor.footprint.waiters == 0 && fixture.reactor.footprint.descriptors == 0)
    }

    @Test("stop: nothing is delivered once it returns, and nothing stays registered")
    func stopEndsDelivery() async throws {
        let fixture = try Fixture()
        fixture.reader.start()
        #expect(fixture.reactor.footprint.waiters == 1)
        fixture.reader.stop()
        #expect(fixture.reactor.footprint.waiters == 0 && fixture.reactor.footprint.descriptors == 0)
        fixture.send(1...2)
        fixture.reader.resume()
        fixture.reader.start()
        await fixture.reactorTurn()
        #expect(fixture.delivered.count == 0)
    }

    @Test("a frame split over several reads is put together; a descriptor from the peer ends the reading as a protocol violation")
    func partialFramesAndDescriptors() async throws {
        let fixture = try Fixture()
        fixture.reader.start()
        let bytes = Channel.Frame(.event, seq: 7, payload: [UInt8](repeating: 9, count: 300)).encoded()
        #expect(Glibc.send(fixture.far.raw, bytes, 10, 0) == 10)
        await fixture.reactorTurn()
        #expect(Glibc.send(fixture.far.raw, Array(bytes[10...]), bytes.count - 10, 0) == bytes.count - 10)
        #expect(await fixture.delivered.next() == "7 on kvmib-reactor")
        let frame = Channel.Frame(.event, seq: 8, payload: [UInt8](repeating: 0, count: 24)).encoded()
        let passed = try socketPair()
        let sent = frame.withUnsafeBytes { kvmib_send_with_fd(fixture.far.raw, $0.baseAddress, $0.count, passed.0.raw) }
        #expect(sent == frame.count)
        #expect(await fixture.delivered.next() == "closed protocolViolation")
        #expect(fixture.reactor.footprint.waiters == 0)
    }

    @Test(
        "feeding a mailbox: a stream of frames pauses the reader past the mailbox's capacity and the consumer's takes resume it; all arrive, in order"
    )
    func feedingAMailboxUnderAStream() async throws {
        let reactor = IOReactor()
        let (near, far) = try socketPair()
        let inputs = Mailbox<String>(capacity: 1)
        let reader = ChannelReader(
            ChannelSocket(near, io: AsyncSocketIO(reactor: reactor)), feeding: inputs, frame: { "\($0.seq)" },
            closed: { "closed \($0.map { "\($0.code)" } ?? "cleanly")" })
        // 50 frames at once: far more than the mailbox holds, so the reader pauses again and again.
        let bytes = (1...50).flatMap { Channel.Frame(.event, seq: UInt32($0), payload: [UInt8](repeating: 0, count: 24)).encoded() }
        #expect(Glibc.send(far.raw, bytes, bytes.count, 0) == bytes.count)
        far.close()
        reader.start()
        var received: [String] = []
        while let input = await inputs.next() {
            received.append(input)
            // At most capacity + 1 frames are ever queued.
            #expect(inputs.count <= 2)
            if input.hasPrefix("closed") { break }
        }
        #expect(received == (1...50).map { "\($0)" } + ["closed cleanly"])
        #expect(inputs.pausedProducers == 0)
        #expect(reactor.footprint.waiters == 0 && reactor.footprint.descriptors == 0)
        reader.stop()
    }
}
