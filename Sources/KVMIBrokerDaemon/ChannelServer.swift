import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// The broker's side of the QEMU channel: a unix-socket server, one session per guest.
public final class ChannelServer: Sendable {
    public let configuration: BrokerConfiguration
    public let registry: SessionRegistry
    private let logger: Logger
    private let io: AsyncSocketIO
    private let connector: IntrospectorConnector
    /// Bounds the connections held (from the descriptor limit) and the silent ones.
    public let admission: ConnectionAdmission

    public init(configuration: BrokerConfiguration, logger: Logger, io: AsyncSocketIO = AsyncSocketIO(), admission: ConnectionAdmission? = nil) {
        self.configuration = configuration
        self.registry = SessionRegistry(statusFile: configuration.statusFile, logger: logger, notifier: configuration.notifier)
        self.logger = logger
        self.io = io
        self.connector = IntrospectorConnector(io: io, pacer: HandshakePacer(limit: configuration.handshakesPerIntrospector))
        self.admission = admission ?? ConnectionAdmission(descriptorLimit: currentDescriptorLimit().soft)
    }

    /// Binds the socket (mode 0600, or 0660 with the configured group) safely: the directory
    /// checked, one broker per socket (a lock held for the process's life), the mode set before
    /// the socket appears under its name (`ServerSocket.bind`).
    public func bind() throws -> Descriptor {
        let group = configuration.channelSocketGroup
        return try ServerSocket.bind(path: configuration.channelSocketPath, mode: group == nil ? 0o600 : 0o660, group: group, what: "channel socket")
    }

    /// Reloads the policy (SIGHUP): all or nothing. On success every session re-decides from the
    /// new snapshot (SET_ALLOWED, unhook, or a new introspector); on failure the old policy stays
    /// and every diagnostic is logged with its file:line.
    @discardableResult
    public func reloadPolicy() async -> Bool {
        guard let store = configuration.policy else {
            logger.notice("reload requested, but the broker runs without a policy (static configuration)")
            return false
        }
        // Reading the policy and its secrets is blocking file I/O: off the cooperative pool, and
        // one reload at a time (the queue is serial).
        switch await BlockingWork.shared.run({ store.reload() }) {
        case .success(let (snapshot, warnings)):
            for warning in warnings { logger.warning("policy: \(warning)") }
            logger.audit.notice(
                "policy reloaded", metadata: ["policy.generation": "\(snapshot.generation)", "policy.rules": "\(snapshot.policy.rules.count)"])
            configuration.notifier?.reloaded(generation: snapshot.generation, failed: false)
            configuration.metrics?.policy(generation: snapshot.generation)
            registry.broadcastPolicyChange()
            return true
        case .failure(let error):
            for diagnostic in error.diagnostics { logger.error("policy: \(diagnostic)") }
            logger.audit.error(
                "policy reload failed; the previous policy stays in force", metadata: ["policy.generation": "\(store.snapshot.generation)"])
            configuration.notifier?.reloaded(generation: store.snapshot.generation, failed: true)
            configuration.metrics?.reloadFailed()
            return false
        }
    }

    /// Accepts connections until cancelled; each runs as a child task (no thread per guest).
    public func run(listener: Descriptor) async {
        let decisions = configuration.policy.map { "the allow-policy (generation \($0.snapshot.generation))" } ?? "\(configuration.introspector)"
        logger.notice("listening for QEMU", metadata: ["channel.socket": "\(configuration.channelSocketPath)", "decisions": "\(decisions)"])
        let socketFile = ServerSocket.fileIdentity(configuration.channelSocketPath)
        // The sessions run on the reactor's thread (an event loop: `IOReactor`'s TaskExecutor).
        await withTaskExecutorPreference(io.reactor) {
            await serveConnections(on: listener, io: io, logger: logger, what: "channel", admission: admission) { connection in
                await self.serve(connection)
            }
        }
        ServerSocket.remove(path: configuration.channelSocketPath, ifStill: socketFile)
    }

    private func serve(_ connection: Descriptor) async {
        var pid: pid_t = 0
        var uid: uid_t = 0
        var gid: gid_t = 0
        guard kvmib_peer_credentials(connection.raw, &pid, &uid, &gid) == 0 else {
            logger.error("cannot read the channel peer's credentials", metadata: ["errno": "\(errnoName(errno))"])
            connection.close()
            return
        }
        let peer = PeerCredentials(pid: pid, uid: uid, gid: gid)
        let session = SessionDriver(
            socket: ChannelSocket(connection, io: io), peer: peer, configuration: configuration, registry: registry, connector: connector,
            admission: admission, logger: logger)
        await session.run()
    }
}
