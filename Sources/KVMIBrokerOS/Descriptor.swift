import KVMIBrokerCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// An owned file descriptor, closed exactly once: by `close()` or, failing that, when the
/// last reference goes away, so an error path cannot leak it.
public final class Descriptor: Sendable, CustomStringConvertible {
    public let raw: Int32
    private let isOpen = Atomic<Bool>(true)

    public init(adopting raw: Int32) {
        precondition(raw >= 0, "adopting an invalid descriptor")
        self.raw = raw
    }

    /// Closes now; later calls do nothing.
    public func close() {
        if isOpen.exchange(false, ordering: .acquiringAndReleasing) {
            _ = Glibc.close(raw)
        }
    }

    /// Gives the descriptor up to a new owner (for example the kernel double or QEMU), so
    /// this object no longer closes it. Returns the raw number.
    public func release() -> Int32 {
        _ = isOpen.exchange(false, ordering: .acquiringAndReleasing)
        return raw
    }

    deinit { close() }

    public var description: String { "fd \(raw)" }
}

/// Runs a system call, retrying on EINTR; returns its result or throws with the errno.
@discardableResult
public func systemCall<T: BinaryInteger>(_ what: @autoclosure () -> String, _ body: () -> T) throws(BrokerError) -> T {
    while true {
        let result = body()
        if result >= 0 { return result }
        let error = errno
        if error == EINTR { continue }
        throw BrokerError(.io, "\(what()) failed: \(String(cString: strerror(error)))", errno: error)
    }
}

/// Counts this process's open descriptors (entries of /proc/self/fd, minus the one used to
/// list them). Tests compare it before and after to prove nothing leaked.
public func openDescriptorCount() -> Int {
    guard let directory = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(directory) }
    var count = 0
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name != "." && name != ".." { count += 1 }
    }
    return count - 1
}

/// Sets O_NONBLOCK on a descriptor.
public func setNonBlocking(_ fd: Int32) throws(BrokerError) {
    let flags = try systemCall("fcntl(F_GETFL)") { fcntl(fd, F_GETFL) }
    try systemCall("fcntl(F_SETFL)") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
}
