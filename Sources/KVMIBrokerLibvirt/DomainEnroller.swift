import CLibvirt
import Foundation
import KVMIBrokerCore

/// What an (un)enrolment did to one domain.
public struct EnrollmentReport: Sendable, Equatable {
    public var name: String
    public var uuid: GuestUUID
    /// One line per change; empty when the domain already was as asked.
    public var changes: [String]
    /// The domain runs now: the changes take effect at its next start.
    public var running: Bool
}

/// Edits persistent domains through a read-write libvirt connection: `kvmi-broker enroll/unenroll`.
///
/// The definition (command line, emulator, with our metadata in it) is replaced with
/// `virDomainDefineXML` when it changes; when only our metadata changes, it is written with
/// `virDomainSetMetadata(..., VIR_DOMAIN_AFFECT_CONFIG)`. A running domain is not touched live:
/// QEMU's command line cannot change under it, so neither does the metadata the broker reads.
public struct DomainEnroller: Sendable {
    public let connection: LibvirtConnection
    /// Whether to write `<qemu:commandline>`; libvirt keeps it only in the QEMU driver.
    public let commandLine: Bool

    /// `commandLine` defaults to whether the connection's driver is QEMU; other drivers are
    /// refused unless `allowNonQEMU` (tests with the test driver, which drops `<qemu:commandline>`).
    public init(connection: LibvirtConnection, allowNonQEMU: Bool = false) throws(BrokerError) {
        guard !connection.readOnly else {
            throw BrokerError(.invalidArgument, "enrolment needs a read-write libvirt connection", at: connection.uri)
        }
        let driver = virConnectGetType(connection.pointer).map { String(cString: $0) } ?? "unknown"
        let isQEMU = driver == "QEMU"
        guard isQEMU || allowNonQEMU else {
            throw BrokerError(.unsupported, "libvirt driver \(driver) is not QEMU: it would drop <qemu:commandline>", at: connection.uri)
        }
        self.connection = connection
        self.commandLine = isQEMU
    }

    public func enroll(_ nameOrUUID: String, options: EnrollmentOptions) throws(BrokerError) -> EnrollmentReport {
        try edit(nameOrUUID) { root throws(BrokerError) in try Enrollment.enroll(root, options: options, commandLine: commandLine) }
    }

    public func unenroll(_ nameOrUUID: String) throws(BrokerError) -> EnrollmentReport {
        try edit(nameOrUUID) { root throws(BrokerError) in try Enrollment.unenroll(root) }
    }

    private func edit(_ nameOrUUID: String, _ transform: (MarkupElement) throws(BrokerError) -> EnrollmentEdit) throws(BrokerError)
        -> EnrollmentReport
    {
        try connection.withDomain(nameOrUUID) { domain throws(BrokerError) in
            let name = virDomainGetName(domain).map { String(cString: $0) } ?? nameOrUUID
            let place = "domain \(name)"
            guard let facts = connection.facts(of: domain, locator: QEMUProcessLocator(runDirectory: "/nonexistent")) else {
                throw LibvirtConnection.lastError(.io, "cannot read the domain", at: place)
            }
            guard virDomainIsPersistent(domain) == 1 else {
                throw BrokerError(.invalidArgument, "the domain is transient; only defined (persistent) domains can be enrolled", at: place)
            }
            let root: MarkupElement
            let edit: EnrollmentEdit
            do throws(BrokerError) {
                root = try MarkupElement.parse(try connection.inactiveXML(of: domain, place: place))
                edit = try transform(root)
            } catch {
                throw error.located(at: place)
            }
            if edit.definitionChanged {
                guard let defined = virDomainDefineXML(connection.pointer, edit.domain.serialized()) else {
                    throw LibvirtConnection.lastError(.io, "libvirt refused the edited definition", at: place)
                }
                virDomainFree(defined)
            } else if edit.metadataChanged {
                let flags = UInt32(VIR_DOMAIN_AFFECT_CONFIG.rawValue)
                let status = virDomainSetMetadata(
                    domain, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), edit.metadata?.setMetadataString, IntrospectionMetadata.prefix,
                    IntrospectionMetadata.namespace, flags)
                guard status == 0 else { throw LibvirtConnection.lastError(.io, "libvirt refused our metadata", at: place) }
            }
            if edit.changed {
                // Check that libvirt kept what we wrote: the same edit again must change nothing.
                let again = try transform(try MarkupElement.parse(try connection.inactiveXML(of: domain, place: place)))
                guard !again.changed else {
                    throw BrokerError(.io, "libvirt did not keep the change (\(again.changes.joined(separator: "; ")))", at: place)
                }
            }
            return EnrollmentReport(name: name, uuid: facts.uuid, changes: edit.changes, running: facts.state.isActive)
        }
    }
}
