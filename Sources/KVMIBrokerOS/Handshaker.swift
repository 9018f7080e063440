import CKVMIBroker
import DequeModule
import Foundation
import KVMIBrokerCore
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// What the broker sends and expects in one handshake.
public struct HandshakeParameters: Sendable {
    public var abi: ABIGeneration
    public var request: HandshakeRequest
    /// SHA-1 of the shared secret; nil accepts any hash, as QEMU does without a key (and says so).
    public var expectedCookie: CookieHash?
    /// From the start of the connect until the whole reply is in (QEMU's default is 10 s).
    public var timeout: Duration
    /// Who may be on the other end (the policy's `AllowedPeer`), checked right after the
    /// connect, before a byte of the handshake (the guest's UUID and name) is sent.
    public var allowedPeer: PeerRequirement?
    /// Called once per attempt that meets the introspector's full listen backlog (metrics).
    public var onBusy: (@Sendable () -> Void)?

    public init(
        abi: ABIGeneration, request: HandshakeRequest, expectedCookie: CookieHash?, timeout: Duration = .seconds(10),
        allowedPeer: PeerRequirement? = nil
    ) {
        self.abi = abi
        self.request = request
        self.expectedCookie = expectedCookie
        self.timeout = timeout
        self.allowedPeer = allowedPeer
    }
}

/// The introspector processes a connection may reach: for unix sockets the listener's uid
/// (SO_PEERCRED on the connected socket) or a user name, for vsock the context id.
public struct PeerRequirement: Sendable, Equatable {
    public var uids: Set<UInt32>
    public var users: [String]
    public var cids: Set<UInt32>

    public init(uids: Set<UInt32> = [], users: [String] = [], cids: Set<UInt32> = []) {
        self.uids = uids
        self.users = users
        self.cids = cids
    }

    public var description: String {
        (uids.sorted().map { "uid:\($0)" } + users.map { "user:\(escapedForLog($0, limit: 64))" } + cids.sorted().map { "cid:\($0)" })
            .joined(separator: ", ")
    }

    /// Nil when the peer on `fd` (connected to `endpoint`) is allowed; else why not. Resolves
    /// user names, so it runs on `BlockingWork` (NSS may be slow), never on the cooperative pool.
    func problem(with fd: Int32, endpoint: IntrospectorEndpoint) -> String? {
        switch endpoint {
        case .unix:
            var pid: pid_t = 0
            var uid: uid_t = 0
            var gid: gid_t = 0
            guard kvmib_peer_credentials(fd, &pid, &uid, &gid) == 0 else {
                return "cannot read the introspector's credentials (SO_PEERCRED: \(errnoName(errno)))"
            }
            var allowed = uids
            for user in users {
                if let entry = getpwnam(user) { allowed.insert(entry.pointee.pw_uid) }
            }
            guard allowed.contains(uid) else {
                return "the process listening there runs as uid \(uid), which AllowedPeer (\(description)) does not name"
            }
            return nil
        case .vsock(let cid, _):
            guard cids.contains(cid) else { return "vsock context \(cid) is not one AllowedPeer (\(description)) names" }
            return nil
        case .tcp:
            return "AllowedPeer cannot be verified for a tcp endpoint"
        }
    }
}

/// A completed handshake: the connected socket, ready to be handed to KVM, and what happened.
public struct HandshakeOutcome: Sendable {
    public let endpoint: IntrospectorEndpoint
    /// The connected socket. Nothing beyond the reply has been read from it.
    public let descriptor: Descriptor
    public let bytesSent: Int
    public let reply: HandshakeReply
    /// False when no secret was configured, so any hash was accepted.
    public let authenticated: Bool
    public let connectDuration: Duration
    public let handshakeDuration: Duration
    /// The introspector's turn (with a pacer): held until this outcome is dropped, so the
    /// descriptors of handshakes that wait for their HOOK count against the same bound.
    public internal(set) var turn: HandshakeTurn?
}

/// One handshake's turn at an introspector; the next in line gets it when this is released.
public final class HandshakeTurn: Sendable {
    private let pacer: HandshakePacer
    private let key: IntrospectorEndpoint
    private let id: UInt64

    init(pacer: HandshakePacer, key: IntrospectorEndpoint, id: UInt64) {
        self.pacer = pacer
        self.key = key
        self.id = id
    }

    deinit { pacer.release(key, id) }
}

/// Paces handshakes per introspector: at most `limit` in flight to one endpoint, the others
/// queued in arrival order. Real introspector libraries accept one guest at a time (libkvmi
/// listens with a backlog of 0 and finishes a KVMI round trip before the next accept), so a
/// boot storm must not throw a thousand connects at once at them.
///
/// The default, 64, is sized by what a storm does to a handshake's latency: a handshake waits
/// for three turns of the reactor (connected, reply, done), and with hundreds of guests ready
/// at once a turn takes half a millisecond or more (325 to 954 `epoll_wait`s in storms of
/// 1,000 lasting 430 to 570 ms under perf), so K in flight carry at most about K per 1.5 ms:
/// with 8, some 5,000 guests a second at best, about the rate a storm runs at, and the pacer,
/// not the tool, set the pace (`Documentation/benchmarks.md` measured 8, 16, 32 and 64). A tool that accepts one
/// guest at a time is paced by its backlog whatever K is: the others retry `EAGAIN` within
/// milliseconds.
public final class HandshakePacer: Sendable {
    public let limit: Int

    /// Who waits for a turn: a task (`turn(at:)`) or a callback (`request(at:_:)`).
    private enum Waiter {
        case task(CheckedContinuation<Void, any Error>)
        case callback(@Sendable (HandshakeTurn) -> Void)
    }

    private struct Lane {
        var inFlight = 0
        var queue = Deque<(id: UInt64, waiter: Waiter)>()

        var isIdle: Bool { inFlight == 0 && queue.isEmpty }

        /// True: run now; nil: queued.
        mutating func admit(_ id: UInt64, _ waiter: Waiter, limit: Int) -> Bool? {
            if inFlight < limit && queue.isEmpty {
                inFlight += 1
                return true
            }
            queue.append((id, waiter))
            return nil
        }

        mutating func withdraw(_ id: UInt64) -> Waiter? {
            guard let index = queue.firstIndex(where: { $0.id == id }) else { return nil }
            return queue.remove(at: index).waiter
        }

        /// A slot is free: it passes to the next in line, if any.
        mutating func release() -> (id: UInt64, waiter: Waiter)? {
            if let next = queue.popFirst() { return next }
            inFlight -= 1
            return nil
        }
    }

    /// A request made with `request(at:_:)`, for `withdraw`.
    public struct Ticket: Sendable {
        fileprivate let key: IntrospectorEndpoint
        fileprivate let id: UInt64
    }

    private struct State {
        var lanes: [IntrospectorEndpoint: Lane] = [:]
        var nextID: UInt64 = 1
        /// Turns cancelled before they queued.
        var early = EarlyCancellations()
    }

    private let state = Mutex(State())

    public init(limit: Int = 64) {
        precondition(limit > 0)
        self.limit = limit
    }

    /// Handshakes in flight and queued for `endpoint` now.
    public func load(of endpoint: IntrospectorEndpoint) -> (inFlight: Int, queued: Int) {
        state.withLock { state in
            let lane = state.lanes[endpoint]
            return (lane?.inFlight ?? 0, lane?.queue.count ?? 0)
        }
    }

    /// Runs `body` once a slot for `endpoint` is free; throws `cancelled` if the task is
    /// cancelled while queued.
    public func paced<T: Sendable>(_ endpoint: IntrospectorEndpoint, _ body: () async throws -> T) async throws -> T {
        let turn = try await self.turn(at: endpoint)
        defer { withExtendedLifetime(turn) {} }
        return try await body()
    }

    /// Waits for a turn at `endpoint`; the turn ends when the returned object is released.
    public func turn(at endpoint: IntrospectorEndpoint) async throws -> HandshakeTurn {
        let key = endpoint
        let id = state.withLock { state -> UInt64 in
            defer { state.nextID += 1 }
            state.early.given(state.nextID)
            return state.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                // Lanes are mutated in place (through the dictionary's accessor): copying one out
                // would copy its queue, O(guests) per step in a boot storm.
                let outcome = state.withLock { state -> Bool? in
                    if state.early.register(id) { return false }
                    return state.lanes[key, default: Lane()].admit(id, .task(continuation), limit: limit)
                }
                switch outcome {
                case true?: continuation.resume()
                case false?: continuation.resume(throwing: BrokerError(.cancelled, "cancelled while queued for the introspector"))
                case nil: break
                }
            }
        } onCancel: {
            let waiter = state.withLock { state -> Waiter? in
                guard let waiter = state.lanes[key]?.withdraw(id) else {
                    state.early.cancel(id)
                    return nil
                }
                if state.lanes[key]?.isIdle == true { state.lanes[key] = nil }
                return waiter
            }
            if case .task(let continuation) = waiter {
                continuation.resume(throwing: BrokerError(.cancelled, "cancelled while queued for the introspector"))
            }
        }
        return HandshakeTurn(pacer: self, key: key, id: id)
    }

    /// Asks for a turn at `endpoint` without a task. With a slot free now, the turn is
    /// returned. Else the request queues and `grant` gets the turn later, called by whoever ends
    /// another turn: it must only hand the turn on (a run of attempts that each fail at once
    /// would otherwise recurse through the pacer). `withdraw` takes back a request still queued.
    public func request(
        at endpoint: IntrospectorEndpoint, _ grant: @escaping @Sendable (HandshakeTurn) -> Void
    ) -> (ticket: Ticket, turn: HandshakeTurn?) {
        let key = endpoint
        let (id, now) = state.withLock { state -> (UInt64, Bool) in
            let id = state.nextID
            state.nextID += 1
            return (id, state.lanes[key, default: Lane()].admit(id, .callback(grant), limit: limit) == true)
        }
        return (Ticket(key: key, id: id), now ? HandshakeTurn(pacer: self, key: key, id: id) : nil)
    }

    /// Takes back a request still queued (its `grant` is not called); false if it was granted.
    @discardableResult
    public func withdraw(_ ticket: Ticket) -> Bool {
        state.withLock { state in
            guard state.lanes[ticket.key]?.withdraw(ticket.id) != nil else { return false }
            if state.lanes[ticket.key]?.isIdle == true { state.lanes[ticket.key] = nil }
            return true
        }
    }

    fileprivate func release(_ key: IntrospectorEndpoint, _ id: UInt64) {
        let next = state.withLock { state -> (id: UInt64, waiter: Waiter)? in
            let next = state.lanes[key]?.release()
            if state.lanes[key]?.isIdle == true { state.lanes[key] = nil }
            return next
        }
        guard let next else { return }
        switch next.waiter {
        case .task(let continuation): continuation.resume()
        case .callback(let grant): grant(HandshakeTurn(pacer: self, key: key, id: next.id))
        }
    }
}

/// Connects to an introspector and performs the QEMU-side handshake under one deadline.
public struct IntrospectorConnector: Sendable {
    public let io: AsyncSocketIO
    /// Nil: no pacing (probes, tests of one connection).
    public let pacer: HandshakePacer?

    public init(io: AsyncSocketIO = AsyncSocketIO(), pacer: HandshakePacer? = nil) {
        self.io = io
        self.pacer = pacer
    }

    /// Connects, sends the request, reads exactly the reply and checks the cookie. On any
    /// failure the socket is closed and the error names the endpoint. With a pacer, waits for
    /// the endpoint's turn first; the deadline starts when the turn comes.
    public func connectAndHandshake(to endpoint: IntrospectorEndpoint, _ parameters: HandshakeParameters) async throws -> HandshakeOutcome {
        let started = Mutex<(attempt: HandshakeAttempt?, cancelled: Bool)>((nil, false))
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<HandshakeOutcome, any Error>) in
                let attempt = start(to: endpoint, parameters) { continuation.resume(with: $0) }
                let cancelled = started.withLock { started in
                    started.attempt = attempt
                    return started.cancelled
                }
                if cancelled { attempt.cancel() }
            }
        } onCancel: {
            let attempt = started.withLock { started in
                started.cancelled = true
                return started.attempt
            }
            attempt?.cancel()
        }
    }

    /// Starts connecting and handshaking without a task (what a session does per attempt: the
    /// reactor's callbacks drive it). `completion` is called exactly once: with the outcome, or
    /// with `cancelled` from within `cancel` if that comes first.
    public func start(
        to endpoint: IntrospectorEndpoint, _ parameters: HandshakeParameters,
        completion: @escaping @Sendable (Result<HandshakeOutcome, BrokerError>) -> Void
    ) -> HandshakeAttempt {
        let attempt = HandshakeAttempt(endpoint: endpoint, parameters: parameters, reactor: io.reactor, pacer: pacer, completion: completion)
        attempt.begin()
        return attempt
    }
}

/// One connect and handshake, driven by the reactor's readiness callbacks and timers instead
/// of a task: the session's handshake in a boot storm costs no task, no task switch per step.
/// Steps: the pacer's turn (the deadline starts then), a non-blocking connect (a full listen
/// backlog is "busy": retried after 1 ms doubling to 20 ms, with jitter, until the deadline),
/// the `AllowedPeer` check on `BlockingWork`'s thread, the request, the reply read exactly,
/// the cookie. Every step runs under the attempt's lock, so `cancel` (from any thread) never
/// races a system call on the socket: once it returns, the socket is closed (during the
/// `AllowedPeer` check, when that check returns), the turn given back and no step runs again.
public final class HandshakeAttempt: Sendable {
    private enum Phase {
        case queued
        case connecting(Descriptor)
        case busy
        case checkingPeer(Descriptor)
        case sending(Descriptor, offset: Int)
        case reading(Descriptor, HandshakeReplyReader)
        case done
    }

    private struct State {
        var phase = Phase.queued
        var ticket: HandshakePacer.Ticket?
        var turn: HandshakeTurn?
        /// The turn of an attempt that ended without an outcome, given back by `deliver` after
        /// the lock (its release may start the next attempt in line).
        var returning: HandshakeTurn?
        var watch: IOReactor.Watch?
        var deadlineTimer: IOReactor.Timer?
        var retryTimer: IOReactor.Timer?
        var started = ContinuousClock.now
        var deadline = ContinuousClock.now
        var connected = ContinuousClock.now
        var busyTries = 0
        var pause = Duration.milliseconds(1)
    }

    /// What a step leaves to do once the lock is released.
    private struct Finish {
        var result: Result<HandshakeOutcome, BrokerError>
        var ticket: HandshakePacer.Ticket?
    }

    private let endpoint: IntrospectorEndpoint
    private let parameters: HandshakeParameters
    private let request: [UInt8]
    private let reactor: IOReactor
    private let completion: @Sendable (Result<HandshakeOutcome, BrokerError>) -> Void
    private let pacer: HandshakePacer?
    private let state = Mutex(State())

    fileprivate init(
        endpoint: IntrospectorEndpoint, parameters: HandshakeParameters, reactor: IOReactor, pacer: HandshakePacer?,
        completion: @escaping @Sendable (Result<HandshakeOutcome, BrokerError>) -> Void
    ) {
        self.endpoint = endpoint
        self.parameters = parameters
        self.request = parameters.request.encoded(for: parameters.abi)
        self.reactor = reactor
        self.pacer = pacer
        self.completion = completion
    }

    fileprivate func begin() {
        guard let pacer else {
            granted(nil)
            return
        }
        let (ticket, turn) = pacer.request(at: endpoint) { [self] turn in handedOver(turn) }
        if let turn {
            granted(turn)
            return
        }
        let withdraw = state.withLock { state -> Bool in
            switch state.phase {
            case .queued:
                state.ticket = ticket
                return false
            case .done:
                return true
            default:
                return false
            }
        }
        if withdraw { pacer.withdraw(ticket) }
    }

    /// Ends the attempt unless it has ended: `completion` gets `cancelled` (before this
    /// returns), the socket is closed and the turn given back.
    public func cancel() {
        let finish = state.withLock { state -> Finish? in
            finished(.failure(BrokerError(.cancelled, "cancelled")), &state)
        }
        deliver(finish)
    }

    /// The turn came at once (nil: no pacer).
    private func granted(_ turn: HandshakeTurn?) {
        let finish = state.withLock { state -> Finish? in
            guard case .queued = state.phase else { return nil }
            state.turn = turn
            return go(&state)
        }
        deliver(finish)
    }

    /// A queued request's turn, handed over by whoever ended another turn: kept, and taken up
    /// from the reactor's loop (a run of attempts that each fail at once must not recurse
    /// through the pacer). Cancelled meanwhile, the turn goes back as this returns.
    private func handedOver(_ turn: HandshakeTurn) {
        let unwanted = state.withLock { state -> HandshakeTurn? in
            guard case .queued = state.phase else { return turn }
            state.turn = turn
            return nil
        }
        guard unwanted == nil else { return }
        _ = reactor.schedule(at: .now) { [self] in
            let finish = state.withLock { state -> Finish? in
                guard case .queued = state.phase else { return nil }
                return go(&state)
            }
            deliver(finish)
        }
    }

    /// The turn is here: the deadline starts, then the connect.
    private func go(_ state: inout State) -> Finish? {
        state.ticket = nil
        state.started = .now
        state.deadline = state.started.advanced(by: parameters.timeout)
        state.deadlineTimer = reactor.schedule(at: state.deadline) { [self] in timedOut() }
        return connect(&state)
    }

    private func connect(_ state: inout State) -> Finish? {
        let address = SocketAddress(endpoint)
        let raw = socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard raw >= 0 else {
            let error = errno
            return finished(.failure(BrokerError(.io, "socket() failed: \(String(cString: strerror(error)))", errno: error)), &state)
        }
        let descriptor = Descriptor(adopting: raw)
        var result: Int32
        repeat {
            result = address.withPointer { Glibc.connect(raw, $0, $1) }
        } while result < 0 && errno == EINTR
        if result == 0 { return connected(descriptor, &state) }
        let error = errno
        if error == EAGAIN && address.family == AF_UNIX {
            // The listen backlog is full: the tool is busy with another guest, not gone.
            descriptor.close()
            if state.busyTries == 0 { parameters.onBusy?() }
            state.busyTries += 1
            let jittered = state.pause * Double.random(in: 0.5...1.5)
            guard ContinuousClock.now.advanced(by: jittered) < state.deadline else {
                return finished(.failure(noConnection()), &state)
            }
            state.phase = .busy
            state.retryTimer = reactor.schedule(at: .now.advanced(by: jittered)) { [self] in retryConnect() }
            state.pause = min(state.pause * 2, .milliseconds(20))
            return nil
        }
        guard error == EINPROGRESS else {
            descriptor.close()
            return finished(.failure(BrokerError(.connectFailed, "cannot connect: \(String(cString: strerror(error)))", errno: error)), &state)
        }
        state.phase = .connecting(descriptor)
        return watch(.writable, descriptor, &state)
    }

    private func retryConnect() {
        let finish = state.withLock { state -> Finish? in
            guard case .busy = state.phase else { return nil }
            state.retryTimer = nil
            return connect(&state)
        }
        deliver(finish)
    }

    /// The socket is connected: the peer check, or the request.
    private func connected(_ descriptor: Descriptor, _ state: inout State) -> Finish? {
        state.connected = .now
        guard let allowed = parameters.allowedPeer else {
            state.phase = .sending(descriptor, offset: 0)
            return send(&state)
        }
        // Resolving user names may block (NSS): on the blocking thread, before a byte of the
        // handshake (the guest's UUID and name) is sent.
        state.phase = .checkingPeer(descriptor)
        let fd = descriptor.raw
        let endpoint = self.endpoint
        BlockingWork.shared.submit { [self] in
            let problem = allowed.problem(with: fd, endpoint: endpoint)
            let finish = self.state.withLock { state -> Finish? in
                guard case .checkingPeer = state.phase else {
                    // Ended meanwhile: the socket was left open for this check (its number
                    // must not be reused under it) and is closed now.
                    descriptor.close()
                    return nil
                }
                if let problem {
                    descriptor.close()
                    return finished(
                        .failure(BrokerError(.authenticationFailed, "refusing the introspector before the handshake: \(problem)")), &state)
                }
                state.phase = .sending(descriptor, offset: 0)
                return send(&state)
            }
            deliver(finish)
        }
        return nil
    }

    private func send(_ state: inout State) -> Finish? {
        guard case .sending(let descriptor, var offset) = state.phase else { return nil }
        do {
            guard try sendAvailable(request, from: &offset, to: descriptor.raw) else {
                state.phase = .sending(descriptor, offset: offset)
                return watch(.writable, descriptor, &state)
            }
        } catch {
            return finished(.failure(error), &state)
        }
        state.phase = .reading(descriptor, HandshakeReplyReader())
        // The reply is hardly there yet (the tool has to run first): wait for readiness rather
        // than learn that from a `recv` (arming reports a reply that came meanwhile).
        return watch(.readable, descriptor, &state)
    }

    private func read(_ state: inout State) -> Finish? {
        guard case .reading(let descriptor, let progress) = state.phase else { return nil }
        var reader = progress
        // Into a buffer on the stack (1 KiB or less, or Swift takes it from the heap): nothing
        // is held between two callbacks but the reader.
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: ChannelSocket.readSize) { buffer -> Finish? in
            read(descriptor, &reader, into: buffer, &state)
        }
    }

    private func read(
        _ descriptor: Descriptor, _ reader: inout HandshakeReplyReader, into buffer: UnsafeMutableBufferPointer<UInt8>, _ state: inout State
    ) -> Finish? {
        while true {
            let asked = min(reader.readLimit, buffer.count)
            let count = Glibc.recv(descriptor.raw, buffer.baseAddress!, asked, Int32(MSG_DONTWAIT))
            if count < 0 {
                let error = errno
                if error == EINTR { continue }
                if error == EAGAIN {
                    state.phase = .reading(descriptor, reader)
                    return watch(.readable, descriptor, &state)
                }
                if error != ECONNRESET { return finished(.failure(BrokerError(.io, "recv failed", errno: error)), &state) }
            }
            if count <= 0 {
                return finished(
                    .failure(
                        BrokerError(.peerClosed, "the introspector closed the connection after \(reader.bytesRead) bytes of its handshake reply")),
                    &state)
            }
            let progress: HandshakeReplyReader.Progress
            do {
                progress = try reader.consume(UnsafeBufferPointer(rebasing: buffer[..<count]))
            } catch {
                return finished(.failure(error), &state)
            }
            guard case .complete(let reply) = progress else {
                // A short read emptied the socket: wait for the rest rather than `recv` EAGAIN.
                if count < asked {
                    state.phase = .reading(descriptor, reader)
                    return watch(.readable, descriptor, &state)
                }
                continue
            }
            var authenticated = false
            if let expected = parameters.expectedCookie {
                guard reply.cookieHash.constantTimeEquals(expected) else {
                    return finished(
                        .failure(
                            BrokerError(
                                .authenticationFailed, "cookie rejected: the introspector's hash does not match the SHA-1 of the shared secret")),
                        &state)
                }
                authenticated = true
            }
            let now = ContinuousClock.now
            let outcome = HandshakeOutcome(
                endpoint: endpoint, descriptor: descriptor, bytesSent: request.count, reply: reply, authenticated: authenticated,
                connectDuration: state.started.duration(to: state.connected), handshakeDuration: state.connected.duration(to: now))
            return finished(.success(outcome), &state)
        }
    }

    /// Waits for `events` on the socket; the step runs again from the callback.
    private func watch(_ events: IOEvents, _ descriptor: Descriptor, _ state: inout State) -> Finish? {
        do {
            state.watch = try reactor.whenReady(events, on: descriptor.raw) { [self] _ in ready() }
            return nil
        } catch {
            return finished(.failure(error as? BrokerError ?? BrokerError(.io, "\(error)")), &state)
        }
    }

    private func ready() {
        let finish = state.withLock { state -> Finish? in
            state.watch = nil
            switch state.phase {
            case .connecting(let descriptor):
                var socketError: Int32 = 0
                var length = socklen_t(MemoryLayout<Int32>.size)
                _ = getsockopt(descriptor.raw, SOL_SOCKET, SO_ERROR, &socketError, &length)
                guard socketError == 0 else {
                    return finished(
                        .failure(BrokerError(.connectFailed, "cannot connect: \(String(cString: strerror(socketError)))", errno: socketError)),
                        &state)
                }
                return connected(descriptor, &state)
            case .sending: return send(&state)
            case .reading: return read(&state)
            case .queued, .busy, .checkingPeer, .done: return nil
            }
        }
        deliver(finish)
    }

    private func timedOut() {
        let finish = state.withLock { state -> Finish? in
            state.deadlineTimer = nil
            let timeout = format(parameters.timeout)
            switch state.phase {
            case .queued, .done:
                return nil
            case .connecting, .busy:
                return finished(.failure(noConnection()), &state)
            case .sending:
                return finished(
                    .failure(BrokerError(.timedOut, "the introspector did not accept the \(request.count)-byte handshake within \(timeout)")),
                    &state)
            case .checkingPeer:
                return finished(.failure(BrokerError(.timedOut, "no complete handshake reply within \(timeout) (0 bytes received)")), &state)
            case .reading(_, let reader):
                return finished(
                    .failure(BrokerError(.timedOut, "no complete handshake reply within \(timeout) (\(reader.bytesRead) bytes received)")),
                    &state)
            }
        }
        deliver(finish)
    }

    private func noConnection() -> BrokerError {
        BrokerError(.timedOut, "no connection within \(format(parameters.timeout))")
    }

    /// Ends the attempt (once): disarms it, closes the socket unless it is the outcome's, and
    /// returns what to do after the lock (deliver, give the turn back, withdraw from the queue).
    private func finished(_ result: Result<HandshakeOutcome, BrokerError>, _ state: inout State) -> Finish? {
        switch state.phase {
        case .done:
            return nil
        case .connecting(let descriptor), .sending(let descriptor, _), .reading(let descriptor, _):
            if case .failure = result { descriptor.close() }
        case .checkingPeer:
            // The check on the blocking thread still uses the socket: it closes it when it returns.
            break
        case .queued, .busy:
            break
        }
        state.phase = .done
        if let watch = state.watch { reactor.cancel(watch) }
        if let timer = state.deadlineTimer { reactor.cancel(timer) }
        if let timer = state.retryTimer { reactor.cancel(timer) }
        state.watch = nil
        state.deadlineTimer = nil
        state.retryTimer = nil
        let turn = state.turn
        state.turn = nil
        let ticket = state.ticket
        state.ticket = nil
        switch result {
        case .success(var outcome):
            // The turn stays with the outcome until it is dropped (the HOOK sent).
            outcome.turn = turn
            return Finish(result: .success(outcome), ticket: ticket)
        case .failure(let error):
            state.returning = turn
            return Finish(result: .failure(error.located(at: endpoint.description)), ticket: ticket)
        }
    }

    /// After the lock: the queue withdrawn from, the turn given back (which may start the next
    /// attempt in line), then the completion.
    private func deliver(_ finish: Finish?) {
        guard let finish else { return }
        if let ticket = finish.ticket { pacer?.withdraw(ticket) }
        // Taken out under the lock and dropped after it (its last reference): the turn goes back
        // here, before the outcome is told.
        _ = state.withLock { state -> HandshakeTurn? in
            defer { state.returning = nil }
            return state.returning
        }
        completion(finish.result)
    }
}

/// Keeps trying to connect and handshake, waiting the back-off between failures.
public struct RetryingConnector: Sendable {
    public let connector: IntrospectorConnector
    public let backoff: Backoff
    /// Stop after this many attempts; nil tries until cancelled.
    public let maximumAttempts: Int?
    public let logger: Logger

    public init(connector: IntrospectorConnector = IntrospectorConnector(), backoff: Backoff, maximumAttempts: Int?, logger: Logger) {
        self.connector = connector
        self.backoff = backoff
        self.maximumAttempts = maximumAttempts
        self.logger = logger
    }

    /// Returns the first successful handshake; throws the last error once attempts run out, or
    /// `cancelled` when the task is cancelled. `onFailure` sees each failure and the delay chosen.
    public func run(
        to endpoint: IntrospectorEndpoint, _ parameters: HandshakeParameters,
        onFailure: @Sendable (Int, BrokerError, Duration?) -> Void = { _, _, _ in }
    ) async throws -> HandshakeOutcome {
        var generator = SystemRandomNumberGenerator()
        var failures = 0
        // A failure that repeats is logged when it starts or changes, then summarised.
        var streak = FailureStreak()
        let activity = "the introspector handshake with \(endpoint)"
        while true {
            do {
                let outcome = try await connector.connectAndHandshake(to: endpoint, parameters)
                if let report = streak.succeeded(at: .now) { RepeatingFailureLog.log(report, activity, logger) }
                return outcome
            } catch let error as BrokerError {
                failures += 1
                let exhausted = maximumAttempts.map { failures >= $0 } ?? false
                let delay = exhausted ? nil : backoff.delay(afterFailures: failures, using: &generator)
                if let report = streak.failed("\(error.code.rawValue): \(error.message)", at: .now) {
                    RepeatingFailureLog.log(
                        report, activity, logger, ["attempt": "\(failures)", "retry.in": "\(delay.map { format($0) } ?? "no retry")"])
                }
                onFailure(failures, error, delay)
                guard let delay else { throw error }
                do {
                    try await Task.sleep(for: delay)
                } catch {
                    throw BrokerError(.cancelled, "cancelled while waiting to retry", at: endpoint.description)
                }
            }
        }
    }
}

/// Durations as people read them: "10 s", "250 ms", "0.31 ms", "1 min 3 s".
public func format(_ duration: Duration) -> String {
    duration.humanReadable
}
