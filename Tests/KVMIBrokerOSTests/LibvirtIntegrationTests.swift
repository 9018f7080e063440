import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerOS
import KVMIBrokerPolicy
import KVMITestIntrospector
import Logging
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// `virsh -c qemu:///system ARGS`.
func virsh(_ arguments: [String]) throws -> (Int32, String, String) {
    try runProcess(URL(fileURLWithPath: "/usr/bin/virsh"), ["-c", "qemu:///system"] + arguments, timeout: 120)
}

/// A test domain's name: `$KVMIB_TEST_DOMAIN_PREFIX` (default `kvmib-`) and `base`, so that test
/// runs from several worktrees sharing one libvirtd each define domains of their own names.
func testDomainName(_ base: String) -> String {
    (ProcessInfo.processInfo.environment["KVMIB_TEST_DOMAIN_PREFIX"] ?? "kvmib-") + base
}

/// Runs scripts/libvirtd-ci: its output goes to a file, not a pipe, because the daemons it
/// starts keep their inherited descriptors open (a pipe would never reach end of file).
func libvirtdCI(_ action: String) throws {
    let log = "/tmp/kvmib-libvirtd-ci-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
    defer { unlink(log) }
    let script = try SpawnedProcess(projectRoot.appendingPathComponent("scripts/libvirtd-ci").path, [action], logPath: log)
    guard let status = script.wait(timeout: 600), status == 0 else {
        throw BrokerError(.io, "scripts/libvirtd-ci \(action) failed: \(script.log)")
    }
}

/// The real libvirtd (scripts/test starts one by hand if none answers; so does this).
func ensureLibvirtd() throws {
    if (try? virsh(["version"]))?.0 == 0 { return }
    try libvirtdCI("start")
}

func restartLibvirtd() throws { try libvirtdCI("restart") }

/// `virsh define` of this XML.
func defineDomain(_ xml: String) throws {
    let path = "/tmp/kvmib-domain-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).xml"
    _ = FileManager.default.createFile(atPath: path, contents: Data(xml.utf8))
    defer { unlink(path) }
    let (status, _, err) = try virsh(["define", path])
    guard status == 0 else { throw BrokerError(.io, "virsh define failed: \(err)") }
}

/// Destroys and undefines a test domain, whatever state it is in.
func removeDomain(_ name: String) {
    _ = try? virsh(["destroy", name])
    _ = try? virsh(["undefine", name])
}

/// Before libvirt starts a domain with these: everything its QEMU (libvirt-qemu, the stock
/// qemu.conf) opens by itself is reachable by that user, or a clear error naming the path.
func requireReachableByStockQEMU(channel: String, double: String, firmware: String? = nil) throws {
    let account = try StockQEMUAccount.lookUp()
    try account.requireReachable(try patchedQEMU(), "-x", what: "the patched QEMU (the domain's <emulator>)")
    try account.requireReachable(double, "-r", what: "the kernel double (test equipment, LD_PRELOADed into QEMU)")
    if let firmware { try account.requireReachable(firmware, "-r", what: "the test firmware") }
    try account.requireReachable(channel, "-w", what: "the broker's channel socket")
}

/// A plain domain, enrolled with `kvmi-broker enroll` (metadata, chardev, object, emulator),
/// then given the kernel double with `<qemu:env>` (test equipment only). `firmware` replaces
/// SeaBIOS (`<loader type='rom'>`, QEMU's -bios). The broker must be listening on `channel`.
func defineEnrolledDomain(name: String, uuid: GuestUUID, channel: String, double: String, firmware: String? = nil) throws {
    try requireReachableByStockQEMU(channel: channel, double: double, firmware: firmware)
    let loader = firmware.map { "<loader type='rom'>\($0)</loader>" } ?? ""
    try defineDomain(
        """
        <domain type='kvm'>
          <name>\(name)</name><uuid>\(uuid)</uuid>
          <memory unit='MiB'>64</memory><vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type>\(loader)</os>
          <features><acpi/></features>
          <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices>
        </domain>
        """)
    let (enrolled, out, err) = try runProcess(
        productsDirectory().appendingPathComponent("kvmi-broker"), ["enroll", name, "--qemu", try patchedQEMU(), "--channel-socket", channel])
    guard enrolled == 0 else { throw BrokerError(.io, "kvmi-broker enroll failed: \(out) \(err)") }
    let (_, xml, _) = try virsh(["dumpxml", "--inactive", name])
    guard let close = xml.range(of: "</qemu:commandline>") else { throw BrokerError(.io, "enroll added no <qemu:commandline>: \(xml)") }
    try defineDomain(xml.replacingCharacters(in: close, with: "<qemu:env name='LD_PRELOAD' value='\(double)'/></qemu:commandline>"))
}

extension OSLayerTests {
    /// A real libvirtd starting the real patched QEMU (with the KERNEL DOUBLE preloaded through
    /// `<qemu:env>`, the one stand-in), the broker with libvirt as its identity source, the policy,
    /// the libvirt hook.
    @Suite("Real libvirtd: enrolled guests, libvirtd restarts, the hook's veto")
    struct LibvirtIntegrationTests {
        let enrolled = GuestUUID("d0d0d0d0-1111-4111-8111-aaaaaaaaaaaa")!
        let outsider = GuestUUID("d0d0d0d0-2222-4222-8222-bbbbbbbbbbbb")!
        let requiredGuest = GuestUUID("d0d0d0d0-3333-4333-8333-cccccccccccc")!

        func domainXML(name: String, uuid: GuestUUID, channel: String, double: String) throws -> String {
            """
            <domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
              <name>\(name)</name><uuid>\(uuid)</uuid>
              <memory unit='MiB'>64</memory><vcpu>1</vcpu>
              <os><type arch='x86_64' machine='pc'>hvm</type></os>
              <features><acpi/></features>
              <devices><emulator>\(try patchedQEMU())</emulator><memballoon model='none'/></devices>
              <qemu:commandline>
                <qemu:arg value='-L'/><qemu:arg value='/usr/share/seabios'/>
                <qemu:arg value='-chardev'/><qemu:arg value='socket,id=kvmib0,path=\(channel),reconnect-ms=300'/>
                <qemu:arg value='-object'/><qemu:arg value='introspection-broker,id=kvmib-vmi0,chardev=kvmib0'/>
                <qemu:env name='LD_PRELOAD' value='\(double)'/>
              </qemu:commandline>
            </domain>
            """
        }

        @Test("an enrolled guest started by libvirt is hooked; libvirtd restarts; a guest outside the policy is left alone")
        func enrolledGuest() async throws {
            try ensureLibvirtd()
            let introspector = try TestIntrospector(
                .init(
                    endpoint: .unix(path: temporarySocketPath("tool")), secret: testSecret,
                    kvmiClient: try KVMIClientPlan(abi: .v12, commands: ["VM_READ_PHYSICAL", "VM_WRITE_PHYSICAL"], events: [])))
            defer { introspector.stop() }
            let tree = try PolicyTree(toolSocket: "\(introspector.endpoint)".replacingOccurrences(of: "unix:", with: ""))
            defer { tree.cleanUp() }
            tree.write(
                "guests.d/50-it.conf",
                "[guest it]\nMatchUUID=\(enrolled)\nIntrospector=tool\nCommands=VM_READ_PHYSICAL;VM_CONTROL_EVENTS\nEvents=UNHOOK\n")
            // QEMU runs as libvirt-qemu (the stock qemu.conf): it reaches the channel socket
            // through its group kvm, as under the systemd unit (`--socket-group kvm`).
            let account = try StockQEMUAccount.lookUp()
            var configuration = BrokerConfiguration(
                channelSocketPath: qemuReachableSocketPath("libvirt-channel"), channelSocketGroup: account.kvmGID,
                policy: try PolicyStore(sources: tree.sources))
            let (identity, watcherTask) = LibvirtIdentity.start(uri: "qemu:///system", logger: Logger(label: "it-libvirt"))
            defer {
                watcherTask.cancel()
                identity.watcher.stop()
            }
            configuration.identity = identity
            let server = ChannelServer(configuration: configuration, logger: Logger(label: "it-broker"))
            let listener = try server.bind()
            let task = Task { await server.run(listener: listener) }
            defer { task.cancel() }
            let double = try kernelDouble()
            try defineEnrolledDomain(name: testDomainName("it-enrolled"), uuid: enrolled, channel: configuration.channelSocketPath, double: double)
            try defineDomain(
                try domainXML(name: testDomainName("it-outsider"), uuid: outsider, channel: configuration.channelSocketPath, double: double))
            defer {
                removeDomain(testDomainName("it-enrolled"))
                removeDomain(testDomainName("it-outsider"))
            }

            let (started, _, startErr) = try virsh(["start", testDomainName("it-enrolled")])
            #expect(started == 0, "\(startErr)")
            let hooked = await eventuallyAsync(timeout: .seconds(30)) {
                server.registry.snapshot().first { $0.uuid == "\(enrolled)" }?.hooked == true
            }
            let sessions = server.registry.snapshot()
            #expect(hooked, "\(sessions)")
            #expect(sessions.first?.name == testDomainName("it-enrolled"), "the name comes from libvirt")
            // The broker accepted a QEMU that is not root: libvirt-qemu, as libvirt's DAC label says.
            let qemuPID = try #require(sessions.first?.qemuPID)
            let credentials = StockQEMUAccount.credentials(of: qemuPID)
            #expect(
                credentials?.uid == account.uid && credentials?.gid == account.gid, "QEMU pid \(qemuPID) runs as \(String(describing: credentials))")
            #expect(eventually { introspector.records.first?.kvmi?.checks["command:VM_WRITE_PHYSICAL"] == -1 }, "\(introspector.records)")
            #expect(introspector.records.first?.kvmi?.version == 1)

            // libvirtd restarts: the guest stays hooked (QEMU and the broker do not depend on it),
            // and the broker's libvirt view comes back (a new domain is identified after the restart).
            try restartLibvirtd()
            let (outsiderStarted, _, outsiderErr) = try virsh(["start", testDomainName("it-outsider")])
            #expect(outsiderStarted == 0, "\(outsiderErr)")
            let leftAlone = await eventuallyAsync(timeout: .seconds(30)) {
                server.registry.snapshot().first { $0.uuid == "\(outsider)" }?.state == "not introspected"
            }
            let after = server.registry.snapshot()
            #expect(leftAlone, "\(after)")
            #expect(after.first { $0.uuid == "\(enrolled)" }?.hooked == true)
            #expect(introspector.records.count == 1, "the outsider got no handshake")
        }

        @Test("a required guest whose introspector is down is refused at start, with the reason in virsh's error")
        func requiredGuestVetoed() async throws {
            try ensureLibvirtd()
            let tree = try PolicyTree(toolSocket: "/tmp/kvmib-it-nobody-\(getpid()).sock")
            defer { tree.cleanUp() }
            tree.write(
                "guests.d/50-required.conf",
                "[guest must]\nMatchUUID=\(requiredGuest)\nIntrospector=tool\nCommands=VM_READ_PHYSICAL\nEvents=UNHOOK\nMode=required\n")
            let controlPath = temporarySocketPath("it-control")
            let control = ControlServer(path: controlPath, plans: try PolicyStore(sources: tree.sources), logger: Logger(label: "it-control"))
            let listener = try control.bind()
            let task = Task { await control.run(listener: listener) }
            defer { task.cancel() }
            let hooks = "/etc/libvirt/hooks/qemu.d"
            let broker = productsDirectory().appendingPathComponent("kvmi-broker")
            let (installed, _, installErr) = try runProcess(
                broker,
                ["install-hook", "--hooks-directory", hooks, "--broker-path", broker.path, "--hook-arguments=--control-socket \(controlPath)"])
            #expect(installed == 0, "\(installErr)")
            defer {
                unlink(hooks + "/50-kvmi-broker")
                try? restartLibvirtd()
            }
            try restartLibvirtd()  // libvirt reads hooks when it starts
            try defineDomain(
                try domainXML(name: testDomainName("it-required"), uuid: requiredGuest, channel: "/tmp/kvmib-none.sock", double: try kernelDouble()))
            defer { removeDomain(testDomainName("it-required")) }
            let (status, _, err) = try virsh(["start", testDomainName("it-required")])
            #expect(status != 0)
            #expect(err.contains("requires introspection by tool") && err.contains("unreachable"), "virsh said: \(err)")
            let (_, state, _) = try virsh(["domstate", testDomainName("it-required")])
            #expect(state.contains("shut off"))
        }
    }
}
