import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMIBrokerPolicy
import Logging

/// Runs one channel connection: HELLO, the identity checks, then `GuestSessionMachine`'s
/// actions. Inputs (QEMU's frames, handshake outcomes, retry timers) arrive on one stream and
/// are handled one at a time, so the machine needs no lock.
final class SessionDriver: Sendable {
    enum Input: Sendable {
        case frame(Channel.Frame)
        case handshake(Result<HandshakeOutcome, BrokerError>)
        case retryDue
        case resultTimeout(seq: UInt32)
        case unhookDeadline
        case policyReloaded
        case closed(BrokerError?)
    }

    let socket: ChannelSocket
    let peer: PeerCredentials
    let configuration: BrokerConfiguration
    let registry: SessionRegistry
    let connector: IntrospectorConnector
    let baseLogger: Logger

    init(
        socket: ChannelSocket, peer: PeerCredentials, configuration: BrokerConfiguration, registry: SessionRegistry,
        connector: IntrospectorConnector, logger: Logger
    ) {
        self.socket = socket
        self.peer = peer
        self.configuration = configuration
        self.registry = registry
        self.connector = connector
        self.baseLogger = logger
    }

    func run() async {
        var logger = baseLogger
        logger[metadataKey: "qemu.pid"] = "\(peer.pid)"
        let hello: Channel.Hello
        do {
            guard let frame = try await socket.receive(until: .now.advanced(by: .seconds(10))) else {
                logger.info("QEMU closed the channel before HELLO")
                return
            }
            guard frame.knownType == .hello else {
                throw BrokerError(.protocolViolation, "first message is type 0x\(String(frame.type, radix: 16)), not HELLO")
            }
            hello = try Channel.Hello(decoding: frame.payload)
        } catch {
            logger.warning("refusing channel peer", metadata: ["peer": "\(peer)", "reason": "\(error)"])
            return
        }
        logger[metadataKey: "guest.uuid"] = "\(hello.uuid)"
        logger[metadataKey: "guest.name"] = "\(hello.name)"
        if let problem = configuration.verifier.problem(with: hello, from: peer) {
            logger.warning("refusing QEMU: \(problem)", metadata: ["peer": "\(peer)"])
            await refuse(EPERM, problem)
            return
        }
        var name = hello.name
        var metadata: GuestMetadata?
        if let identity = configuration.identity {
            switch await identity.verify(uuid: hello.uuid, pid: peer.pid) {
            case .accepted(let domainName, let domainMetadata):
                name = domainName
                metadata = domainMetadata
                logger[metadataKey: "guest.name"] = "\(name)"
            case .refused(let why):
                logger.warning("refusing QEMU: libvirt says \(why)", metadata: ["peer": "\(peer)"])
                await refuse(EPERM, "libvirt: \(why)")
                return
            case .unavailable(let why):
                logger.warning("refusing QEMU for now: its identity cannot be checked with libvirt: \(why)", metadata: ["peer": "\(peer)"])
                await refuse(EAGAIN, "libvirt unavailable: \(why)")
                return
            }
        }
        let status = SessionStatus(
            uuid: "\(hello.uuid)", name: name, qemuPID: peer.pid, state: "connected", hooked: hello.flags.contains(.hooked), failures: 0,
            lastFailure: nil, startTime: hello.startTime, since: Date())
        guard let token = await registry.claim(hello.uuid, status: status) else {
            let reason = "another QEMU process already holds the session of guest \(hello.uuid)"
            logger.warning("refusing QEMU: \(reason)")
            await refuse(EBUSY, reason)
            return
        }
        logger.info(
            "QEMU connected",
            metadata: [
                "hooked": "\(hello.flags.contains(.hooked))", "required": "\(hello.flags.contains(.required))",
                "start_time": "\(hello.startTime)", "max_gpa": "\(hello.maxGPA)", "kvm.cap206": "\(hello.capV12)", "kvm.cap180": "\(hello.capV7)",
                "kvm.introspection": "\(hello.introspectionParameter)",
            ])
        await drive(hello: hello, name: name, metadata: metadata, token: token, logger: logger)
        await registry.release(hello.uuid, token: token)
    }

    private func refuse(_ errno: Int32, _ reason: String) async {
        try? await socket.send(
            Channel.Frame(.refuse, seq: 1, payload: Channel.refuse(errno: errno, reason: reason)), until: .now.advanced(by: .seconds(1)))
    }

    private func drive(hello: Channel.Hello, name: String, metadata: GuestMetadata?, token: UInt64, logger: Logger) async {
        let (inputs, continuation) = AsyncStream<Input>.makeStream()
        let reader = Task {
            do {
                while let frame = try await socket.receive(until: .now.advanced(by: .seconds(86_400 * 365))) {
                    continuation.yield(.frame(frame))
                }
                continuation.yield(.closed(nil))
            } catch let error as BrokerError {
                continuation.yield(.closed(error))
            } catch {
                continuation.yield(.closed(BrokerError(.io, "\(error)")))
            }
        }
        let plans = configuration.plans
        let (plan, reason) = plans.plan(uuid: hello.uuid, name: name, metadata: metadata)
        logger.notice("policy decision: \(reason)", metadata: ["policy.rule": "\(plan?.rule ?? "-")"])
        var state = LoopState(
            machine: GuestSessionMachine(allowLists: plan?.allowLists ?? .kernelDefaults(.v12)),
            request: HandshakeRequest(uuid: hello.uuid, name: hello.name, startTime: hello.startTime, maxGPA: hello.maxGPA), plan: plan)
        await registry.listen(token: token) { continuation.yield(.policyReloaded) }
        defer {
            reader.cancel()
            state.handshakeTask?.cancel()
            state.retryTask?.cancel()
            state.resultTimer?.cancel()
            state.unhookTimer?.cancel()
            state.pendingOutcome?.descriptor.close()
            continuation.finish()
        }
        let first = state.machine.handle(.helloAccepted(hello, introspect: plan != nil))
        if await perform(first, &state, continuation, logger) == false { return }
        await publish(state, hello.uuid, token)
        for await input in inputs {
            var actions: [GuestSessionMachine.Action] = []
            switch input {
            case .frame(let frame):
                switch frame.knownType {
                case .result:
                    state.resultTimer?.cancel()
                    guard let result = try? Channel.Result(decoding: frame.payload) else { return }
                    let wasHooked = state.machine.state.isHooked
                    actions = state.machine.handle(.result(result))
                    if !wasHooked, state.machine.state.isHooked, let start = state.triggeredAt {
                        state.lastHook = start.duration(to: .now)
                        state.lastHookRequest = state.hookRequestedAt.map { $0.duration(to: .now) }
                        state.hooks += 1
                        state.triggeredAt = nil
                        logger.info("hooked \(format(state.lastHook ?? .zero)) after the trigger")
                    }
                case .event:
                    guard let event = try? Channel.Event(decoding: frame.payload) else { return }
                    // The tool learns the guest's current session id (new after a reset or an incoming migration).
                    state.request.startTime = event.startTime
                    actions = state.machine.handle(.event(event))
                default:
                    logger.warning(
                        "QEMU sent an unexpected \(frame.knownType.map { "\($0)" } ?? "type 0x\(String(frame.type, radix: 16))") message; closing")
                    return
                }
            case .handshake(.success(let outcome)):
                state.handshakeTask = nil
                state.pendingOutcome = outcome
                if !outcome.authenticated {
                    logger.warning(
                        "no shared secret configured: the introspector is not authenticated", metadata: ["tool.endpoint": "\(outcome.endpoint)"])
                }
                actions = state.machine.handle(.handshakeSucceeded)
            case .handshake(.failure(let error)):
                state.handshakeTask = nil
                actions = state.machine.handle(.handshakeFailed(error))
            case .retryDue:
                state.retryTask = nil
                actions = state.machine.handle(.retryDue)
            case .unhookDeadline:
                actions = state.machine.handle(.unhookDeadline)
            case .policyReloaded:
                let (next, reason) = plans.plan(uuid: hello.uuid, name: name, metadata: metadata)
                let same: Bool
                switch (state.plan, next) {
                case (nil, nil): same = true
                case (let old?, let new?): same = new.sameIntrospector(as: old)
                default: same = false
                }
                // Every decision is audited; a changed one at notice level.
                logger.log(
                    level: next != state.plan ? .notice : .info, "policy reloaded: \(next != state.plan ? "changed" : "unchanged"): \(reason)",
                    metadata: ["policy.rule": "\(next?.rule ?? "-")"])
                if same, let next { state.plan = next } else { state.pendingPlan = next }
                actions = state.machine.handle(
                    .policyChanged(
                        introspect: next != nil, allowLists: next?.allowLists ?? state.machine.allowLists, sameIntrospector: same))
                if !same, !state.machine.state.isUnhookingOrUpdating {
                    // Not hooked: the new plan applies from the next attempt.
                    state.plan = state.pendingPlan
                }
            case .resultTimeout(let seq):
                logger.error("QEMU did not answer request \(seq) within \(format(configuration.resultTimeout)); closing the channel")
                return
            case .closed(let error):
                if let error { logger.warning("channel closed: \(error)") } else { logger.info("QEMU closed the channel") }
                return
            }
            if await perform(actions, &state, continuation, logger) == false { return }
            await publish(state, hello.uuid, token)
        }
    }

    struct LoopState {
        var machine: GuestSessionMachine
        /// What the broker tells the tool: QEMU's own identity from HELLO, kept current.
        var request: HandshakeRequest
        var seq: UInt32 = 0
        var handshakeTask: Task<Void, Never>?
        var retryTask: Task<Void, Never>?
        var resultTimer: Task<Void, Never>?
        var pendingOutcome: HandshakeOutcome?
        /// The decision in force for this session (nil: not introspected).
        var plan: SessionPlan?
        /// A new introspector's plan, adopted once the old session has been unhooked.
        var pendingPlan: SessionPlan?
        var unhookTimer: Task<Void, Never>?
        /// When the current attempt series began (the trigger), for the hook latency.
        var triggeredAt: ContinuousClock.Instant?
        var lastHook: Duration?
        var hookRequestedAt: ContinuousClock.Instant?
        var lastHookRequest: Duration?
        var hooks = 0

        mutating func nextSeq() -> UInt32 {
            seq += 1
            return seq
        }
    }

    private func publish(_ state: LoopState, _ uuid: GuestUUID, _ token: UInt64) async {
        let machine = state.machine
        await registry.update(uuid, token: token) { status in
            let description = machine.state.description
            if status.state != description { status.since = Date() }
            status.state = description
            if case .hooked = machine.state { status.hooked = true } else { status.hooked = false }
            status.failures = machine.failures
            status.lastFailure = machine.lastFailure
            status.hooks = state.hooks
            func microseconds(_ duration: Duration) -> Int64 {
                let (seconds, attoseconds) = duration.components
                return seconds * 1_000_000 + attoseconds / 1_000_000_000_000
            }
            status.lastHookMicroseconds = state.lastHook.map(microseconds)
            status.lastHookRequestMicroseconds = state.lastHookRequest.map(microseconds)
        }
    }

    /// Performs actions in order; false means the channel is done.
    private func perform(
        _ actions: [GuestSessionMachine.Action], _ state: inout LoopState, _ inputs: AsyncStream<Input>.Continuation, _ logger: Logger
    ) async -> Bool {
        for action in actions {
            do {
                switch action {
                case .sendWelcome:
                    try await send(.welcome, Channel.welcome(version: Channel.version), &state)
                case .startHandshake:
                    guard let plan = state.plan else { continue }
                    if state.triggeredAt == nil { state.triggeredAt = .now }
                    let parameters = HandshakeParameters(
                        abi: plan.allowLists.abi, request: state.request, expectedCookie: plan.cookie, timeout: plan.handshakeTimeout)
                    let connector = self.connector
                    let endpoint = plan.endpoint
                    state.handshakeTask = Task {
                        do {
                            inputs.yield(.handshake(.success(try await connector.connectAndHandshake(to: endpoint, parameters))))
                        } catch let error as BrokerError {
                            inputs.yield(.handshake(.failure(error)))
                        } catch {
                            inputs.yield(.handshake(.failure(BrokerError(.io, "\(error)"))))
                        }
                    }
                case .sendHook(let lists):
                    guard let outcome = state.pendingOutcome else { continue }
                    state.pendingOutcome = nil
                    defer { outcome.descriptor.close() }  // QEMU has its own copy once sent
                    state.hookRequestedAt = .now
                    let seq = try await send(.hook, lists.encoded(), &state, passing: outcome.descriptor.raw)
                    let timeout = configuration.resultTimeout
                    state.resultTimer = Task {
                        if (try? await Task.sleep(for: timeout)) != nil { inputs.yield(.resultTimeout(seq: seq)) }
                    }
                case .dropHandshake:
                    state.pendingOutcome?.descriptor.close()
                    state.pendingOutcome = nil
                case .cancelHandshake:
                    state.handshakeTask?.cancel()
                    state.handshakeTask = nil
                case .sendRelease:
                    try await send(.release, [], &state)
                case .scheduleRetry(let failures):
                    var generator = SystemRandomNumberGenerator()
                    let delay = (state.plan?.backoff ?? configuration.backoff).delay(afterFailures: failures, using: &generator)
                    logger.debug("retrying in \(format(delay))")
                    state.retryTask = Task {
                        if (try? await Task.sleep(for: delay)) != nil { inputs.yield(.retryDue) }
                    }
                case .cancelRetry:
                    state.retryTask?.cancel()
                    state.retryTask = nil
                case .sendSetAllowed(let lists):
                    try await sendRequest(.setAllowed, lists.encoded(), &state, inputs)
                case .sendPreunhook:
                    try await sendRequest(.preunhook, [], &state, inputs)
                case .sendUnhook:
                    state.unhookTimer?.cancel()
                    try await sendRequest(.unhook, [], &state, inputs)
                case .scheduleUnhookDeadline:
                    let timeout = state.plan?.unhookTimeout ?? .seconds(5)
                    state.unhookTimer = Task {
                        if (try? await Task.sleep(for: timeout)) != nil { inputs.yield(.unhookDeadline) }
                    }
                case .adoptNewIntrospector:
                    state.unhookTimer?.cancel()
                    if let next = state.pendingPlan {
                        state.plan = next
                        state.pendingPlan = nil
                    }
                case .log(let level, let message):
                    logger.log(level: level.swiftLog, "\(message)", metadata: ["session.state": "\(state.machine.state)"])
                case .closeChannel:
                    return false
                }
            } catch {
                logger.warning("channel failed while performing \(action): \(error)")
                return false
            }
        }
        return true
    }

    /// Sends a request and arms the RESULT timeout.
    private func sendRequest(
        _ type: Channel.MessageType, _ payload: [UInt8], _ state: inout LoopState, _ inputs: AsyncStream<Input>.Continuation
    ) async throws {
        let seq = try await send(type, payload, &state)
        let timeout = configuration.resultTimeout
        state.resultTimer?.cancel()
        state.resultTimer = Task {
            if (try? await Task.sleep(for: timeout)) != nil { inputs.yield(.resultTimeout(seq: seq)) }
        }
    }

    @discardableResult
    private func send(_ type: Channel.MessageType, _ payload: [UInt8], _ state: inout LoopState, passing fd: Int32? = nil) async throws -> UInt32 {
        let seq = state.nextSeq()
        try await socket.send(Channel.Frame(type, seq: seq, payload: payload), passing: fd, until: .now.advanced(by: configuration.resultTimeout))
        return seq
    }
}

extension GuestSessionMachine.LogLevel {
    var swiftLog: Logger.Level {
        switch self {
        case .debug: return .debug
        case .info: return .info
        case .notice: return .notice
        case .warning: return .warning
        case .error: return .error
        }
    }
}
