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

    public init(configuration: BrokerConfiguration, logger: Logger, io: AsyncSocketIO = AsyncSocketIO()) {
        self.configuration = configuration
        self.registry = SessionRegistry(statusFile: configuration.statusFile)
        self.logger = logger
        self.io = io
        self.connector = IntrospectorConnector(io: io)
    }

    /// Binds the socket (mode 0600, or 0660 with the configured group).
    public func bind() throws -> Descriptor {
        let path = configuration.channelSocketPath
        let directory = (path as NSString).deletingLastPathComponent
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        let previous = umask(0o177)
        defer { umask(previous) }
        let (listener, _) = try listenSocket(on: .unix(path: path), nonBlocking: true)
        if let group = configuration.channelSocketGroup {
            guard chown(path, 0, group) == 0 || chown(path, getuid(), group) == 0, chmod(path, 0o660) == 0 else {
                throw BrokerError(.io, "cannot give the channel socket to group \(group)", at: path, errno: errno)
            }
        }
        return listener
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
        switch store.reload() {
        case .success(let (snapshot, warnings)):
            for warning in warnings { logger.warning("policy: \(warning)") }
            logger.notice(
                "policy reloaded", metadata: ["policy.generation": "\(snapshot.generation)", "policy.rules": "\(snapshot.policy.rules.count)"])
            await registry.broadcastPolicyChange()
            return true
        case .failure(let error):
            for diagnostic in error.diagnostics { logger.error("policy: \(diagnostic)") }
            logger.error("policy reload failed; the previous policy stays in force", metadata: ["policy.generation": "\(store.snapshot.generation)"])
            return false
        }
    }

    /// Accepts connections until cancelled; each runs as a child task (no thread per guest).
    public func run(listener: Descriptor) async {
        let decisions = configuration.policy.map { "the allow-policy (generation \($0.snapshot.generation))" } ?? "\(configuration.introspector)"
        logger.notice("listening for QEMU", metadata: ["channel.socket": "\(configuration.channelSocketPath)", "decisions": "\(decisions)"])
        await serveConnections(on: listener, io: io, logger: logger, what: "channel") { connection in await self.serve(connection) }
        unlink(configuration.channelSocketPath)
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
            logger: logger)
        await session.run()
    }
}
