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

/// One enrolled guest on the real libvirtd and the real patched QEMU (kernel double preloaded),
/// the broker in this process with libvirt as its identity source, and a test introspector.
/// With `toolClosesOnUnhook: false` the tool never lets go: it takes the unhook event and keeps
/// its socket open, so every interception QEMU makes runs into its timeout. The guest's
/// firmware powers off on the ACPI power button (Fixtures/acpi-poweroff-firmware.S).
/// `lines` receives the broker's log.
struct EnrolledLibvirtGuest {
    let name: String
    let uuid: GuestUUID
    let introspector: TestIntrospector
    let tree: PolicyTree
    let server: ChannelServer
    let serverTask: Task<Void, Never>
    let identity: LibvirtIdentity
    let watcherTask: Task<Void, Never>
    /// Where QEMU's stderr goes (through virtlogd); read from the offset of each step.
    let qemuLogPath: String
    /// The broker's channel socket (the domain's chardev connects to it).
    let channel: String

    init(name: String, uuid: GuestUUID, toolClosesOnUnhook: Bool = false, lines: LineCounter? = nil) throws {
        try ensureLibvirtd()
        self.name = name
        self.uuid = uuid
        qemuLogPath = "/var/log/libvirt/qemu/\(name).log"
        removeDomain(name)  // a leftover of an interrupted run
        introspector = try TestIntrospector(
            .init(
                endpoint: .unix(path: temporarySocketPath("libvirt-guest-tool")), secret: testSecret,
                kvmiClient: try KVMIClientPlan(
                    abi: .v12, commands: ["VM_READ_PHYSICAL"], events: ["UNHOOK"], closesOnUnhook: toolClosesOnUnhook)))
        tree = try PolicyTree(toolSocket: "\(introspector.endpoint)".replacingOccurrences(of: "unix:", with: ""))
        tree.write(
            "guests.d/50-virsh.conf",
            "[guest virsh]\nMatchUUID=\(uuid)\nIntrospector=tool\nCommands=VM_READ_PHYSICAL;VM_CONTROL_EVENTS\nEvents=UNHOOK\n")
        // libvirt runs QEMU as libvirt-qemu (the stock qemu.conf): the channel socket is root:kvm
        // 0660 in a directory it may search, as the systemd unit makes it (`--socket-group kvm`).
        channel = qemuReachableSocketPath("libvirt-guest-channel")
        var configuration = BrokerConfiguration(
            channelSocketPath: channel, channelSocketGroup: try StockQEMUAccount.lookUp().kvmGID, policy: try PolicyStore(sources: tree.sources))
        (identity, watcherTask) = LibvirtIdentity.start(uri: "qemu:///system", logger: Logger(label: "virsh-libvirt"))
        configuration.identity = identity
        // A test that reads the broker's lines must see every refusal, however many a retrying peer causes.
        if lines != nil { configuration.refusals = RateLimitedLog(linesPerWindow: 100_000) }
        let logger = lines.map { lines in Logger(label: "libvirt-guest-broker", factory: { _ in lines }) } ?? Logger(label: "virsh-broker")
        server = ChannelServer(configuration: configuration, logger: logger)
        let listener = try server.bind()
        serverTask = Task { [server] in await server.run(listener: listener) }
        do {
            try defineEnrolledDomain(
                name: name, uuid: uuid, channel: channel, double: try kernelDouble(), firmware: try acpiPoweroffFirmware())
        } catch {
            tearDown()
            throw error
        }
    }

    /// Removes the domain and its log, stops the broker and the introspector.
    func tearDown() {
        removeDomain(name)
        unlink(qemuLogPath)
        serverTask.cancel()
        watcherTask.cancel()
        identity.watcher.stop()
        introspector.stop()
        tree.cleanUp()
    }

    /// `virsh ARGS` with its wall time printed (documentation, never asserted).
    func timedVirsh(_ arguments: [String]) throws -> (Int32, String) {
        let start = ContinuousClock.now
        let (status, out, err) = try virsh(arguments)
        print("virsh \(arguments.joined(separator: " ")) against a tool that never closes: \(ContinuousClock.now - start), status \(status)")
        return (status, out + err)
    }

    /// `virsh domstate --reason`, e.g. "paused (user)".
    func state() throws -> String {
        try virsh(["domstate", "--reason", name]).1.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Polls `virsh domstate` (one process per look, so ten looks a second at most).
    func waitForState(_ expected: String) -> Bool {
        eventually {
            if (try? state()) == expected { return true }
            usleep(100_000)
            return false
        }
    }

    /// The broker's view of the guest (what `kvmi-broker status` prints).
    func session() async -> SessionStatus? {
        server.registry.snapshot().first { $0.uuid == "\(uuid)" }
    }

    /// Waits until a KVMI session of connection `first` or later has enabled the unhook event
    /// (so that QEMU's PREUNHOOK reaches the tool) and the broker reports the guest hooked.
    /// Returns that connection's index.
    func waitForHook(from first: Int) async -> Int? {
        let hooked = await eventuallyAsync {
            let index = introspector.records.lastIndex { $0.kvmi?.unhookEnabled == 0 && $0.kvmi?.ended == nil }
            guard let index, index >= first else { return false }
            return await session()?.hooked == true
        }
        return hooked ? introspector.records.lastIndex { $0.kvmi?.unhookEnabled == 0 && $0.kvmi?.ended == nil } : nil
    }

    /// The tool of connection `index` got the unhook event, held on, and the other end closed its socket.
    func heldOnUntilUnhooked(_ index: Int) -> Bool {
        eventually {
            let kvmi = introspector.records[index].kvmi
            return kvmi?.unhookEventReceived == true && kvmi?.closedByOtherEndAfterUnhook == true
        }
    }

    func logSize() -> Int {
        ((try? FileManager.default.attributesOfItem(atPath: qemuLogPath)[.size]) as? NSNumber)?.intValue ?? 0
    }

    /// QEMU's log since `offset` (its last 2,000 characters), for a failure's message: the test
    /// removes the log when it ends.
    func qemuLogText(since offset: Int) -> String {
        guard let data = FileManager.default.contents(atPath: qemuLogPath) else { return "(no log at \(qemuLogPath))" }
        guard data.count > offset else { return "(nothing since offset \(offset); the log has \(data.count) bytes)" }
        return String(String(decoding: data.dropFirst(offset), as: UTF8.self).suffix(2_000))
    }

    /// QEMU's log since `offset` once it contains `text` (virtlogd writes it asynchronously).
    func qemuLog(since offset: Int, contains text: String) -> Bool {
        eventually {
            guard let data = FileManager.default.contents(atPath: qemuLogPath), data.count > offset else { return false }
            return String(decoding: data.dropFirst(offset), as: UTF8.self).contains(text)
        }
    }
}
