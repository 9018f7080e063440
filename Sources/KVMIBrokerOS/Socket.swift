import CKVMIBroker
import KVMIBrokerCore

#if canImport(Glibc)
    import Glibc
#endif

/// A socket address in the kernel's form, built from an endpoint.
public struct SocketAddress: Sendable {
    public let family: Int32
    let storage: sockaddr_storage
    let length: socklen_t

    public init(_ endpoint: IntrospectorEndpoint) {
        var storage = sockaddr_storage()
        var length: socklen_t = 0
        switch endpoint {
        case .unix(let path):
            withUnsafeMutableBytes(of: &storage) { raw in
                raw.storeBytes(of: sa_family_t(AF_UNIX), as: sa_family_t.self)
                var bytes = Array(path.utf8)
                let abstract = bytes.first == UInt8(ascii: "@")
                if abstract { bytes[0] = 0 }
                let pathOffset = MemoryLayout<sa_family_t>.size
                for (index, byte) in bytes.enumerated() { raw[pathOffset + index] = byte }
                // Abstract names have no terminating NUL and count exactly.
                length = socklen_t(pathOffset + bytes.count + (abstract ? 0 : 1))
            }
            family = AF_UNIX
        case .vsock(let cid, let port):
            length = kvmib_sockaddr_vsock(&storage, cid, port)
            family = kvmib_af_vsock()
        case .tcp(.v4(let bytes), let port):
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            withUnsafeMutableBytes(of: &address.sin_addr) { raw in
                for index in 0..<4 { raw[index] = bytes[index] }
            }
            withUnsafeMutableBytes(of: &storage) { raw in
                withUnsafeBytes(of: address) { raw.copyMemory(from: $0) }
            }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
            family = AF_INET
        case .tcp(.v6(let bytes), let port):
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            address.sin6_port = port.bigEndian
            withUnsafeMutableBytes(of: &address.sin6_addr) { raw in
                for index in 0..<16 { raw[index] = bytes[index] }
            }
            withUnsafeMutableBytes(of: &storage) { raw in
                withUnsafeBytes(of: address) { raw.copyMemory(from: $0) }
            }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
            family = AF_INET6
        }
        self.storage = storage
        self.length = length
    }

    func withPointer<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        withUnsafeBytes(of: storage) { raw in
            body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)
        }
    }
}

/// Non-blocking socket operations that wait on the reactor instead of a thread.
public struct AsyncSocketIO: Sendable {
    public let reactor: IOReactor

    public init(reactor: IOReactor = .shared) { self.reactor = reactor }

    /// Creates a non-blocking, close-on-exec stream socket and connects it by `deadline`.
    public func connect(to endpoint: IntrospectorEndpoint, until deadline: ContinuousClock.Instant) async throws -> Descriptor {
        let address = SocketAddress(endpoint)
        let raw = try systemCall("socket()") {
            socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        let descriptor = Descriptor(adopting: raw)
        do {
            try await connect(descriptor, to: address, endpoint: endpoint, until: deadline)
        } catch {
            descriptor.close()
            throw error
        }
        return descriptor
    }

    private func connect(_ descriptor: Descriptor, to address: SocketAddress, endpoint: IntrospectorEndpoint, until deadline: ContinuousClock.Instant)
        async throws
    {
        var result: Int32
        repeat {
            result = address.withPointer { Glibc.connect(descriptor.raw, $0, $1) }
        } while result < 0 && errno == EINTR
        if result == 0 { return }
        let error = errno
        if error == EAGAIN && address.family == AF_UNIX {
            throw BrokerError(.busy, "the introspector's listen backlog is full", errno: error)
        }
        guard error == EINPROGRESS else {
            throw BrokerError(.connectFailed, "cannot connect: \(String(cString: strerror(error)))", errno: error)
        }
        do {
            _ = try await reactor.wait(for: .writable, on: descriptor.raw, until: deadline)
        } catch let error as BrokerError where error.code == .timedOut {
            throw BrokerError(.timedOut, "connection not established before the deadline")
        }
        var socketError: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = getsockopt(descriptor.raw, SOL_SOCKET, SO_ERROR, &socketError, &length)
        if socketError != 0 {
            throw BrokerError(.connectFailed, "cannot connect: \(String(cString: strerror(socketError)))", errno: socketError)
        }
    }

    /// Writes all of `bytes` by `deadline` (MSG_NOSIGNAL: a closed peer is an error, not a signal).
    public func writeAll(_ bytes: [UInt8], to fd: Int32, until deadline: ContinuousClock.Instant) async throws {
        var offset = 0
        while try !sendAvailable(bytes, from: &offset, to: fd) {
            _ = try await reactor.wait(for: .writable, on: fd, until: deadline)
        }
    }

    /// Reads at least one and at most `limit` bytes by `deadline`. Returns an empty array at
    /// end of stream.
    public func readSome(from fd: Int32, limit: Int, until deadline: ContinuousClock.Instant) async throws -> [UInt8] {
        precondition(limit > 0)
        var buffer = [UInt8](repeating: 0, count: limit)
        while true {
            let count = buffer.withUnsafeMutableBytes { raw in
                recv(fd, raw.baseAddress!, limit, Int32(MSG_DONTWAIT))
            }
            if count >= 0 {
                buffer.removeLast(limit - count)
                return buffer
            }
            let error = errno
            if error == EINTR { continue }
            if error == EAGAIN {
                _ = try await reactor.wait(for: .readable, on: fd, until: deadline)
                continue
            }
            if error == ECONNRESET { return [] }
            throw BrokerError(.io, "recv failed", errno: error)
        }
    }
}

/// Connects a stream socket to a unix path with a plain `connect()`: for short-lived clients
/// on their own thread (the libvirt hook, test equipment), not for the broker's tasks. A local
/// connect completes at once; with `nonBlocking` a full backlog leaves it pending (EAGAIN),
/// which the caller's poll for writability covers.
public func connectUnixSocket(_ path: String, nonBlocking: Bool = false) throws(BrokerError) -> Descriptor {
    let endpoint: IntrospectorEndpoint
    do {
        endpoint = try IntrospectorEndpoint(parsing: "unix:" + path)
    } catch {
        throw BrokerError(.invalidArgument, "not a usable unix socket path (absolute, at most 107 bytes)", at: path)
    }
    let address = SocketAddress(endpoint)
    var type = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
    if nonBlocking { type |= Int32(SOCK_NONBLOCK.rawValue) }
    let descriptor = Descriptor(adopting: try systemCall("socket()") { socket(AF_UNIX, type, 0) })
    let result = address.withPointer { Glibc.connect(descriptor.raw, $0, $1) }
    if result != 0 && !(nonBlocking && (errno == EAGAIN || errno == EINPROGRESS)) {
        let error = errno
        descriptor.close()
        throw BrokerError(.connectFailed, "cannot connect: \(String(cString: strerror(error)))", at: path, errno: error)
    }
    return descriptor
}

/// Sends what the socket takes now of `bytes` past `offset`, advancing it: true once all is
/// sent, false when the socket is full (wait for writable, then call again). Non-blocking,
/// MSG_NOSIGNAL: a closed peer is an error, not a signal.
func sendAvailable(_ bytes: [UInt8], from offset: inout Int, to fd: Int32) throws(BrokerError) -> Bool {
    while offset < bytes.count {
        let start = offset
        let written = bytes.withUnsafeBytes { raw in
            send(fd, raw.baseAddress! + start, raw.count - start, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
        }
        if written > 0 {
            offset += written
            continue
        }
        let error = errno
        if error == EINTR { continue }
        if error == EAGAIN { return false }
        if error == EPIPE || error == ECONNRESET {
            throw BrokerError(.peerClosed, "the peer closed the connection after \(offset) of \(bytes.count) bytes were sent", errno: error)
        }
        throw BrokerError(.io, "send failed after \(offset) of \(bytes.count) bytes", errno: error)
    }
    return true
}
