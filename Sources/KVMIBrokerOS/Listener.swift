import CKVMIBroker
import KVMIBrokerCore

#if canImport(Glibc)
    import Glibc
#endif

/// Binds and listens on a unix or TCP endpoint. For unix paths a stale socket file is
/// replaced; for TCP, port 0 picks a free port (see `boundEndpoint`).
public func listenSocket(on endpoint: IntrospectorEndpoint, backlog: Int32 = 1024, nonBlocking: Bool = false) throws(BrokerError) -> (
    Descriptor, IntrospectorEndpoint
) {
    let address = SocketAddress(endpoint)
    var type = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
    if nonBlocking { type |= Int32(SOCK_NONBLOCK.rawValue) }
    let raw = try systemCall("socket()") { socket(address.family, type, 0) }
    let descriptor = Descriptor(adopting: raw)
    if case .unix(let path) = endpoint, path.hasPrefix("/") {
        var status = stat()
        if lstat(path, &status) == 0 && status.st_mode & S_IFMT == S_IFSOCK { unlink(path) }
    }
    if address.family != AF_UNIX {
        var one: Int32 = 1
        _ = setsockopt(raw, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    }
    do {
        try systemCall("bind(\(endpoint))") { address.withPointer { bind(raw, $0, $1) } }
        try systemCall("listen(\(endpoint))") { Glibc.listen(raw, backlog) }
    } catch {
        descriptor.close()
        throw error.located(at: endpoint.description)
    }
    var bound = endpoint
    if case .tcp(let host, _) = endpoint {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutableBytes(of: &storage) { raw in
            getsockname(descriptor.raw, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length)
        }
        let port = withUnsafeBytes(of: storage) { raw in
            UInt16(bigEndian: raw.load(fromByteOffset: 2, as: UInt16.self))
        }
        bound = .tcp(host: host, port: port)
    }
    return (descriptor, bound)
}
