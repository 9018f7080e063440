import KVMIBrokerCore
import KVMIBrokerPolicy

/// What the management layer (libvirt) says about a QEMU that claims a guest's identity.
public enum IdentityCheck: Sendable, Equatable {
    /// A running domain with that UUID whose QEMU is the peer; name and metadata come from it.
    case accepted(name: String, metadata: GuestMetadata?)
    /// The claim is contradicted: one sentence why.
    case refused(String)
    /// No answer now (libvirt down or slow); QEMU retries on its own.
    case unavailable(String)
}

/// The source of truth for "which running domain is this QEMU" (libvirt in production).
public protocol IdentitySource: Sendable {
    func verify(uuid: GuestUUID, pid: Int32) async -> IdentityCheck
}
