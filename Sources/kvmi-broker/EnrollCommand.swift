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

            With --host-wide instead of a domain: zero-touch enrolment of every guest. Writes \
            \(HostWideEnrollment.defaultPath) (or --host-config), which the patched QEMU reads whenever it \
            starts, also under libvirt's -no-user-config: every KVM guest started with -uuid connects to \
            --channel-socket unless its command line has an introspection-broker object of its own (that one \
            wins). Nothing in the domains' XML changes, so it survives Nova's and KubeVirt's XML rewrites. \
            libvirt must start the patched QEMU: make it the default emulator (/usr/bin/qemu-system-x86_64), \
            see qemu-patches.md, "Zero-touch enrolment". Guests pick the change up at their next start.
            """)

    @Argument(help: "The domain's name or UUID (not with --host-wide).")
    var domain: String?

    @Flag(help: "Enroll every guest the patched QEMU starts on this host, through QEMU's host-wide file, instead of one domain.")
    var hostWide = false

    @Option(help: "The host-wide file --host-wide writes (the patched QEMU reads \(HostWideEnrollment.defaultPath)).")
    var hostConfig = HostWideEnrollment.defaultPath

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

    func validate() throws {
        if hostWide {
            guard domain == nil else { throw ValidationError("give either a domain or --host-wide, not both") }
            guard introspector == nil, emulator == nil else {
                throw ValidationError(
                    "--introspector and --qemu are per domain: the policy names the introspector, and libvirt's default emulator runs")
            }
        } else {
            guard domain != nil else { throw ValidationError("give the domain's name or UUID, or --host-wide") }
            guard hostConfig == HostWideEnrollment.defaultPath else { throw ValidationError("--host-config goes with --host-wide") }
        }
    }

    func run() throws {
        do {
            guard let domain else {
                try writeHostWide(
                    path: hostConfig, text: HostWideEnrollment.fileText(enabled: true, channelSocket: channelSocket, required: required))
                print("host-wide enrolment on in \(hostConfig): every KVM guest the patched QEMU starts connects to \(channelSocket)")
                print("  guests running now pick it up at their next start; the policy decides which are introspected")
                print("  libvirt runs its default emulator for domains that name no other: it must be the patched QEMU")
                return
            }
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

    @Argument(help: "The domain's name or UUID (not with --host-wide).")
    var domain: String?

    @Flag(help: "Turn host-wide enrolment off: 'enabled = \"off\"' in the host-wide file.")
    var hostWide = false

    @Option(help: "The host-wide file --host-wide writes.")
    var hostConfig = HostWideEnrollment.defaultPath

    @Option(help: "With --host-wide: the channel socket the file keeps naming.")
    var channelSocket = EnrollmentOptions.defaultChannelSocket

    @Option(name: .customLong("connect"), help: "The libvirt URI.")
    var uri = "qemu:///system"

    func validate() throws {
        guard hostWide != (domain != nil) else { throw ValidationError("give either a domain or --host-wide") }
    }

    func run() throws {
        do {
            guard let domain else {
                try writeHostWide(path: hostConfig, text: HostWideEnrollment.fileText(enabled: false, channelSocket: channelSocket))
                print("host-wide enrolment off in \(hostConfig): guests started from now on do not connect to the broker by themselves")
                return
            }
            let enroller = try DomainEnroller(connection: LibvirtConnection.open(uri, readOnly: false))
            printReport(try enroller.unenroll(domain), verb: "unenrolled")
        } catch {
            FileHandle.standardError.write(Data("kvmi-broker unenroll: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

/// Writes the host-wide file whole (a temporary file renamed over it), mode 0644: QEMU reads it
/// as whatever user libvirt runs it as.
private func writeHostWide(path: String, text: String) throws(BrokerError) {
    let temporary = path + ".kvmi-broker-new"
    guard FileManager.default.createFile(atPath: temporary, contents: Data(text.utf8), attributes: [.posixPermissions: 0o644]) else {
        throw BrokerError(.io, "cannot write \(temporary) (its directory must exist; root is needed for /etc/qemu)", at: path)
    }
    // On disk before the rename: every patched QEMU on the host reads this file at start, and an
    // empty one left by a crash would stop them all (no path: a fatal error).
    let fd = open(temporary, O_RDONLY | O_CLOEXEC)
    guard fd >= 0, fsync(fd) == 0 else {
        let error = errno
        if fd >= 0 { close(fd) }
        unlink(temporary)
        throw BrokerError(.io, "cannot flush \(temporary) to disk", at: path, errno: error)
    }
    close(fd)
    guard rename(temporary, path) == 0 else {
        let error = errno
        unlink(temporary)
        throw BrokerError(.io, "cannot rename \(temporary) to \(path)", at: path, errno: error)
    }
    let directory = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if directory >= 0 {
        _ = fsync(directory)
        close(directory)
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
