import Foundation
import KVMIBrokerCore
import KVMIBrokerOS

#if canImport(Glibc)
    import Glibc
#endif

/// Why a control-socket command has nothing to show, with its exit code.
struct Failure: Error {
    var message: String
    var code: Int32
}

/// One request line to the broker's control socket and its one answer line (without the
/// newline), every step within `timeout` seconds: `status`, `drain` and `undrain` use it.
func exchange(
    _ body: Data, with controlSocket: String, timeout: Double, maximumAnswer: Int, connectFailure: (BrokerError) -> Failure
) throws(Failure) -> [UInt8] {
    let shownSocket = escapedForLog(controlSocket, limit: 256)
    let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int64(timeout * 1000)))
    let socket: Descriptor
    do {
        socket = try connectUnixSocket(controlSocket, nonBlocking: true)
    } catch {
        throw connectFailure(error)
    }
    defer { socket.close() }
    let fd = socket.raw
    let timedOut = Failure(
        message: "the broker at \(shownSocket) did not answer within \(Duration.humanReadable(seconds: timeout)) (--timeout)", code: 5)
    func waitFor(_ events: Int16) throws(Failure) {
        while true {
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard remaining > .zero else { throw timedOut }
            var pollFD = pollfd(fd: fd, events: events, revents: 0)
            let milliseconds = Int32(clamping: remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000 + 1)
            let ready = poll(&pollFD, 1, milliseconds)
            if ready > 0 { return }
            if ready < 0 && errno != EINTR { throw Failure(message: "poll on \(shownSocket): \(String(cString: strerror(errno)))", code: 5) }
        }
    }
    var request = Array(body) + [10]
    while !request.isEmpty {
        try waitFor(Int16(POLLOUT))
        let sent = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if sent < 0 {
            if errno == EAGAIN || errno == EINTR { continue }
            throw Failure(message: "cannot send the request to \(shownSocket): \(String(cString: strerror(errno)))", code: 5)
        }
        request.removeFirst(sent)
    }
    var reply: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while reply.last != 10 {
        guard reply.count <= maximumAnswer else {
            throw Failure(message: "the broker's answer at \(shownSocket) is larger than \(maximumAnswer >> 10) KiB", code: 5)
        }
        try waitFor(Int16(POLLIN))
        let count = recv(fd, &chunk, chunk.count, 0)
        if count < 0 && (errno == EAGAIN || errno == EINTR) { continue }
        if count < 0 {
            throw Failure(message: "cannot read the broker's answer at \(shownSocket): \(String(cString: strerror(errno)))", code: 5)
        }
        guard count > 0 else { throw Failure(message: "the broker at \(shownSocket) closed the connection without answering", code: 5) }
        reply += chunk.prefix(count)
    }
    return Array(reply.dropLast())
}

/// Why the control socket could not be reached, in one sentence; `whoMay` says who may connect.
func controlSocketFailure(_ error: BrokerError, _ controlSocket: String, whoMay: String) -> Failure {
    let shownSocket = escapedForLog(controlSocket, limit: 256)
    switch error.errno {
    case ENOENT:
        return Failure(
            message: "no control socket at \(shownSocket): the broker is not running, or it listens elsewhere (give its --control-socket)", code: 3)
    case ECONNREFUSED:
        return Failure(message: "nothing listens on \(shownSocket): the broker is not running (the socket is left from an earlier one)", code: 3)
    case EACCES, EPERM:
        return Failure(message: "cannot connect to \(shownSocket): permission denied (\(whoMay))", code: 4)
    default:
        return Failure(message: "cannot connect to \(shownSocket): \(escapedForLog(error.description, limit: 512))", code: 5)
    }
}
