import KVMIBrokerCore
import KVMIBrokerLibvirt
import KVMIBrokerPolicy

/// What the management layer (libvirt) says about the running domain a QEMU claims to be.
public struct DomainIdentity: Sendable, Equatable {
    public var name: String
    public var metadata: GuestMetadata?
    /// OpenStack Nova's element (project, flavor, image), when the domain has one.
    public var nova: NovaMetadata?
    /// The `<emulator>` libvirt started for the domain: the peer must run that very file.
    public var emulator: String?
    /// The user and group libvirt runs the domain's QEMU as; nil when it reports none (then
    /// only root may be the QEMU).
    public var processLabel: DACLabel?

    public init(name: String, metadata: GuestMetadata? = nil, nova: NovaMetadata? = nil, emulator: String? = nil, processLabel: DACLabel? = nil) {
        self.name = name
        self.metadata = metadata
        self.nova = nova
        self.emulator = emulator
        self.processLabel = processLabel
    }
}

/// What the management layer (libvirt) says about a QEMU that claims a guest's identity.
public enum IdentityCheck: Sendable, Equatable {
    /// A running domain with that UUID whose QEMU pid is the peer's; its name, metadata,
    /// emulator and DAC label come from it (the peer's executable and uid are compared next).
    case accepted(DomainIdentity)
    /// The claim is contradicted: one sentence why.
    case refused(String)
    /// No answer now (libvirt down or slow); QEMU retries on its own.
    case unavailable(String)
}

/// The source of truth for "which running domain is this QEMU" (libvirt in production).
public protocol IdentitySource: Sendable {
    func verify(uuid: GuestUUID, pid: Int32) async -> IdentityCheck
}
