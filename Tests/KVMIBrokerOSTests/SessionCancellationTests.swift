import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerOS
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Holds the reactor's thread inside a session reader's callback (the reader's lock held) until
/// the broker's cancellation has returned, or 60 s passed: a cancellation handler that waits
/// for the reader's lock cannot return while the reader is held, so the hold ends by its bound.
private final class ReaderHold: @unchecked Sendable {
    private let condition = NSCondition()
    private var armed = false
    private var entered = false
    private var cancelReturned = false
    private var outcome: Bool?

    /// The next frame any session's reader takes is held.
    func arm() {
        condition.lock()
        armed = true
        condition.unlock()
    }

    /// `BrokerConfiguration.frameTaken`: on the reactor's thread, with the reader's lock held.
    func frameTaken() {
        condition.lock()
        defer { condition.unlock() }
        guard armed else { return }
        armed = false
        entered = true
        condition.broadcast()
        let bound = Date(timeIntervalSinceNow: 60)
        while !cancelReturned, condition.wait(until: bound) {}
        outcome = cancelReturned
        condition.broadcast()
    }

    func cancelDidReturn() {
        condition.lock()
        cancelReturned = true
        condition.broadcast()
        condition.unlock()
    }

    /// Waits (at most 60 s) until a reader is held.
    func waitUntilHeld() -> Bool {
        condition.lock()
        defer { condition.unlock() }
        let bound = Date(timeIntervalSinceNow: 60)
        while !entered, condition.wait(until: bound) {}
        return entered
    }

    /// Waits until the hold ended: true if the cancellation returned while the reader was held.
    func waitUntilReleased() -> Bool? {
        condition.lock()
        defer { condition.unlock() }
        let bound = Date(timeIntervalSinceNow: 120)
        while outcome == nil, condition.wait(until: bound) {}
        return outcome
    }
}

extension OSLayerTests.DaemonChannelTests {
    /// A session's cancellation handler runs under its task's status lock; the reader's
    /// callback holds the reader's lock while it resumes the session's task, which takes that
    /// status lock. A handler that waited for the reader's lock (`ChannelReader.stop`) could
    /// deadlock the broker's shutdown with its reactor: it was seen under load. The handler only
    /// flags the reader (`requestStop`); here the reader is held on purpose while the broker is
    /// cancelled.
    @Test("cancelling the broker while a session's reader holds its lock on the reactor's thread returns at once")
    func cancellationWhileTheReaderHoldsItsLock() async throws {
        let hold = ReaderHold()
        let procRoot = try fakeProc(cmdlineUUID: uuid)
        defer { try? FileManager.default.removeItem(atPath: procRoot) }
        // No introspector listens: the session waits for its retry, reading its channel.
        let (_, broker, socketPath) = try startBroker(procRoot: procRoot, introspector: .unix(path: temporarySocketPath("absent-tool"))) {
            $0.frameTaken = { hold.frameTaken() }
        }
        let qemu = try FakeQEMU(connectingTo: socketPath)
        qemu.send(hello(uuid: uuid))
        #expect(qemu.receive(timeout: .seconds(30))?.0.knownType == .welcome)

        hold.arm()
        qemu.send(
            Channel.Frame(
                .event, seq: 2, payload: Channel.Event(kind: .paused, error: 0, startTime: 1_795_000_000, hooked: false, running: false).encoded()))
        #expect(hold.waitUntilHeld(), "the session's reader did not take the EVENT")
        let canceller = Thread {
            broker.cancel()
            hold.cancelDidReturn()
        }
        canceller.start()
        let returnedWhileHeld = hold.waitUntilReleased()
        #expect(returnedWhileHeld == true, "the broker's cancellation waited for the session reader's lock")
        await broker.value
    }
}
