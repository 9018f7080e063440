import CKVMIBroker
import KVMIBrokerCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One end of the broker <-> QEMU channel on a non-blocking unix socket: framed, bounded,
/// with descriptors only where the protocol allows them.
public final class ChannelSocket: Sendable {
    public let descriptor: Descriptor
    private let io: AsyncSocketIO
    /// Bytes `receive` read past the frame it returned (a peer may send frames back to back);
    /// the channel's `ChannelReader` starts with them.
    private let buffered = Mutex(Channel.FrameReader())
    /// The reactor this channel's waits go through: the executor its session's tasks prefer.
    public var reactor: IOReactor { io.reactor }

    public init(_ descriptor: Descriptor, io: AsyncSocketIO = AsyncSocketIO()) {
        self.descriptor = descriptor
        self.io = io
    }

    /// Sends one frame, with `fd` attached as SCM_RIGHTS to its first byte when given.
    public func send(_ frame: Channel.Frame, passing fd: Int32? = nil, until deadline: ContinuousClock.Instant) async throws {
        let bytes = frame.encoded()
        var offset = 0
        if let fd {
            while true {
                let sent = bytes.withUnsafeBytes { kvmib_send_with_fd(descriptor.raw, $0.baseAddress, $0.count, fd) }
                if sent > 0 {
                    offset = sent
                    break
                }
                let error = errno
                if error == EINTR { continue }
                if error == EAGAIN {
                    _ = try await io.reactor.wait(for: .writable, on: descriptor.raw, until: deadline)
                    continue
                }
                throw BrokerError(
                    error == EPIPE || error == ECONNRESET ? .peerClosed : .io, "cannot send \(frame.knownType.map { "\($0)" } ?? "frame")",
                    errno: error)
            }
        }
        if offset < bytes.count {
            try await io.writeAll(Array(bytes[offset...]), to: descriptor.raw, until: deadline)
        }
    }

    /// Receives the next frame; nil at a clean end of stream (between frames). Any descriptor
    /// that arrives is closed and reported as a protocol error: QEMU never sends one. Bytes read
    /// past the frame are kept for the next `receive` or the channel's `ChannelReader`.
    public func receive(until deadline: ContinuousClock.Instant?) async throws -> Channel.Frame? {
        var reader = takeBuffered()
        defer { buffered.withLock { $0 = reader } }
        while true {
            if let frame = try reader.next() { return frame }
            switch try receiveAvailable(into: &reader) {
            case .frame(let frame): return frame
            case .endOfStream: return nil
            case .partial(drained: false): continue
            case .partial(drained: true), .wouldBlock:
                _ = try await io.reactor.wait(for: .readable, on: descriptor.raw, until: deadline)
            }
        }
    }

    /// What `receive` read past its last frame (an empty reader if nothing).
    fileprivate func takeBuffered() -> Channel.FrameReader {
        buffered.withLock { reader in
            defer { reader = Channel.FrameReader() }
            return reader
        }
    }

    fileprivate enum Received {
        /// The first frame the read completed (the reader may hold more: `next`).
        case frame(Channel.Frame)
        case endOfStream
        /// Part of a frame; drained: the read took less than it asked for, so the socket had
        /// nothing more (wait for readiness rather than `recv` EAGAIN).
        case partial(drained: Bool)
        case wouldBlock
    }

    /// The most one read takes: a frame the channel carries is smaller (HELLO, RESULT, EVENT),
    /// so one `recv` takes it whole, and 1 KiB is what Swift keeps on the stack (more, and
    /// `withUnsafeTemporaryAllocation` takes it from the heap at every read).
    static let readSize = 1024

    /// One `recvmsg` into a buffer on the stack: synchronous, so no buffer is held across the
    /// wait for the next byte (a thousand idle sessions wait there).
    @inline(never)
    fileprivate func receiveAvailable(into reader: inout Channel.FrameReader) throws -> Received {
        let limit = min(reader.room, Self.readSize)
        return try withUnsafeTemporaryAllocation(of: UInt8.self, capacity: Self.readSize) { buffer in
            try withUnsafeTemporaryAllocation(of: Int32.self, capacity: 4) { fds in
                fds.initialize(repeating: -1)
                var count: Int32 = 0
                var truncated: Int32 = 0
                while true {
                    let received = kvmib_recv_with_fds(descriptor.raw, buffer.baseAddress, limit, fds.baseAddress, 4, &count, &truncated)
                    for index in 0..<Int(count) { _ = close(fds[index]) }
                    if count > 0 || truncated != 0 {
                        throw BrokerError(.protocolViolation, "the peer sent file descriptors; QEMU never does")
                    }
                    if received > 0 {
                        let frame = try reader.consume(UnsafeBufferPointer(rebasing: buffer[..<received]))
                        return frame.map { .frame($0) } ?? .partial(drained: received < limit)
                    }
                    if received == 0 {
                        if reader.atFrameBoundary { return .endOfStream }
                        throw BrokerError(.peerClosed, "the peer closed the channel in the middle of a frame")
                    }
                    let error = errno
                    if error == EINTR { continue }
                    if error == EAGAIN { return .wouldBlock }
                    if error == ECONNRESET { return .endOfStream }
                    throw BrokerError(.io, "cannot receive from the channel", errno: error)
                }
            }
        }
    }
}

/// Reads a channel's frames on its reactor's thread as they arrive, with no task of its own:
/// a session's reader is a readiness callback, not a task waiting in `receive` (a boot storm
/// holds a thousand of them). Each frame goes to `deliver`, which says whether to go on or to
/// pause (its consumer's queue is full: `resume` then, when there is room). The end of the
/// stream or an error is delivered once, as `.closed`, and ends the reading; `stop` ends it
/// from outside: once it returns, `deliver` is not called again, so the descriptor can close.
public final class ChannelReader: Sendable {
    public enum Event: Sendable {
        case frame(Channel.Frame)
        /// The end: nil at a clean end of stream, else what went wrong.
        case closed(BrokerError?)
    }

    private struct State {
        /// The bytes read and not delivered yet: a frame in progress, and frames read with
        /// the last one delivered.
        var frame = Channel.FrameReader()
        var watch: IOReactor.Watch?
        /// A turn of the reactor asked for, to deliver frames read already (`start`, `resume`).
        var turn: IOReactor.Timer?
        var paused = false
        var stopped = false
    }

    private let socket: ChannelSocket
    /// Called with this reader's lock held, on the reactor's thread (or, when the descriptor
    /// cannot be armed, on the thread that called `start` or `resume`, with `.closed`): it must
    /// not call back into the reader (`resume` is for later, from the consumer). Returns false
    /// to pause.
    private let deliver: @Sendable (Event, ChannelReader) -> Bool
    private let state = Mutex(State())
    /// Set by `requestStop`, without the lock: checked before every read and every arm.
    private let stopRequested = Atomic<Bool>(false)

    public init(_ socket: ChannelSocket, deliver: @escaping @Sendable (Event, ChannelReader) -> Bool) {
        self.socket = socket
        self.deliver = deliver
        // What `receive` read past HELLO, if QEMU sent more at once.
        state.withLock { $0.frame = socket.takeBuffered() }
    }

    /// A reader that queues each frame in `mailbox`, pausing while more than its capacity are
    /// queued until the consumer takes one, and posts the end: a guest session's reader.
    public convenience init<Element: Sendable>(
        _ socket: ChannelSocket, feeding mailbox: Mailbox<Element>, frame: @escaping @Sendable (Channel.Frame) -> Element,
        closed: @escaping @Sendable (BrokerError?) -> Element
    ) {
        self.init(socket) { event, reader in
            switch event {
            case .frame(let received):
                return mailbox.offer(frame(received)) { [weak reader] in reader?.resume() }
            case .closed(let error):
                mailbox.post(closed(error))
                return false
            }
        }
    }

    /// Starts reading (once): frames are delivered as the descriptor reports them (those read
    /// before, by the socket's `receive`, at once).
    public func start() {
        state.withLock { state in
            guard !state.stopped, state.watch == nil, state.turn == nil, !state.paused else { return }
            proceed(&state)
        }
    }

    /// Goes on after `deliver` asked for a pause.
    public func resume() {
        state.withLock { state in
            guard !state.stopped, state.paused else { return }
            state.paused = false
            // The next turn of the reactor delivers what is read already or, for the socket,
            // reports what is waiting: this reader takes its turn after the others (a QEMU that
            // streams frames gets its share, not a thread).
            proceed(&state)
        }
    }

    /// Ends the reading without waiting, for a task's cancellation handler: nothing more is
    /// read once a read in progress returns. (`stop` waits for the reader's lock, and `deliver`
    /// resumes the consumer's task under that lock, which takes the task's status lock: from a
    /// handler, which runs under the task's status lock, `stop` could deadlock with it.)
    public func requestStop() {
        stopRequested.store(true, ordering: .releasing)
    }

    /// Ends the reading; `deliver` is not called once this returns. Not from a cancellation
    /// handler: `requestStop` there.
    public func stop() {
        state.withLock { state in
            state.stopped = true
            if let watch = state.watch { socket.reactor.cancel(watch) }
            if let turn = state.turn { socket.reactor.cancel(turn) }
            state.watch = nil
            state.turn = nil
        }
    }

    private func arm(_ state: inout State) {
        guard !stopRequested.load(ordering: .acquiring) else {
            state.stopped = true
            return
        }
        do {
            state.watch = try socket.reactor.whenReady(.readable, on: socket.descriptor.raw) { [self] _ in readable() }
        } catch {
            end(.closed(error as? BrokerError ?? BrokerError(.io, "\(error)")), &state)
        }
    }

    /// Waits for the socket, or for the reactor's next turn when a frame is read already (on
    /// the reactor's thread, as every frame is delivered).
    private func proceed(_ state: inout State) {
        guard state.frame.hasFrame else { return arm(&state) }
        state.turn = socket.reactor.schedule(at: .now) { [self] in
            self.state.withLock { state in
                state.turn = nil
                guard !state.stopped, !state.paused else { return }
                pump(&state, reading: false)
            }
        }
    }

    private func readable() {
        state.withLock { state in
            state.watch = nil
            guard !state.stopped, !state.paused else { return }
            pump(&state, reading: true)
        }
    }

    /// Delivers the frames read already, then reads while `reading`, which ends once a read
    /// gives a frame: a channel that streams frames yields to the others after each read (its
    /// one-shot registration reports at once what is still waiting). Arms the descriptor when
    /// the socket is drained: a read that took less than it asked for says so, with no `recv`
    /// to hear EAGAIN.
    private func pump(_ state: inout State, reading: Bool) {
        var reading = reading
        while true {
            guard !stopRequested.load(ordering: .acquiring) else {
                state.stopped = true
                return
            }
            let received: ChannelSocket.Received
            do {
                if let frame = try state.frame.next() {
                    received = .frame(frame)
                } else if reading {
                    received = try socket.receiveAvailable(into: &state.frame)
                } else {
                    arm(&state)
                    return
                }
            } catch {
                end(.closed(error as? BrokerError ?? BrokerError(.io, "\(error)")), &state)
                return
            }
            switch received {
            case .frame(let frame):
                // No more reads this turn: what the read took goes out, then the registration
                // reports what is still waiting after the other descriptors' turn (behind 1 KiB
                // of a stream, a frame waits a turn of the reactor, not a second).
                reading = false
                if !deliver(.frame(frame), self) {
                    state.paused = true
                    return
                }
            case .partial(drained: false):
                continue
            case .partial(drained: true), .wouldBlock:
                arm(&state)
                return
            case .endOfStream:
                end(.closed(nil), &state)
                return
            }
        }
    }

    private func end(_ event: Event, _ state: inout State) {
        state.stopped = true
        _ = deliver(event, self)
    }
}
