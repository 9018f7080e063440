import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerOS
import KVMITestIntrospector
import Testing

#if canImport(Glibc)
    import Glibc
#endif

extension OSLayerTests {
    /// Issue 10 item 7 on the real parts: libvirt's pid-to-domain check against an impostor that
    /// passes every other check. The impostor is the same patched QEMU binary that libvirt runs
    /// as the domain's `<emulator>`, with the victim's `-uuid` and name, started by hand, as root
    /// and as the very user and group libvirt runs the domain's QEMU as with Debian's qemu.conf
    /// (libvirt-qemu, its DAC label); only libvirtd knows it is not the domain's QEMU. A process
    /// of any other user cannot even connect: the channel socket is root:kvm 0660.
    @Suite("Real libvirtd: an impostor QEMU with the victim's -uuid is refused and claims nothing")
    struct RealLibvirtImpostorTests {
        @Test(
            "an impostor before the domain runs, and others while it runs (root, libvirt-qemu), are refused; libvirt's QEMU is hooked and stays hooked"
        )
        func impostorBeforeAndDuring() async throws {
            let lines = LineCounter()
            let guest = try EnrolledLibvirtGuest(
                name: testDomainName("real-impostor"), uuid: GuestUUID("d0d0d0d0-6666-4666-8666-000000000001")!, toolClosesOnUnhook: true,
                lines: lines)
            defer { guest.tearDown() }
            // Before the watcher is connected a peer is told "not now" (EAGAIN), not refused.
            #expect(eventually { guest.identity.watcher.isConnected }, "the watcher did not connect to qemu:///system")
            let qemu = try patchedQEMU()
            let double = try kernelDouble()

            // 1. The domain is shut off: whoever claims its UUID is refused.
            let early = try QEMUProcess(qemu: qemu, channelSocket: guest.channel, uuid: guest.uuid, name: guest.name, kernelDouble: double)
            let refusedEarly = eventually { lines.messages.contains { $0.contains("libvirt runs no domain with UUID \(guest.uuid)") } }
            early.stop()
            #expect(refusedEarly, "\(lines.messages.suffix(20))\n\(early.log)")
            #expect(guest.introspector.records.isEmpty, "the impostor reached the tool: \(guest.introspector.records)")
            #expect(await guest.session() == nil, "a refused connection claimed the guest")

            // 2. libvirt starts the domain: its QEMU is hooked, nothing the impostor did stands in its way.
            #expect(try virsh(["start", guest.name]).0 == 0)
            #expect(await guest.waitForHook(from: 0) != nil, "\(guest.introspector.records)\n\(lines.messages.suffix(20))")
            let libvirtPID = try #require(Int32(try String(contentsOfFile: "/run/libvirt/qemu/\(guest.name).pid", encoding: .utf8)))
            let hooked = try #require(await guest.session())
            #expect(hooked.qemuPID == libvirtPID && hooked.hooked)
            // libvirt's QEMU is not root: it runs as libvirt-qemu, and the broker accepted it
            // against the DAC label libvirt reports.
            let account = try StockQEMUAccount.lookUp()
            let credentials = StockQEMUAccount.credentials(of: libvirtPID)
            #expect(credentials?.uid == account.uid && credentials?.gid == account.gid, "QEMU runs as \(String(describing: credentials))")

            // 3. Another impostor (root) while the domain runs: refused by libvirt's pid, and the real session is untouched.
            let during = try QEMUProcess(qemu: qemu, channelSocket: guest.channel, uuid: guest.uuid, name: guest.name, kernelDouble: double)
            let expected = "domain \(guest.name) (\(guest.uuid)) runs as QEMU pid \(libvirtPID), not pid \(during.pid)"
            let refusedDuring = eventually { lines.messages.contains { $0.contains(expected) } }
            during.stop()
            #expect(refusedDuring, "\(lines.messages.suffix(20))\n\(during.log)")

            // 4. The same impostor as libvirt-qemu: the uid and gid of libvirt's DAC label pass,
            // libvirt's pid does not.
            let sameUser = try QEMUProcess(
                qemu: qemu, channelSocket: guest.channel, uuid: guest.uuid, name: guest.name, kernelDouble: double,
                runAs: (account.uid, account.gid))
            let sameUserExpected = "domain \(guest.name) (\(guest.uuid)) runs as QEMU pid \(libvirtPID), not pid \(sameUser.pid)"
            let refusedSameUser = eventually { lines.messages.contains { $0.contains(sameUserExpected) } }
            let sameUserCredentials = StockQEMUAccount.credentials(of: sameUser.pid)
            sameUser.stop()
            #expect(refusedSameUser, "\(lines.messages.suffix(20))\n\(sameUser.log)")
            #expect(sameUserCredentials?.uid == account.uid, "the impostor ran as \(String(describing: sameUserCredentials))")

            // 5. A process of another user (nobody, not in group kvm) cannot reach the channel socket at all.
            let (connected, _, connectError) = try runProcess(
                URL(fileURLWithPath: "/usr/bin/setpriv"),
                [
                    "--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3", "-c",
                    "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])", guest.channel,
                ])
            #expect(connected != 0 && connectError.contains("PermissionError"), "uid 65534 connected to \(guest.channel): \(connectError)")

            let after = await guest.session()
            #expect(after?.qemuPID == libvirtPID && after?.hooked == true, "\(after.map { "\($0)" } ?? "no session")")
            #expect(guest.introspector.records.count == 1, "one tool session, the real guest's: \(guest.introspector.records)")
            #expect(guest.introspector.records.first?.handshake?.uuid == guest.uuid)
        }
    }
}
