import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerLibvirt
import KVMIBrokerOS
import KVMIBrokerPolicy
import KVMITestIntrospector
import Logging
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The patched QEMU with a host-wide `introspection-broker.conf` of its own, so that a test never
/// writes the host's /etc/qemu: a hard link to (or copy of) the binary beside a `qemu-bundle/`
/// tree, which QEMU reads instead of its installed paths (`get_relocated_path()`, its convention
/// for running from a build tree). Firmware paths inside the bundle point back to Debian's.
struct HostWideQEMU {
    let directory: String
    let binary: String
    /// Where this QEMU reads its host-wide file: `qemu-bundle/etc/qemu/introspection-broker.conf`.
    let configPath: String

    init(tag: String) throws {
        directory = "/tmp/kvmib-zerotouch-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        binary = directory + "/qemu-system-x86_64"
        configPath = directory + "/qemu-bundle/etc/qemu/introspection-broker.conf"
        let files = FileManager.default
        try files.createDirectory(atPath: directory + "/qemu-bundle/etc/qemu", withIntermediateDirectories: true)
        try files.createDirectory(atPath: directory + "/qemu-bundle/usr/share", withIntermediateDirectories: true)
        for firmware in ["seabios", "qemu"] {
            try files.createSymbolicLink(atPath: directory + "/qemu-bundle/usr/share/" + firmware, withDestinationPath: "/usr/share/" + firmware)
        }
        let qemu = try patchedQEMU()
        if link(qemu, binary) != 0 { try files.copyItem(atPath: qemu, toPath: binary) }
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }
}

/// `kvmi-broker enroll|unenroll ARGS`.
private func brokerCommand(_ arguments: [String]) throws -> (Int32, String, String) {
    try runProcess(productsDirectory().appendingPathComponent("kvmi-broker"), arguments)
}

/// `enroll --host-wide` and `unenroll --host-wide` on the command line: the file they write and
/// what they refuse. QEMU's reading of that file is tested in qemu-patches/tests/channel-test.py
/// (t_host_wide*) and with the real libvirtd below.
@Suite("Zero-touch enrolment: the host-wide file on the command line")
struct HostWideCommandTests {
    @Test("enroll --host-wide writes QEMU's host-wide file; unenroll --host-wide turns it off; bad input changes nothing")
    func writesAndRefuses() throws {
        let directory = "/tmp/kvmib-zerotouch-cli-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/introspection-broker.conf"

        let (enrolled, out, err) = try brokerCommand(["enroll", "--host-wide", "--host-config", path, "--channel-socket", "/run/x/qemu.sock"])
        #expect(enrolled == 0, "\(err)")
        #expect(out.contains("host-wide enrolment on in \(path)"), "\(out)")
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(text.contains("[introspection-broker]\n  enabled = \"on\"\n  path = \"/run/x/qemu.sock\"\n  reconnect-ms = \"1000\"\n"), "\(text)")
        #expect(!text.contains("required = "))
        let mode = (try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? NSNumber)?.intValue
        #expect(mode == 0o644)

        // A path QEMU's -readconfig syntax cannot carry, and misplaced options: refused, file unchanged.
        for arguments in [
            ["enroll", "--host-wide", "--host-config", path, "--channel-socket", "/run/a\"b.sock"],
            ["enroll", "--host-wide", "--host-config", path, "--channel-socket", "relative.sock"],
            ["enroll", "somedomain", "--host-wide", "--host-config", path],
            ["enroll", "--host-wide", "--host-config", path, "--qemu", "/usr/bin/true"],
            ["enroll", "somedomain", "--host-config", path],
            ["unenroll", "somedomain", "--host-wide", "--host-config", path],
        ] {
            let (status, _, refusal) = try brokerCommand(arguments)
            #expect(status != 0, "\(arguments)")
            #expect(!refusal.isEmpty, "\(arguments)")
            #expect(try String(contentsOfFile: path, encoding: .utf8) == text, "\(arguments) changed the file")
        }
        let (quote, _, quoteErr) = try brokerCommand(["enroll", "--host-wide", "--host-config", path, "--channel-socket", "/run/a\"b.sock"])
        #expect(quote == 1 && quoteErr.contains("without double quotes"), "\(quoteErr)")

        let (required, _, requiredErr) = try brokerCommand(["enroll", "--host-wide", "--required", "--host-config", path])
        #expect(required == 0, "\(requiredErr)")
        #expect(try String(contentsOfFile: path, encoding: .utf8).hasSuffix("  reconnect-ms = \"1000\"\n  required = \"on\"\n"))

        let (off, offOut, offErr) = try brokerCommand(["unenroll", "--host-wide", "--host-config", path])
        #expect(off == 0, "\(offErr)")
        #expect(offOut.contains("host-wide enrolment off"), "\(offOut)")
        #expect(try String(contentsOfFile: path, encoding: .utf8).contains("  enabled = \"off\"\n  path = \"/run/kvmi-broker/qemu.sock\"\n"))
        #expect(!FileManager.default.fileExists(atPath: path + ".kvmi-broker-new"))
    }
}

extension OSLayerTests {
    /// Zero-touch enrolment through the real libvirtd and the real patched QEMU: guests whose XML
    /// has nothing of ours (as Nova and KubeVirt regenerate it) still reach the broker, because
    /// the QEMU libvirt runs reads the host-wide file. No kernel double: this host's kernel
    /// refuses the hook (ENOTTY), which the broker reports; everything before it is real.
    @Suite("Real libvirtd: zero-touch enrolment through QEMU's host-wide file")
    struct ZeroTouchTests {
        let introspected = GuestUUID("d0d0d0d0-7777-4777-8777-0000000000a1")!
        let outsider = GuestUUID("d0d0d0d0-7777-4777-8777-0000000000a2")!

        /// A domain as a management layer writes it: no metadata, no <qemu:commandline>. `<acpi/>`:
        /// without it libvirt 9.0 passes -no-acpi, which QEMU 10 no longer knows.
        func plainXML(name: String, uuid: GuestUUID, emulator: String) -> String {
            """
            <domain type='kvm'>
              <name>\(name)</name><uuid>\(uuid)</uuid>
              <memory unit='MiB'>64</memory><vcpu>1</vcpu>
              <os><type arch='x86_64' machine='pc'>hvm</type></os>
              <features><acpi/></features>
              <devices><emulator>\(emulator)</emulator><memballoon model='none'/></devices>
            </domain>
            """
        }

        @Test("a domain redefined without our XML is still introspected; a guest outside the policy is released and runs")
        func redefinedDomainStillIntrospected() async throws {
            try ensureLibvirtd()
            let qemu = try HostWideQEMU(tag: "libvirt")
            defer { qemu.remove() }
            let introspector = try TestIntrospector(.init(endpoint: .unix(path: temporarySocketPath("zerotouch-tool")), secret: testSecret))
            defer { introspector.stop() }
            let tree = try PolicyTree(toolSocket: "\(introspector.endpoint)".replacingOccurrences(of: "unix:", with: ""))
            defer { tree.cleanUp() }
            tree.write(
                "guests.d/50-zerotouch.conf",
                "[guest zerotouch]\nMatchUUID=\(introspected)\nIntrospector=tool\nCommands=VM_READ_PHYSICAL\nEvents=UNHOOK\n")
            // QEMU runs as libvirt-qemu (Debian's qemu.conf): the socket in a directory it may
            // search, group kvm, as the unit's --socket-group kvm makes it.
            let channel = qemuReachableSocketPath("zerotouch-channel")
            var configuration = BrokerConfiguration(
                channelSocketPath: channel, channelSocketGroup: try StockQEMUAccount.lookUp().kvmGID, policy: try PolicyStore(sources: tree.sources))
            let (identity, watcherTask) = LibvirtIdentity.start(uri: "qemu:///system", logger: Logger(label: "zerotouch-libvirt"))
            defer {
                watcherTask.cancel()
                identity.watcher.stop()
            }
            configuration.identity = identity
            let server = ChannelServer(configuration: configuration, logger: Logger(label: "zerotouch-broker"))
            let listener = try server.bind()
            let task = Task { await server.run(listener: listener) }
            defer { task.cancel() }

            // The administrator's one step, into this QEMU's own host-wide file.
            let (written, _, writeErr) = try brokerCommand(["enroll", "--host-wide", "--host-config", qemu.configPath, "--channel-socket", channel])
            #expect(written == 0, "\(writeErr)")

            // Enrolled once by hand, then redefined from XML without our pieces, as Nova does on a
            // hard reboot; the emulator stays (on a real host: the patched QEMU as libvirt's default).
            let name = testDomainName("zerotouch-guest")
            let outsiderName = testDomainName("zerotouch-outsider")
            removeDomain(name)
            removeDomain(outsiderName)
            defer {
                removeDomain(name)
                removeDomain(outsiderName)
                unlink("/var/log/libvirt/qemu/\(name).log")
                unlink("/var/log/libvirt/qemu/\(outsiderName).log")
            }
            try defineDomain(plainXML(name: name, uuid: introspected, emulator: qemu.binary))
            let (enrolled, _, enrollErr) = try brokerCommand(["enroll", name, "--qemu", qemu.binary, "--channel-socket", channel])
            #expect(enrolled == 0, "\(enrollErr)")
            try defineDomain(plainXML(name: name, uuid: introspected, emulator: qemu.binary))
            let (_, xml, _) = try virsh(["dumpxml", "--inactive", name])
            #expect(!xml.contains("qemu:commandline") && !xml.contains("introspection"), "redefined without our XML: \(xml)")

            let (started, _, startErr) = try virsh(["start", name])
            #expect(started == 0, "\(startErr)")
            // HELLO reached the broker, libvirt confirmed who the QEMU is, the policy chose the
            // tool, the handshake with the tool carried the guest's UUID, and HOOK met this
            // kernel's refusal.
            let refused = await eventuallyAsync(timeout: .seconds(60)) {
                server.registry.snapshot().first { $0.uuid == "\(introspected)" }?.lastFailure?.contains("ENOTTY") == true
            }
            let session = server.registry.snapshot().first { $0.uuid == "\(introspected)" }
            #expect(refused, "\(String(describing: session))")
            #expect(session?.name == name)
            #expect(session?.identity == "libvirt")
            #expect(session?.introspector == "tool")
            #expect(introspector.records.contains { $0.handshake?.uuid == introspected }, "\(introspector.records)")

            // Deny by default: a guest the policy does not name is released and runs.
            try defineDomain(plainXML(name: outsiderName, uuid: outsider, emulator: qemu.binary))
            let (outsiderStarted, _, outsiderErr) = try virsh(["start", outsiderName])
            #expect(outsiderStarted == 0, "\(outsiderErr)")
            let released = await eventuallyAsync(timeout: .seconds(60)) {
                server.registry.snapshot().first { $0.uuid == "\(outsider)" }?.state == "not introspected"
            }
            let sessions = server.registry.snapshot()
            #expect(released, "\(sessions)")
            #expect(try virsh(["domstate", outsiderName]).1.contains("running"))
            #expect(!introspector.records.contains { $0.handshake?.uuid == outsider }, "the outsider got no handshake")
        }
    }
}
