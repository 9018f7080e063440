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
            let limit = min(reader.readLimit, 4096)
            var buffer = [UInt8](repeating: 0, count: limit)
            var fds = [Int32](repeating: -1, count: 4)
            var count: Int32 = 0
            var truncated: Int32 = 0
            let received = buffer.withUnsafeMutableBytes { raw in
                kvmib_recv_with_fds(descriptor.raw, raw.baseAddress, limit, &fds, 4, &count, &truncated)
            }
            for index in 0..<Int(count) { _ = close(fds[index]) }
            if count > 0 || truncated != 0 {
                throw BrokerError(.protocolViolation, "the peer sent file descriptors; QEMU never does")
            }
            if received > 0 {
                if let frame = try reader.consume(buffer.prefix(received)) { return frame }
                continue
            }
            if received == 0 {
                if reader.atFrameBoundary { return nil }
                throw BrokerError(.peerClosed, "the peer closed the channel in the middle of a frame")
            }
            let error = errno
            if error == EINTR { continue }
            if error == EAGAIN {
                _ = try await io.reactor.wait(for: .readable, on: descriptor.raw, until: deadline)
                continue
            }
            if error == ECONNRESET { return nil }
            throw BrokerError(.io, "cannot receive from the channel", errno: error)
        }
    }
}
