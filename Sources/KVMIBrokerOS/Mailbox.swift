import DequeModule
import KVMIBrokerCore
import Synchronization

/// One consumer's inputs, in arrival order: what a guest's session reads its channel frames,
/// handshake outcomes and timers from.
///
/// Cheaper than a rendezvous channel where it matters (a boot storm hands each session a few
/// inputs): `post` never suspends, and `next` suspends only when nothing is queued. Bounded
/// where a peer decides the rate: inputs sent with `send` (the channel's frames) wait while
/// `capacity` of them are queued, so a QEMU that streams frames waits for its session, not the
/// broker's memory. Inputs posted with `post` must be bounded by their producer (one handshake
/// outcome per attempt, one input per armed timer, coalesced reload notices).
public final class Mailbox<Element: Sendable>: Sendable {
    private struct State {
        /// Each element with whether it was sent with `send` (those count against the capacity).
        var queue = Deque<(element: Element, sent: Bool)>()
        var bounded = 0
        var consumer: CheckedContinuation<Element?, Never>?
        /// Senders waiting for room, each with the element it sends.
        var senders = Deque<(id: UInt64, element: Element, continuation: CheckedContinuation<Void, Never>)>()
        var nextID: UInt64 = 0
        /// Senders cancelled before they registered their wait.
        var cancelledSenders: Set<UInt64> = []
        var finished = false
        /// The consumer was cancelled before it registered its wait.
        var consumerCancelled = false
    }

    private let state = Mutex(State())

    private enum SendStep {
        case done
        case deliver(CheckedContinuation<Element?, Never>)
        case wait
    }
    /// How many sent (bounded) elements may be queued before `send` waits.
    public let capacity: Int

    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
    }

    /// Queues `element` now (dropped once finished). For inputs bounded by their producer.
    public func post(_ element: Element) {
        let consumer = state.withLock { state -> CheckedContinuation<Element?, Never>? in
            guard !state.finished else { return nil }
            if let consumer = state.consumer {
                state.consumer = nil
                return consumer
            }
            state.queue.append((element, false))
            return nil
        }
        consumer?.resume(returning: element)
    }

    /// Queues `element`, first waiting while `capacity` sent elements are queued (dropped once
    /// finished; a cancelled sender stops waiting and its element is dropped).
    public func send(_ element: Element) async {
        let step = state.withLock { state -> SendStep in
            if state.finished { return .done }
            if let consumer = state.consumer {
                state.consumer = nil
                return .deliver(consumer)
            }
            if state.bounded < capacity {
                state.queue.append((element, true))
                state.bounded += 1
                return .done
            }
            return .wait
        }
        switch step {
        case .done: return
        case .deliver(let consumer):
            consumer.resume(returning: element)
            return
        case .wait: break
        }
        let id = state.withLock { state -> UInt64 in
            state.nextID += 1
            return state.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state -> Bool in
                    if state.finished || state.cancelledSenders.remove(id) != nil { return true }
                    if state.bounded < capacity {
                        state.queue.append((element, true))
                        state.bounded += 1
                        return true
                    }
                    state.senders.append((id, element, continuation))
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            let waiting = state.withLock { state -> CheckedContinuation<Void, Never>? in
                guard let index = state.senders.firstIndex(where: { $0.id == id }) else {
                    state.cancelledSenders.insert(id)
                    return nil
                }
                return state.senders.remove(at: index).continuation
            }
            waiting?.resume()
        }
    }

    /// The next element, waiting for one; nil once finished and drained, or when the
    /// consumer's task is cancelled while it waits.
    public func next() async -> Element? {
        var admitted: CheckedContinuation<Void, Never>?
        let taken = state.withLock { state -> Element? in
            guard let first = state.queue.popFirst() else { return nil }
            if first.sent { admitted = admitSender(&state) }
            return first.element
        }
        if let taken {
            admitted?.resume()
            return taken
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Element?, Never>) in
                var sender: CheckedContinuation<Void, Never>?
                let immediate = state.withLock { state -> Element?? in
                    if let first = state.queue.popFirst() {
                        if first.sent { sender = admitSender(&state) }
                        return .some(first.element)
                    }
                    if state.finished || state.consumerCancelled {
                        state.consumerCancelled = false
                        return .some(nil)
                    }
                    state.consumer = continuation
                    return .none
                }
                sender?.resume()
                if let immediate { continuation.resume(returning: immediate) }
            }
        } onCancel: {
            let consumer = state.withLock { state -> CheckedContinuation<Element?, Never>? in
                guard let consumer = state.consumer else {
                    state.consumerCancelled = true
                    return nil
                }
                state.consumer = nil
                return consumer
            }
            consumer?.resume(returning: nil)
        }
    }

    /// Ends the mailbox: queued elements are still delivered, new ones are dropped, waiting
    /// senders return (their elements dropped) and a waiting consumer gets nil.
    public func finish() {
        let (consumer, senders) = state.withLock { state in
            state.finished = true
            let consumer = state.consumer
            state.consumer = nil
            let senders = state.senders
            state.senders.removeAll()
            return (consumer, senders)
        }
        consumer?.resume(returning: nil)
        for sender in senders { sender.continuation.resume() }
    }

    /// Elements queued now (for tests and the footprint).
    public var count: Int { state.withLock { $0.queue.count } }

    /// Senders waiting for room (for tests).
    var waitingSenders: Int { state.withLock { $0.senders.count } }

    /// A consumer waits for an element (for tests).
    var hasConsumer: Bool { state.withLock { $0.consumer != nil } }

    /// A sent element left the queue: its slot goes to the first waiting sender, if any.
    private func admitSender(_ state: inout State) -> CheckedContinuation<Void, Never>? {
        state.bounded -= 1
        guard state.bounded < capacity, let sender = state.senders.popFirst() else { return nil }
        state.queue.append((sender.element, true))
        state.bounded += 1
        return sender.continuation
    }
}
