import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import KVMIBrokerPolicy
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// The control protocol between the libvirt hook (`kvmi-broker hook`) and the broker: one
/// JSON request line, one JSON answer line, on a root-only unix socket.
public enum ControlProtocol {
    public static let maximumLine = 64 * 1024

    public struct Request: Codable, Sendable, Equatable {
        /// The libvirt hook operation: prepare, start, started, stopped, release, ...
        public var operation: String
        public var uuid: String
        public var name: String
        /// Our metadata element from the domain XML, when present.
        public var metadataWanted: Bool?
        public var metadataIntrospector: String?
        public var metadataRequired: Bool?

        public init(operation: String, uuid: String, name: String, metadataWanted: Bool?, metadataIntrospector: String?, metadataRequired: Bool?) {
            self.operation = operation
            self.uuid = uuid
            self.name = name
            self.metadataWanted = metadataWanted
            self.metadataIntrospector = metadataIntrospector
            self.metadataRequired = metadataRequired
        }

        public var metadata: GuestMetadata? {
            metadataWanted.map { GuestMetadata(wanted: $0, introspector: metadataIntrospector, required: metadataRequired ?? false) }
        }
    }

    public struct Response: Codable, Sendable, Equatable {
        public var allow: Bool
        /// One line for people (virsh shows it when the start is vetoed).
        public var reason: String

        public init(allow: Bool, reason: String) {
            self.allow = allow
            self.reason = reason
        }
    }
}

/// Serves the hook: root-only (SO_PEERCRED), bounded in size and time. For `prepare` and
/// `start` it vetoes a guest the policy requires to be introspected when its introspector
/// cannot be reached; everything else is allowed and logged. It never calls libvirt (libvirt
/// is waiting for the hook).
public final class ControlServer: Sendable {
    let path: String
    let plans: any PlanSource
    let logger: Logger
    let io: AsyncSocketIO
    /// How long a reachability check may take.
    let probeTimeout: Duration
    /// Peers allowed besides root (tests run the hook as the same user).
    let allowedUID: UInt32
    /// Counts an unreachable introspector of a required guest; nil when metrics are off.
    let metrics: BrokerMetrics?

    public init(
        path: String, plans: any PlanSource, logger: Logger, probeTimeout: Duration = .seconds(2), io: AsyncSocketIO = AsyncSocketIO(),
        metrics: BrokerMetrics? = nil
    ) {
        self.metrics = metrics
        self.path = path
        self.plans = plans
        self.logger = logger
        self.io = io
        self.probeTimeout = probeTimeout
        self.allowedUID = getuid()
    }

    /// Binds the control socket, mode 0600 (root only), as `ServerSocket.bind` does: one broker
    /// per socket, a checked directory, no window with a wider mode.
    public func bind() throws -> Descriptor {
        try ServerSocket.bind(path: path, mode: 0o600, what: "control socket")
    }

    public func run(listener: Descriptor) async {
        await serveConnections(on: listener, io: io, logger: logger, what: "control") { connection in await self.serve(connection) }
        ServerSocket.remove(path: path, servedBy: listener)
    }

    private func serve(_ connection: Descriptor) async {
        var pid: pid_t = 0
        var uid: uid_t = 0
        var gid: gid_t = 0
        guard kvmib_peer_credentials(connection.raw, &pid, &uid, &gid) == 0, uid == 0 || uid == allowedUID else {
            logger.warning("control socket: refusing a client that is not root", metadata: ["peer.pid": "\(pid)", "peer.uid": "\(uid)"])
            return
        }
        let deadline = ContinuousClock.now.advanced(by: .seconds(5))
        do {
            var line: [UInt8] = []
            while !line.contains(10) {
                guard line.count < ControlProtocol.maximumLine else { throw BrokerError(.protocolViolation, "request line too long") }
                let chunk = try await io.readSome(from: connection.raw, limit: 4096, until: deadline)
                if chunk.isEmpty { throw BrokerError(.peerClosed, "the hook closed before its request") }
                line += chunk
            }
            let request = try JSONDecoder().decode(ControlProtocol.Request.self, from: Data(line.prefix { $0 != 10 }))
            let response = await answer(request)
            var bytes = Array(try JSONEncoder().encode(response))
            bytes.append(10)
            try await io.writeAll(bytes, to: connection.raw, until: deadline)
        } catch {
            logger.warning("control socket: \(escapedForLog("\(error)", limit: 512))", metadata: ["peer.pid": "\(pid)"])
        }
    }

    func answer(_ request: ControlProtocol.Request) async -> ControlProtocol.Response {
        guard let uuid = GuestUUID(request.uuid) else {
            return .init(allow: false, reason: "the hook sent no valid UUID ('\(escapedForLog(request.uuid, limit: 64))')")
        }
        let name = escapedForLog(request.name)
        var logger = self.logger
        logger[metadataKey: "guest.uuid"] = "\(uuid)"
        logger[metadataKey: "guest.name"] = "\(name)"
        let (decision, reason) = plans.decide(uuid: uuid, name: request.name, metadata: request.metadata)
        let operation = escapedForLog(request.operation, limit: 32)
        guard request.operation == "prepare" || request.operation == "start" else {
            logger.info("libvirt: \(operation)", metadata: ["policy": "\(reason)"])
            return .init(allow: true, reason: reason)
        }
        let plan: SessionPlan
        switch decision {
        case .notIntrospected:
            logger.notice("libvirt \(operation): \(reason)")
            return .init(allow: true, reason: reason)
        case .requiredButUnservable(let rule):
            // Fail closed: a required guest whose decision cannot be served must not start.
            let why = "kvmi-broker: guest \(name) (\(uuid)) requires introspection per \(rule), but the policy cannot serve it: \(reason)"
            logger.warning("vetoing the start: \(why)")
            return .init(allow: false, reason: why)
        case .introspect(let decided):
            plan = decided
        }
        guard plan.required else {
            logger.notice("libvirt \(operation): \(reason) (best-effort)")
            return .init(allow: true, reason: reason)
        }
        // Required: the introspector must be reachable now, or the guest would run unmonitored.
        do {
            let socket = try await io.connect(to: plan.endpoint, until: .now.advanced(by: probeTimeout))
            socket.close()
            logger.notice("libvirt \(operation): \(reason) (required; introspector reachable)")
            return .init(allow: true, reason: reason)
        } catch {
            metrics?.unreachable(introspector: plan.introspectorName)
            let why =
                "kvmi-broker: guest \(name) (\(uuid)) requires introspection by \(plan.introspectorName) per \(plan.rule), but \(plan.endpoint) is unreachable: \((error as? BrokerError)?.description ?? "\(error)")"
            logger.warning("vetoing the start: \(why)")
            return .init(allow: false, reason: why)
        }
    }
}
