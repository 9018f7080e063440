/// The life of one guest's introspection session, as a pure state machine: the daemon feeds
/// it what happened (QEMU's messages, handshake outcomes, timers) and performs the actions it
/// returns. Keeping it free of I/O makes every transition testable.
public struct GuestSessionMachine: Sendable {
    public enum State: Sendable, Equatable, CustomStringConvertible {
        /// Policy does not introspect this guest; vCPUs released.
        case notIntrospected
        /// Connecting and handshaking with the introspector (attempt n).
        case connecting(attempt: Int)
        /// HOOK sent, waiting for QEMU's RESULT.
        case hooking(attempt: Int)
        /// Waiting the back-off before attempt n.
        case backingOff(nextAttempt: Int)
        case hooked(ABIGeneration)
        /// QEMU unhooked for a pause, outgoing migration or snapshot; waits for it to run again.
        case suspended(Channel.Event.Kind)
        /// Policy introspects the guest, but QEMU accepts HOOK only while the VM runs (or while
        /// `required=on` holds its vCPUs): waiting for it to start or resume.
        case waitingForVM
        /// A policy change: SET_ALLOWED sent, waiting for QEMU's RESULT.
        case updating
        /// A policy change withdrew the guest or gave it another introspector: PREUNHOOK sent or
        /// the tool asked to let go; QEMU unhooks on the tool's hang-up or on UNHOOK.
        case unhooking
        /// The VM is shutting down or the channel closed.
        case ended

        public var isHooked: Bool {
            if case .hooked = self { return true }
            return false
        }

        /// A policy change is being applied to a hooked session.
        public var isUnhookingOrUpdating: Bool {
            switch self {
            case .unhooking, .updating: return true
            default: return false
            }
        }

        public var description: String {
            switch self {
            case .notIntrospected: return "not introspected"
            case .connecting(let attempt): return "connecting to the introspector (attempt \(attempt))"
            case .hooking(let attempt): return "hooking (attempt \(attempt))"
            case .backingOff(let next): return "waiting to retry (attempt \(next) next)"
            case .hooked(let abi): return "hooked (ABI \(abi))"
            case .suspended(let kind): return "unhooked for \(kind)"
            case .waitingForVM: return "waiting for the VM to run"
            case .updating: return "changing the allow-lists"
            case .unhooking: return "unhooking for a policy change"
            case .ended: return "ended"
            }
        }
    }

    public enum Input: Sendable {
        /// QEMU's HELLO passed the identity checks; `introspect` is the policy's decision and
        /// `introspectorID` the decision's `Channel.Applied.introspector` (nil: not introspected),
        /// compared with what a hooked QEMU says it was hooked with. `failsClosed`: the policy
        /// requires the guest but cannot serve it (a hooked guest is then not unhooked).
        case helloAccepted(Channel.Hello, introspect: Bool, introspectorID: [UInt8]? = nil, failsClosed: Bool = false)
        case handshakeSucceeded
        case handshakeFailed(BrokerError)
        case result(Channel.Result)
        case event(Channel.Event)
        case retryDue
        /// The policy was reloaded: this guest's new decision. `sameIntrospector` is false when
        /// the tool, its endpoint, secret or ABI changed (the session must be handed over).
        case policyChanged(introspect: Bool, allowLists: Channel.AllowLists, sameIntrospector: Bool)
        /// The tool did not let go within its unhook timeout after PREUNHOOK.
        case unhookDeadline
        /// The hook has lasted its survival time (`scheduleSurvivalCheck`): it resets the back-off.
        case hookSurvived
    }

    public enum Action: Sendable, Equatable {
        case sendWelcome
        /// Start connect + handshake with the introspector.
        case startHandshake
        /// Send HOOK with the handshake's socket, then close the broker's copy.
        case sendHook(Channel.AllowLists)
        /// Discard the socket of a handshake that is no longer wanted.
        case dropHandshake
        case cancelHandshake
        case sendRelease
        case scheduleRetry(afterFailures: Int)
        case cancelRetry
        case sendSetAllowed(Channel.AllowLists)
        case sendPreunhook
        case sendUnhook
        /// Arm the introspector's unhook timeout (then `unhookDeadline`).
        case scheduleUnhookDeadline
        /// A hook succeeded: arm its survival timer (then `hookSurvived`). Until it fires the hook
        /// has not proven itself, and a hang-up counts as a short-lived hook.
        case scheduleSurvivalCheck
        /// The new decision's introspector takes over: reload the connection parameters.
        case adoptNewIntrospector
        case log(LogLevel, String)
        /// An attempt failed for this reason (a back-off retry follows). The driver logs it when
        /// the failure starts or its reason changes and summarises repeats (`FailureStreak`),
        /// never a line per attempt.
        case failing(String)
        /// The guest is hooked: the driver logs this line once, with the failed attempts before
        /// it, if any.
        case succeeded(String)
        case closeChannel
    }

    public enum LogLevel: Sendable, Equatable {
        case debug, info, notice, warning, error
    }

    /// How a HELLO that says "hooked" (a broker restart) was reconciled with the current decision.
    public enum Reconciliation: Sendable, Equatable, CustomStringConvertible {
        /// Same introspector, same lists: nothing to do.
        case unchanged
        /// Same introspector, other lists: SET_ALLOWED.
        case setAllowed
        /// Another introspector (or ABI): PREUNHOOK, UNHOOK, then a handshake with the decided one.
        case handOver
        /// QEMU cannot say what it was hooked with (version 1): treated as unknown, so unhooked
        /// and hooked again per the current decision.
        case unknownRehook
        /// No longer introspected: PREUNHOOK, UNHOOK, then RELEASE.
        case unhookAndRelease
        /// Required by the policy, which cannot serve it (conflicting rules, an unknown
        /// introspector): left hooked as it is rather than run unmonitored.
        case keptRequiredButUnservable

        public var description: String {
            switch self {
            case .unchanged: return "hooked with the decided introspector and lists; nothing to do"
            case .setAllowed: return "hooked with the decided introspector but other lists; SET_ALLOWED"
            case .handOver: return "hooked with another introspector; PREUNHOOK, UNHOOK, then a handshake with the decided one"
            case .unknownRehook:
                return "hooked, but QEMU cannot say with which introspector and lists; PREUNHOOK, UNHOOK, then hooked again per the decision"
            case .unhookAndRelease: return "hooked, but no longer introspected; PREUNHOOK, UNHOOK, then RELEASE"
            case .keptRequiredButUnservable:
                return "hooked; the policy requires the guest but cannot serve it, so it stays hooked as it is rather than run unmonitored"
            }
        }
    }

    public private(set) var allowLists: Channel.AllowLists
    public private(set) var state: State = .notIntrospected
    /// Whether QEMU last said the VM runs (HELLO, events).
    public private(set) var vmRunning = false
    /// After a policy-driven unhook: start over with the new introspector.
    private var handOver = false
    /// After a restart's unhook of a guest no longer introspected: RELEASE it.
    private var releaseAfterUnhook = false
    /// The lists of the SET_ALLOWED in flight (what QEMU applies if it succeeds).
    private var sentLists: Channel.AllowLists?
    /// A reload that arrived while SET_ALLOWED was in flight: whether it introspects, and
    /// whether every reload since kept the introspector.
    private var changeWhileUpdating: (introspect: Bool, sameIntrospector: Bool)?
    public private(set) var introspect = false
    /// Consecutive failures since the last hook that survived; drives the back-off. A hook
    /// resets it only once it has lasted (`hookSurvived`), so a tool in a crash loop, which
    /// accepts each handshake and closes right after, meets a growing back-off.
    public private(set) var failures = 0
    /// Hooks in a row that ended (the tool hung up) before they survived.
    public private(set) var shortLivedHooks = 0
    /// The current hook has not survived yet (a hang-up now counts as short-lived).
    private var hookOnTrial = false
    /// Short-lived hooks in a row from which the session is said to be flapping.
    public static let flappingThreshold = 3
    /// The introspector accepts the guest and lets go again, over and over.
    public var isFlapping: Bool { shortLivedHooks >= Self.flappingThreshold }
    /// The last failure's reason, so a repeated failure is logged once at warning level.
    public private(set) var lastFailure: String?
    private var held = false
    /// Set by a HELLO that says "hooked", for the driver's audit line.
    public private(set) var reconciliation: Reconciliation?

    public init(allowLists: Channel.AllowLists) {
        self.allowLists = allowLists
    }

    public mutating func handle(_ input: Input) -> [Action] {
        switch input {
        case .helloAccepted(let hello, let introspect, let introspectorID, let failsClosed):
            self.introspect = introspect
            held = hello.flags.contains(.held)
            vmRunning = hello.flags.contains(.running)
            var actions: [Action] = [.sendWelcome]
            if hello.flags.contains(.hooked), let abi = hello.hookedABI {
                state = .hooked(abi)
                return actions + reconcile(hello, abi: abi, introspectorID: introspectorID, failsClosed: failsClosed)
            }
            if !introspect {
                state = .notIntrospected
                actions.append(.log(.notice, "policy does not introspect this guest"))
                if held { actions.append(.sendRelease) }
                return actions
            }
            guard hello.flags.contains(.running) || held else {
                state = .waitingForVM
                return actions
            }
            return actions + startAttempt()

        case .handshakeSucceeded:
            guard case .connecting(let attempt) = state else { return [.dropHandshake] }
            state = .hooking(attempt: attempt)
            return [.sendHook(allowLists)]

        case .handshakeFailed(let error):
            guard case .connecting = state else { return [] }
            if error.code == .cancelled { return [] }
            return fail("introspector handshake failed: \(error)")

        case .result(let result) where result.requestType == Channel.MessageType.setAllowed.rawValue:
            guard case .updating = state else { return [] }
            // A reload while the request was in flight is decided now, against what QEMU applied.
            let change = changeWhileUpdating
            let wanted = allowLists
            changeWhileUpdating = nil
            func thenTheReload() -> [Action] {
                guard let change else { return [] }
                return policyChanged(introspect: change.introspect, lists: wanted, sameIntrospector: change.sameIntrospector)
            }
            if result.error == 0 && result.hooked {
                allowLists = sentLists ?? allowLists
                sentLists = nil
                state = .hooked(allowLists.abi)
                return [.log(.notice, "allow-lists changed in place (SET_ALLOWED)")] + thenTheReload()
            }
            sentLists = nil
            guard result.hooked else {
                return fail("SET_ALLOWED failed at \(result.step): \(errnoName(result.error)); QEMU unhooked the guest") + thenTheReload()
            }
            // QEMU refused the request but is still hooked with lists the policy no longer wants:
            // a new HOOK would only meet EEXIST. Let the tool go and hook again with the new lists.
            state = .unhooking
            handOver = introspect
            return [
                .log(
                    .warning,
                    "SET_ALLOWED failed at \(result.step): \(errnoName(result.error)) and QEMU kept the old allow-lists; unhooking to hook again with the new ones"
                ),
                .sendPreunhook,
            ] + thenTheReload()

        case .result(let result) where result.requestType == Channel.MessageType.preunhook.rawValue:
            guard case .unhooking = state else { return [] }
            if result.error == 0 { return [.scheduleUnhookDeadline] }
            return [
                .log(.notice, "PREUNHOOK refused (\(errnoName(result.error))): the tool did not ask for the unhook event; unhooking at once"),
                .sendUnhook,
            ]

        case .result(let result) where result.requestType == Channel.MessageType.unhook.rawValue:
            guard case .unhooking = state, !result.hooked else { return [] }
            return finishUnhook()

        case .hookSurvived:
            guard hookOnTrial, state.isHooked else { return [] }
            hookOnTrial = false
            let wasFlapping = isFlapping
            failures = 0
            shortLivedHooks = 0
            return wasFlapping ? [.log(.notice, "the introspector's connection has lasted; no longer flapping")] : []

        case .unhookDeadline:
            guard case .unhooking = state else { return [] }
            return [.log(.warning, "the introspector did not close within its unhook timeout; unhooking"), .sendUnhook]

        case .policyChanged(let newIntrospect, let lists, let sameIntrospector):
            return policyChanged(introspect: newIntrospect, lists: lists, sameIntrospector: sameIntrospector)

        case .result(let result) where result.requestType == Channel.MessageType.hook.rawValue && !isHooking:
            // The decision changed while the HOOK was in flight (policy, pause): a guest hooked
            // now is hooked against the current decision, so let the tool go.
            guard result.error == 0 && result.hooked else { return [] }
            switch state {
            case .hooked, .unhooking, .updating:
                return []
            default:
                state = .unhooking
                handOver = introspect
                return [.log(.notice, "a HOOK sent before the decision changed succeeded; unhooking"), .sendPreunhook]
            }

        case .result(let result):
            guard case .hooking = state, result.requestType == Channel.MessageType.hook.rawValue else {
                return [.log(.debug, "RESULT for request type \(result.requestType) (step \(result.step), error \(result.error))")]
            }
            if result.error == 0 && result.hooked {
                state = .hooked(allowLists.abi)
                lastFailure = nil
                held = false
                hookOnTrial = true
                return [.succeeded("guest hooked (ABI \(allowLists.abi))"), .scheduleSurvivalCheck]
            }
            return fail(Self.explain(result, abi: allowLists.abi))

        case .retryDue:
            guard case .backingOff = state, introspect else { return [] }
            return startAttempt()

        case .event(let event):
            vmRunning = event.running
            guard let kind = event.kind else { return [.log(.info, "ignoring QEMU event of unknown kind \(event.rawKind)")] }
            if case .unhooking = state, !event.hooked, kind != .shutdown {
                // QEMU let go (the tool closed after PREUNHOOK, or an interception unhooked).
                return [.log(.info, "QEMU: \(kind)")] + finishUnhook()
            }
            return handle(kind, event)
        }
    }

    private mutating func policyChanged(introspect newIntrospect: Bool, lists: Channel.AllowLists, sameIntrospector: Bool) -> [Action] {
        let before = introspect
        introspect = newIntrospect
        switch state {
        case .hooked:
            if !newIntrospect || !sameIntrospector {
                allowLists = lists
                handOver = newIntrospect
                state = .unhooking
                let why = newIntrospect ? "the policy gives the guest another introspector" : "the policy no longer introspects the guest"
                return [.log(.notice, "\(why): PREUNHOOK, then unhook"), .sendPreunhook]
            }
            guard lists != allowLists else { return [] }
            allowLists = lists
            sentLists = lists
            changeWhileUpdating = nil
            state = .updating
            return [.log(.notice, "the policy changed the allow-lists: SET_ALLOWED"), .sendSetAllowed(lists)]
        case .updating:
            // Decided again when QEMU answers the SET_ALLOWED in flight (never lost behind it);
            // meanwhile any other path (a failure, a re-hook) uses the newest lists.
            allowLists = lists
            changeWhileUpdating = (newIntrospect, sameIntrospector && (changeWhileUpdating?.sameIntrospector ?? true))
            return []
        case .unhooking, .ended:
            allowLists = lists
            handOver = newIntrospect
            return []
        default:
            allowLists = lists
            var actions: [Action] = []
            if !sameIntrospector { actions.append(.adoptNewIntrospector) }
            if !newIntrospect {
                actions += stopTrying()
                state = .notIntrospected
                actions.append(.log(.notice, "the policy no longer introspects the guest"))
                if held { actions.append(.sendRelease) }
                return actions
            }
            if !before || !sameIntrospector {
                actions += stopTrying()
                guard vmRunning || held else {
                    state = .waitingForVM
                    return actions
                }
                failures = 0
                return actions + [.log(.notice, "the policy now introspects the guest")] + startAttempt()
            }
            return actions
        }
    }

    /// A restart: QEMU says the guest is hooked. Converge on the current decision through the
    /// same paths a live policy change takes (`.updating`, `.unhooking`, `finishUnhook`).
    private mutating func reconcile(_ hello: Channel.Hello, abi: ABIGeneration, introspectorID: [UInt8]?, failsClosed: Bool) -> [Action] {
        let said = hello.applied.map { "QEMU says \($0)" } ?? "QEMU cannot say with which introspector and lists (channel version \(hello.version))"
        let decision: Reconciliation
        if !introspect {
            decision = failsClosed ? .keptRequiredButUnservable : .unhookAndRelease
        } else if let applied = hello.applied {
            if applied.introspector != introspectorID || abi != allowLists.abi {
                decision = .handOver
            } else {
                decision = applied.lists == allowLists.digest ? .unchanged : .setAllowed
            }
        } else {
            // Unknown is not "the same": the socket QEMU holds may reach any tool with any lists.
            decision = .unknownRehook
        }
        reconciliation = decision
        let line = Action.log(.notice, "QEMU reports the guest is already hooked (ABI \(abi)); \(said): \(decision)")
        switch decision {
        case .unchanged:
            return [line]
        case .keptRequiredButUnservable:
            return [.log(.warning, "QEMU reports the guest is already hooked (ABI \(abi)); \(said): \(decision)")]
        case .setAllowed:
            state = .updating
            sentLists = allowLists
            changeWhileUpdating = nil
            return [line, .sendSetAllowed(allowLists)]
        case .handOver, .unknownRehook, .unhookAndRelease:
            state = .unhooking
            handOver = introspect
            releaseAfterUnhook = !introspect
            return [line, .sendPreunhook]
        }
    }

    /// QEMU has unhooked after a policy change: hand over to the new introspector, or stop.
    private mutating func finishUnhook() -> [Action] {
        // The broker's audit record says "guest unhooked for the policy change" (SessionDriver).
        var actions: [Action] = []
        let release = releaseAfterUnhook && !introspect
        releaseAfterUnhook = false
        if introspect && handOver {
            handOver = false
            failures = 0
            actions.append(.adoptNewIntrospector)
            guard vmRunning || held else {
                state = .waitingForVM
                return actions
            }
            return actions + startAttempt()
        }
        handOver = false
        state = .notIntrospected
        // "This VM is not introspected": a no-op for QEMU unless it holds vCPUs.
        if release { actions.append(.sendRelease) }
        return actions
    }

    private mutating func handle(_ kind: Channel.Event.Kind, _ event: Channel.Event) -> [Action] {
        let note = Action.log(.info, "QEMU: \(kind)\(event.error != 0 ? " (\(errnoName(event.error)))" : "")")
        switch kind {
        case .toolHangup:
            guard introspect, !isSuspended else { return [note] }
            // The tool went away (crash or restart): reconnect after the back-off, never at once.
            failures += 1
            var flapping: [Action] = []
            if hookOnTrial {
                hookOnTrial = false
                shortLivedHooks += 1
                if shortLivedHooks >= Self.flappingThreshold {
                    lastFailure = "flapping: the introspector closed its connection right after the hook \(shortLivedHooks) times in a row"
                    if shortLivedHooks == Self.flappingThreshold { flapping = [.log(.warning, lastFailure!)] }
                }
            }
            state = .backingOff(nextAttempt: failures + 1)
            // The broker's audit record says "the introspector closed its connection; QEMU unhooked the guest".
            let actions: [Action] = [note] + flapping + [.scheduleRetry(afterFailures: failures)]
            guard event.running else {
                state = .waitingForVM
                return Array(actions.dropLast())
            }
            return actions
        case .shutdown:
            let actions = stopTrying()
            state = .ended
            return [note] + actions
        case .requiredTimeout:
            return [.log(.error, "QEMU held the guest's vCPUs past its required-timeout; the guest stays paused until it is hooked")]
        case .paused, .migrationOut, .savevm, .resumed, .migrationFailed, .migrationIn, .reset:
            // QEMU's word on whether the VM is hooked is the truth (it may stop without unhooking,
            // e.g. on an I/O error, and it says so).
            if event.hooked {
                let actions = stopTrying()
                if !state.isHooked { state = .hooked(allowLists.abi) }
                return [note] + actions
            }
            guard introspect else { return [note] }
            if [.paused, .migrationOut, .savevm].contains(kind) {
                // Unhooked for a pause, an outgoing migration or a snapshot: wait for QEMU to say the VM runs here again.
                let actions = stopTrying()
                state = .suspended(kind)
                return [note] + actions
            }
            guard event.running else {
                let actions = stopTrying()
                state = .waitingForVM
                return [note] + actions
            }
            if case .connecting = state { return [note] }
            if case .hooking = state { return [note] }
            if case .backingOff = state { return [note] }
            return [note] + stopTrying() + startAttempt()
        }
    }

    private var isHooking: Bool {
        if case .hooking = state { return true }
        return false
    }

    private var isSuspended: Bool {
        if case .suspended = state { return true }
        return false
    }

    private mutating func startAttempt() -> [Action] {
        let attempt = failures + 1
        state = .connecting(attempt: attempt)
        return [.startHandshake]
    }

    private mutating func stopTrying() -> [Action] {
        switch state {
        case .connecting: return [.cancelHandshake]
        case .backingOff: return [.cancelRetry]
        default: return []
        }
    }

    private mutating func fail(_ reason: String) -> [Action] {
        failures += 1
        state = .backingOff(nextAttempt: failures + 1)
        lastFailure = reason
        return [.failing(reason), .scheduleRetry(afterFailures: failures)]
    }

    /// A sentence for a failed HOOK, naming the likely cause.
    public static func explain(_ result: Channel.Result, abi: ABIGeneration) -> String {
        let code = errnoName(result.error)
        switch (result.step, result.error) {
        case (.hook, 25):  // ENOTTY
            return
                "the host kernel has no KVM introspection: \(result.step) for ABI \(abi) answered \(code) (if the kernel has KVMI, it speaks another ABI generation)"
        case (.hook, 1):  // EPERM
            return "KVM introspection is disabled in the kernel: \(result.step) answered \(code); load kvm with introspection=1"
        case (.hook, 17):  // EEXIST
            return "the kernel still holds an earlier introspection session for this VM (\(result.step) answered \(code))"
        case (.hook, 22):  // EINVAL
            return "the kernel refused the introspector socket (\(result.step) answered \(code))"
        case (.command, _), (.event, _):
            return
                "the kernel refused \(result.step == .command ? "command" : "event") id \(result.failedID) (\(code)); QEMU unhooked the guest. Check the ABI generation (\(abi)) and the allow-list"
        case (.fd, _):
            return "QEMU did not receive the introspector socket with HOOK (\(code))"
        case (.state, _):
            return "QEMU refused HOOK in its current state (\(code))"
        case (.request, _):
            return "QEMU does not understand HOOK (\(code)); its patch may be older than the broker"
        default:
            return "HOOK failed at \(result.step): \(code)"
        }
    }
}
