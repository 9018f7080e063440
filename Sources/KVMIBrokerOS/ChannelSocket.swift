import CKVMIBroker
import KVMIBrokerCore

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

    private enum Received {
        case frame(Channel.Frame)
        case endOfStream
        case partial
        case wouldBlock
    }

    /// One `recvmsg` into a buffer on the stack: synchronous, so no buffer is held across the
    /// wait for the next byte (a thousand idle sessions wait there).
    @inline(never)
    private func receiveAvailable(into reader: inout Channel.FrameReader) throws -> Received {
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
