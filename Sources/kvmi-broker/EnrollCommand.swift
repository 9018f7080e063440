import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMIBrokerLibvirt

/// `kvmi-broker enroll`: mark a libvirt domain for introspection and connect its QEMU to the broker.
struct EnrollCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enroll",
        abstract: "Enroll a libvirt domain: our metadata, the channel to the broker on QEMU's command line, and the patched QEMU.",
        discussion: """
            Edits the persistent definition through libvirt: the <kvmi:introspection> metadata element \
            (namespace \(IntrospectionMetadata.namespace)), the <qemu:commandline> arguments \
            '-chardev socket,id=kvmib0,path=SOCKET,reconnect-ms=1000' and \
            '-object introspection-broker,id=kvmib-vmi0,chardev=kvmib0[,required=on]', and <emulator>: --qemu, or \
            \(EnrollCommand.packagedQEMU) (the kvmi-broker-qemu package) when --qemu is not given and that file \
            exists; otherwise the domain's <emulator> is left as it is. \
            Running it again with the same options changes nothing; with other options it replaces what it added. \
            A running domain picks the changes up at its next start. The policy still decides whether and how \
            the guest is introspected.
            """)

    @Argument(help: "The domain's name or UUID.")
    var domain: String

    @Option(help: "The introspector the domain asks for (a name the policy defines).")
    var introspector: String?

    @Flag(help: "The guest must not start unless it can be introspected.")
    var required = false

    /// The patched QEMU the kvmi-broker-qemu package installs beside Debian's.
    static let packagedQEMU = "/usr/lib/kvmi-broker/qemu-system-x86_64"

    @Option(
        name: .customLong("qemu"),
        help: """
            The patched QEMU binary the domain runs (its <emulator>). Default: \(packagedQEMU) if that file \
            exists, else the domain's current <emulator> is kept.
            """)
    var emulator: String?

    @Option(help: "The broker's channel socket QEMU connects to (kvmi-broker run --channel-socket).")
    var channelSocket = EnrollmentOptions.defaultChannelSocket

    @Option(name: .customLong("connect"), help: "The libvirt URI.")
    var uri = "qemu:///system"

    func run() throws {
        do {
            let emulator = emulator ?? (FileManager.default.isExecutableFile(atPath: Self.packagedQEMU) ? Self.packagedQEMU : nil)
            let options = try EnrollmentOptions(introspector: introspector, required: required, emulator: emulator, channelSocket: channelSocket)
            if let emulator, !FileManager.default.isExecutableFile(atPath: emulator) {
                throw BrokerError(.invalidArgument, "--qemu \(emulator) is not an executable file")
            }
            let enroller = try DomainEnroller(connection: LibvirtConnection.open(uri, readOnly: false))
            printReport(try enroller.enroll(domain, options: options), verb: "enrolled")
        } catch let error as BrokerError {
            FileHandle.standardError.write(Data("kvmi-broker enroll: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

/// `kvmi-broker unenroll`: remove exactly what `enroll` added.
struct UnenrollCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unenroll",
        abstract: "Remove from a libvirt domain exactly what 'kvmi-broker enroll' added, restoring the emulator it replaced.")

    @Argument(help: "The domain's name or UUID.")
    var domain: String

    @Option(name: .customLong("connect"), help: "The libvirt URI.")
    var uri = "qemu:///system"

    func run() throws {
        do {
            let enroller = try DomainEnroller(connection: LibvirtConnection.open(uri, readOnly: false))
            printReport(try enroller.unenroll(domain), verb: "unenrolled")
        } catch {
            FileHandle.standardError.write(Data("kvmi-broker unenroll: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

private func printReport(_ report: EnrollmentReport, verb: String) {
    if report.changes.isEmpty {
        print("\(report.name) (\(report.uuid)): already \(verb), nothing changed")
        return
    }
    print("\(report.name) (\(report.uuid)): \(verb)")
    for change in report.changes { print("  \(change)") }
    if report.running { print("  the domain is running: the changes take effect at its next start") }
}
