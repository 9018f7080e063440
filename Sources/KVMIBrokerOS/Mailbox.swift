import DequeModule
import KVMIBrokerCore
import Synchronization

/// One consumer's inputs, in arrival order: what a guest's session reads its channel frames,
/// handshake outcomes and timers from.
///
/// Cheaper than a rendezvous channel where it matters (a boot storm hands each session a few
/// inputs): neither `post` nor `offer` suspends, and `next` suspends only when nothing is
/// queued. Bounded where a peer decides the rate: an input given with `offer` (a channel
/// frame) is queued at once, in arrival order, and while more than `capacity` offered inputs
/// are queued its producer is told to pause until `whenRoom` calls it back, so a QEMU that
/// streams frames waits for its session, not the broker's memory. Inputs given with `post`
/// must be bounded by their producer (one handshake outcome per attempt, one input per armed
/// timer, coalesced reload notices).
///
/// Inlinable so that its user's module specializes it for its element type: unspecialized, each
/// call looked up the metadata of the queue's tuple and optional types at run time, which was
/// several percent of the reactor thread's time in a boot storm.
public final class Mailbox<Element: Sendable>: Sendable {
    @usableFromInline
    struct State {
        /// Each element with whether it was offered (those count against the capacity).
        @usableFromInline var queue = Deque<(element: Element, offered: Bool)>()
        /// Offered elements in `queue`.
        @usableFromInline var bounded = 0
        @usableFromInline var consumer: (id: UInt64, continuation: CheckedContinuation<Element?, Never>)?
        /// Producers told to pause, oldest first: called once there is room.
        @usableFromInline var paused = Deque<@Sendable () -> Void>()
        @usableFromInline var nextID: UInt64 = 0
        /// The consumer's wait cancelled before it registered.
        @usableFromInline var early = EarlyCancellations()
        @usableFromInline var finished = false

        @usableFromInline
        init() {}

        @inlinable
        mutating func newWait() -> UInt64 {
            nextID += 1
            early.given(nextID)
            return nextID
        }
    }

    @usableFromInline
    let state = Mutex(State())

    /// How many offered elements may be queued before their producer pauses.
    public let capacity: Int

    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
    }

    /// Queues `element` now (dropped once finished). For inputs bounded by their producer.
    @inlinable
    public func post(_ element: Element) {
        let consumer = state.withLock { state -> CheckedContinuation<Element?, Never>? in
            guard !state.finished else { return nil }
            if let consumer = state.consumer {
                state.consumer = nil
                return consumer.continuation
            }
            state.queue.append((element, false))
            return nil
        }
        consumer?.resume(returning: element)
    }

    /// Queues `element` now, in arrival order (dropped once finished). True: the producer may
    /// go on. False: more than `capacity` offered elements are queued; the producer pauses and
    /// `whenRoom` is called once (never under the mailbox's lock, never from within this call)
    /// when the consumer has taken enough of them, or when the mailbox finishes.
    @inlinable
    public func offer(_ element: Element, whenRoom: @escaping @Sendable () -> Void) -> Bool {
        let (consumer, goOn) = state.withLock { state -> (CheckedContinuation<Element?, Never>?, Bool) in
            if state.finished { return (nil, true) }
            if let consumer = state.consumer {
                state.consumer = nil
                return (consumer.continuation, true)
            }
            state.queue.append((element, true))
            state.bounded += 1
            guard state.bounded > capacity else { return (nil, true) }
            state.paused.append(whenRoom)
            return (nil, false)
        }
        consumer?.resume(returning: element)
        return goOn
    }

    /// The next element, waiting for one; nil once finished and drained, or when the
    /// consumer's task is cancelled while it waits.
    @inlinable
    public func next() async -> Element? {
        var admitted: (@Sendable () -> Void)?
        let taken = state.withLock { state -> Element? in
            guard let first = state.queue.popFirst() else { return nil }
            if first.offered { admitted = admitProducer(&state) }
            return first.element
        }
        if let taken {
            admitted?()
            return taken
        }
        let id = state.withLock { $0.newWait() }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Element?, Never>) in
                var admitted: (@Sendable () -> Void)?
                let immediate = state.withLock { state -> Element?? in
                    let cancelled = state.early.register(id)
                    if let first = state.queue.popFirst() {
                        if first.offered { admitted = admitProducer(&state) }
                        return .some(first.element)
                    }
                    if state.finished || cancelled { return .some(nil) }
                    state.consumer = (id, continuation)
                    return .none
                }
                admitted?()
                if let immediate { continuation.resume(returning: immediate) }
            }
        } onCancel: {
            let consumer = state.withLock { state -> CheckedContinuation<Element?, Never>? in
                guard let consumer = state.consumer, consumer.id == id else {
                    state.early.cancel(id)
                    return nil
                }
                state.consumer = nil
                return consumer.continuation
            }
            consumer?.resume(returning: nil)
        }
    }

    /// Ends the mailbox: queued elements are still delivered, new ones are dropped, paused
    /// producers are called back and a waiting consumer gets nil.
    @inlinable
    public func finish() {
        let (consumer, paused) = state.withLock { state in
            state.finished = true
            let consumer = state.consumer
            state.consumer = nil
            let paused = state.paused
            state.paused.removeAll()
            return (consumer, paused)
        }
        consumer?.continuation.resume(returning: nil)
        for producer in paused { producer() }
    }

    /// Elements queued now (for tests and the footprint).
    public var count: Int { state.withLock { $0.queue.count } }

    /// Producers paused until there is room (for tests).
    var pausedProducers: Int { state.withLock { $0.paused.count } }

    /// A consumer waits for an element (for tests).
    var hasConsumer: Bool { state.withLock { $0.consumer != nil } }

    /// Waits given out and not registered, or cancelled before they registered (for tests:
    /// nothing may stay behind).
    var pendingWaits: Int { state.withLock { $0.early.count } }

    /// An offered element left the queue: the oldest paused producer goes on once at most
    /// `capacity` offered elements are queued.
    @inlinable
    func admitProducer(_ state: inout State) -> (@Sendable () -> Void)? {
        state.bounded -= 1
        guard state.bounded <= capacity else { return nil }
        return state.paused.popFirst()
    }
}
