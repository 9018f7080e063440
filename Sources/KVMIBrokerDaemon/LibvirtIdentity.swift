import KVMIBrokerCore
import KVMIBrokerLibvirt
import KVMIBrokerPolicy
import Logging

/// libvirt as the identity source: a HELLO is accepted only if libvirt runs a domain with that
/// UUID whose QEMU pid is the peer's; the name and our metadata come from libvirt.
public struct LibvirtIdentity: IdentitySource {
    public let watcher: LibvirtWatcher
    public let timeout: Duration

    public init(watcher: LibvirtWatcher, timeout: Duration = .seconds(5)) {
        self.watcher = watcher
        self.timeout = timeout
    }

    public func verify(uuid: GuestUUID, pid: Int32) async -> IdentityCheck {
        switch await watcher.verifyPeer(uuid: uuid, pid: pid, timeout: timeout) {
        case .accepted(let domain):
            return .accepted(
                name: domain.name,
                metadata: domain.metadata.map { GuestMetadata(wanted: $0.wanted, introspector: $0.introspector, required: $0.required) })
        case .refused(let why):
            return .refused(why)
        case .unavailable(let why):
            return .unavailable(why)
        }
    }

    /// Starts the watcher and logs its events (discovery, disconnects, resyncs) until cancelled.
    public static func start(uri: String, logger: Logger) -> (LibvirtIdentity, Task<Void, Never>) {
        let watcher = LibvirtWatcher(configuration: .init(uri: uri), logger: logger)
        watcher.start()
        let task = Task {
            for await event in watcher.events {
                logger.info("libvirt: \(event)")
            }
        }
        return (LibvirtIdentity(watcher: watcher), task)
    }
}
