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

/// QEMU's line when its unhook-timeout (5 s by default) ran out with the tool still holding on.
private let unhookedAnyway = "the introspection tool did not close its socket within 5 s; unhooking anyway"

extension OSLayerTests {
    /// Issue 9 item 6: a tool that never lets go must not wedge the VM's management. libvirt
    /// fails a domain's other calls after 30 s waiting for its job, and `virsh destroy` sends
    /// SIGKILL 10 s after SIGTERM; QEMU's unhook-timeout and shutdown-timeout (5 s) must fit.
    /// The assertions are on outcomes; each command's wall time is printed, not asserted.
    @Suite("Real libvirtd: virsh suspend, save, shutdown and destroy against a tool that never closes")
    struct VirshNeverClosingToolTests {
        @Test("virsh suspend succeeds, the domain paused and unhooked after QEMU's unhook-timeout; virsh resume hooks it again")
        func suspendAndResume() async throws {
            let guest = try EnrolledLibvirtGuest(name: testDomainName("virsh-suspend"), uuid: GuestUUID("d0d0d0d0-5555-4555-8555-000000000001")!)
            defer { guest.tearDown() }
            #expect(try virsh(["start", guest.name]).0 == 0)
            let first = try #require(await guest.waitForHook(from: 0), "\(guest.introspector.records)")
            let offset = guest.logSize()

            let (suspended, suspendOutput) = try guest.timedVirsh(["suspend", guest.name])
            #expect(suspended == 0, "\(suspendOutput)")
            #expect(try guest.state() == "paused (user)")
            #expect(guest.heldOnUntilUnhooked(first), "\(guest.introspector.records[first])")
            #expect(guest.qemuLog(since: offset, contains: unhookedAnyway))
            let unhooked = await eventuallyAsync { (await guest.session()).map { !$0.hooked && $0.state == "unhooked for PAUSED" } == true }
            let status = await guest.session()
            #expect(unhooked, "the broker's status: \(status.map { "\($0)" } ?? "no session")")

            let (resumed, resumeOutput) = try guest.timedVirsh(["resume", guest.name])
            #expect(resumed == 0, "\(resumeOutput)")
            #expect(try guest.state() == "running (unpaused)")
            let second = await guest.waitForHook(from: first + 1)
            #expect(second != nil, "not hooked again after resume: \(guest.introspector.records)")
        }

        @Test("virsh save succeeds while the tool holds on; virsh restore brings the guest back, hooked again")
        func saveAndRestore() async throws {
            let guest = try EnrolledLibvirtGuest(name: testDomainName("virsh-save"), uuid: GuestUUID("d0d0d0d0-5555-4555-8555-000000000002")!)
            defer { guest.tearDown() }
            let image = "\(privateSocketDirectory)/kvmib-virsh-save-\(UInt32.random(in: 0...UInt32.max)).img"
            defer { unlink(image) }
            #expect(try virsh(["start", guest.name]).0 == 0)
            let first = try #require(await guest.waitForHook(from: 0), "\(guest.introspector.records)")
            let pid = try #require(await guest.session()?.qemuPID)
            let offset = guest.logSize()

            let (saved, saveOutput) = try guest.timedVirsh(["save", guest.name, image])
            #expect(saved == 0, "\(saveOutput)")
            #expect(try guest.state() == "shut off (saved)")
            #expect(FileManager.default.fileExists(atPath: image))
            #expect(guest.heldOnUntilUnhooked(first), "\(guest.introspector.records[first])")
            #expect(guest.qemuLog(since: offset, contains: unhookedAnyway))
            let ended = await eventuallyAsync { await guest.session() == nil }
            #expect(ended, "the saved QEMU's session ends")

            let (restored, restoreOutput) = try guest.timedVirsh(["restore", image])
            #expect(restored == 0, "\(restoreOutput)")
            #expect(try guest.state() == "running (restored)")
            let second = await guest.waitForHook(from: first + 1)
            #expect(second != nil, "not hooked after restore: \(guest.introspector.records)")
            let restoredPID = await guest.session()?.qemuPID
            #expect(restoredPID != pid, "a new QEMU")
        }

        /// `virsh shutdown` presses the ACPI power button; this guest's firmware powers off, so
        /// QEMU's shutdown interception runs (bounded by shutdown-timeout), then libvirt sends
        /// SIGTERM to the stopped QEMU. `virsh destroy --graceful` is QEMU's SIGTERM path while
        /// hooked: libvirt sends SIGTERM only, never SIGKILL, and fails if QEMU has not exited
        /// after its wait, so its success shows that QEMU exited on SIGTERM alone.
        @Test("virsh shutdown (ACPI) and virsh destroy --graceful (SIGTERM) end the domain while the tool holds on, without SIGKILL")
        func shutdownAndGracefulDestroy() async throws {
            let guest = try EnrolledLibvirtGuest(name: testDomainName("virsh-shutdown"), uuid: GuestUUID("d0d0d0d0-5555-4555-8555-000000000003")!)
            defer { guest.tearDown() }
            #expect(try virsh(["start", guest.name]).0 == 0)
            let first = try #require(await guest.waitForHook(from: 0), "\(guest.introspector.records)")
            var offset = guest.logSize()

            let start = ContinuousClock.now
            let (shutdown, shutdownOutput) = try guest.timedVirsh(["shutdown", guest.name])
            #expect(shutdown == 0, "\(shutdownOutput)")
            let shutOff = guest.waitForState("shut off (shutdown)")
            #expect(shutOff, "\((try? guest.state()) ?? "?")")
            print("virsh shutdown: the domain was shut off \(ContinuousClock.now - start) after the command began")
            #expect(guest.heldOnUntilUnhooked(first), "\(guest.introspector.records[first])")
            #expect(guest.qemuLog(since: offset, contains: unhookedAnyway))
            #expect(
                guest.qemuLog(since: offset, contains: "terminating on signal 15"),
                "libvirt's SIGTERM after the guest's power-off; QEMU's log since the shutdown: \(guest.qemuLogText(since: offset))")

            #expect(try virsh(["start", guest.name]).0 == 0)
            let second = try #require(await guest.waitForHook(from: first + 1), "\(guest.introspector.records)")
            offset = guest.logSize()
            let (destroyed, destroyOutput) = try guest.timedVirsh(["destroy", "--graceful", guest.name])
            #expect(destroyed == 0, "libvirt gave up waiting for QEMU after SIGTERM: \(destroyOutput)")
            #expect(try guest.state() == "shut off (destroyed)")
            #expect(guest.heldOnUntilUnhooked(second), "\(guest.introspector.records[second])")
            #expect(guest.qemuLog(since: offset, contains: unhookedAnyway))
            #expect(guest.qemuLog(since: offset, contains: "terminating on signal 15"))
        }
    }
}
