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
    private let key: String
    private let id: UInt64

    init(pacer: HandshakePacer, key: String, id: UInt64) {
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
public final class HandshakePacer: Sendable {
    public let limit: Int

    private struct Lane {
        var inFlight = 0
        var queue = Deque<(id: UInt64, continuation: CheckedContinuation<Void, any Error>)>()

        var isIdle: Bool { inFlight == 0 && queue.isEmpty }

        /// True: run now; nil: queued.
        mutating func admit(_ id: UInt64, _ continuation: CheckedContinuation<Void, any Error>, limit: Int) -> Bool? {
            if inFlight < limit && queue.isEmpty {
                inFlight += 1
                return true
            }
            queue.append((id, continuation))
            return nil
        }

        mutating func withdraw(_ id: UInt64) -> CheckedContinuation<Void, any Error>? {
            guard let index = queue.firstIndex(where: { $0.id == id }) else { return nil }
            return queue.remove(at: index).continuation
        }

        /// A slot is free: it passes to the next in line, if any.
        mutating func release() -> CheckedContinuation<Void, any Error>? {
            if let next = queue.popFirst() { return next.continuation }
            inFlight -= 1
            return nil
        }
    }

    private struct State {
        var lanes: [String: Lane] = [:]
        var nextID: UInt64 = 1
        /// Turns cancelled before they queued.
        var early = EarlyCancellations()
    }

    private let state = Mutex(State())

    public init(limit: Int = 8) {
        precondition(limit > 0)
        self.limit = limit
    }

    /// Handshakes in flight and queued for `endpoint` now.
    public func load(of endpoint: IntrospectorEndpoint) -> (inFlight: Int, queued: Int) {
        state.withLock { state in
            let lane = state.lanes[endpoint.description]
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
        let key = endpoint.description
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
                    return state.lanes[key, default: Lane()].admit(id, continuation, limit: limit)
                }
                switch outcome {
                case true?: continuation.resume()
                case false?: continuation.resume(throwing: BrokerError(.cancelled, "cancelled while queued for the introspector"))
                case nil: break
                }
            }
        } onCancel: {
            let waiter = state.withLock { state -> CheckedContinuation<Void, any Error>? in
                guard let waiter = state.lanes[key]?.withdraw(id) else {
                    state.early.cancel(id)
                    return nil
                }
                return waiter
            }
            waiter?.resume(throwing: BrokerError(.cancelled, "cancelled while queued for the introspector"))
        }
        return HandshakeTurn(pacer: self, key: key, id: id)
    }

    fileprivate func release(_ key: String, _ id: UInt64) {
        let next = state.withLock { state -> CheckedContinuation<Void, any Error>? in
            let next = state.lanes[key]?.release()
            if state.lanes[key]?.isIdle == true { state.lanes[key] = nil }
            return next
        }
        next?.resume()
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
        guard let pacer else { return try await attempt(endpoint, parameters) }
        let turn = try await pacer.turn(at: endpoint)
        var outcome = try await attempt(endpoint, parameters)
        outcome.turn = turn
        return outcome
    }

    private func attempt(_ endpoint: IntrospectorEndpoint, _ parameters: HandshakeParameters) async throws -> HandshakeOutcome {
        let clock = ContinuousClock()
        let start = clock.now
        let deadline = start.advanced(by: parameters.timeout)
        do {
            let descriptor: Descriptor
            do {
                descriptor = try await connectWhenNotBusy(endpoint, until: deadline, onBusy: parameters.onBusy)
            } catch let error as BrokerError where error.code == .timedOut {
                throw BrokerError(.timedOut, "no connection within \(format(parameters.timeout))")
            }
            let connected = clock.now
            if let allowed = parameters.allowedPeer {
                let fd = descriptor.raw
                if let problem = await BlockingWork.shared.run({ allowed.problem(with: fd, endpoint: endpoint) }) {
                    descriptor.close()
                    throw BrokerError(.authenticationFailed, "refusing the introspector before the handshake: \(problem)")
                }
            }
            do {
                let (sent, reply, authenticated) = try await handshake(on: descriptor.raw, parameters, until: deadline)
                return HandshakeOutcome(
                    endpoint: endpoint, descriptor: descriptor, bytesSent: sent, reply: reply, authenticated: authenticated,
                    connectDuration: start.duration(to: connected), handshakeDuration: connected.duration(to: clock.now))
            } catch {
                descriptor.close()
                throw error
            }
        } catch let error as BrokerError {
            throw error.located(at: endpoint.description)
        }
    }

    /// A unix listener whose backlog is full answers EAGAIN: the tool is busy with another
    /// guest, not gone. Try again promptly, with a little jitter, until the deadline.
    private func connectWhenNotBusy(
        _ endpoint: IntrospectorEndpoint, until deadline: ContinuousClock.Instant, onBusy: (@Sendable () -> Void)? = nil
    ) async throws -> Descriptor {
        var pause = Duration.milliseconds(1)
        var busy = 0
        while true {
            do {
                return try await io.connect(to: endpoint, until: deadline)
            } catch let error as BrokerError where error.code == .busy {
                if busy == 0 { onBusy?() }
                busy += 1
                let jittered = pause * Double.random(in: 0.5...1.5)
                guard ContinuousClock.now.advanced(by: jittered) < deadline else {
                    throw BrokerError(.timedOut, "the introspector stayed busy (full listen backlog, \(busy) tries)", errno: EAGAIN)
                }
                try await Task.sleep(for: jittered)
                pause = min(pause * 2, .milliseconds(20))
            }
        }
    }

    /// The handshake on an already connected socket: returns bytes sent, the reply, and
    /// whether the cookie was checked.
    public func handshake(on fd: Int32, _ parameters: HandshakeParameters, until deadline: ContinuousClock.Instant) async throws -> (
        Int, HandshakeReply, Bool
    ) {
        let request = parameters.request.encoded(for: parameters.abi)
        do {
            try await io.writeAll(request, to: fd, until: deadline)
        } catch let error as BrokerError where error.code == .timedOut {
            throw BrokerError(.timedOut, "the introspector did not accept the \(request.count)-byte handshake within \(format(parameters.timeout))")
        }
        var reader = HandshakeReplyReader()
        while true {
            let chunk: [UInt8]
            do {
                chunk = try await io.readSome(from: fd, limit: min(reader.readLimit, 4096), until: deadline)
            } catch let error as BrokerError where error.code == .timedOut {
                throw BrokerError(
                    .timedOut,
                    "no complete handshake reply within \(format(parameters.timeout)) (\(reader.bytesRead) bytes received)")
            }
            if chunk.isEmpty {
                throw BrokerError(
                    .peerClosed, "the introspector closed the connection after \(reader.bytesRead) bytes of its handshake reply")
            }
            if case .complete(let reply) = try reader.consume(chunk) {
                guard let expected = parameters.expectedCookie else { return (request.count, reply, false) }
                guard reply.cookieHash.constantTimeEquals(expected) else {
                    throw BrokerError(.authenticationFailed, "cookie rejected: the introspector's hash does not match the SHA-1 of the shared secret")
                }
                return (request.count, reply, true)
            }
        }
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
