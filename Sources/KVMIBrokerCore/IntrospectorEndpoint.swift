#if canImport(Glibc)
    import Glibc
#endif

/// Where an introspection tool listens: `unix:/path`, `vsock:CID:PORT` or `tcp:HOST:PORT`.
///
/// TCP hosts are address literals (IPv4 `a.b.c.d` or IPv6 `[...]`): the broker never blocks on
/// name resolution.
public enum IntrospectorEndpoint: Sendable, Hashable, CustomStringConvertible {
    /// A filesystem path, or an abstract-namespace name when it starts with `@`.
    case unix(path: String)
    case vsock(cid: UInt32, port: UInt32)
    case tcp(host: IPAddress, port: UInt16)

    public enum IPAddress: Sendable, Hashable, CustomStringConvertible {
        /// Four bytes in network order.
        case v4([UInt8])
        /// Sixteen bytes in network order.
        case v6([UInt8])

        public var description: String {
            switch self {
            case .v4(let bytes): return bytes.map(String.init).joined(separator: ".")
            case .v6(let bytes): return "[\(formatIPv6(bytes))]"
            }
        }
    }

    /// `sun_path` holds 108 bytes including the terminating NUL.
    public static let maximumUnixPathBytes = 107
    static let vsockCIDAny: UInt32 = 0xFFFF_FFFF
    static let vsockPortAny: UInt32 = 0xFFFF_FFFF

    /// Parses an endpoint string; the error says which part is wrong and why.
    public init(parsing text: String) throws(BrokerError) {
        func fail(_ why: String) -> BrokerError {
            BrokerError(.invalidEndpoint, "invalid introspector endpoint '\(escapedForLog(text))': \(why)")
        }
        guard let colon = text.firstIndex(of: ":") else {
            throw fail("expected 'unix:/path', 'vsock:CID:PORT' or 'tcp:HOST:PORT'")
        }
        let scheme = text[..<colon]
        let rest = String(text[text.index(after: colon)...])
        switch scheme {
        case "unix":
            guard !rest.isEmpty else { throw fail("the unix socket path is empty") }
            guard rest.hasPrefix("/") || rest.hasPrefix("@") else {
                throw fail("the unix socket path must be absolute (or '@name' for the abstract namespace)")
            }
            guard !rest.utf8.contains(0) else { throw fail("the unix socket path contains a NUL byte") }
            // The endpoint is logged and shown as written: nothing a log would have to escape.
            guard !needsEscapingForLog(rest) else {
                throw fail("the unix socket path contains a control character (or a line separator, a bidirectional override, a byte-order mark)")
            }
            guard rest.utf8.count <= Self.maximumUnixPathBytes else {
                throw fail("the unix socket path is \(rest.utf8.count) bytes; at most \(Self.maximumUnixPathBytes) fit in sun_path")
            }
            self = .unix(path: rest)
        case "vsock":
            let parts = rest.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2 else { throw fail("expected 'vsock:CID:PORT'") }
            let cid: UInt32
            if parts[0] == "host" {
                cid = 2
            } else if let value = UInt32(parts[0]) {
                cid = value
            } else {
                throw fail("CID '\(parts[0])' is not a number from 0 to 4294967294 (or 'host')")
            }
            guard cid != Self.vsockCIDAny else { throw fail("CID 4294967295 (VMADDR_CID_ANY) cannot be connected to") }
            guard let port = UInt32(parts[1]) else { throw fail("port '\(parts[1])' is not a number from 0 to 4294967294") }
            guard port != Self.vsockPortAny else { throw fail("port 4294967295 (VMADDR_PORT_ANY) cannot be connected to") }
            self = .vsock(cid: cid, port: port)
        case "tcp":
            let hostText: Substring
            let portText: Substring
            if rest.hasPrefix("[") {
                guard let close = rest.firstIndex(of: "]") else { throw fail("missing ']' after the IPv6 address") }
                hostText = rest[rest.index(after: rest.startIndex)..<close]
                let after = rest[rest.index(after: close)...]
                guard after.hasPrefix(":") else { throw fail("expected ':PORT' after ']'") }
                portText = after.dropFirst()
                guard let bytes = parseIPv6(String(hostText)) else { throw fail("'\(hostText)' is not an IPv6 address") }
                self = .tcp(host: .v6(bytes), port: 0)
            } else {
                guard let lastColon = rest.lastIndex(of: ":") else { throw fail("expected 'tcp:HOST:PORT'") }
                hostText = rest[..<lastColon]
                portText = rest[rest.index(after: lastColon)...]
                if hostText.contains(":") { throw fail("an IPv6 address must be written in brackets, as 'tcp:[::1]:PORT'") }
                guard !hostText.isEmpty else { throw fail("the host is empty") }
                guard let bytes = parseIPv4(String(hostText)) else {
                    throw fail("'\(hostText)' is not an IPv4 address; host names are not resolved, write an address")
                }
                self = .tcp(host: .v4(bytes), port: 0)
            }
            guard let port = UInt16(portText), port != 0 else { throw fail("port '\(portText)' is not a number from 1 to 65535") }
            if case .tcp(let host, _) = self { self = .tcp(host: host, port: port) }
        default:
            throw fail("unknown scheme '\(scheme)'; use unix, vsock or tcp")
        }
    }

    public var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .vsock(let cid, let port): return "vsock:\(cid):\(port)"
        case .tcp(let host, let port): return "tcp:\(host):\(port)"
        }
    }
}

private func parseIPv4(_ text: String) -> [UInt8]? {
    let parts = text.split(separator: ".", omittingEmptySubsequences: false)
    guard parts.count == 4 else { return nil }
    var bytes: [UInt8] = []
    for part in parts {
        guard !part.isEmpty, part.count <= 3, part.allSatisfy(\.isASCII), let value = UInt8(part) else { return nil }
        if part.count > 1 && part.hasPrefix("0") { return nil }
        bytes.append(value)
    }
    return bytes
}

private func parseIPv6(_ text: String) -> [UInt8]? {
    var address = in6_addr()
    guard inet_pton(AF_INET6, text, &address) == 1 else { return nil }
    return withUnsafeBytes(of: address) { Array($0) }
}

private func formatIPv6(_ bytes: [UInt8]) -> String {
    var address = in6_addr()
    withUnsafeMutableBytes(of: &address) { raw in
        for index in 0..<16 { raw[index] = bytes[index] }
    }
    var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
    guard inet_ntop(AF_INET6, &address, &buffer, socklen_t(buffer.count)) != nil else { return "?" }
    return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
}
