import Testing

@testable import KVMIBrokerCore

@Suite("Broker <-> QEMU channel codec")
struct ChannelCodecTests {
    static let hello = Channel.Hello(
        version: 1, flags: [.required, .held], pid: 4242, uuid: GuestUUID("6695eb01-f6a4-8304-79aa-97f2502e193f")!, startTime: 1_700_000_000,
        maxGPA: 0x1_2000_0000, hookedABI: nil, capV12: 1, capV7: 0, introspectionParameter: -1, name: "win10")

    @Test("a frame is a 16-byte little-endian header and its payload")
    func frameGolden() {
        let bytes = Channel.Frame(.unhook, seq: 7, payload: [0xAA]).encoded()
        #expect(bytes == [0x4B, 0x56, 0x4D, 0x49, 0x13, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0xAA])
    }

    @Test("HELLO version 1 has the documented offsets and round-trips")
    func helloLayout() throws {
        let payload = Self.hello.encoded()
        #expect(payload.count == 120)
        #expect(payload.read(UInt16.self, at: 0, order: .little) == 1)
        #expect(payload.read(UInt16.self, at: 2, order: .little) == 0b110)
        #expect(payload.read(UInt32.self, at: 4, order: .little) == 4242)
        #expect(Array(payload[8..<24]) == Self.hello.uuid.bytes)
        #expect(payload.read(Int64.self, at: 24, order: .little) == 1_700_000_000)
        #expect(payload.read(UInt64.self, at: 32, order: .little) == 0x1_2000_0000)
        #expect(payload[40] == 0)
        #expect(payload.read(Int32.self, at: 52, order: .little) == -1)
        #expect(Array(payload[56..<61]) == Array("win10".utf8))
        #expect(try Channel.Hello(decoding: payload) == Self.hello)
        // A longer payload from a later version decodes; its tail is ignored.
        #expect(try Channel.Hello(decoding: payload + [1, 2, 3]) == Self.hello)
        // Version 1 has no record of what was applied, whatever follows its 120 bytes.
        #expect(try Channel.Hello(decoding: payload + [UInt8](repeating: 9, count: 64)).applied == nil)
    }

    @Test("HELLO version 2: the applied record follows the 120 bytes of version 1; zeros mean none; it is validated")
    func helloVersion2() throws {
        let applied = try #require(Channel.Applied(introspector: [UInt8](repeating: 0xA1, count: 32), lists: [UInt8](repeating: 0xB2, count: 32)))
        var hello = Self.hello
        hello.version = 2
        hello.flags = [.hooked, .running]
        hello.hookedABI = .v12
        hello.applied = applied
        let payload = hello.encoded()
        #expect(payload.count == 184)
        #expect(payload.read(UInt16.self, at: 0, order: .little) == 2)
        #expect(Array(payload[120..<152]) == applied.introspector && Array(payload[152..<184]) == applied.lists)
        #expect(try Channel.Hello(decoding: payload) == hello)
        #expect(try Channel.Hello(decoding: payload + [1, 2, 3]) == hello)
        // Not hooked: zeros, decoded as no record.
        var idle = Self.hello
        idle.version = 2
        #expect(idle.encoded().count == 184 && idle.encoded()[120...].allSatisfy { $0 == 0 })
        #expect(try Channel.Hello(decoding: idle.encoded()).applied == nil)
        // A version 2 HELLO without its tail, or with a record but not hooked, is malformed.
        #expect(throws: BrokerError.self) { try Channel.Hello(decoding: Array(payload.prefix(120))) }
        var notHooked = Array(payload)
        notHooked[2] = 0
        #expect(throws: BrokerError.self) { try Channel.Hello(decoding: notHooked) }
        // One field set is not a record QEMU keeps: unknown.
        var half = Array(payload)
        for index in 152..<184 { half[index] = 0 }
        #expect(try Channel.Hello(decoding: half).applied == nil)
        // Peer bytes reach a log as hex only.
        #expect("\(applied)" == "introspector a1a1a1a1a1a1a1a1, lists b2b2b2b2b2b2b2b2")
        #expect(Channel.Applied(introspector: [1], lists: applied.lists) == nil)
    }

    @Test("versions: WELCOME answers the lower of QEMU's and the broker's")
    func negotiation() {
        #expect(Channel.negotiatedVersion(1) == 1)
        #expect(Channel.negotiatedVersion(2) == 2)
        #expect(Channel.negotiatedVersion(7) == Channel.version)
    }

    @Test("HOOK and SET_ALLOWED version 2: the applied record follows the ids; the lists' digest covers ABI and ids")
    func allowListsApplied() throws {
        let lists = try Channel.AllowLists(abi: .v12, commands: [12, 10], events: [0])
        let applied = try #require(Channel.Applied(introspector: [UInt8](repeating: 3, count: 32), lists: lists.digest))
        let bytes = lists.encoded(applied: applied)
        #expect(bytes.count == 8 + 12 + 64)
        #expect(Array(bytes[20...]) == applied.encoded())
        #expect(try Channel.AllowLists(decoding: bytes) == lists)
        #expect(Channel.AllowLists.applied(inPayload: bytes) == applied)
        #expect(Channel.AllowLists.applied(inPayload: lists.encoded()) == nil)
        #expect(lists.digest.count == 32 && lists.digest == lists.digest)
        #expect(lists.digest != (try Channel.AllowLists(abi: .v12, commands: [12], events: [0])).digest)
        #expect(lists.digest != (try Channel.AllowLists(abi: .v7, commands: [12, 10], events: [0])).digest)
        #expect(lists.digest != (try Channel.AllowLists(abi: .v12, commands: [12], events: [10, 0])).digest)
    }

    @Test("HOOK allow-lists: abi, counts, then ids")
    func allowLists() throws {
        let lists = try Channel.AllowLists(abi: .v12, commands: [-1], events: [0, 5])
        let bytes = lists.encoded()
        #expect(bytes == [12, 0, 1, 0, 2, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 5, 0, 0, 0])
        #expect(try Channel.AllowLists(decoding: bytes) == lists)
        #expect(throws: BrokerError.self) { try Channel.AllowLists(abi: .v7, commands: [-1, 3], events: []) }
        #expect(throws: BrokerError.self) { try Channel.AllowLists(abi: .v7, commands: Array(0..<65), events: []) }
        #expect(throws: BrokerError.self) { try Channel.AllowLists(decoding: [12, 0, 5, 0, 0, 0, 0, 0, 1, 0, 0, 0]) }
    }

    @Test("RESULT and EVENT round-trip")
    func resultAndEvent() throws {
        let result = Channel.Result(requestType: 0x10, step: .hook, hooked: false, error: 25, failedID: -1)
        #expect(result.encoded().count == 16)
        #expect(try Channel.Result(decoding: result.encoded()) == result)
        let event = Channel.Event(kind: .reset, error: 0, startTime: 99, hooked: false, running: true)
        #expect(event.encoded().count == 24)
        #expect(try Channel.Event(decoding: event.encoded()) == event)
    }

    @Test("the frame reader is bounded and rejects garbage")
    func frameReader() throws {
        var reader = Channel.FrameReader()
        let frame = Channel.Frame(.hello, seq: 1, payload: Self.hello.encoded())
        let bytes = frame.encoded()
        var decoded: Channel.Frame?
        var offset = 0
        while decoded == nil {
            let take = min(reader.readLimit, 5)
            decoded = try reader.consume(bytes[offset..<offset + take])
            offset += take
        }
        #expect(decoded == frame && offset == bytes.count)
        var bad = Channel.FrameReader()
        #expect(throws: BrokerError.self) { _ = try bad.consume([UInt8](repeating: 0x41, count: 16)) }
        var huge = Channel.FrameReader()
        #expect(throws: BrokerError.self) {
            _ = try huge.consume(Channel.Frame(type: 0x40, seq: 1, payload: []).encoded().prefix(12) + [0x01, 0x10, 0, 0])
        }
        var short = Channel.FrameReader()
        #expect(throws: BrokerError.self) { _ = try short.consume(Channel.Frame(.hello, seq: 1, payload: [1, 2]).encoded().prefix(16)) }
    }

    @Test("one read may take several frames and the start of another: each comes out whole, in order, and the reader stays bounded")
    func frameReaderTakesFramesWhole() throws {
        let frames = (1...3).map { Channel.Frame(.event, seq: UInt32($0), payload: [UInt8](repeating: UInt8($0), count: 24 + $0)) }
        let stream = frames.flatMap { $0.encoded() }
        var reader = Channel.FrameReader()
        #expect(reader.room == Channel.FrameReader.capacity && reader.readLimit == Channel.headerSize)
        // The first two frames and 20 bytes of the third (its header and 4 bytes of payload).
        let firstRead = frames[0].encoded().count + frames[1].encoded().count + 20
        #expect(try reader.consume(stream[..<firstRead]) == frames[0])
        #expect(reader.hasFrame)
        #expect(try reader.next() == frames[1])
        #expect(!reader.hasFrame && !reader.atFrameBoundary)
        #expect(try reader.next() == nil)
        // Exactly the rest of the third frame is left to read; the reader may take more.
        #expect(reader.readLimit == stream.count - firstRead)
        #expect(reader.room == Channel.FrameReader.capacity - 20)
        #expect(try reader.consume(stream[firstRead...]) == frames[2])
        #expect(reader.atFrameBoundary && !reader.hasFrame && reader.room == Channel.FrameReader.capacity)
        // A bad header behind a good frame is reported by `next`, and `hasFrame` says it is there.
        var behind = Channel.FrameReader()
        #expect(try behind.consume(frames[0].encoded() + [UInt8](repeating: 0x41, count: 16)) == frames[0])
        #expect(behind.hasFrame)
        #expect(throws: BrokerError.self) { _ = try behind.next() }
    }
}

@Suite("Guest session state machine")
struct GuestSessionMachineTests {
    let lists: Channel.AllowLists

    init() throws {
        lists = try Channel.AllowLists(abi: .v12, commands: [-1], events: [-1])
    }

    /// The decided introspector's id, as the driver computes it from the plan.
    let toolID = [UInt8](repeating: 7, count: 32)

    /// A hooked HELLO says (version 2) it was hooked with `toolID` and `lists` unless told otherwise.
    func hello(_ flags: Channel.Hello.Flags = [.running], abi: ABIGeneration? = nil, applied: Channel.Applied? = nil) -> Channel.Hello {
        Channel.Hello(
            flags: flags, pid: 1, uuid: .zero, startTime: 1, maxGPA: 0, hookedABI: abi, capV12: 0, capV7: 0, introspectionParameter: -1, name: "g",
            applied: applied ?? (flags.contains(.hooked) ? Channel.Applied(introspector: toolID, lists: lists.digest) : nil))
    }

    func event(_ kind: Channel.Event.Kind, running: Bool = true) -> Channel.Event {
        Channel.Event(kind: kind, error: 0, startTime: 2, hooked: false, running: running)
    }

    @Test("HELLO -> handshake -> HOOK -> hooked")
    func happyPath() {
        var machine = GuestSessionMachine(allowLists: lists)
        #expect(machine.handle(.helloAccepted(hello(), introspect: true)) == [.sendWelcome, .startHandshake])
        #expect(machine.handle(.handshakeSucceeded) == [.sendHook(lists)])
        let actions = machine.handle(.result(Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1)))
        #expect(machine.state == .hooked(.v12))
        #expect(actions == [.succeeded("guest hooked (ABI v12)"), .scheduleSurvivalCheck])
    }

    @Test("a guest outside the policy is released and left alone")
    func notIntrospected() {
        var machine = GuestSessionMachine(allowLists: lists)
        let actions = machine.handle(.helloAccepted(hello([.held, .required]), introspect: false))
        #expect(actions.contains(.sendRelease) && !actions.contains(.startHandshake))
        #expect(machine.state == .notIntrospected)
        #expect(machine.handle(.event(event(.resumed))).contains(.startHandshake) == false)
    }

    @Test("a QEMU that is already hooked is not hooked twice")
    func alreadyHooked() {
        var machine = GuestSessionMachine(allowLists: lists)
        let actions = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: toolID))
        #expect(!actions.contains(.startHandshake))
        #expect(machine.state == .hooked(.v12))
    }

    @Test("HOOK failing with ENOTTY: a failure naming the missing kernel support, then back-off; the driver's streak decides what is logged")
    func enotty() {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello(), introspect: true))
        _ = machine.handle(.handshakeSucceeded)
        let failed = Channel.Result(requestType: 0x10, step: .hook, hooked: false, error: 25, failedID: -1)
        let first = machine.handle(.result(failed))
        guard case .failing(let text) = first.first else {
            Issue.record("no failure: \(first)")
            return
        }
        #expect(text.contains("the host kernel has no KVM introspection") && text.contains("ENOTTY"))
        #expect(first.last == .scheduleRetry(afterFailures: 1))
        #expect(machine.handle(.retryDue) == [.startHandshake])
        _ = machine.handle(.handshakeSucceeded)
        let second = machine.handle(.result(failed))
        #expect(second == [.failing(text), .scheduleRetry(afterFailures: 2)])
        #expect(!second.contains { if case .log = $0 { return true } else { return false } })
        #expect(machine.handle(.retryDue) == [.startHandshake])
        _ = machine.handle(.handshakeSucceeded)
        #expect(
            machine.handle(.result(Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1))) == [
                .succeeded("guest hooked (ABI v12)"), .scheduleSurvivalCheck,
            ])
    }

    @Test("hooks that end before they survive do not reset the back-off; 3 in a row is flapping; a hook that lasts clears it")
    func flapping() {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello(), introspect: true))
        let hooked = Channel.Result(requestType: 0x10, step: .none, hooked: true, error: 0, failedID: -1)
        for round in 1...4 {
            _ = machine.handle(.handshakeSucceeded)
            #expect(machine.handle(.result(hooked)).contains(.scheduleSurvivalCheck))
            let actions = machine.handle(.event(event(.toolHangup)))
            #expect(actions.contains(.scheduleRetry(afterFailures: round)), "round \(round): \(actions)")
            #expect(machine.isFlapping == (round >= GuestSessionMachine.flappingThreshold))
            #expect(machine.handle(.retryDue) == [.startHandshake])
        }
        _ = machine.handle(.handshakeSucceeded)
        _ = machine.handle(.result(hooked))
        #expect(machine.handle(.hookSurvived).contains { if case .log = $0 { return true } else { return false } })
        #expect(!machine.isFlapping && machine.failures == 0)
        #expect(machine.handle(.event(event(.toolHangup))).contains(.scheduleRetry(afterFailures: 1)))
        #expect(machine.shortLivedHooks == 0)
    }

    @Test("pause stops the attempts; resume starts a new handshake")
    func pauseResume() {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello(), introspect: true))
        _ = machine.handle(.handshakeFailed(BrokerError(.timedOut, "x")))
        #expect(machine.handle(.event(event(.paused, running: false))).contains(.cancelRetry))
        #expect(machine.state == .suspended(.paused))
        #expect(machine.handle(.retryDue) == [])
        #expect(machine.handle(.event(event(.resumed))).contains(.startHandshake))
    }

    @Test("a tool hang-up reconnects after the back-off, never at once")
    func hangup() {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: toolID))
        let actions = machine.handle(.event(event(.toolHangup)))
        #expect(actions.contains(.scheduleRetry(afterFailures: 1)) && !actions.contains(.startHandshake))
    }

    @Test("a handshake that completes after a pause is dropped, not hooked")
    func lateHandshake() {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello(), introspect: true))
        _ = machine.handle(.event(event(.paused, running: false)))
        #expect(machine.handle(.handshakeSucceeded) == [.dropHandshake])
    }

    @Test("a VM that does not run yet (-S) is not hooked until QEMU says it runs; a held one is hooked at once")
    func waitsForTheVM() {
        var machine = GuestSessionMachine(allowLists: lists)
        #expect(machine.handle(.helloAccepted(hello([]), introspect: true)) == [.sendWelcome])
        #expect(machine.state == .waitingForVM)
        #expect(machine.handle(.event(event(.resumed))).contains(.startHandshake))
        var held = GuestSessionMachine(allowLists: lists)
        #expect(held.handle(.helloAccepted(hello([.required, .held]), introspect: true)).contains(.startHandshake))
    }

    @Test("QEMU's hooked flag is the truth: a stop it did not intercept leaves the session hooked")
    func uninterceptedStop() {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: toolID))
        _ = machine.handle(.event(Channel.Event(kind: .paused, error: 0, startTime: 1, hooked: true, running: false)))
        #expect(machine.state == .hooked(.v12))
        #expect(
            machine.handle(.event(Channel.Event(kind: .resumed, error: 0, startTime: 1, hooked: true, running: true))).contains(.startHandshake)
                == false)
    }

    @Test("an outgoing migration suspends even though the VM still runs; a failed one re-handshakes")
    func migration() {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: toolID))
        #expect(!machine.handle(.event(event(.migrationOut, running: true))).contains(.startHandshake))
        #expect(machine.state == .suspended(.migrationOut))
        #expect(machine.handle(.event(event(.migrationFailed))).contains(.startHandshake))
    }

    @Test("policy change on a hooked guest: new lists -> SET_ALLOWED; withdrawn -> PREUNHOOK, UNHOOK at the deadline; new tool -> hand over")
    func policyChanges() throws {
        let other = try Channel.AllowLists(abi: .v12, commands: [12], events: [0])
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: toolID))
        #expect(machine.handle(.policyChanged(introspect: true, allowLists: lists, sameIntrospector: true)) == [])
        #expect(machine.handle(.policyChanged(introspect: true, allowLists: other, sameIntrospector: true)).contains(.sendSetAllowed(other)))
        _ = machine.handle(.result(Channel.Result(requestType: 0x11, step: .none, hooked: true, error: 0, failedID: -1)))
        #expect(machine.state == .hooked(.v12) && machine.allowLists == other)

        #expect(machine.handle(.policyChanged(introspect: false, allowLists: other, sameIntrospector: true)).contains(.sendPreunhook))
        #expect(
            machine.handle(.result(Channel.Result(requestType: 0x12, step: .none, hooked: true, error: 0, failedID: -1))) == [.scheduleUnhookDeadline]
        )
        #expect(machine.handle(.unhookDeadline).contains(.sendUnhook))
        _ = machine.handle(.result(Channel.Result(requestType: 0x13, step: .none, hooked: false, error: 0, failedID: -1)))
        #expect(machine.state == .notIntrospected)

        var handOver = GuestSessionMachine(allowLists: lists)
        _ = handOver.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: toolID))
        #expect(handOver.handle(.policyChanged(introspect: true, allowLists: other, sameIntrospector: false)).contains(.sendPreunhook))
        // The tool lets go: QEMU's TOOL_HANGUP says unhooked; the new introspector takes over at once.
        let actions = handOver.handle(.event(Channel.Event(kind: .toolHangup, error: 0, startTime: 1, hooked: false, running: true)))
        #expect(actions.contains(.adoptNewIntrospector) && actions.contains(.startHandshake))
    }

    @Test("a reload while SET_ALLOWED is in flight is applied when QEMU answers, never lost behind it")
    func reloadDuringUpdate() throws {
        let second = try Channel.AllowLists(abi: .v12, commands: [12], events: [0])
        let third = try Channel.AllowLists(abi: .v12, commands: [10], events: [0])
        let ok = Channel.Result(requestType: 0x11, step: .none, hooked: true, error: 0, failedID: -1)
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: toolID))
        #expect(machine.handle(.policyChanged(introspect: true, allowLists: second, sameIntrospector: true)).contains(.sendSetAllowed(second)))
        #expect(machine.handle(.policyChanged(introspect: true, allowLists: third, sameIntrospector: true)) == [])
        #expect(machine.handle(.result(ok)).contains(.sendSetAllowed(third)))
        #expect(machine.state == .updating)
        _ = machine.handle(.result(ok))
        #expect(machine.state == .hooked(.v12) && machine.allowLists == third)

        // Back to what is in flight: nothing more to send.
        #expect(machine.handle(.policyChanged(introspect: true, allowLists: second, sameIntrospector: true)).contains(.sendSetAllowed(second)))
        _ = machine.handle(.policyChanged(introspect: true, allowLists: lists, sameIntrospector: true))
        _ = machine.handle(.policyChanged(introspect: true, allowLists: second, sameIntrospector: true))
        #expect(!machine.handle(.result(ok)).contains(.sendSetAllowed(second)))
        #expect(machine.state == .hooked(.v12))

        // Withdrawn, or another introspector, meanwhile: unhooked once QEMU answers.
        #expect(machine.handle(.policyChanged(introspect: true, allowLists: third, sameIntrospector: true)).contains(.sendSetAllowed(third)))
        _ = machine.handle(.policyChanged(introspect: true, allowLists: third, sameIntrospector: false))
        #expect(machine.handle(.result(ok)).contains(.sendPreunhook))
        #expect(machine.state == .unhooking)
    }

    @Test("PREUNHOOK refused (the tool never enabled the unhook event): UNHOOK at once")
    func preunhookRefused() {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: toolID))
        _ = machine.handle(.policyChanged(introspect: false, allowLists: lists, sameIntrospector: true))
        #expect(
            machine.handle(.result(Channel.Result(requestType: 0x12, step: .preunhook, hooked: true, error: 2, failedID: -1))).contains(.sendUnhook))
    }

    // MARK: - A restart reconciles (QEMU's HELLO says hooked)

    func result(_ type: Channel.MessageType, hooked: Bool, error: Int32 = 0) -> GuestSessionMachine.Input {
        .result(Channel.Result(requestType: type.rawValue, step: error == 0 ? .none : .state, hooked: hooked, error: error, failedID: -1))
    }

    @Test("restart, same introspector and lists: nothing is sent but WELCOME")
    func reconcileUnchanged() {
        var machine = GuestSessionMachine(allowLists: lists)
        let actions = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: toolID))
        #expect(actions.filter { if case .log = $0 { return false } else { return true } } == [.sendWelcome])
        #expect(machine.state == .hooked(.v12) && machine.reconciliation == .unchanged)
    }

    @Test("restart, same introspector, other lists: SET_ALLOWED with the decided lists, through the live-change path")
    func reconcileOtherLists() throws {
        let applied = Channel.Applied(introspector: toolID, lists: try Channel.AllowLists(abi: .v12, commands: [12], events: [0]).digest)
        var machine = GuestSessionMachine(allowLists: lists)
        let actions = machine.handle(
            .helloAccepted(hello([.hooked, .running], abi: .v12, applied: applied), introspect: true, introspectorID: toolID))
        #expect(actions.first == .sendWelcome && actions.last == .sendSetAllowed(lists) && !actions.contains(.sendPreunhook))
        #expect(machine.state == .updating && machine.reconciliation == .setAllowed)
        _ = machine.handle(result(.setAllowed, hooked: true))
        #expect(machine.state == .hooked(.v12))
    }

    @Test("restart, another introspector: PREUNHOOK, and once QEMU has let go a handshake with the decided one")
    func reconcileOtherIntrospector() {
        var machine = GuestSessionMachine(allowLists: lists)
        let other = [UInt8](repeating: 8, count: 32)
        let actions = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: true, introspectorID: other))
        #expect(actions.last == .sendPreunhook && !actions.contains(.startHandshake))
        #expect(machine.state == .unhooking && machine.reconciliation == .handOver)
        #expect(machine.handle(result(.preunhook, hooked: true)) == [.scheduleUnhookDeadline])
        let after = machine.handle(.event(Channel.Event(kind: .toolHangup, error: 0, startTime: 1, hooked: false, running: true)))
        #expect(after.contains(.adoptNewIntrospector) && after.contains(.startHandshake) && !after.contains(.sendRelease))
        #expect(machine.handle(.handshakeSucceeded) == [.sendHook(lists)])
    }

    @Test("restart, hooked with another ABI generation than decided: handed over")
    func reconcileOtherABI() throws {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v7), introspect: true, introspectorID: toolID))
        #expect(machine.reconciliation == .handOver && machine.state == .unhooking)
    }

    @Test("restart, no longer introspected: PREUNHOOK, UNHOOK at the deadline, then RELEASE")
    func reconcileWithdrawn() {
        var machine = GuestSessionMachine(allowLists: lists)
        let actions = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: false, introspectorID: nil))
        #expect(actions.last == .sendPreunhook && machine.reconciliation == .unhookAndRelease)
        #expect(machine.handle(result(.preunhook, hooked: true)) == [.scheduleUnhookDeadline])
        #expect(machine.handle(.unhookDeadline).contains(.sendUnhook))
        let done = machine.handle(result(.unhook, hooked: false))
        #expect(done.last == .sendRelease && !done.contains(.startHandshake))
        #expect(machine.state == .notIntrospected)
    }

    @Test("restart, required by a policy that cannot serve it: left hooked, never unhooked to run unmonitored")
    func reconcileUnservable() {
        var machine = GuestSessionMachine(allowLists: lists)
        let actions = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: false, failsClosed: true))
        #expect(!actions.contains(.sendPreunhook) && !actions.contains(.sendRelease) && !actions.contains(.sendUnhook))
        #expect(machine.state == .hooked(.v12) && machine.reconciliation == .keptRequiredButUnservable)
    }

    @Test("restart, a version 1 QEMU says hooked but not with what: unknown, so unhooked and hooked again per the decision")
    func reconcileUnknown() {
        var machine = GuestSessionMachine(allowLists: lists)
        var old = hello([.hooked, .running], abi: .v12)
        old.version = 1
        old.applied = nil
        let actions = machine.handle(.helloAccepted(old, introspect: true, introspectorID: toolID))
        #expect(actions.last == .sendPreunhook && machine.reconciliation == .unknownRehook)
        // The tool never enabled the unhook event: UNHOOK at once, then a new handshake.
        #expect(machine.handle(result(.preunhook, hooked: true, error: 2)).contains(.sendUnhook))
        let after = machine.handle(result(.unhook, hooked: false))
        #expect(after.contains(.startHandshake) && !after.contains(.sendRelease))
    }

    @Test("restart reconciliation meets a reload: the reload's decision wins once QEMU has let go")
    func reconcileThenReload() {
        var machine = GuestSessionMachine(allowLists: lists)
        _ = machine.handle(.helloAccepted(hello([.hooked, .running], abi: .v12), introspect: false, introspectorID: nil))
        #expect(machine.handle(.policyChanged(introspect: true, allowLists: lists, sameIntrospector: false)) == [])
        let after = machine.handle(.event(Channel.Event(kind: .toolHangup, error: 0, startTime: 1, hooked: false, running: true)))
        #expect(after.contains(.startHandshake) && !after.contains(.sendRelease))
    }
}
