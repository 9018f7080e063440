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
    /// that arrives is closed and reported as a protocol error: QEMU never sends one.
    public func receive(until deadline: ContinuousClock.Instant?) async throws -> Channel.Frame? {
        var reader = Channel.FrameReader()
        while true {
            switch try receiveAvailable(into: &reader) {
            case .frame(let frame): return frame
            case .endOfStream: return nil
            case .partial: continue
            case .wouldBlock: _ = try await io.reactor.wait(for: .readable, on: descriptor.raw, until: deadline)
            }
        }
    }

    fileprivate enum Received {
        case frame(Channel.Frame)
        case endOfStream
        case partial
        case wouldBlock
    }

    /// One `recvmsg` into a buffer on the stack: synchronous, so no buffer is held across the
    /// wait for the next byte (a thousand idle sessions wait there).
    @inline(never)
    fileprivate func receiveAvailable(into reader: inout Channel.FrameReader) throws -> Received {
        let limit = min(reader.readLimit, 4096)
        return try withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 4096) { buffer in
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
                        return frame.map { .frame($0) } ?? .partial
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
        /// The bytes of a frame not complete yet.
        var frame = Channel.FrameReader()
        var watch: IOReactor.Watch?
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

    /// Starts reading (once): frames are delivered as the descriptor reports them.
    public func start() {
        state.withLock { state in
            guard !state.stopped, state.watch == nil, !state.paused else { return }
            arm(&state)
        }
    }

    /// Goes on after `deliver` asked for a pause.
    public func resume() {
        state.withLock { state in
            guard !state.stopped, state.paused else { return }
            state.paused = false
            // The next look at the descriptors reports what is waiting: this reader takes its
            // turn after the others (a QEMU that streams frames gets its share, not a thread).
            arm(&state)
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
            state.watch = nil
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

    private func readable() {
        state.withLock { state in
            state.watch = nil
            guard !state.stopped, !state.paused else { return }
            while true {
                guard !stopRequested.load(ordering: .acquiring) else {
                    state.stopped = true
                    return
                }
                let received: ChannelSocket.Received
                do {
                    received = try socket.receiveAvailable(into: &state.frame)
                } catch {
                    end(.closed(error as? BrokerError ?? BrokerError(.io, "\(error)")), &state)
                    return
                }
                switch received {
                case .frame(let frame):
                    state.frame = Channel.FrameReader()
                    if !deliver(.frame(frame), self) {
                        state.paused = true
                        return
                    }
                case .partial:
                    continue
                case .wouldBlock:
                    arm(&state)
                    return
                case .endOfStream:
                    end(.closed(nil), &state)
                    return
                }
            }
        }
    }

    private func end(_ event: Event, _ state: inout State) {
        state.stopped = true
        _ = deliver(event, self)
    }
}
