import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// Serves `GET /metrics` (Prometheus text exposition, `BrokerMetrics`) on a unix socket or a
/// loopback TCP port: a minimal HTTP/1.0-style responder, one request per connection.
///
/// Bounded like the control socket: non-blocking sockets on the reactor (`serveConnections`),
/// at most `maximumConnections` connections, at most `maximumSilent` of them still sending their
/// request (the oldest is shut down when a newer one needs room), a request of at most
/// `maximumRequest` bytes that must be complete within `requestTimeout`. A client that sends too
/// much or too slowly is cut off; later scrapes are served as before.
public final class MetricsServer: Sendable {
    public enum Address: Sendable, Equatable, CustomStringConvertible {
        /// A unix socket, mode 0660 with `group`, else 0600.
        case unix(path: String, group: UInt32?)
        /// A loopback address and port (`loopbackEndpoint(parsing:)` checked it).
        case tcp(IntrospectorEndpoint)

        public var description: String {
            switch self {
            case .unix(let path, _): return "unix:\(path)"
            case .tcp(let endpoint): return "\(endpoint)"
            }
        }
    }

    public static let maximumRequest = 8 * 1024
    public static let maximumConnections = 32
    public static let maximumSilent = 8

    public let address: Address
    let metrics: BrokerMetrics
    let sessions: SessionRegistry?
    let logger: Logger
    let io: AsyncSocketIO
    let requestTimeout: Duration
    let admission = ConnectionAdmission(maximumConnections: MetricsServer.maximumConnections, maximumGreeting: MetricsServer.maximumSilent)
    /// Cut-off clients, a few lines a minute at most.
    let cutOffs = RateLimitedLog(linesPerWindow: 4, window: .seconds(60))

    public init(
        address: Address, metrics: BrokerMetrics, sessions: SessionRegistry?, logger: Logger, requestTimeout: Duration = .seconds(5),
        io: AsyncSocketIO = AsyncSocketIO()
    ) {
        self.address = address
        self.metrics = metrics
        self.sessions = sessions
        self.logger = logger
        self.requestTimeout = requestTimeout
        self.io = io
    }

    /// Parses `--metrics-listen ADDRESS:PORT` and refuses anything but a loopback address: the
    /// endpoint has no authentication, so it is never offered to the network.
    public static func loopbackEndpoint(parsing text: String) throws(BrokerError) -> IntrospectorEndpoint {
        let endpoint: IntrospectorEndpoint
        do {
            endpoint = try IntrospectorEndpoint(parsing: "tcp:" + text)
        } catch {
            throw BrokerError(
                .invalidArgument, "--metrics-listen '\(escapedForLog(text, limit: 64))' is not ADDRESS:PORT (such as 127.0.0.1:9465 or [::1]:9465)")
        }
        guard case .tcp(let host, _) = endpoint, isLoopback(host) else {
            throw BrokerError(
                .invalidArgument,
                "--metrics-listen '\(escapedForLog(text, limit: 64))' is not a loopback address: the metrics endpoint has no authentication; listen on 127.0.0.1 or [::1] (or use --metrics-socket) and let a local agent forward it"
            )
        }
        return endpoint
    }

    static func isLoopback(_ host: IntrospectorEndpoint.IPAddress) -> Bool {
        switch host {
        case .v4(let bytes): return bytes.first == 127
        case .v6(let bytes):
            if bytes == Array(repeating: 0, count: 15) + [1] { return true }
            // ::ffff:127.x.y.z
            return bytes.count == 16 && bytes[0..<10].allSatisfy { $0 == 0 } && bytes[10] == 0xFF && bytes[11] == 0xFF && bytes[12] == 127
        }
    }

    /// Binds the socket: a unix socket as the channel and control sockets are bound
    /// (`ServerSocket.bind`), or the loopback TCP port.
    public func bind() throws -> Descriptor {
        switch address {
        case .unix(let path, let group):
            return try ServerSocket.bind(path: path, mode: group == nil ? 0o600 : 0o660, group: group, what: "metrics socket")
        case .tcp(let endpoint):
            return try listenSocket(on: endpoint, backlog: 64, nonBlocking: true).0
        }
    }

    public func run(listener: Descriptor) async {
        logger.notice("serving metrics", metadata: ["metrics.address": "\(address)"])
        // The socket file's identity: at the end the path is removed only if it still names
        // this file, not one another broker bound since.
        var socketFile: SocketFileIdentity?
        if case .unix(let path, _) = address { socketFile = ServerSocket.fileIdentity(path) }
        await serveConnections(on: listener, io: io, logger: logger, what: "metrics", admission: admission) { connection in
            await self.serve(connection)
        }
        if case .unix(let path, _) = address { ServerSocket.remove(path: path, ifStill: socketFile) }
    }

    private func serve(_ connection: Descriptor) async {
        let deadline = ContinuousClock.now.advanced(by: requestTimeout)
        let request: [UInt8]
        do {
            let ticket = admission.greeting(connection)
            defer { admission.greeted(ticket) }
            request = try await readRequest(connection, until: deadline)
        } catch {
            cutOffs.log(logger, level: .info, "metrics: request cut off: \(escapedForLog("\(error)", limit: 256))")
            if let error = error as? BrokerError, error.code == .protocolViolation {
                try? await io.writeAll(Self.response(431, "Request Header Fields Too Large"), to: connection.raw, until: deadline)
            }
            return
        }
        let response: [UInt8]
        switch Self.route(request) {
        case .metrics(let head):
            let counts = sessions?.sessionCounts ?? SessionCounts()
            let descriptors = await BlockingWork.shared.run { BrokerMetrics.countOpenDescriptors() }
            let body = metrics.exposition(counts: counts, descriptors: descriptors)
            response = Self.response(200, "OK", body: body, type: "text/plain; version=0.0.4; charset=utf-8", head: head)
        case .notFound:
            response = Self.response(404, "Not Found")
        case .badMethod:
            response = Self.response(405, "Method Not Allowed", extra: "Allow: GET, HEAD\r\n")
        case .badRequest:
            response = Self.response(400, "Bad Request")
        }
        do {
            try await io.writeAll(response, to: connection.raw, until: ContinuousClock.now.advanced(by: requestTimeout))
        } catch {
            cutOffs.log(logger, level: .info, "metrics: response not delivered: \(escapedForLog("\(error)", limit: 256))")
        }
    }

    /// Reads up to the blank line that ends the request's head, within the bounds.
    private func readRequest(_ connection: Descriptor, until deadline: ContinuousClock.Instant) async throws -> [UInt8] {
        var request: [UInt8] = []
        while Self.headEnd(request) == nil {
            guard request.count < Self.maximumRequest else {
                throw BrokerError(.protocolViolation, "request longer than \(Self.maximumRequest) bytes")
            }
            let chunk = try await io.readSome(from: connection.raw, limit: min(4096, Self.maximumRequest - request.count + 1), until: deadline)
            if chunk.isEmpty { throw BrokerError(.peerClosed, "the client closed before the end of its request") }
            request += chunk
        }
        return request
    }

    /// Where the head ends (after CRLF CRLF, or LF LF from a lenient client).
    static func headEnd(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 2 else { return nil }
        for index in 1..<bytes.count where bytes[index] == 10 {
            if bytes[index - 1] == 10 { return index + 1 }
            if index >= 3, bytes[index - 1] == 13, bytes[index - 2] == 10 { return index + 1 }
        }
        return nil
    }

    enum Route: Equatable {
        /// `head`: HEAD, the headers only.
        case metrics(head: Bool)
        case notFound
        case badMethod
        case badRequest
    }

    /// The request line: `GET /metrics HTTP/1.x` (a query string is ignored).
    static func route(_ request: [UInt8]) -> Route {
        let line = request.prefix { $0 != 10 && $0 != 13 }
        let parts = line.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: true)
        guard parts.count == 3, parts[2].starts(with: Array("HTTP/".utf8)) else { return .badRequest }
        let method = String(decoding: parts[0], as: UTF8.self)
        let target = parts[1].prefix { $0 != UInt8(ascii: "?") }
        guard method == "GET" || method == "HEAD" else { return .badMethod }
        return Array(target) == Array("/metrics".utf8) ? .metrics(head: method == "HEAD") : .notFound
    }

    static func response(
        _ status: Int, _ reason: String, body: [UInt8]? = nil, type: String = "text/plain; charset=utf-8", head: Bool = false, extra: String = ""
    ) -> [UInt8] {
        let content = body ?? Array("\(status) \(reason)\n".utf8)
        var bytes = Array(
            "HTTP/1.0 \(status) \(reason)\r\nContent-Type: \(type)\r\nContent-Length: \(content.count)\r\n\(extra)Connection: close\r\n\r\n".utf8)
        if !head { bytes += content }
        return bytes
    }
}
