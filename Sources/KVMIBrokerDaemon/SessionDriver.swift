import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMIBrokerPolicy
import Logging
import Synchronization

/// Runs one channel connection: HELLO, the identity checks, then `GuestSessionMachine`'s
/// actions. Inputs (QEMU's frames, handshake outcomes, timers) arrive in one mailbox and are
/// handled one at a time, so the machine needs no lock.
///
/// Bounded by construction: the mailbox holds at most 5 frames (the reader, a readiness
/// callback on the reactor, queues each frame it reads, in order, and pauses while more than 4
/// are queued: a QEMU that streams frames waits for the session to take them and never keeps a
/// thread); at most one handshake, one request and one timer of each kind are outstanding, each
/// tagged with an id so that a late outcome or a stale timeout is recognised and dropped. The
/// timers are entries in the reactor's deadline heap (cancelled at the end) and the handshake
/// is driven by the reactor's callbacks (`HandshakeAttempt`): the session is the only task.
/// The reader is stopped and the handshake cancelled before the channel descriptor is closed.
final class SessionDriver: Sendable {
    enum Input: Sendable {
        case frame(Channel.Frame)
        case handshake(attempt: UInt64, Result<HandshakeOutcome, BrokerError>)
        case retryDue(timer: UInt64)
        /// The unix endpoint the last attempt could not reach appeared (the watcher's wake-up for
        /// the retry `timer`): the retry is due now.
        case endpointAppeared(timer: UInt64)
        /// The hook armed with this timer has lasted `hookSurvival`.
        case hookSurvived(timer: UInt64)
        case resultTimeout(seq: UInt32)
        case unhookDeadline(timer: UInt64)
        case policyReloaded
        case closed(BrokerError?)
    }

    let socket: ChannelSocket
    let peer: PeerCredentials
    let configuration: BrokerConfiguration
    let registry: SessionRegistry
    let connector: IntrospectorConnector
    let admission: ConnectionAdmission?
    let baseLogger: Logger

    init(
        socket: ChannelSocket, peer: PeerCredentials, configuration: BrokerConfiguration, registry: SessionRegistry,
        connector: IntrospectorConnector, admission: ConnectionAdmission? = nil, logger: Logger
    ) {
        self.socket = socket
        self.peer = peer
        self.configuration = configuration
        self.registry = registry
        self.connector = connector
        self.admission = admission
        self.baseLogger = logger
    }

    func run() async {
        // The admission phase returns before the session's long life begins, so its frame
        // (HELLO, the checks, the claim) is not held by a thousand waiting sessions.
        guard let admitted = await admit() else { return }
        await drive(admitted)
        registry.release(admitted.hello.uuid, token: admitted.token)
    }

    /// A guest past HELLO, the identity checks and the claim.
    struct Admitted: Sendable {
        let hello: Channel.Hello
        let name: String
        let metadata: GuestMetadata?
        let nova: NovaMetadata?
        let facts: ProcessFacts?
        let token: UInt64
        let logger: Logger
        /// The session's inputs and its reload flag, registered with the claim.
        let inputs: Mailbox<Input>
        let reload: ReloadFlag
    }

    /// HELLO, identity checks, claim; nil when the connection was refused or closed.
    ///
    /// Only the waits are here (HELLO, the /proc and libvirt checks, a REFUSE); the decisions
    /// and their messages are made in synchronous helpers. A boot storm keeps a thousand
    /// sessions in this function at once, each holding its frame in its task's allocator: the
    /// frame was 6 KB while the messages and the status were built here, first-touched memory
    /// that cost page faults on the reactor's thread.
    @inline(never)
    private func admit() async -> Admitted? {
        var logger = baseLogger
        logger[metadataKey: "qemu.pid"] = "\(peer.pid)"
        guard let hello = await receiveHello(logger) else { return nil }
        Self.name(&logger, hello)
        if let refusal = versionRefusal(hello, logger) {
            await refuse(refusal.errno, refusal.reason)
            return nil
        }
        let verifier = configuration.verifier
        let peer = self.peer
        let channel = socket.descriptor
        // With libvirt, the executable is compared with the domain's <emulator> below; without
        // it, with the configured emulators.
        let emulatorList = configuration.identity == nil
        let (verdict, facts) = await BlockingWork.shared.run {
            // Pinned for the checks only: SO_PEERPIDFD names the process that connected, whenever
            // it is asked (the re-check before HOOK asks again); from the verdict on, the facts
            // (the executable, and the start time where the kernel has no SO_PEERPIDFD) carry the
            // identity, so a guest costs one descriptor, not two.
            let pin = ProcessPin.peer(of: channel.raw, pid: peer.pid)
            defer { pin.pidfd?.close() }
            return verifier.verdict(for: hello, from: peer, pin: pin, emulatorList: emulatorList)
        }
        if let refusal = refusal(verdict, logger) {
            await refuse(refusal.errno, refusal.reason)
            return nil
        }
        var domain: DomainIdentity?
        if let identity = configuration.identity {
            let answer = await identity.verify(uuid: hello.uuid, pid: peer.pid)
            guard case .accepted(let found) = answer else {
                if let refusal = libvirtRefusal(answer, logger) { await refuse(refusal.errno, refusal.reason) }
                return nil
            }
            // The pinned process image (its facts) against what libvirt started: the emulator
            // file and the user and group.
            let uuid = hello.uuid
            let pinned = facts ?? ProcessFacts(startTime: nil, executable: "", executableDevice: nil, executableInode: nil)
            let emulatorVerdict = await BlockingWork.shared.run { verifier.verdict(for: found, uuid: uuid, facts: pinned, peer: peer) }
            if let refusal = refusal(emulatorVerdict, logger) {
                await refuse(refusal.errno, refusal.reason)
                return nil
            }
            domain = found
        }
        switch claim(hello, domain: domain, facts: facts, logger: logger) {
        case .success(let admitted):
            return admitted
        case .failure(let refusal):
            await refuse(refusal.errno, refusal.reason)
            return nil
        }
    }

    /// What a refused QEMU is told (REFUSE), already logged.
    struct Refusal: Error {
        let errno: Int32
        let reason: String
    }

    /// HELLO, within the HELLO deadline; nil (logged) when the peer closed or sent something else.
    @inline(never)
    private func receiveHello(_ logger: Logger) async -> Channel.Hello? {
        // A silent connection counts against the greeting cap until it speaks.
        let ticket = admission?.greeting(socket.descriptor)
        defer { ticket.map { admission?.greeted($0) } }
        let frame: Channel.Frame?
        do {
            frame = try await socket.receive(until: .now.advanced(by: configuration.helloTimeout))
        } catch {
            refusedPeer(error, logger)
            return nil
        }
        return hello(from: frame, logger)
    }

    @inline(never)
    private func hello(from frame: Channel.Frame?, _ logger: Logger) -> Channel.Hello? {
        guard let frame else {
            configuration.refusals.log(logger, level: .info, "the peer closed the channel before HELLO", metadata: ["peer": "\(peer)"])
            return nil
        }
        do {
            guard frame.knownType == .hello else {
                throw BrokerError(.protocolViolation, "first message is type 0x\(String(frame.type, radix: 16)), not HELLO")
            }
            return try Channel.Hello(decoding: frame.payload)
        } catch {
            refusedPeer(error, logger)
            return nil
        }
    }

    @inline(never)
    private func refusedPeer(_ error: any Error, _ logger: Logger) {
        configuration.refusals.log(logger, "refusing channel peer", metadata: ["peer": "\(peer)", "reason": "\(error)"])
    }

    /// The guest's UUID and (escaped) name in the session's log metadata.
    @inline(never)
    private static func name(_ logger: inout Logger, _ hello: Channel.Hello) {
        logger[metadataKey: "guest.uuid"] = "\(hello.uuid)"
        logger[metadataKey: "guest.name"] = "\(escapedForLog(hello.name, limit: 64))"
    }

    @inline(never)
    private func versionRefusal(_ hello: Channel.Hello, _ logger: Logger) -> Refusal? {
        guard hello.version < 1 else { return nil }
        let reason = "channel version \(hello.version) is not a version of this protocol (the broker speaks \(Channel.version))"
        configuration.refusals.log(logger, "refusing QEMU: \(reason)", metadata: ["peer": "\(peer)"])
        return Refusal(errno: EPROTONOSUPPORT, reason: reason)
    }

    /// The refusal (logged) for a verdict of the identity checks; nil when accepted.
    @inline(never)
    private func refusal(_ verdict: PeerVerifier.Verdict, _ logger: Logger) -> Refusal? {
        switch verdict {
        case .accepted:
            return nil
        case .refused(let problem):
            configuration.refusals.log(logger, "refusing QEMU: \(problem)", metadata: ["peer": "\(peer)"])
            return Refusal(errno: EPERM, reason: problem)
        case .transient(let problem):
            configuration.refusals.log(logger, "refusing QEMU for now: \(problem)", metadata: ["peer": "\(peer)"])
            return Refusal(errno: EAGAIN, reason: problem)
        }
    }

    /// The refusal (logged) for what libvirt answered other than `accepted`.
    @inline(never)
    private func libvirtRefusal(_ answer: IdentityCheck, _ logger: Logger) -> Refusal? {
        switch answer {
        case .accepted:
            return nil
        case .refused(let why):
            configuration.refusals.log(logger, "refusing QEMU: libvirt says \(why)", metadata: ["peer": "\(peer)"])
            return Refusal(errno: EPERM, reason: "libvirt: \(why)")
        case .unavailable(let why):
            configuration.refusals.log(
                logger, "refusing QEMU for now: its identity cannot be checked with libvirt: \(why)", metadata: ["peer": "\(peer)"])
            return Refusal(errno: EAGAIN, reason: "libvirt unavailable: \(why)")
        }
    }

    /// Claims the guest (its status and the session's inputs in the registry): the session is
    /// admitted; or the refusal (logged) when another channel holds it.
    @inline(never)
    private func claim(_ hello: Channel.Hello, domain: DomainIdentity?, facts: ProcessFacts?, logger: Logger) -> Result<Admitted, Refusal> {
        var logger = logger
        let name = domain?.name ?? escapedForLog(hello.name, limit: 64)
        if let domain { logger[metadataKey: "guest.name"] = "\(escapedForLog(domain.name, limit: 64))" }
        let status = SessionStatus(
            uuid: "\(hello.uuid)", name: name, qemuPID: peer.pid, state: "connected", hooked: hello.flags.contains(.hooked), failures: 0,
            lastFailure: nil, startTime: hello.startTime, since: Date(),
            identity: configuration.identity == nil ? "proc only (libvirt identity check OFF)" : "libvirt",
            hookedSince: hello.flags.contains(.hooked) ? Date() : nil)
        // The reader pauses while more than 4 frames are queued (back-pressure on a QEMU that
        // streams them); the other inputs are bounded by their producers (one per attempt, timer
        // or reload).
        let inputs = Mailbox<Input>(capacity: 4)
        let reload = ReloadFlag()
        // One call to the registry claims the guest and registers the session's inputs.
        let claim = registry.claim(
            hello.uuid, status: status,
            onPolicyChange: {
                // Coalesced: however many reloads happen, at most one notice waits for the session.
                if !reload.pending.exchange(true, ordering: .acquiringAndReleasing) {
                    inputs.post(.policyReloaded)
                }
            },
            injector: { input in inputs.post(input) })
        let token: UInt64
        switch claim {
        case .success(let claimed):
            token = claimed
        case .failure(.otherProcess(let pid)):
            let reason = "QEMU pid \(pid) already holds the session of guest \(hello.uuid)"
            configuration.refusals.log(logger, "refusing QEMU: \(reason)")
            return .failure(Refusal(errno: EBUSY, reason: reason))
        case .failure(.alreadyConnected):
            let reason = "this QEMU already has a live channel for guest \(hello.uuid); one channel per guest"
            configuration.refusals.log(logger, "refusing QEMU: \(reason)")
            return .failure(Refusal(errno: EBUSY, reason: reason))
        }
        logger.info(
            "QEMU connected",
            metadata: [
                "hooked": "\(hello.flags.contains(.hooked))", "required": "\(hello.flags.contains(.required))",
                "start_time": "\(hello.startTime)", "max_gpa": "\(hello.maxGPA)", "kvm.cap206": "\(hello.capV12)", "kvm.cap180": "\(hello.capV7)",
                "kvm.introspection": "\(hello.introspectionParameter)",
            ])
        return .success(
            Admitted(
                hello: hello, name: name, metadata: domain?.metadata, nova: domain?.nova, facts: facts, token: token, logger: logger,
                inputs: inputs, reload: reload))
    }

    @inline(never)
    private func refuse(_ errno: Int32, _ reason: String) async {
        try? await socket.send(
            Channel.Frame(.refuse, seq: 1, payload: Channel.refuse(errno: errno, reason: reason)), until: .now.advanced(by: .seconds(1)))
    }

    private func drive(_ admitted: Admitted) async {
        let hello = admitted.hello
        let inputs = admitted.inputs
        // The reader: a readiness callback on the reactor, not a task. Each frame is queued at
        // once; past the mailbox's bound the reader pauses until the session takes one.
        let frameTaken = configuration.frameTaken
        let reader = ChannelReader(
            socket, feeding: inputs,
            frame: { frame in
                frameTaken?()
                return .frame(frame)
            }, closed: { .closed($0) })
        reader.start()
        var state = LoopState(
            machine: GuestSessionMachine(allowLists: .kernelDefaults(.v12)),
            request: HandshakeRequest(uuid: hello.uuid, name: hello.name, startTime: hello.startTime, maxGPA: hello.maxGPA), plan: nil,
            logLimit: RateLimitedLog(linesPerWindow: configuration.sessionLogLines, window: .seconds(10)), facts: admitted.facts,
            audit: admitted.logger.audit)
        state.channelVersion = Channel.negotiatedVersion(hello.version)
        let session = SessionContext(
            hello: hello, name: admitted.name, metadata: admitted.metadata, nova: admitted.nova, token: admitted.token, inputs: inputs,
            reload: admitted.reload,
            logger: admitted.logger)
        // A cancelled session (the broker shutting down) stops reading at once: it drains what
        // is queued, however fast its QEMU streams. (`requestStop`: a cancellation handler must
        // not wait for the reader's lock.)
        await withTaskCancellationHandler {
            await loop(session, state: &state)
        } onCancel: {
            reader.requestStop()
        }
        configuration.metrics?.moved(from: state.standing, to: nil)
        // Teardown, structured: nothing the session started outlives it. The reader stops
        // before the descriptor can close (no late read of a reused descriptor number).
        reader.stop()
        inputs.finish()
        state.stopWatching(configuration.endpointWatcher)
        for alarm in [state.retryAlarm, state.resultAlarm, state.unhookAlarm, state.survivalAlarm] { alarm?.cancel() }
        // The handshake in progress, if any: its socket is closed and its turn given back
        // before `cancel` returns (a superseded one was cancelled the same way).
        state.supersede()
        state.pendingOutcome?.descriptor.close()
        for request in state.queued { request.descriptor?.close() }
    }

    /// The session's life: the first decision, then one input at a time.
    @inline(never)
    private func loop(_ session: SessionContext, state: inout LoopState) async {
        guard await begin(session, state: &state) else { return }
        while let input = await session.inputs.next() {
            // Each input is handled in a function of its own (not inlined), so the frame this
            // loop keeps while it waits is small: a boot storm holds a thousand of them.
            if await handle(input, session, &state) == false { return }
        }
    }

    /// The policy decision and the first actions (WELCOME, ...); false when the channel is
    /// done already.
    @inline(never)
    private func begin(_ session: SessionContext, state: inout LoopState) async -> Bool {
        let first = decideFirst(
            hello: session.hello, name: session.name, metadata: session.metadata, nova: session.nova, state: &state, logger: session.logger)
        if await perform(first, &state, session.inputs, session.logger) == false { return false }
        publish(&state, session.hello.uuid, session.token)
        return true
    }

    /// The policy's decision for the guest, audited, and the machine's first actions.
    @inline(never)
    private func decideFirst(
        hello: Channel.Hello, name: String, metadata: GuestMetadata?, nova: NovaMetadata?, state: inout LoopState, logger: Logger
    ) -> [GuestSessionMachine.Action] {
        // With libvirt, HELLO's UUID is the domain's (libvirt runs that domain as this very
        // QEMU pid) and the name is libvirt's: per-guest endpoints are expanded from them.
        let (decided, why) = configuration.decidePlan(
            uuid: hello.uuid, name: name, metadata: metadata, nova: nova, identityVerified: configuration.identity != nil)
        let (decision, reason) = configuration.drains.apply(decided, reason: why, hooked: hello.flags.contains(.hooked))
        let plan = decision.plan
        state.failClosed = decision.failsClosed
        state.rule = decision.rule ?? "-"
        state.audit.notice("policy decision: \(reason)", metadata: state.auditMetadata(plan))
        state.plan = plan
        state.machine = GuestSessionMachine(allowLists: plan?.allowLists ?? .kernelDefaults(.v12))
        // The introspector's id (a SHA-256) matters only to reconcile a guest QEMU says is hooked.
        let introspectorID = hello.flags.contains(.hooked) ? plan?.introspectorID : nil
        let first = state.machine.handle(
            .helloAccepted(hello, introspect: plan != nil, introspectorID: introspectorID, failsClosed: state.failClosed))
        if let reconciliation = state.machine.reconciliation {
            // A restart found the guest hooked: what QEMU said, what is done, and the deciding rule (audit).
            state.audit.notice(
                "restart reconciliation: \(reconciliation)",
                metadata: state.auditMetadata(plan).merging([
                    "qemu.applied": "\(escapedForLog(hello.applied.map { "\($0)" } ?? "unknown", limit: 128))",
                    "channel.version": "\(state.channelVersion)",
                ]) { $1 })
        }
        return first
    }

    /// What one session's input handling needs besides its state.
    struct SessionContext: Sendable {
        let hello: Channel.Hello
        let name: String
        let metadata: GuestMetadata?
        let nova: NovaMetadata?
        let token: UInt64
        let inputs: Mailbox<Input>
        let reload: ReloadFlag
        let logger: Logger
    }

    /// Handles one input; false ends the session. Only the channel I/O awaits: the decisions
    /// are made synchronously in `react`, so this frame (kept by every session's task
    /// allocator at its high-water mark) stays small.
    @inline(never)
    private func handle(_ input: Input, _ session: SessionContext, _ state: inout LoopState) async -> Bool {
        guard let actions = react(to: input, session, &state) else { return false }
        if await perform(actions, &state, session.inputs, session.logger) == false { return false }
        if await sendQueuedRequest(&state, session.inputs, session.logger) == false { return false }
        publish(&state, session.hello.uuid, session.token)
        return true
    }

    /// What an input means for the session: the machine's actions, or nil to end the session;
    /// counted in the metrics (O(1): a few counter increments).
    @inline(never)
    private func react(to input: Input, _ session: SessionContext, _ state: inout LoopState) -> [GuestSessionMachine.Action]? {
        let before = state.machine.state
        guard let metrics = configuration.metrics else {
            let actions = decide(input, session, &state)
            auditUnhook(from: before, input, state, session.logger)
            return actions
        }
        let hooksBefore = state.hooks
        let actions = decide(input, session, &state)
        let introspector = state.plan?.introspectorName ?? "none"
        if state.hooks != hooksBefore { metrics.hooked(introspector: introspector, latency: state.lastHook) }
        let failing = actions?.contains(where: { if case .failing = $0 { return true } else { return false } }) ?? false
        if failing {
            let reason: String
            switch input {
            case .handshake(_, .failure(let error)): reason = BrokerMetrics.reason(error)
            case .frame(let frame):
                if let result = try? Channel.Result(decoding: frame.payload), result.requestType == Channel.MessageType.hook.rawValue {
                    reason = BrokerMetrics.reason(hookFailedAt: result.step)
                } else {
                    reason = "set-allowed-failed"
                }
            default: reason = "other"
            }
            metrics.failed(introspector: introspector, reason: reason)
        }
        switch input {
        case .handshake(_, .failure(let error)) where failing && error.code == .connectFailed:
            metrics.unreachable(introspector: introspector)
        case .handshake(_, .success(let outcome)) where state.pendingOutcome != nil:
            metrics.handshake(introspector: introspector, duration: outcome.connectDuration + outcome.handshakeDuration)
        default: break
        }
        if let reason = Self.unhookReason(from: before, to: state.machine.state, input) {
            metrics.unhooked(introspector: introspector, reason: reason)
        }
        auditUnhook(from: before, input, state, session.logger)
        return actions
    }

    /// The audit record of an unhook (the machine's state went from holding the guest to not),
    /// once, with its reason.
    private func auditUnhook(from before: GuestSessionMachine.State, _ input: Input, _ state: LoopState, _ logger: Logger) {
        guard let reason = Self.unhookReason(from: before, to: state.machine.state, input) else { return }
        var metadata = state.auditMetadata(state.plan)
        metadata["unhook.reason"] = "\(reason)"
        switch reason {
        case "policy": state.audit.notice("guest unhooked for the policy change", metadata: metadata)
        case "introspector-closed": state.audit.warning("the introspector closed its connection; QEMU unhooked the guest", metadata: metadata)
        default: state.audit.notice("QEMU unhooked the guest (\(reason))", metadata: metadata)
        }
    }

    /// Why QEMU unhooked the guest between `before` and `after`, or nil if it did not (a session
    /// that ends is not counted: the guest left).
    static func unhookReason(from before: GuestSessionMachine.State, to after: GuestSessionMachine.State, _ input: Input) -> String? {
        func holds(_ state: GuestSessionMachine.State) -> Bool {
            switch state {
            case .hooked, .updating, .unhooking: return true
            default: return false
            }
        }
        guard holds(before), !holds(after), after != .ended else { return nil }
        if case .unhooking = before { return "policy" }
        if case .frame(let frame) = input, frame.knownType == .event, let event = try? Channel.Event(decoding: frame.payload), let kind = event.kind {
            switch kind {
            case .toolHangup: return "introspector-closed"
            case .paused: return "paused"
            case .migrationOut: return "migration-out"
            case .savevm: return "savevm"
            default: return "qemu"
            }
        }
        if case .frame = input { return "set-allowed-failed" }
        return "other"
    }

    @inline(never)
    private func decide(_ input: Input, _ session: SessionContext, _ state: inout LoopState) -> [GuestSessionMachine.Action]? {
        let hello = session.hello
        let name = session.name
        let metadata = session.metadata
        let nova = session.nova
        let logger = session.logger
        var actions: [GuestSessionMachine.Action] = []
        switch input {
        case .frame(let frame):
            switch frame.knownType {
            case .result:
                guard let outstanding = state.outstanding, frame.seq == outstanding.seq else {
                    logger.error("QEMU sent a RESULT for request \(frame.seq), which is not the outstanding request; closing the channel")
                    return nil
                }
                guard let result = try? Channel.Result(decoding: frame.payload), result.requestType == outstanding.type.rawValue else {
                    logger.error("QEMU's RESULT for request \(frame.seq) does not answer a \(outstanding.type); closing the channel")
                    return nil
                }
                state.outstanding = nil
                state.resultAlarm?.cancel()
                state.resultAlarm = nil
                let wasHooked = state.machine.state.isHooked
                actions = state.machine.handle(.result(result))
                if !wasHooked, state.machine.state.isHooked, let start = state.triggeredAt {
                    state.lastHook = start.duration(to: .now)
                    state.lastHookRequest = state.hookRequestedAt.map { $0.duration(to: .now) }
                    state.hooks += 1
                    state.triggeredAt = nil
                }
            case .event:
                guard let event = try? Channel.Event(decoding: frame.payload) else { return nil }
                // The tool learns the guest's current session id (new after a reset or an incoming migration).
                state.request.startTime = event.startTime
                actions = state.machine.handle(.event(event))
            default:
                logger.warning(
                    "QEMU sent an unexpected \(frame.knownType.map { "\($0)" } ?? "type 0x\(String(frame.type, radix: 16))") message; closing")
                return nil
            }
        case .handshake(let attempt, let outcome):
            guard attempt == state.handshakeAttempt else {
                // A superseded attempt (cancelled by a pause, a policy change, ...): never its
                // success (one that completed just before it was superseded).
                if case .success(let late) = outcome { late.descriptor.close() }
                return []
            }
            state.handshake = nil
            state.handshakeAttempt = nil
            switch outcome {
            case .success(let outcome):
                state.lastHandshakeError = nil
                state.pendingOutcome = outcome
                if !outcome.authenticated {
                    logger.warning(
                        "no shared secret configured: the introspector is not authenticated", metadata: ["tool.endpoint": "\(outcome.endpoint)"])
                }
                actions = state.machine.handle(.handshakeSucceeded)
            case .failure(let error):
                state.lastHandshakeError = error
                actions = state.machine.handle(.handshakeFailed(error))
            }
        case .retryDue(let timer):
            guard timer == state.retryTimer else { return [] }
            state.retryAlarm = nil
            state.retryTimer = nil
            state.stopWatching(configuration.endpointWatcher)
            actions = state.machine.handle(.retryDue)
        case .endpointAppeared(let timer):
            guard timer == state.retryTimer else { return [] }
            // The watcher forgot the waiter when it woke it; the back-off timer is not needed now.
            state.watchToken = nil
            state.retryAlarm?.cancel()
            state.retryAlarm = nil
            state.retryTimer = nil
            state.wokenByEndpoint = true
            logger.debug("the introspector's socket appeared; connecting now rather than after the back-off")
            actions = state.machine.handle(.retryDue)
        case .hookSurvived(let timer):
            guard timer == state.survivalTimer else { return [] }
            state.survivalAlarm = nil
            state.survivalTimer = nil
            actions = state.machine.handle(.hookSurvived)
        case .unhookDeadline(let timer):
            guard timer == state.unhookTimerID else { return [] }
            state.unhookAlarm = nil
            state.unhookTimerID = nil
            actions = state.machine.handle(.unhookDeadline)
        case .policyReloaded:
            session.reload.pending.store(false, ordering: .releasing)
            let (decided, why) = configuration.decidePlan(
                uuid: hello.uuid, name: name, metadata: metadata, nova: nova, identityVerified: configuration.identity != nil)
            let hooked = state.machine.state.isHooked || state.machine.state.isUnhookingOrUpdating
            let (decision, reason) = configuration.drains.apply(decided, reason: why, hooked: hooked)
            let next = decision.plan
            state.failClosed = decision.failsClosed
            let same: Bool
            switch (state.plan, next) {
            case (nil, nil): same = true
            case (let old?, let new?): same = new.sameIntrospector(as: old)
            default: same = false
            }
            // Every decision is audited; a changed one at notice level.
            state.rule = decision.rule ?? "-"
            state.audit.log(
                level: next != state.plan ? .notice : .info, "policy reloaded: \(next != state.plan ? "changed" : "unchanged"): \(reason)",
                metadata: state.auditMetadata(next))
            if same, let next { state.plan = next } else { state.pendingPlan = next }
            actions = state.machine.handle(
                .policyChanged(
                    introspect: next != nil, allowLists: next?.allowLists ?? state.machine.allowLists, sameIntrospector: same))
            if !same, !state.machine.state.isUnhookingOrUpdating {
                // Not hooked: the new plan applies from the next attempt.
                state.plan = state.pendingPlan
            }
        case .resultTimeout(let seq):
            guard state.outstanding?.seq == seq else { return [] }  // answered meanwhile: stale
            logger.error(
                "QEMU did not answer request \(seq) (\(state.outstanding!.type)) within \(format(configuration.resultTimeout)); closing the channel"
            )
            return nil
        case .closed(let error):
            if let error { logger.warning("channel closed: \(error)") } else { logger.info("QEMU closed the channel") }
            return nil
        }
        return actions
    }

    struct QueuedRequest {
        var type: Channel.MessageType
        var payload: [UInt8]
        /// HOOK's introspector socket, kept open until the HOOK is sent.
        var descriptor: Descriptor?
    }

    struct LoopState {
        /// The audit trail's logger with the session's metadata, made once (its records are
        /// two per guest in a boot storm; making the logger is a handler and a closure each).
        let audit: Logger
        var machine: GuestSessionMachine
        /// What the broker tells the tool: QEMU's own identity from HELLO, kept current.
        var request: HandshakeRequest
        var seq: UInt32 = 0
        /// The request awaiting QEMU's RESULT (one at a time, version 1 does not pipeline).
        var outstanding: (seq: UInt32, type: Channel.MessageType)?
        /// Requests decided while another was outstanding, sent in order as RESULTs arrive.
        var queued: [QueuedRequest] = []
        var nextID: UInt64 = 0
        /// The handshake in progress: driven by the reactor's callbacks, not a task.
        var handshake: HandshakeAttempt?
        var handshakeAttempt: UInt64?
        var retryAlarm: SessionAlarm?
        var retryTimer: UInt64?
        var resultAlarm: SessionAlarm?
        var pendingOutcome: HandshakeOutcome?
        /// The decision in force for this session (nil: not introspected).
        var plan: SessionPlan?
        /// The policy requires the guest but cannot serve it: never RELEASE it.
        var failClosed = false
        /// A new introspector's plan, adopted once the old session has been unhooked.
        var pendingPlan: SessionPlan?
        var unhookAlarm: SessionAlarm?
        var unhookTimerID: UInt64?
        /// When the current attempt series began (the trigger), for the hook latency.
        var triggeredAt: ContinuousClock.Instant?
        var lastHook: Duration?
        var hookRequestedAt: ContinuousClock.Instant?
        var lastHookRequest: Duration?
        var hooks = 0
        /// The endpoint of the last handshake attempt and why it failed (nil: it did not), to
        /// tell whether the retry should also wait for the endpoint's socket to appear.
        var attemptEndpoint: IntrospectorEndpoint?
        var lastHandshakeError: BrokerError?
        /// The endpoint watcher's waiter for the pending retry.
        var watchToken: UInt64?
        /// The attempt in progress was started by the endpoint's socket appearing.
        var wokenByEndpoint = false
        /// Short retries after a wake-up that met a socket not yet listening.
        var quickRetries = 0
        static let maximumQuickRetries = 5
        /// The survival timer of the current hook.
        var survivalAlarm: SessionAlarm?
        var survivalTimer: UInt64?

        /// The unix path to watch when the last attempt found no socket (ENOENT: wake if it is
        /// there already) or a socket nobody listens on (ECONNREFUSED: a stale file; a tool that
        /// starts replaces it, which is a create). nil: back-off only (vsock, tcp, abstract
        /// names, other failures).
        func endpointToWatch() -> (path: String, ifPresent: Bool)? {
            guard case .unix(let path)? = attemptEndpoint, path.hasPrefix("/"), let error = lastHandshakeError, error.code == .connectFailed
            else { return nil }
            switch error.errno {
            case ENOENT: return (path, true)
            case ECONNREFUSED: return (path, false)
            default: return nil
            }
        }

        mutating func stopWatching(_ watcher: EndpointWatcher?) {
            if let token = watchToken { watcher?.cancel(token) }
            watchToken = nil
        }

        /// The rule of the decision in force, for the audit records ("-": none).
        var rule = "-"

        /// An audit record's metadata: the session's state, the deciding rule, the introspector.
        func auditMetadata(_ plan: SessionPlan?) -> Logger.Metadata {
            var metadata: Logger.Metadata = ["session.state": "\(machine.state)", "policy.rule": "\(rule)"]
            if let plan { metadata["introspector"] = "\(plan.introspectorName)" }
            return metadata
        }
        /// The version WELCOME answered: 2 adds the `Applied` tail to HOOK and SET_ALLOWED.
        var channelVersion: UInt16 = 1
        /// What the status view was last told.
        var published: Published?
        /// Where the metrics count this session (nil: not introspected).
        var standing: BrokerMetrics.Standing?
        /// This session's log lines are rate-limited (a QEMU streaming events cannot flood the log).
        let logLimit: RateLimitedLog
        /// The failed attempts in a row, for the log: once when they start or change, then
        /// summaries, then once with the hook that ends them.
        var streak = FailureStreak()
        /// The checked process image, compared again right before each HOOK.
        let facts: ProcessFacts?

        init(
            machine: GuestSessionMachine, request: HandshakeRequest, plan: SessionPlan?, logLimit: RateLimitedLog, facts: ProcessFacts?,
            audit: Logger
        ) {
            self.machine = machine
            self.audit = audit
            self.request = request
            self.plan = plan
            self.logLimit = logLimit
            self.facts = facts
        }

        /// What HOOK and SET_ALLOWED tell QEMU to echo after a restart (version 2 only).
        func applied(_ lists: Channel.AllowLists) -> Channel.Applied? {
            channelVersion >= 2 ? plan?.applied(lists) : nil
        }

        /// Cancels the handshake in progress, if any: at once (its socket closed, its turn
        /// given back); the `cancelled` outcome it posts is dropped as stale.
        mutating func supersede() {
            handshake?.cancel()
            handshake = nil
            handshakeAttempt = nil
        }

        mutating func nextSeq() -> UInt32 {
            seq += 1
            return seq
        }

        mutating func newID() -> UInt64 {
            nextID += 1
            return nextID
        }
    }

    /// What the status view shows of a session, taken synchronously so that the hop to the
    /// registry carries a few fields, not the session's state.
    struct Published: Sendable, Equatable {
        /// The machine's state (its text is made only when it changed: most inputs change nothing).
        var state: GuestSessionMachine.State
        var hooked: Bool
        var failures: Int
        var lastFailure: String?
        var flapping: Bool
        var required: Bool
        var hooks: Int
        var lastHookMicroseconds: Int64?
        var lastHookRequestMicroseconds: Int64?
        /// The decision's introspector and lists (nil: not introspected).
        var introspector: String?
        var lists: Channel.AllowLists?

        init(_ state: LoopState) {
            func microseconds(_ duration: Duration) -> Int64 {
                let (seconds, attoseconds) = duration.components
                return seconds * 1_000_000 + attoseconds / 1_000_000_000_000
            }
            self.state = state.machine.state
            if case .hooked = state.machine.state { hooked = true } else { hooked = false }
            failures = state.machine.failures
            lastFailure = state.machine.lastFailure
            flapping = state.machine.isFlapping
            required = state.plan?.required == true || state.failClosed
            hooks = state.hooks
            lastHookMicroseconds = state.lastHook.map(microseconds)
            lastHookRequestMicroseconds = state.lastHookRequest.map(microseconds)
            if case .notIntrospected = state.machine.state {
                introspector = nil
                lists = nil
            } else {
                introspector = state.plan?.introspectorName
                lists = state.plan == nil ? nil : state.machine.allowLists
            }
        }
    }

    /// Updates the status view when what it shows changed (most inputs change nothing there,
    /// and then the registry is not called).
    @inline(never)
    private func publish(_ state: inout LoopState, _ uuid: GuestUUID, _ token: UInt64) {
        let published = Published(state)
        if let metrics = configuration.metrics {
            let standing: BrokerMetrics.Standing?
            switch state.machine.state {
            case .notIntrospected, .ended: standing = nil
            default: standing = state.plan.map { BrokerMetrics.Standing(introspector: $0.introspectorName, hooked: published.hooked) }
            }
            if standing != state.standing {
                metrics.moved(from: state.standing, to: standing)
                state.standing = standing
            }
        }
        guard published != state.published else { return }
        let previous = state.published
        state.published = published
        let text = published.state == previous?.state ? nil : published.state.description
        registry.update(uuid, token: token) { status in
            let now = Date()
            if let text, status.state != text {
                status.since = now
                status.state = text
            }
            if published.hooked != status.hooked { status.hookedSince = published.hooked ? now : nil }
            status.hooked = published.hooked
            status.failures = published.failures
            status.lastFailure = published.lastFailure
            status.flapping = published.flapping ? true : nil
            status.required = published.required ? true : nil
            status.hooks = published.hooks
            status.lastHookMicroseconds = published.lastHookMicroseconds
            status.lastHookRequestMicroseconds = published.lastHookRequestMicroseconds
            status.introspector = published.introspector
            status.commands = published.lists?.commands
            status.events = published.lists?.events
        }
    }

    /// Hands `input` to the session after `delay` (unless cancelled first): an entry in the
    /// reactor's deadline heap, not a task that sleeps.
    private func timer(after delay: Duration, _ inputs: Mailbox<Input>, _ input: Input) -> SessionAlarm {
        let reactor = socket.reactor
        return SessionAlarm(reactor: reactor, timer: reactor.schedule(at: .now.advanced(by: delay)) { inputs.post(input) })
    }

    /// Performs actions in order; false means the channel is done. Only sending awaits; every
    /// other action is applied synchronously by `apply`, which keeps this frame small.
    @inline(never)
    private func perform(
        _ actions: [GuestSessionMachine.Action], _ state: inout LoopState, _ inputs: Mailbox<Input>, _ logger: Logger
    ) async -> Bool {
        for action in actions {
            let step = apply(action, &state, inputs, logger)
            do {
                switch step {
                case .done:
                    continue
                case .close:
                    return false
                case .welcome:
                    try await send(.welcome, Channel.welcome(version: state.channelVersion), &state)
                case .request(let type, let payload):
                    try await sendRequest(type, payload, &state, inputs)
                case .hook(let lists):
                    guard let outcome = state.pendingOutcome else { continue }
                    state.pendingOutcome = nil
                    if await hook(outcome.descriptor, lists, &state, inputs, logger) == false { return false }
                }
            } catch {
                logger.warning("channel failed while performing \(action): \(error)")
                return false
            }
        }
        return true
    }

    /// What `perform` still has to send after `apply`.
    enum Step {
        case done
        case close
        case welcome
        case request(Channel.MessageType, [UInt8])
        case hook(Channel.AllowLists)
    }

    /// Applies an action's effect on the session's state and timers; returns what to send.
    @inline(never)
    private func apply(_ action: GuestSessionMachine.Action, _ state: inout LoopState, _ inputs: Mailbox<Input>, _ logger: Logger) -> Step {
        switch action {
        case .sendWelcome:
            return .welcome
        case .startHandshake:
            guard let plan = state.plan else { return .done }
            if state.triggeredAt == nil { state.triggeredAt = .now }
            var parameters = HandshakeParameters(
                abi: plan.allowLists.abi, request: state.request, expectedCookie: plan.cookie, timeout: plan.handshakeTimeout,
                allowedPeer: plan.peerRequirement)
            if let metrics = configuration.metrics {
                let name = plan.introspectorName
                parameters.onBusy = { metrics.busy(introspector: name) }
            }
            let endpoint = plan.endpoint
            state.attemptEndpoint = endpoint
            let attempt = state.newID()
            state.supersede()
            state.handshakeAttempt = attempt
            // Driven by the reactor's callbacks (no task); the outcome comes as an input.
            state.handshake = connector.start(to: endpoint, parameters) { outcome in
                inputs.post(.handshake(attempt: attempt, outcome))
            }
        case .sendHook(let lists):
            return .hook(lists)
        case .dropHandshake:
            state.pendingOutcome?.descriptor.close()
            state.pendingOutcome = nil
        case .cancelHandshake:
            state.supersede()
        case .sendRelease:
            // Required but unservable: the guest must not run unmonitored, so it stays held.
            guard !state.failClosed else {
                state.audit.warning(
                    "the policy requires this guest to be introspected but cannot serve it; not releasing its vCPUs",
                    metadata: state.auditMetadata(nil))
                return .done
            }
            state.audit.notice("RELEASE: the guest is not introspected; QEMU releases any vCPUs it holds", metadata: state.auditMetadata(nil))
            return .request(.release, [])
        case .scheduleRetry(let failures):
            var generator = SystemRandomNumberGenerator()
            var delay = (state.plan?.backoff ?? configuration.backoff).delay(afterFailures: failures, using: &generator)
            let id = state.newID()
            state.stopWatching(configuration.endpointWatcher)
            if let watch = state.endpointToWatch() {
                if state.wokenByEndpoint, !watch.ifPresent, state.quickRetries < LoopState.maximumQuickRetries {
                    // Woken by the socket's creation, then refused: the tool has bound but not yet
                    // listened. Try again shortly (50 ms doubling, 5 times), then the back-off.
                    delay = min(delay, .milliseconds(50 << state.quickRetries))
                    state.quickRetries += 1
                }
                state.watchToken = configuration.endpointWatcher?.watch(watch.path, ifPresent: watch.ifPresent) {
                    inputs.post(.endpointAppeared(timer: id))
                }
            }
            if !state.wokenByEndpoint { state.quickRetries = 0 }
            state.wokenByEndpoint = false
            logger.debug(
                "attempt \(failures) failed; retrying in \(format(delay))\(state.watchToken != nil ? " or when the endpoint's socket appears" : "")")
            state.retryAlarm?.cancel()
            state.retryTimer = id
            state.retryAlarm = timer(after: delay, inputs, .retryDue(timer: id))
        case .cancelRetry:
            state.retryAlarm?.cancel()
            state.retryAlarm = nil
            state.retryTimer = nil
            state.stopWatching(configuration.endpointWatcher)
        case .scheduleSurvivalCheck:
            let id = state.newID()
            state.survivalAlarm?.cancel()
            state.survivalTimer = id
            state.survivalAlarm = timer(after: configuration.hookSurvival, inputs, .hookSurvived(timer: id))
        case .sendSetAllowed(let lists):
            return .request(.setAllowed, lists.encoded(applied: state.applied(lists)))
        case .sendPreunhook:
            return .request(.preunhook, [])
        case .sendUnhook:
            state.unhookAlarm?.cancel()
            state.unhookAlarm = nil
            state.unhookTimerID = nil
            return .request(.unhook, [])
        case .scheduleUnhookDeadline:
            let timeout = state.plan?.unhookTimeout ?? .seconds(5)
            let id = state.newID()
            state.unhookAlarm?.cancel()
            state.unhookTimerID = id
            state.unhookAlarm = timer(after: timeout, inputs, .unhookDeadline(timer: id))
        case .adoptNewIntrospector:
            state.unhookAlarm?.cancel()
            state.unhookAlarm = nil
            state.unhookTimerID = nil
            if let next = state.pendingPlan {
                state.plan = next
                state.pendingPlan = nil
            }
        case .log(let level, let message):
            if let suppressed = state.logLimit.admit() {
                if suppressed > 0 { logger.notice("\(suppressed) log lines of this session were suppressed (rate limit)") }
                logger.log(level: level.swiftLog, "\(message)", metadata: ["session.state": "\(state.machine.state)"])
            }
        case .failing(let reason):
            if let report = state.streak.failed(reason, at: .now) {
                RepeatingFailureLog.log(report, "introspecting the guest", logger, ["session.state": "\(state.machine.state)"])
            }
        case .succeeded(let line):
            var text = line
            if let lastHook = state.lastHook { text += " \(format(lastHook)) after the trigger" }
            if case .recovered(let attempts, let over) = state.streak.succeeded(at: .now) {
                text += ", after \(attempts) failed attempt\(attempts == 1 ? "" : "s") over \(format(over))"
            }
            state.audit.notice("\(text)", metadata: state.auditMetadata(state.plan))
        case .closeChannel:
            return .close
        }
        return .done
    }

    /// HOOK with the introspector's socket, right after checking that the peer is still the
    /// process whose identity was checked: the socket can read and write the guest's memory.
    @inline(never)
    private func hook(
        _ descriptor: Descriptor, _ lists: Channel.AllowLists, _ state: inout LoopState, _ inputs: Mailbox<Input>, _ logger: Logger
    ) async -> Bool {
        if let facts = state.facts {
            let verifier = configuration.verifier
            let pid = peer.pid
            let channel = socket.descriptor
            if let problem = await BlockingWork.shared.run({ verifier.recheck(pid: pid, facts, channel: channel.raw) }) {
                descriptor.close()
                logger.error("not hooking: \(problem); closing the channel")
                return false
            }
        }
        state.hookRequestedAt = .now
        do {
            try await sendRequest(.hook, lists.encoded(applied: state.applied(lists)), &state, inputs, passing: descriptor)
            return true
        } catch {
            logger.warning("channel failed while sending HOOK: \(error)")
            return false
        }
    }

    /// Sends a request and arms its RESULT timeout; while another request is outstanding it
    /// waits in the queue (version 1 does not pipeline). A passed descriptor is closed once
    /// sent: QEMU has its own copy then.
    @inline(never)
    private func sendRequest(
        _ type: Channel.MessageType, _ payload: [UInt8], _ state: inout LoopState, _ inputs: Mailbox<Input>,
        passing descriptor: Descriptor? = nil
    ) async throws {
        guard state.outstanding == nil else {
            state.queued.append(QueuedRequest(type: type, payload: payload, descriptor: descriptor))
            return
        }
        defer { descriptor?.close() }
        let seq = try await send(type, payload, &state, passing: descriptor?.raw)
        state.outstanding = (seq, type)
        state.resultAlarm?.cancel()
        state.resultAlarm = timer(after: configuration.resultTimeout, inputs, .resultTimeout(seq: seq))
    }

    /// After a RESULT: the next queued request, if any.
    @inline(never)
    private func sendQueuedRequest(_ state: inout LoopState, _ inputs: Mailbox<Input>, _ logger: Logger) async -> Bool {
        guard state.outstanding == nil, !state.queued.isEmpty else { return true }
        let next = state.queued.removeFirst()
        do {
            try await sendRequest(next.type, next.payload, &state, inputs, passing: next.descriptor)
            return true
        } catch {
            logger.warning("channel failed while sending \(next.type): \(error)")
            return false
        }
    }

    @discardableResult
    @inline(never)
    private func send(_ type: Channel.MessageType, _ payload: [UInt8], _ state: inout LoopState, passing fd: Int32? = nil) async throws -> UInt32 {
        let seq = state.nextSeq()
        try await socket.send(Channel.Frame(type, seq: seq, payload: payload), passing: fd, until: .now.advanced(by: configuration.resultTimeout))
        return seq
    }
}

/// One of a session's timers (retry, RESULT, unhook, survival), armed on the reactor.
struct SessionAlarm {
    let reactor: IOReactor
    let timer: IOReactor.Timer

    func cancel() { reactor.cancel(timer) }
}

/// A reload notice is pending for a session (coalesces reloads).
final class ReloadFlag: Sendable {
    let pending = Atomic<Bool>(false)
}

extension PlanDecision {
    /// Required, but no plan can serve it.
    var failsClosed: Bool {
        if case .requiredButUnservable = self { return true }
        return false
    }

    /// The deciding rule, for the audit log.
    var rule: String? {
        switch self {
        case .introspect(let plan): return plan.rule
        case .requiredButUnservable(let rule): return rule
        case .notIntrospected: return nil
        }
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
