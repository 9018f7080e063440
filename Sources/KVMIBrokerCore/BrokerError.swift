/// The one error type of kvmi-broker: a stable code for programs, a sentence for people.
///
/// `message` says what was wrong; `location` says where (a file:line, an endpoint, a peer or
/// a guest UUID), so every error names both.
public struct BrokerError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Stable, machine-readable error classes.
    public enum Code: String, Sendable, Equatable {
        case invalidArgument = "invalid-argument"
        case invalidEndpoint = "invalid-endpoint"
        case connectFailed = "connect-failed"
        case timedOut = "timed-out"
        case peerClosed = "peer-closed"
        case protocolViolation = "protocol-violation"
        case authenticationFailed = "authentication-failed"
        case insecureFile = "insecure-file"
        case io = "io"
        case cancelled = "cancelled"
        case unsupported = "unsupported"
        /// The peer is there but cannot take us now (a unix listener's full backlog): retry soon, not a failure.
        case busy = "busy"
    }

    public var code: Code
    public var message: String
    /// Where it happened: an endpoint, a file:line, a peer, a guest UUID.
    public var location: String?
    /// The errno behind it, when a system call failed.
    public var errno: Int32?

    public init(_ code: Code, _ message: String, at location: String? = nil, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.location = location
        self.errno = errno
    }

    public var description: String {
        var text = location.map { "\($0): \(message)" } ?? message
        if let errno { text += " (\(errnoName(errno)))" }
        return text
    }

    /// The same error, placed at `location` unless it already names a place.
    public func located(at location: String) -> BrokerError {
        var copy = self
        if copy.location == nil { copy.location = location }
        return copy
    }
}

/// errno values by their names, for `errnoName` and `errnoNumber(named:)`.
private let errnoNames: [Int32: String] = [
    1: "EPERM", 2: "ENOENT", 4: "EINTR", 5: "EIO", 9: "EBADF", 11: "EAGAIN", 12: "ENOMEM",
    13: "EACCES", 14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 19: "ENODEV", 22: "EINVAL",
    24: "EMFILE", 25: "ENOTTY", 32: "EPIPE", 38: "ENOSYS", 61: "ENODATA", 7: "E2BIG",
    88: "ENOTSOCK", 95: "EOPNOTSUPP", 97: "EAFNOSUPPORT", 98: "EADDRINUSE", 99: "EADDRNOTAVAIL",
    101: "ENETUNREACH", 104: "ECONNRESET", 110: "ETIMEDOUT", 111: "ECONNREFUSED",
    113: "EHOSTUNREACH", 114: "EALREADY", 115: "EINPROGRESS", 40: "ELOOP",
]

/// Symbolic errno names for the values the broker reports; falls back to the number.
public func errnoName(_ value: Int32) -> String {
    errnoNames[value] ?? "errno \(value)"
}

/// The errno `errnoName` names (`EACCES` -> 13), or nil.
public func errnoNumber(named name: String) -> Int32? {
    errnoNames.first { $0.value == name }?.key
}
