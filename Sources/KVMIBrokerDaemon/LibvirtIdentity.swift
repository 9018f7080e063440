import KVMIBrokerCore
import KVMIBrokerLibvirt
import KVMIBrokerPolicy
import Logging

/// libvirt as the identity source: a HELLO is accepted only if libvirt runs a domain with that
/// UUID whose QEMU pid is the peer's; the name, our metadata, the emulator and the DAC label
/// come from libvirt (the last two from the live XML).
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
                DomainIdentity(
                    name: domain.name,
                    metadata: domain.metadata.map { GuestMetadata(wanted: $0.wanted, introspector: $0.introspector, required: $0.required) },
                    nova: domain.nova,
                    emulator: domain.emulator, processLabel: domain.processLabel))
        case .refused(let why):
            return .refused(why)
        case .unavailable(let why):
            return .unavailable(why)
        }
    }

    /// Starts the watcher and logs its events (discovery, resyncs; the watcher itself logs
    /// connects, disconnects and connect failures) until cancelled.
    /// (Tests point `locator` at a run directory of their own, with the test driver.)
    public static func start(uri: String, locator: QEMUProcessLocator = .system, logger: Logger) -> (LibvirtIdentity, Task<Void, Never>) {
        let watcher = LibvirtWatcher(configuration: .init(uri: uri, locator: locator), logger: logger)
        watcher.start()
        let task = Task {
            for await event in watcher.events {
                if let line = event.logLine { logger.info("\(line)") }
            }
        }
        return (LibvirtIdentity(watcher: watcher), task)
    }
}
