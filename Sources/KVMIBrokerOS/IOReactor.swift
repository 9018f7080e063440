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

/// One epoll thread that turns descriptor readiness and deadlines into resumed tasks, and
/// runs the tasks that prefer it as their executor (the guests' sessions: see the
/// `TaskExecutor` conformance below).
///
/// Every socket the broker drives is non-blocking; a task tries its system call first and,
/// on EAGAIN, awaits readiness here. So there is no thread per connection and nothing blocks
/// Swift's cooperative pool: the only blocking call, `epoll_wait`, runs on this thread.
///
/// A descriptor has one epoll registration whose interest mask is the union of its waiters
/// (at most one reader and one writer), so a session can send while its reader waits on the
/// same socket. The registration is one-shot: re-armed with what is still wanted after each
/// report, and removed when nobody waits any more, so a closed descriptor leaves nothing behind.
/// Deadlines of waits that ended early are dropped from the heap in bulk once they outnumber
/// the live ones, so the heap stays proportional to the waits in progress.
public final class IOReactor: Sendable {
    /// The process-wide reactor.
    public static let shared = IOReactor()

    /// What a readiness report resumes: a task's wait, or a callback (`whenReady`).
    private enum Resumer {
        case task(CheckedContinuation<IOEvents, any Error>)
        case callback(@Sendable (IOEvents) -> Void)

        func resume(_ events: IOEvents) {
            switch self {
            case .task(let continuation): continuation.resume(returning: events)
            case .callback(let handler): handler(events)
            }
        }

        /// A task's wait ends with `error`; a callback has no deadline and is cancelled silently.
        func fail(_ error: BrokerError) {
            if case .task(let continuation) = self { continuation.resume(throwing: error) }
        }
    }

    private struct Waiter {
        let token: UInt64
        let resumer: Resumer
        let deadline: ContinuousClock.Instant?
    }

    /// The waiters of one descriptor.
    private struct Registration {
        var reader: Waiter?
        var writer: Waiter?

        var interest: UInt32 {
            (reader == nil ? 0 : IOEvents.readable.rawValue) | (writer == nil ? 0 : IOEvents.writable.rawValue)
        }
        var isEmpty: Bool { reader == nil && writer == nil }
    }

    private struct Deadline: Comparable {
        let instant: ContinuousClock.Instant
        let token: UInt64
        static func < (a: Deadline, b: Deadline) -> Bool { a.instant < b.instant }
    }

    /// A timer armed with `schedule(at:_:)`.
    public struct Timer: Sendable, Hashable {
        fileprivate let token: UInt64
    }

    /// A callback armed with `whenReady(_:on:_:)`.
    public struct Watch: Sendable, Hashable {
        fileprivate let token: UInt64
    }

    private struct State {
        var registrations: [Int32: Registration] = [:]
        /// Armed timers: when each fires and what it calls.
        var timers: [UInt64: (instant: ContinuousClock.Instant, action: @Sendable () -> Void)] = [:]
        /// Where each live waiter is: its descriptor and whether it writes.
        var tokens: [UInt64: (fd: Int32, writes: Bool)] = [:]
        var deadlines = Heap<Deadline>()
        /// Heap entries whose waiter has already ended.
        var staleDeadlines = 0
        /// Waits cancelled before they registered.
        var early = EarlyCancellations()
        var nextToken: UInt64 = 1
    }

    private let epollFD: Int32
    private let wakeFD: Int32
    private static let wakeToken = UInt64.max
    private let state = Mutex(State())
    /// The reactor's thread (`pthread_self`), so that work it does itself skips the wake-up.
    private let reactorThread = Atomic<UInt>(0)
    /// Jobs of tasks that prefer this reactor as their executor (`TaskExecutor`).
    private let jobs = Mutex(JobQueue())

    private struct JobQueue {
        var pending: [UnownedJob] = []
        /// The reactor's thread is in (or about to enter) `epoll_wait` with nothing queued: a
        /// job queued now must wake it.
        var sleeping = false
    }

    public init() {
        epollFD = kvmib_epoll_create()
        wakeFD = kvmib_eventfd()
        precondition(epollFD >= 0 && wakeFD >= 0, "cannot create the I/O reactor: \(String(cString: strerror(errno)))")
        precondition(kvmib_epoll_add(epollFD, wakeFD, IOEvents.readable.rawValue, Self.wakeToken) == 0)
        let thread = Thread { [self] in
            kvmib_name_thread("kvmib-reactor")
            // SCHED_OTHER whoever starts it (a thread started from a SCHED_BATCH helper inherits
            // SCHED_BATCH): every session waits for this thread, it may preempt.
            useNormalScheduling()
            self.run()
        }
        thread.start()
    }

    /// Waits until `fd` reports `events` (`.readable` or `.writable`; hang-up and error are
    /// always reported), or throws `timedOut` at `deadline` (nil: no deadline), or `cancelled`
    /// when the task is cancelled. At most one task may wait to read and one to write on a
    /// descriptor at a time.
    public func wait(for events: IOEvents, on fd: Int32, until deadline: ContinuousClock.Instant?) async throws -> IOEvents {
        precondition(events == .readable || events == .writable, "wait for readable or writable, one at a time")
        let writes = events == .writable
        let token = state.withLock { state -> UInt64 in
            defer { state.nextToken += 1 }
            state.early.given(state.nextToken)
            return state.nextToken
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<IOEvents, any Error>) in
                var failure: BrokerError?
                var wakeNeeded = false
                state.withLock { state in
                    if state.early.register(token) {
                        failure = BrokerError(.cancelled, "cancelled")
                        return
                    }
                    let waiter = Waiter(token: token, resumer: .task(continuation), deadline: deadline)
                    switch register(waiter, on: fd, writes: writes, in: &state) {
                    case .failure(let error): failure = error
                    case .success(let earliest): wakeNeeded = earliest
                    }
                }
                if let failure {
                    continuation.resume(throwing: failure)
                } else if wakeNeeded && !isReactorThread {
                    // (On the reactor's own thread the timeout is recomputed before the next wait.)
                    wake()
                }
            }
        } onCancel: {
            let waiter = state.withLock { state -> Waiter? in
                guard let waiter = remove(token: token, from: &state) else {
                    state.early.cancel(token)
                    return nil
                }
                return waiter
            }
            waiter?.resumer.fail(BrokerError(.cancelled, "cancelled"))
        }
    }

    /// Calls `handler` on the reactor's thread once `fd` reports `events` (`.readable` or
    /// `.writable`; hang-up and error are always reported): a wait without a task, for I/O
    /// driven by callbacks. One-shot: arm it again to wait again. No deadline. `handler` runs
    /// between two looks at the descriptors and must not block. Throws when the descriptor
    /// cannot be registered or something already waits on that side of it.
    public func whenReady(_ events: IOEvents, on fd: Int32, _ handler: @escaping @Sendable (IOEvents) -> Void) throws -> Watch {
        precondition(events == .readable || events == .writable, "wait for readable or writable, one at a time")
        let result = state.withLock { state -> Result<UInt64, BrokerError> in
            let token = state.nextToken
            state.nextToken += 1
            return register(Waiter(token: token, resumer: .callback(handler), deadline: nil), on: fd, writes: events == .writable, in: &state)
                .map { _ in token }
        }
        return Watch(token: try result.get())
    }

    /// Disarms `watch`; true if its report had not been taken yet. A report already taken
    /// (by the turn in progress, when this is called from another handler or a timer's action,
    /// or by a turn running meanwhile on the reactor's thread) still calls the handler once, so
    /// a handler that must not run after this checks a flag of its own.
    @discardableResult
    public func cancel(_ watch: Watch) -> Bool {
        state.withLock { state in remove(token: watch.token, from: &state) != nil }
    }

    /// Adds `waiter` to `fd`'s registration and arms it; on success, whether its deadline is
    /// now the earliest (the reactor's thread must recompute its timeout).
    private func register(_ waiter: Waiter, on fd: Int32, writes: Bool, in state: inout State) -> Result<Bool, BrokerError> {
        var registration = state.registrations[fd] ?? Registration()
        let isNew = registration.isEmpty
        if (writes ? registration.writer : registration.reader) != nil {
            return .failure(BrokerError(.io, "two waiters to \(writes ? "write" : "read") fd \(fd)"))
        }
        if writes { registration.writer = waiter } else { registration.reader = waiter }
        if let error = arm(fd, registration.interest, isNew: isNew) {
            return .failure(BrokerError(.io, "epoll_ctl(fd \(fd)) failed", errno: error))
        }
        state.registrations[fd] = registration
        state.tokens[waiter.token] = (fd, writes)
        guard let deadline = waiter.deadline else { return .success(false) }
        let earliest = state.deadlines.min.map { deadline < $0.instant } ?? true
        state.deadlines.insert(Deadline(instant: deadline, token: waiter.token))
        return .success(earliest)
    }

    /// Calls `action` on the reactor's thread at `deadline`, unless `cancel` comes first. For
    /// the sessions' timers: an entry in the deadline heap, not a task and a libdispatch timer.
    /// `action` runs between two looks at the descriptors and must not block.
    public func schedule(at deadline: ContinuousClock.Instant, _ action: @escaping @Sendable () -> Void) -> Timer {
        let (token, wakeNeeded) = state.withLock { state -> (UInt64, Bool) in
            let token = state.nextToken
            state.nextToken += 1
            state.timers[token] = (deadline, action)
            let earliest = state.deadlines.min.map { deadline < $0.instant } ?? true
            state.deadlines.insert(Deadline(instant: deadline, token: token))
            return (token, earliest)
        }
        if wakeNeeded && !isReactorThread { wake() }
        return Timer(token: token)
    }

    /// Disarms `timer`; true if it had not fired yet (its action will not run).
    @discardableResult
    public func cancel(_ timer: Timer) -> Bool {
        state.withLock { state in
            guard state.timers.removeValue(forKey: timer.token) != nil else { return false }
            state.staleDeadlines += 1
            return true
        }
    }

    /// Timers armed and not yet fired or cancelled (for tests that prove nothing piles up).
    public var timerCount: Int { state.withLock { $0.timers.count } }

    private var isReactorThread: Bool { reactorThread.load(ordering: .relaxed) == UInt(pthread_self()) }

    /// Waits with no deadline (until ready or cancelled).
    public func wait(for events: IOEvents, on fd: Int32) async throws -> IOEvents {
        try await wait(for: events, on: fd, until: nil)
    }

    /// Descriptors registered and deadlines held, for tests that prove nothing piles up.
    public var footprint: (descriptors: Int, waiters: Int, deadlines: Int) {
        state.withLock { ($0.registrations.count, $0.tokens.count, $0.deadlines.count) }
    }

    /// Tokens given out and not registered, or cancelled before they registered (for tests:
    /// nothing may stay behind).
    var pendingTokens: Int { state.withLock { $0.early.count } }

    /// (Re-)arms the one-shot registration of `fd` with `interest`; returns an errno on failure.
    private func arm(_ fd: Int32, _ interest: UInt32, isNew: Bool) -> Int32? {
        if isNew {
            if kvmib_epoll_add_oneshot(epollFD, fd, interest, UInt64(UInt32(bitPattern: fd))) == 0 { return nil }
            // A stale registration of a descriptor number that was closed and reused elsewhere
            // cannot exist (we remove ours when the last waiter leaves), but be exact anyway.
            if errno != EEXIST { return errno }
        }
        if kvmib_epoll_mod_oneshot(epollFD, fd, interest, UInt64(UInt32(bitPattern: fd))) == 0 { return nil }
        if errno == ENOENT, kvmib_epoll_add_oneshot(epollFD, fd, interest, UInt64(UInt32(bitPattern: fd))) == 0 { return nil }
        return errno
    }

    /// Removes a live waiter (cancelled or expired): re-arms its descriptor for what is still
    /// wanted, or drops the registration. Returns the waiter, nil if it already ended.
    private func remove(token: UInt64, from state: inout State) -> Waiter? {
        guard let (fd, writes) = state.tokens.removeValue(forKey: token), var registration = state.registrations[fd] else { return nil }
        let waiter = writes ? registration.writer : registration.reader
        if writes { registration.writer = nil } else { registration.reader = nil }
        settle(fd, registration, in: &state)
        if waiter?.deadline != nil { state.staleDeadlines += 1 }
        return waiter
    }

    private func settle(_ fd: Int32, _ registration: Registration, in state: inout State) {
        if registration.isEmpty {
            state.registrations[fd] = nil
            _ = kvmib_epoll_del(epollFD, fd)
        } else {
            state.registrations[fd] = registration
            _ = arm(fd, registration.interest, isNew: false)
        }
    }

    private func wake() {
        var one: UInt64 = 1
        _ = Glibc.write(wakeFD, &one, 8)
    }

    private func run() {
        var tokens = [UInt64](repeating: 0, count: 128)
        var events = [UInt32](repeating: 0, count: 128)
        var batch: [UnownedJob] = []
        // Reused from turn to turn (no allocation per turn).
        var ready: [(Resumer, IOEvents)] = []
        var expired: [Resumer] = []
        var fired: [@Sendable () -> Void] = []
        reactorThread.store(UInt(pthread_self()), ordering: .relaxed)
        let executor = asUnownedTaskExecutor()
        while true {
            // The jobs queued so far (those they queue run after the next look at the descriptors).
            jobs.withLock { swap(&batch, &$0.pending) }
            for job in batch { job.runSynchronously(on: executor) }
            batch.removeAll(keepingCapacity: true)
            var timeout = state.withLock { state -> Int32 in
                while let first = state.deadlines.min, state.tokens[first.token] == nil, state.timers[first.token] == nil {
                    _ = state.deadlines.removeMin()
                    state.staleDeadlines -= 1
                }
                guard let first = state.deadlines.min else { return -1 }
                let remaining = ContinuousClock.now.duration(to: first.instant)
                if remaining <= .zero { return 0 }
                return Int32(min((remaining.millisecondsDouble).rounded(.up), 60_000))
            }
            let idle = jobs.withLock { queue -> Bool in
                guard queue.pending.isEmpty else { return false }
                queue.sleeping = true
                return true
            }
            if !idle { timeout = 0 }
            let count = kvmib_epoll_wait(epollFD, &tokens, &events, Int32(events.count), timeout)
            if idle { jobs.withLock { $0.sleeping = false } }
            if count < 0 && errno != EINTR {
                fatalError("epoll_wait failed: \(String(cString: strerror(errno)))")
            }
            state.withLock { state in
                for index in 0..<max(Int(count), 0) {
                    if tokens[index] == Self.wakeToken {
                        var value: UInt64 = 0
                        _ = Glibc.read(wakeFD, &value, 8)
                        continue
                    }
                    let fd = Int32(bitPattern: UInt32(truncatingIfNeeded: tokens[index]))
                    guard var registration = state.registrations[fd] else { continue }
                    let reported = IOEvents(rawValue: events[index])
                    let failed = !reported.isDisjoint(with: [.hangup, .error])
                    let wakesReader = failed || reported.contains(.readable) || events[index] & UInt32(KVMIB_EV_RDHUP) != 0
                    let wakesWriter = failed || reported.contains(.writable)
                    if wakesReader, let waiter = registration.reader {
                        registration.reader = nil
                        state.tokens[waiter.token] = nil
                        if waiter.deadline != nil { state.staleDeadlines += 1 }
                        ready.append((waiter.resumer, reported))
                    }
                    if wakesWriter, let waiter = registration.writer {
                        registration.writer = nil
                        state.tokens[waiter.token] = nil
                        if waiter.deadline != nil { state.staleDeadlines += 1 }
                        ready.append((waiter.resumer, reported))
                    }
                    // One-shot: the registration is disarmed now; re-arm for whoever still waits.
                    settle(fd, registration, in: &state)
                }
                let now = ContinuousClock.now
                while let first = state.deadlines.min, first.instant <= now {
                    _ = state.deadlines.removeMin()
                    if let timer = state.timers.removeValue(forKey: first.token) {
                        fired.append(timer.action)
                        continue
                    }
                    guard let waiter = remove(token: first.token, from: &state) else {
                        state.staleDeadlines -= 1
                        continue
                    }
                    state.staleDeadlines -= 1  // `remove` counted the entry just popped
                    expired.append(waiter.resumer)
                }
                compactDeadlines(&state)
            }
            // In order; each is released as soon as it has run, so what it holds (a handshake's
            // turn at its introspector, a session's reader) goes back then, not after the batch.
            ready.reverse()
            while let (resumer, result) = ready.popLast() { resumer.resume(result) }
            expired.reverse()
            while let resumer = expired.popLast() { resumer.fail(BrokerError(.timedOut, "deadline passed")) }
            fired.reverse()
            while let action = fired.popLast() { action() }
        }
    }

    /// Rebuilds the heap from the live waiters once stale entries are the majority.
    private func compactDeadlines(_ state: inout State) {
        guard state.staleDeadlines > 256, state.staleDeadlines * 2 > state.deadlines.count else { return }
        var live: [Deadline] = []
        live.reserveCapacity(state.deadlines.count - state.staleDeadlines)
        for (token, timer) in state.timers { live.append(Deadline(instant: timer.instant, token: token)) }
        for (token, place) in state.tokens {
            let registration = state.registrations[place.fd]
            if let instant = (place.writes ? registration?.writer : registration?.reader)?.deadline {
                live.append(Deadline(instant: instant, token: token))
            }
        }
        state.deadlines = Heap(live)
        state.staleDeadlines = 0
    }
}

/// The reactor is also an executor: a task that prefers it (`withTaskExecutorPreference`) runs
/// on the reactor's thread, between two looks at the descriptors, as an event loop's callbacks
/// do. The sessions run there: a socket that becomes ready resumes its task on the same thread,
/// with no hand-over to another thread and no wake-up, which in a boot storm was most of the
/// broker's cost. Blocking work still goes to `BlockingWork` (its result comes back here).
extension IOReactor: TaskExecutor {
    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let wakeNeeded = jobs.withLock { queue -> Bool in
            queue.pending.append(job)
            guard queue.sleeping else { return false }
            queue.sleeping = false
            return true
        }
        if wakeNeeded { wake() }
    }
}
