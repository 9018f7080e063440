import CLibvirt
import Foundation
import KVMIBrokerCore
import Testing

@testable import KVMIBrokerLibvirt

#if canImport(Glibc)
    import Glibc
#endif

/// Against a real libvirtd (`scripts/libvirtd-ci start`) with a defined, shut-off TCG domain
/// named by KVMIB_REAL_LIBVIRT_DOMAIN: start it, check identity, restart libvirtd, check the
/// resync, destroy it. Off unless that variable is set (needs root and a real QEMU).
@Suite(.serialized, .enabled(if: ProcessInfo.processInfo.environment["KVMIB_REAL_LIBVIRT_DOMAIN"] != nil))
struct RealLibvirtdSmokeTests {
    @Test func eventsIdentityAndResyncAcrossALibvirtdRestart() async throws {
        let name = try #require(ProcessInfo.processInfo.environment["KVMIB_REAL_LIBVIRT_DOMAIN"])
        let script = ProcessInfo.processInfo.environment["KVMIB_LIBVIRTD_CI"] ?? "scripts/libvirtd-ci"
        let watcher = LibvirtWatcher(
            configuration: .init(backoff: try Backoff(initial: .milliseconds(100), maximum: .seconds(1), multiplier: 2, jitter: 0)))
        let log = EventLog(watcher.events)
        watcher.start()
        defer { watcher.stop() }
        try await log.wait(for: "the first resync") { $0.contains { $0.resynced != nil } }

        let control = try LibvirtConnection.open("qemu:///system", readOnly: false)
        try control.withDomain(name) { domain throws(BrokerError) in
            guard virDomainCreate(domain) == 0 else { throw LibvirtConnection.lastError(.io, "start", at: name) }
        }
        try await log.wait(for: "\(name)'s start event") { $0.contains { $0.lifecycle?.name == name && $0.lifecycle?.kind == .started } }
        let started = try #require(log.events.compactMap(\.lifecycle).first { $0.name == name && $0.kind == .started })
        let pid = try #require(started.domain?.qemuPID)
        // The identity check also reads the live XML: the emulator libvirt started, and the DAC
        // label it runs QEMU under. scripts/libvirtd-ci leaves Debian's qemu.conf as it ships (no
        // user or group): libvirt's defaults, user and group libvirt-qemu, as numbers.
        let user = try #require(getpwnam("libvirt-qemu"), "no user libvirt-qemu").pointee.pw_uid
        let group = try #require(getgrnam("libvirt-qemu"), "no group libvirt-qemu").pointee.gr_gid
        var expected = try #require(started.domain)
        expected.emulator = try control.withDomain(name) { domain throws(BrokerError) in
            try DomainDescription(xml: try control.inactiveXML(of: domain, place: name)).emulator
        }
        expected.processLabel = DACLabel("+\(user):+\(group)")
        #expect(expected.emulator != nil)
        // And QEMU runs as that, not as root.
        let processStatus = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8).split(separator: "\n")
        #expect(processStatus.contains { $0.hasPrefix("Uid:\t\(user)\t") }, "\(processStatus.filter { $0.hasPrefix("Uid:") })")
        #expect(processStatus.contains { $0.hasPrefix("Gid:\t\(group)\t") }, "\(processStatus.filter { $0.hasPrefix("Gid:") })")
        #expect(await watcher.verifyPeer(uuid: started.uuid, pid: pid, timeout: patience) == .accepted(expected))
        #expect(await watcher.verifyPeer(uuid: started.uuid, pid: pid + 1, timeout: patience) != .accepted(expected))

        let clock = ContinuousClock()
        let restartedAt = clock.now
        // Not Foundation.Process: its waitUntilExit hung here once the script had daemonised libvirtd.
        var child: pid_t = 0
        let argv: [UnsafeMutablePointer<CChar>?] = [strdup(script), strdup("restart"), nil]
        defer { argv.forEach { free($0) } }
        #expect(posix_spawn(&child, script, nil, nil, argv, environ) == 0)
        var status: Int32 = 0
        #expect(waitpid(child, &status, 0) == child)
        #expect(status == 0)
        try await log.wait(for: "the disconnection by the restart") { $0.contains { if case .disconnected = $0 { true } else { false } } }
        try await log.wait(for: "the resync after the restart") { $0.compactMap(\.resynced).count >= 2 }
        let resynced = try #require(log.events.compactMap(\.resynced).last)
        #expect(resynced.contains { $0.name == name && $0.qemuPID == pid })
        print("real libvirtd: disconnected + resynced \(clock.now - restartedAt) after the restart began; events: \(log.events.count)")

        // Clean up. libvirtd's own reconnect sometimes stops a domain started a moment before the
        // restart (seen once in about ten runs: "terminating on signal 15 from libvirtd",
        // "shutting down, reason=daemon"), after the resync above: then there is nothing to
        // destroy, and the stop event below comes from libvirt all the same.
        let again = try LibvirtConnection.open("qemu:///system", readOnly: false)  // the restart closed `control`
        try again.withDomain(name) { domain throws(BrokerError) in
            guard virDomainDestroy(domain) == 0 || virDomainIsActive(domain) == 0 else {
                throw LibvirtConnection.lastError(.io, "destroy", at: name)
            }
        }
        try await log.wait(for: "\(name)'s stop event") { $0.contains { $0.lifecycle?.name == name && $0.lifecycle?.kind == .stopped } }
    }

    /// A libvirtd that stops answering (SIGSTOP) is noticed by keepalive, and the watcher comes back after SIGCONT.
    @Test func keepaliveNoticesAFrozenLibvirtd() async throws {
        let pidText = try String(contentsOfFile: "/run/libvirtd.pid", encoding: .utf8)
        let daemon = try #require(Int32(pidText.trimmingCharacters(in: .whitespacesAndNewlines)))
        let watcher = LibvirtWatcher(
            configuration: .init(
                backoff: try Backoff(initial: .milliseconds(200), maximum: .seconds(1), multiplier: 2, jitter: 0), keepAliveInterval: 1,
                keepAliveCount: 2))
        let log = EventLog(watcher.events)
        watcher.start()
        defer { watcher.stop() }
        try await log.wait(for: "the first resync") { $0.contains { $0.resynced != nil } }
        let clock = ContinuousClock()
        let frozenAt = clock.now
        kill(daemon, SIGSTOP)
        do {
            defer { kill(daemon, SIGCONT) }  // thawed whatever happens
            try await log.wait(for: "keepalive to notice the frozen libvirtd") { $0.contains(.disconnected(reason: .keepalive)) }
            print("real libvirtd: keepalive noticed the frozen daemon after \(clock.now - frozenAt)")
        }
        try await log.wait(for: "the resync after the thaw") { $0.compactMap(\.resynced).count >= 2 }
    }
}
