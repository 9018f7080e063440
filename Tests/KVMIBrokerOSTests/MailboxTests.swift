import Synchronization
import Testing

@testable import KVMIBrokerOS

/// Counts calls from any thread.
final class Counter: Sendable {
    private let count = Atomic<Int>(0)
    func add() { count.add(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

@Suite("A session's mailbox: order, back-pressure on offered elements, the end")
struct MailboxTests {
    /// A mailbox of capacity 1 holding an offered 1 and an offered 2, whose producer was told
    /// to pause; `calls` counts the calls of its `whenRoom`.
    private func pausedProducer() -> (Mailbox<Int>, calls: Counter) {
        let mailbox = Mailbox<Int>(capacity: 1)
        let calls = Counter()
        #expect(mailbox.offer(1) { Issue.record("room with one element queued") })
        let goOn = mailbox.offer(2) { calls.add() }
        #expect(!goOn)
        #expect(mailbox.pausedProducers == 1)
        return (mailbox, calls)
    }

    @Test("elements come out in the order they went in; a waiting consumer gets the next one posted")
    func order() async {
        let mailbox = Mailbox<Int>(capacity: 2)
        mailbox.post(1)
        #expect(mailbox.offer(2) { Issue.record("room called without a pause") })
        mailbox.post(3)
        #expect(await mailbox.next() == 1)
        #expect(await mailbox.next() == 2)
        #expect(await mailbox.next() == 3)
        async let waiting = mailbox.next()
        mailbox.post(4)
        #expect(await waiting == 4)
        #expect(mailbox.pendingWaits == 0)
    }

    @Test("a producer pauses past `capacity` offered elements and is called back once; a later post does not overtake its element")
    func producerPausesAndKeepsItsPlace() async {
        let (mailbox, calls) = pausedProducer()
        #expect(mailbox.count == 2)
        // A timer's input posted now comes after the frame that was already read (as a RESULT
        // read before its timeout fired must be handled before the timeout).
        mailbox.post(3)
        #expect(calls.value == 0)
        #expect(await mailbox.next() == 1)
        #expect(calls.value == 1)
        #expect(mailbox.pausedProducers == 0)
        #expect(await mailbox.next() == 2)
        #expect(await mailbox.next() == 3)
        #expect(calls.value == 1)
        #expect(mailbox.count == 0)
        #expect(mailbox.pendingWaits == 0)
    }

    @Test("finish: queued elements still come out, then nil; new ones are dropped; a paused producer is called back")
    func finish() async {
        let (mailbox, calls) = pausedProducer()
        mailbox.finish()
        #expect(calls.value == 1)
        mailbox.post(3)
        #expect(mailbox.offer(4) { Issue.record("room called after the end") })
        #expect(await mailbox.next() == 1)
        #expect(await mailbox.next() == 2)
        #expect(await mailbox.next() == nil)
        #expect(calls.value == 1)
    }

    @Test("a consumer that waits returns nil when its task is cancelled; the next consumer is not affected")
    func cancelledConsumer() async {
        let mailbox = Mailbox<Int>(capacity: 1)
        let consumer = Task { await mailbox.next() }
        while !mailbox.hasConsumer { await Task.yield() }
        consumer.cancel()
        #expect(await consumer.value == nil)
        // A consumer cancelled before it waits gets nil at once, and leaves nothing behind.
        let early = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return await mailbox.next()
        }
        #expect(await early.value == nil)
        #expect(mailbox.pendingWaits == 0)
        // The mailbox still works for a consumer that is not cancelled.
        async let waiting = mailbox.next()
        while !mailbox.hasConsumer { await Task.yield() }
        mailbox.post(5)
        #expect(await waiting == 5)
    }
}
