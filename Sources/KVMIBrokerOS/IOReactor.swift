import CKVMIBroker
import Foundation
import HeapModule
import KVMIBrokerCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Readiness events a task can wait for.
public struct IOEvents: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let readable = IOEvents(rawValue: UInt32(KVMIB_EV_IN))
    public static let writable = IOEvents(rawValue: UInt32(KVMIB_EV_OUT))
    /// Always reported, never needs asking for.
    public static let hangup = IOEvents(rawValue: UInt32(KVMIB_EV_HUP))
    public static let error = IOEvents(rawValue: UInt32(KVMIB_EV_ERR))
}

/// One epoll thread that turns descriptor readiness and deadlines into resumed tasks.
///
/// Every socket the broker drives is non-blocking; a task tries its system call first and,
/// on EAGAIN, awaits readiness here. So there is no thread per connection and nothing blocks
/// Swift's cooperative pool: the only blocking call, `epoll_wait`, runs on this thread.
public final class IOReactor: Sendable {
    /// The process-wide reactor.
    public static let shared = IOReactor()

    private struct Waiter {
        let fd: Int32
        let continuation: CheckedContinuation<IOEvents, any Error>
    }

    private struct Deadline: Comparable {
        let instant: ContinuousClock.Instant
        let token: UInt64
        static func < (a: Deadline, b: Deadline) -> Bool { a.instant < b.instant }
    }

    private struct State {
        var waiters: [UInt64: Waiter] = [:]
        var deadlines = Heap<Deadline>()
        var cancelledBeforeRegistration: Set<UInt64> = []
        var nextToken: UInt64 = 1
    }

    private let epollFD: Int32
    private let wakeFD: Int32
    private static let wakeToken: UInt64 = 0
    private let state = Mutex(State())

    public init() {
        epollFD = kvmib_epoll_create()
        wakeFD = kvmib_eventfd()
        precondition(epollFD >= 0 && wakeFD >= 0, "cannot create the I/O reactor: \(String(cString: strerror(errno)))")
        precondition(kvmib_epoll_add(epollFD, wakeFD, IOEvents.readable.rawValue, Self.wakeToken) == 0)
        let thread = Thread { [self] in self.run() }
        thread.name = "kvmi-io-reactor"
        thread.start()
    }

    /// Waits until `fd` reports one of `events` (hang-up and error are always reported), or
    /// throws `timedOut` at `deadline`, or `cancelled` when the task is cancelled.
    public func wait(for events: IOEvents, on fd: Int32, until deadline: ContinuousClock.Instant) async throws -> IOEvents {
        let token = state.withLock { state -> UInt64 in
            defer { state.nextToken += 1 }
            return state.nextToken
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<IOEvents, any Error>) in
                var failure: BrokerError?
                var wakeNeeded = false
                state.withLock { state in
                    if state.cancelledBeforeRegistration.remove(token) != nil {
                        failure = BrokerError(.cancelled, "cancelled")
                        return
                    }
                    if kvmib_epoll_add_oneshot(epollFD, fd, events.rawValue, token) != 0 {
                        let error = errno
                        failure = BrokerError(.io, "epoll_ctl(ADD, fd \(fd)) failed", errno: error)
                        return
                    }
                    state.waiters[token] = Waiter(fd: fd, continuation: continuation)
                    wakeNeeded = state.deadlines.min.map { deadline < $0.instant } ?? true
                    state.deadlines.insert(Deadline(instant: deadline, token: token))
                }
                if let failure {
                    continuation.resume(throwing: failure)
                } else if wakeNeeded {
                    wake()
                }
            }
        } onCancel: {
            let waiter = state.withLock { state -> Waiter? in
                guard let waiter = state.waiters.removeValue(forKey: token) else {
                    state.cancelledBeforeRegistration.insert(token)
                    return nil
                }
                _ = kvmib_epoll_del(epollFD, waiter.fd)
                return waiter
            }
            waiter?.continuation.resume(throwing: BrokerError(.cancelled, "cancelled"))
        }
    }

    private func wake() {
        var one: UInt64 = 1
        _ = Glibc.write(wakeFD, &one, 8)
    }

    private func run() {
        var tokens = [UInt64](repeating: 0, count: 128)
        var events = [UInt32](repeating: 0, count: 128)
        while true {
            let timeout = state.withLock { state -> Int32 in
                while let first = state.deadlines.min, state.waiters[first.token] == nil {
                    _ = state.deadlines.removeMin()
                }
                guard let first = state.deadlines.min else { return -1 }
                let remaining = ContinuousClock.now.duration(to: first.instant)
                if remaining <= .zero { return 0 }
                return Int32(min((remaining.millisecondsDouble).rounded(.up), 60_000))
            }
            let count = kvmib_epoll_wait(epollFD, &tokens, &events, Int32(events.count), timeout)
            if count < 0 && errno != EINTR {
                fatalError("epoll_wait failed: \(String(cString: strerror(errno)))")
            }
            var ready: [(CheckedContinuation<IOEvents, any Error>, IOEvents)] = []
            var expired: [CheckedContinuation<IOEvents, any Error>] = []
            state.withLock { state in
                for index in 0..<max(Int(count), 0) {
                    let token = tokens[index]
                    if token == Self.wakeToken {
                        var value: UInt64 = 0
                        _ = Glibc.read(wakeFD, &value, 8)
                        continue
                    }
                    guard let waiter = state.waiters.removeValue(forKey: token) else { continue }
                    _ = kvmib_epoll_del(epollFD, waiter.fd)
                    ready.append((waiter.continuation, IOEvents(rawValue: events[index])))
                }
                let now = ContinuousClock.now
                while let first = state.deadlines.min, first.instant <= now {
                    _ = state.deadlines.removeMin()
                    guard let waiter = state.waiters.removeValue(forKey: first.token) else { continue }
                    _ = kvmib_epoll_del(epollFD, waiter.fd)
                    expired.append(waiter.continuation)
                }
            }
            for (continuation, result) in ready { continuation.resume(returning: result) }
            for continuation in expired { continuation.resume(throwing: BrokerError(.timedOut, "deadline passed")) }
        }
    }
}
