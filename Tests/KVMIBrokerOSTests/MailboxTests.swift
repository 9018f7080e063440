import Synchronization
import Testing

@testable import KVMIBrokerOS

@Suite("A session's mailbox: order, back-pressure on sent elements, the end")
struct MailboxTests {
    /// A mailbox of capacity 1 holding a sent 1, and a sender of 2 that has registered its
    /// wait (waited for as an event).
    private func blockedSender() async -> (Mailbox<Int>, Task<Void, Never>) {
        let mailbox = Mailbox<Int>(capacity: 1)
        await mailbox.send(1)
        let sender = Task { await mailbox.send(2) }
        while mailbox.waitingSenders == 0 { await Task.yield() }
        return (mailbox, sender)
    }

    @Test("elements come out in the order they went in; a waiting consumer gets the next one posted")
    func order() async {
        let mailbox = Mailbox<Int>(capacity: 2)
        mailbox.post(1)
        await mailbox.send(2)
        mailbox.post(3)
        #expect(await mailbox.next() == 1)
        #expect(await mailbox.next() == 2)
        #expect(await mailbox.next() == 3)
        async let waiting = mailbox.next()
        mailbox.post(4)
        #expect(await waiting == 4)
        #expect(mailbox.pendingWaits == 0)
    }

    @Test("a sender waits while more than `capacity` sent elements are queued; a later post does not overtake its element")
    func sendersWaitAndKeepTheirPlace() async {
        let (mailbox, second) = await blockedSender()
        #expect(mailbox.count == 2)
        // A timer's input posted now comes after the frame that was already read (as a RESULT
        // read before its timeout fired must be handled before the timeout).
        mailbox.post(3)
        #expect(await mailbox.next() == 1)
        await second.value
        #expect(await mailbox.next() == 2)
        #expect(await mailbox.next() == 3)
        #expect(mailbox.count == 0)
        #expect(mailbox.pendingWaits == 0)
    }

    @Test("finish: queued elements still come out, then nil; new ones are dropped; a waiting sender returns")
    func finish() async {
        let (mailbox, blocked) = await blockedSender()
        mailbox.finish()
        await blocked.value
        mailbox.post(3)
        await mailbox.send(4)
        #expect(await mailbox.next() == 1)
        #expect(await mailbox.next() == 2)
        #expect(await mailbox.next() == nil)
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

    @Test("a sender that waits returns when its task is cancelled; its element stays queued")
    func cancelledSender() async {
        let (mailbox, sender) = await blockedSender()
        sender.cancel()
        await sender.value
        #expect(mailbox.waitingSenders == 0)
        #expect(await mailbox.next() == 1)
        #expect(await mailbox.next() == 2)
        #expect(mailbox.count == 0)
        #expect(mailbox.pendingWaits == 0)
    }
}
