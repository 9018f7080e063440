import CKVMIBroker
import DequeModule
import KVMIBrokerCore
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Bounds the connections a server holds, so a boot storm or a flood cannot exhaust the
/// process's descriptors (libdispatch traps when it cannot open a file under EMFILE) nor
/// starve the guests that speak first.
///
/// - At most `maximumConnections` live at once; past that the server stops accepting and
///   the kernel's listen backlog holds the rest (QEMU's chardev retries on its own).
/// - Connections that have not introduced themselves yet ("greeting") are capped at
///   `maximumGreeting`: when a newer one needs room, the oldest silent one is shut down.
///   A real QEMU sends HELLO right after connecting, so it leaves that set at once.
public final class ConnectionAdmission: Sendable {
    public let maximumConnections: Int
    public let maximumGreeting: Int

    private struct State {
        var live = 0
        var greeting: [UInt64: Descriptor] = [:]
        /// Greeting connections, oldest first (entries that left are skipped lazily).
        var order = Deque<UInt64>()
        var nextID: UInt64 = 1
        var slotWaiter: CheckedContinuation<Void, Never>?
        /// `waitForAnEnd(orAfter:on:)`'s bound passed before its waiter was in place.
        var nudged = false
        var evicted = 0
    }

    private let state = Mutex(State())

    public init(maximumConnections: Int, maximumGreeting: Int) {
        precondition(maximumConnections > 0 && maximumGreeting > 0)
        self.maximumConnections = maximumConnections
        self.maximumGreeting = maximumGreeting
    }

    /// Limits from the process's descriptor limit: a live connection holds one descriptor (its
    /// channel), and a second only while its handshake is in flight, which the handshake pacer
    /// bounds; `reserve` stay free for those sockets and everything else (libvirt, /proc reads,
    /// the runtime).
    public convenience init(descriptorLimit: Int, reserve: Int = 128) {
        let connections = max(1, descriptorLimit - reserve)
        self.init(maximumConnections: connections, maximumGreeting: max(1, min(256, connections / 4)))
    }

    /// Live connections now, and silent ones shut down so far.
    public var counts: (live: Int, greeting: Int, evicted: Int) {
        state.withLock { ($0.live, $0.greeting.count, $0.evicted) }
    }

    /// Returns when one more connection may be accepted. Makes room by shutting down the
    /// oldest silent connection when that is what blocks it.
    func waitForRoom() async {
        while true {
            let hasRoom = state.withLock { state -> Bool in
                if state.live < maximumConnections { return true }
                evictOldest(&state)
                return false
            }
            if hasRoom { return }
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state -> Bool in
                    if state.live < maximumConnections { return true }
                    state.slotWaiter = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        }
    }

    /// Returns when a connection ends or `bound` has passed, whichever comes first: after
    /// accept met EMFILE, descriptors also come back from elsewhere (a handshake's socket to an
    /// introspector, a file), and the guests that hold the rest may stay for days.
    func waitForAnEnd(orAfter bound: Duration, on reactor: IOReactor) async {
        state.withLock { $0.nudged = false }
        let timer = reactor.schedule(at: .now.advanced(by: bound)) { [self] in
            let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                guard let waiter = state.slotWaiter else {
                    state.nudged = true
                    return nil
                }
                state.slotWaiter = nil
                return waiter
            }
            waiter?.resume()
        }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let resumeNow = state.withLock { state -> Bool in
                if state.live == 0 || state.nudged {
                    state.nudged = false
                    return true
                }
                state.slotWaiter = continuation
                return false
            }
            if resumeNow { continuation.resume() }
        }
        reactor.cancel(timer)
    }

    func admitted() {
        state.withLock { $0.live += 1 }
    }

    func ended() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.live -= 1
            defer { state.slotWaiter = nil }
            return state.slotWaiter
        }
        waiter?.resume()
    }

    /// The connection waits for its peer's first message; returns a ticket for `greeted`.
    public func greeting(_ connection: Descriptor) -> UInt64 {
        state.withLock { state in
            let id = state.nextID
            state.nextID += 1
            state.greeting[id] = connection
            state.order.append(id)
            while state.greeting.count > maximumGreeting { evictOldest(&state) }
            return id
        }
    }

    /// The peer introduced itself (or the connection ended): it no longer counts as silent.
    public func greeted(_ ticket: UInt64) {
        state.withLock { state in
            state.greeting[ticket] = nil
            if state.order.count > 4 * max(state.greeting.count, 64) {
                state.order = Deque(state.order.filter { state.greeting[$0] != nil })
            }
        }
    }

    /// Shuts down (not closes: the owner's task closes it) the oldest silent connection, so
    /// its pending read ends at once.
    private func evictOldest(_ state: inout State) {
        while let id = state.order.popFirst() {
            guard let connection = state.greeting.removeValue(forKey: id) else { continue }
            _ = shutdown(connection.raw, Int32(SHUT_RDWR))
            state.evicted += 1
            return
        }
    }
}

/// Accepts connections on a non-blocking listener until the task is cancelled, each handled in
/// its own child task (no thread per connection), then closes the listener. Admission is
/// bounded (`admission`); when accept fails for lack of descriptors (EMFILE, ENFILE, ENOBUFS)
/// it tries again when a connection ends or 100 ms later (descriptors also come back from
/// handshake sockets and files), and says so once per episode, so it can neither spin, nor
/// stall while guests hold their connections, nor flood the log.
public func serveConnections(
    on listener: Descriptor, io: AsyncSocketIO, logger: Logger, what: String, admission: ConnectionAdmission? = nil,
    _ handle: @escaping @Sendable (Descriptor) async -> Void
) async {
    let admission = admission ?? ConnectionAdmission(descriptorLimit: currentDescriptorLimit().soft)
    var atLimit = false
    var accepted = 0
    // A flood makes the server reach its limit again and again: say so a few times a minute.
    let limitNotices = RateLimitedLog(linesPerWindow: 4, window: .seconds(60))
    await withDiscardingTaskGroup { group in
        while !Task.isCancelled {
            if admission.counts.live >= admission.maximumConnections {
                if !atLimit {
                    limitNotices.log(
                        logger,
                        "the \(what) socket holds its maximum of \(admission.maximumConnections) connections; new ones wait in the listen backlog")
                    atLimit = true
                }
                await admission.waitForRoom()
                continue
            }
            let raw = kvmib_accept(listener.raw, 1)
            if raw >= 0 {
                if atLimit {
                    limitNotices.log(logger, level: .notice, "the \(what) socket accepts connections again")
                    atLimit = false
                }
                let connection = Descriptor(adopting: raw)
                admission.admitted()
                group.addTask {
                    await handle(connection)
                    connection.close()
                    admission.ended()
                }
                // Let the new connections' tasks run: a stampede must not keep a pool thread here.
                accepted += 1
                if accepted % 16 == 0 { await Task.yield() }
                continue
            }
            let error = errno
            switch error {
            case EAGAIN:
                do {
                    _ = try await io.reactor.wait(for: .readable, on: listener.raw)
                } catch {
                    break
                }
            case EINTR, ECONNABORTED:
                continue
            case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                if !atLimit {
                    limitNotices.log(
                        logger, level: .error,
                        "accept failed on the \(what) socket: out of descriptors; trying again when a connection ends or within 100 ms",
                        metadata: ["errno": "\(errnoName(error))", "connections": "\(admission.counts.live)"])
                    atLimit = true
                }
                if admission.counts.live > 0 {
                    await admission.waitForAnEnd(orAfter: .milliseconds(100), on: io.reactor)
                } else {
                    try? await Task.sleep(for: .milliseconds(100))
                }
            default:
                logger.error("accept failed on the \(what) socket", metadata: ["errno": "\(errnoName(error))"])
                try? await Task.sleep(for: .milliseconds(100))
            }
        }
    }
    listener.close()
}

/// The process's descriptor limit (RLIMIT_NOFILE).
public func currentDescriptorLimit() -> (soft: Int, hard: Int) {
    var limit = rlimit()
    guard getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0 else { return (1024, 1024) }
    func value(_ raw: rlim_t) -> Int { raw > rlim_t(Int32.max) ? Int(Int32.max) : Int(raw) }  // RLIM_INFINITY included
    return (value(limit.rlim_cur), value(limit.rlim_max))
}

/// Raises the soft descriptor limit to the hard one (a daemon serving hundreds of guests needs
/// more than the usual 1,024); returns the limit in force afterwards.
@discardableResult
public func raiseDescriptorLimit() -> (soft: Int, hard: Int) {
    var limit = rlimit()
    if getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0, limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(RLIMIT_NOFILE_VALUE, &limit)
    }
    return currentDescriptorLimit()
}

/// The descriptors `reserveDescriptorTable` makes room for: 16,384 (a table of 128 KiB in the
/// kernel), thousands of guests' channels and handshakes.
public let reservedDescriptorTable = 16_384

/// Grows the process's descriptor table now to hold `count` descriptors (at most the soft
/// limit), so that it does not grow while guests connect.
///
/// The kernel doubles the table when a new descriptor does not fit, and in a process with more
/// than one thread it then waits for an RCU grace period (`synchronize_rcu` in
/// `expand_files`) before the system call returns: 10 to 25 ms on this kind of machine, in
/// `accept4` on the reactor's thread and in `pidfd_open` on the blocking-work thread, with
/// every other thread that opens a descriptor waiting behind it. A boot storm of 1,000 guests
/// doubled it from 64 to 2,048 entries, and the machine sat idle for about 100 ms of a 280 ms
/// storm (`perf sched timehist`; the reactor in state D in `expand_files`). The table never
/// shrinks, so once is enough. False when the descriptor could not be made (the table stays).
@discardableResult
public func reserveDescriptorTable(_ count: Int = reservedDescriptorTable) -> Bool {
    let limit = currentDescriptorLimit().soft
    return kvmib_reserve_descriptor_table(Int32(clamping: min(count, limit))) == 0
}

#if canImport(Glibc)
    private let RLIMIT_NOFILE_VALUE = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
#endif
