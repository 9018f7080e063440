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
    /// as the domain's `<emulator>`, as the same user (root, the DAC label of this libvirtd),
    /// with the victim's `-uuid` and name, started by hand; only libvirtd knows it is not the
    /// domain's QEMU.
    @Suite("Real libvirtd: an impostor QEMU with the victim's -uuid is refused and claims nothing")
    struct RealLibvirtImpostorTests {
        @Test("an impostor before the domain runs, and another while it runs, are refused; libvirt's QEMU is hooked and stays hooked")
        func impostorBeforeAndDuring() async throws {
            let lines = LineCounter()
            let guest = try EnrolledLibvirtGuest(
                name: "kvmib-real-impostor", uuid: GuestUUID("d0d0d0d0-6666-4666-8666-000000000001")!, toolClosesOnUnhook: true,
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

            // 3. Another impostor while the domain runs: refused by libvirt's pid, and the real session is untouched.
            let during = try QEMUProcess(qemu: qemu, channelSocket: guest.channel, uuid: guest.uuid, name: guest.name, kernelDouble: double)
            let expected = "domain \(guest.name) (\(guest.uuid)) runs as QEMU pid \(libvirtPID), not pid \(during.pid)"
            let refusedDuring = eventually { lines.messages.contains { $0.contains(expected) } }
            during.stop()
            #expect(refusedDuring, "\(lines.messages.suffix(20))\n\(during.log)")
            let after = await guest.session()
            #expect(after?.qemuPID == libvirtPID && after?.hooked == true, "\(after.map { "\($0)" } ?? "no session")")
            #expect(guest.introspector.records.count == 1, "one tool session, the real guest's: \(guest.introspector.records)")
            #expect(guest.introspector.records.first?.handshake?.uuid == guest.uuid)
        }
    }
}
