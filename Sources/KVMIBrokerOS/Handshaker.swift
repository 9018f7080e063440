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

    public init(abi: ABIGeneration, request: HandshakeRequest, expectedCookie: CookieHash?, timeout: Duration = .seconds(10)) {
        self.abi = abi
        self.request = request
        self.expectedCookie = expectedCookie
        self.timeout = timeout
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
    }

    private struct State {
        var lanes: [String: Lane] = [:]
        var nextID: UInt64 = 1
        var cancelledEarly: Set<UInt64> = []
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
        let key = endpoint.description
        let id = state.withLock { state -> UInt64 in
            defer { state.nextID += 1 }
            return state.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let outcome = state.withLock { state -> Bool? in
                    if state.cancelledEarly.remove(id) != nil { return false }
                    var lane = state.lanes[key] ?? Lane()
                    defer { state.lanes[key] = lane }
                    if lane.inFlight < limit && lane.queue.isEmpty {
                        lane.inFlight += 1
                        return true
                    }
                    lane.queue.append((id, continuation))
                    return nil
                }
                switch outcome {
                case true?: continuation.resume()
                case false?: continuation.resume(throwing: BrokerError(.cancelled, "cancelled while queued for the introspector"))
                case nil: break
                }
            }
        } onCancel: {
            let waiter = state.withLock { state -> CheckedContinuation<Void, any Error>? in
                guard var lane = state.lanes[key], let index = lane.queue.firstIndex(where: { $0.id == id }) else {
                    state.cancelledEarly.insert(id)
                    return nil
                }
                let waiter = lane.queue.remove(at: index).continuation
                state.lanes[key] = lane
                return waiter
            }
            waiter?.resume(throwing: BrokerError(.cancelled, "cancelled while queued for the introspector"))
        }
        defer { release(key, id) }
        return try await body()
    }

    private func release(_ key: String, _ id: UInt64) {
        let next = state.withLock { state -> CheckedContinuation<Void, any Error>? in
            state.cancelledEarly.remove(id)
            guard var lane = state.lanes[key] else { return nil }
            defer { state.lanes[key] = lane.inFlight == 0 && lane.queue.isEmpty ? nil : lane }
            if let next = lane.queue.popFirst() { return next.continuation }  // the slot passes on
            lane.inFlight -= 1
            return nil
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
        return try await pacer.paced(endpoint) { try await attempt(endpoint, parameters) }
    }

    private func attempt(_ endpoint: IntrospectorEndpoint, _ parameters: HandshakeParameters) async throws -> HandshakeOutcome {
        let clock = ContinuousClock()
        let start = clock.now
        let deadline = start.advanced(by: parameters.timeout)
        do {
            let descriptor: Descriptor
            do {
                descriptor = try await connectWhenNotBusy(endpoint, until: deadline)
            } catch let error as BrokerError where error.code == .timedOut {
                throw BrokerError(.timedOut, "no connection within \(format(parameters.timeout))")
            }
            let connected = clock.now
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
    private func connectWhenNotBusy(_ endpoint: IntrospectorEndpoint, until deadline: ContinuousClock.Instant) async throws -> Descriptor {
        var pause = Duration.milliseconds(1)
        var busy = 0
        while true {
            do {
                return try await io.connect(to: endpoint, until: deadline)
            } catch let error as BrokerError where error.code == .busy {
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
        while true {
            do {
                return try await connector.connectAndHandshake(to: endpoint, parameters)
            } catch let error as BrokerError {
                failures += 1
                let exhausted = maximumAttempts.map { failures >= $0 } ?? false
                let delay = exhausted ? nil : backoff.delay(afterFailures: failures, using: &generator)
                logger.warning(
                    "introspector handshake failed",
                    metadata: [
                        "tool.endpoint": "\(endpoint)", "attempt": "\(failures)", "error.code": "\(error.code.rawValue)",
                        "reason": "\(error.message)", "retry.in": "\(delay.map { format($0) } ?? "no retry")",
                    ])
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

/// Durations as people read them: "10 s", "250 ms", "0.31 ms".
public func format(_ duration: Duration) -> String {
    let seconds = duration.secondsDouble
    if seconds >= 1 { return seconds == seconds.rounded() ? "\(Int(seconds)) s" : String(format: "%.2f s", seconds) }
    let milliseconds = seconds * 1000
    if milliseconds >= 10 { return "\(Int(milliseconds.rounded())) ms" }
    return String(format: "%.3f ms", milliseconds)
}
