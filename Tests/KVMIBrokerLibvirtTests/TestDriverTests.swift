import CLibvirt
import Foundation
import KVMIBrokerCore
import Logging
import Testing

@testable import KVMIBrokerLibvirt

let alphaUUID = GuestUUID("11111111-0000-4000-8000-000000000001")!
let betaUUID = GuestUUID("11111111-0000-4000-8000-000000000002")!

/// A private test-driver world per test: `test:///<dir>/node.xml` (test:///default is shared by the whole process).
/// alpha runs and asks for introspection; beta is defined and shut off.
struct TestWorld {
    let directory: String
    let uri: String

    init() throws {
        directory = NSTemporaryDirectory() + "kvmib-libvirt-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory + "/run", withIntermediateDirectories: true)
        uri = "test://" + directory + "/node.xml"
        let node = """
            <node>
              <domain type='test'>
                <name>alpha</name>
                <uuid>\(alphaUUID)</uuid>
                <memory>65536</memory>
                <os><type>hvm</type></os>
                <metadata><kvmi:introspection xmlns:kvmi="https://kvmi-broker.org/xmlns/1" introspector="acme" required="yes"/></metadata>
                <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
              </domain>
              <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
                <name>beta</name>
                <uuid>\(betaUUID)</uuid>
                <memory>65536</memory>
                <os><type>hvm</type></os>
                <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
                <test:runstate>5</test:runstate>
              </domain>
            </node>
            """
        try node.write(toFile: directory + "/node.xml", atomically: true, encoding: .utf8)
    }

    var locator: QEMUProcessLocator { QEMUProcessLocator(runDirectory: directory + "/run") }

    func writePID(_ pid: Int32, for name: String) throws {
        try "\(pid)\n".write(toFile: "\(directory)/run/\(name).pid", atomically: true, encoding: .utf8)
    }

    func cleanUp() { try? FileManager.default.removeItem(atPath: directory) }
}

/// Collects a watcher's events from a task; tests wait for a condition with a deadline.
final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [LibvirtEvent] = []
    private var consumer: Task<Void, Never>?

    init(_ stream: AsyncStream<LibvirtEvent>) {
        consumer = Task { [weak self] in
            for await event in stream { self?.append(event) }
        }
    }

    private func append(_ event: LibvirtEvent) {
        lock.lock()
        items.append(event)
        lock.unlock()
    }

    var events: [LibvirtEvent] {
        lock.lock()
        defer { lock.unlock() }
        return items
    }

    /// Waits until `condition` holds on the events so far (true) or 5 s pass (false).
    func wait(_ condition: ([LibvirtEvent]) -> Bool) async -> Bool {
        for _ in 0..<500 {
            if condition(events) { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return condition(events)
    }
}

extension LibvirtEvent {
    var lifecycle: LifecycleEvent? { if case .lifecycle(let event) = self { event } else { nil } }
    var resynced: [LibvirtDomain]? { if case .resynced(let domains) = self { domains } else { nil } }
}

/// A watcher whose opener hands out handles on one shared test-driver connection, failing
/// `failures` times first after each `failNext` call.
final class SharedOpener: @unchecked Sendable {
    let base: LibvirtConnection
    private let lock = NSLock()
    private var failuresLeft = 0
    private(set) var attempts = 0

    init(_ base: LibvirtConnection) { self.base = base }

    func failNext(_ count: Int) {
        lock.lock()
        failuresLeft = count
        lock.unlock()
    }

    func open() throws(BrokerError) -> LibvirtConnection {
        lock.lock()
        defer { lock.unlock() }
        attempts += 1
        if failuresLeft > 0 {
            failuresLeft -= 1
            throw BrokerError(.connectFailed, "cannot connect to libvirt: simulated", at: base.uri)
        }
        return base.sharing()
    }
}

/// Tests log nothing.
let quiet = Logger(label: "kvmi-broker.libvirt.tests", factory: { _ in SwiftLogNoOpLogHandler() })

func fastBackoff() throws -> Backoff {
    try Backoff(initial: .milliseconds(20), maximum: .milliseconds(80), multiplier: 2, jitter: 0)
}

@Suite struct TestDriverTests {
    @Test func listsRunningDomainsWithMetadataAndPID() throws {
        let world = try TestWorld()
        defer { world.cleanUp() }
        try world.writePID(4242, for: "alpha")
        let connection = try LibvirtConnection.open(world.uri, readOnly: true)
        let running = try connection.runningDomains(locator: world.locator)
        #expect(running.map(\.name) == ["alpha"])
        let alpha = try #require(running.first)
        #expect(alpha.uuid == alphaUUID)
        #expect(alpha.state == .running)
        #expect(alpha.id != nil)
        #expect(alpha.qemuPID == 4242)
        #expect(alpha.metadata == IntrospectionMetadata(introspector: "acme", required: true))
        let all = try connection.allDomains(locator: world.locator)
        #expect(all.map(\.name) == ["alpha", "beta"])
        #expect(all[1].state == .shutoff && all[1].id == nil && all[1].metadata == nil && all[1].qemuPID == nil)
        #expect(try connection.domain(uuid: GuestUUID("11111111-0000-4000-8000-0000000000ff")!) == nil)
    }

    @Test func openFailureNamesTheURI() {
        #expect {
            try LibvirtConnection.open("test:///nonexistent/dir/node.xml", readOnly: true)
        } throws: { error in
            let error = error as? BrokerError
            return error?.code == .connectFailed && error?.location == "test:///nonexistent/dir/node.xml"
        }
    }

    @Test func lifecycleAndMetadataEventsArriveThroughTheStream() async throws {
        let world = try TestWorld()
        defer { world.cleanUp() }
        let base = try LibvirtConnection.open(world.uri, readOnly: false)
        let opener = SharedOpener(base)
        let watcher = LibvirtWatcher(
            configuration: .init(uri: world.uri, backoff: try fastBackoff(), locator: world.locator),
            logger: quiet, opener: { _, _ throws(BrokerError) in try opener.open() })
        let log = EventLog(watcher.events)
        watcher.start()
        defer { watcher.stop() }
        #expect(await log.wait { $0.contains { $0.resynced?.map(\.name) == ["alpha"] } })
        #expect(log.events.first == .connected(uri: world.uri))

        try base.withDomain("beta") { domain throws(BrokerError) in
            guard virDomainCreate(domain) == 0 else { throw LibvirtConnection.lastError(.io, "create", at: "beta") }
        }
        #expect(await log.wait { $0.contains { $0.lifecycle?.name == "beta" && $0.lifecycle?.kind == .started } })
        let started = try #require(log.events.compactMap(\.lifecycle).first { $0.kind == .started })
        #expect(started.uuid == betaUUID)
        #expect(started.domain?.state == .running)

        try base.withDomain("alpha") { domain throws(BrokerError) in
            guard virDomainDestroy(domain) == 0 else { throw LibvirtConnection.lastError(.io, "destroy", at: "alpha") }
        }
        #expect(await log.wait { $0.contains { $0.lifecycle?.name == "alpha" && $0.lifecycle?.kind == .stopped } })
        #expect(log.events.compactMap(\.lifecycle).first { $0.kind == .stopped }?.domain?.state == .shutoff)

        // Our metadata changes on the running beta (live): a metadataChanged event with the new element.
        try base.withDomain("beta") { domain throws(BrokerError) in
            let status = virDomainSetMetadata(
                domain, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), "<introspection introspector=\"other\"/>", "kvmi",
                IntrospectionMetadata.namespace, UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue))
            guard status == 0 else { throw LibvirtConnection.lastError(.io, "set metadata", at: "beta") }
        }
        #expect(
            await log.wait {
                $0.contains { if case .metadataChanged(let d) = $0 { d.name == "beta" && d.metadata?.introspector == "other" } else { false } }
            })
    }

    @Test func closeTriggersBackoffReconnectAndResync() async throws {
        let world = try TestWorld()
        defer { world.cleanUp() }
        let base = try LibvirtConnection.open(world.uri, readOnly: false)
        let opener = SharedOpener(base)
        let watcher = LibvirtWatcher(
            configuration: .init(
                uri: world.uri, backoff: try Backoff(initial: .milliseconds(100), maximum: .milliseconds(400), multiplier: 2, jitter: 0),
                locator: world.locator),
            logger: quiet, opener: { _, _ throws(BrokerError) in try opener.open() })
        let log = EventLog(watcher.events)
        watcher.start()
        defer { watcher.stop() }
        #expect(await log.wait { $0.contains { $0.resynced != nil } })

        // libvirtd "restarts": the connection closes, the next two opens fail, and beta starts while we are away.
        opener.failNext(2)
        watcher.simulateClose(reason: .eof)
        #expect(await log.wait { $0.contains(.disconnected(reason: .eof)) })
        #expect(!watcher.isConnected)
        try base.withDomain("beta") { domain throws(BrokerError) in
            guard virDomainCreate(domain) == 0 else { throw LibvirtConnection.lastError(.io, "create", at: "beta") }
        }
        #expect(await log.wait { $0.compactMap(\.resynced).count == 2 })
        let events = log.events
        let afterClose = Array(events.drop { $0 != .disconnected(reason: .eof) })
        let failures = afterClose.compactMap { if case .connectFailed(let attempt, _, let delay) = $0 { (attempt, delay) } else { nil } }
        #expect(failures.map(\.0) == [1, 2])
        #expect(failures.map(\.1) == [.milliseconds(100), .milliseconds(200)])
        #expect(afterClose.dropFirst(3).first == .connected(uri: world.uri))
        // Nothing missed while away: the resync lists beta, whose start event was never seen.
        #expect(afterClose.last?.resynced?.map(\.name) == ["alpha", "beta"])
        #expect(!events.contains { $0.lifecycle?.name == "beta" })
        #expect(opener.attempts == 4)
        #expect(watcher.isConnected)

        // Events flow again on the new connection, once each (the old registration is gone).
        try base.withDomain("beta") { domain throws(BrokerError) in
            guard virDomainDestroy(domain) == 0 else { throw LibvirtConnection.lastError(.io, "destroy", at: "beta") }
        }
        #expect(await log.wait { $0.contains { $0.lifecycle?.name == "beta" && $0.lifecycle?.kind == .stopped } })
        try await Task.sleep(for: .milliseconds(100))
        #expect(log.events.filter { $0.lifecycle?.name == "beta" }.count == 1)
    }

    @Test func firstConnectionFailuresAreRetried() async throws {
        let world = try TestWorld()
        defer { world.cleanUp() }
        let opener = SharedOpener(try LibvirtConnection.open(world.uri, readOnly: true))
        opener.failNext(1)
        let watcher = LibvirtWatcher(
            configuration: .init(uri: world.uri, backoff: try fastBackoff(), locator: world.locator),
            logger: quiet, opener: { _, _ throws(BrokerError) in try opener.open() })
        let log = EventLog(watcher.events)
        watcher.start()
        #expect(await log.wait { $0.contains { $0.resynced != nil } })
        if case .connectFailed(1, let error, _) = log.events.first {
            #expect(error.code == .connectFailed)
        } else {
            Issue.record("first event is \(String(describing: log.events.first))")
        }
        watcher.stop()
        try await Task.sleep(for: .milliseconds(50))
        #expect(!watcher.isConnected)
    }

    @Test func identityNeedsTheRunningDomainsQEMUPID() async throws {
        let world = try TestWorld()
        defer { world.cleanUp() }
        try world.writePID(4242, for: "alpha")
        let opener = SharedOpener(try LibvirtConnection.open(world.uri, readOnly: true))
        let watcher = LibvirtWatcher(
            configuration: .init(uri: world.uri, backoff: try fastBackoff(), locator: world.locator),
            logger: quiet, opener: { _, _ throws(BrokerError) in try opener.open() })
        // Not connected yet: libvirt cannot be asked.
        if case .unavailable = await watcher.verifyPeer(uuid: alphaUUID, pid: 4242) {} else { Issue.record("expected unavailable") }
        let log = EventLog(watcher.events)
        watcher.start()
        defer { watcher.stop() }
        #expect(await log.wait { $0.contains { $0.resynced != nil } })

        guard case .accepted(let domain) = await watcher.verifyPeer(uuid: alphaUUID, pid: 4242) else {
            Issue.record("alpha with its pid should be accepted")
            return
        }
        #expect(domain.name == "alpha" && domain.metadata?.introspector == "acme")
        #expect(await watcher.verifyPeer(uuid: alphaUUID, pid: 999) == .refused("domain alpha (\(alphaUUID)) runs as QEMU pid 4242, not pid 999"))
        #expect(await watcher.verifyPeer(uuid: betaUUID, pid: 4242) == .refused("libvirt runs no domain with UUID \(betaUUID)"))
        #expect(try await watcher.runningDomains().map(\.name) == ["alpha"])
    }

    @Test func statusXMLGivesThePIDWhenThereIsNoPIDFile() throws {
        let world = try TestWorld()
        defer { world.cleanUp() }
        try "<domstatus state='running' reason='booted' pid='777'>\n  <domain type='kvm'/>\n</domstatus>\n"
            .write(toFile: world.directory + "/run/web.xml", atomically: true, encoding: .utf8)
        #expect(world.locator.pid(ofDomain: "web") == 777)
        #expect(world.locator.pid(ofDomain: "none") == nil)
        #expect(world.locator.pid(ofDomain: "../etc") == nil)
    }

    @Test func enrollAndUnenrollThroughLibvirtAreIdempotent() throws {
        let world = try TestWorld()
        defer { world.cleanUp() }
        let connection = try LibvirtConnection.open(world.uri, readOnly: false)
        #expect(throws: BrokerError.self) { try DomainEnroller(connection: connection) }  // the test driver is not QEMU
        #expect(throws: BrokerError.self) { try DomainEnroller(connection: LibvirtConnection.open(world.uri, readOnly: true), allowNonQEMU: true) }
        let enroller = try DomainEnroller(connection: connection, allowNonQEMU: true)
        let before = try connection.withDomain("beta") { domain throws(BrokerError) in try connection.inactiveXML(of: domain, place: "beta") }

        let options = try EnrollmentOptions(introspector: "acme", required: true, emulator: "/opt/kvmi/bin/qemu-system-x86_64")
        let first = try enroller.enroll("beta", options: options)
        #expect(first.name == "beta" && first.uuid == betaUUID && !first.running)
        #expect(first.changes.count == 2)
        let enrolledXML = try connection.withDomain("beta") { domain throws(BrokerError) in try connection.inactiveXML(of: domain, place: "beta") }
        let enrolled = try DomainDescription(xml: enrolledXML)
        #expect(enrolled.emulator == "/opt/kvmi/bin/qemu-system-x86_64")
        #expect(
            enrolled.metadata
                == IntrospectionMetadata(introspector: "acme", required: true, originalEmulator: "/usr/bin/qemu-system-x86_64"))

        #expect(try enroller.enroll("beta", options: options).changes == [])
        #expect(try enroller.enroll(betaUUID.description, options: options).changes == [])

        // Only the metadata differs: written with virDomainSetMetadata, the rest untouched.
        let softer = try EnrollmentOptions(introspector: "acme", emulator: "/opt/kvmi/bin/qemu-system-x86_64")
        #expect(try enroller.enroll("beta", options: softer).changes.count == 1)
        #expect(try connection.domain(named: "beta")?.metadata?.required == false)

        let removed = try enroller.unenroll("beta")
        #expect(removed.changes.count == 2)
        let after = try connection.withDomain("beta") { domain throws(BrokerError) in try connection.inactiveXML(of: domain, place: "beta") }
        #expect(after == before)
        #expect(try enroller.unenroll("beta").changes == [])

        // The running alpha: its persistent definition changes, for its next start.
        #expect(try enroller.enroll("alpha", options: EnrollmentOptions(introspector: "acme", required: true)).running)

        #expect {
            try enroller.enroll("gamma", options: EnrollmentOptions())
        } throws: { error in
            (error as? BrokerError)?.description == "domain gamma: libvirt has no domain with this name or UUID"
        }
    }
}
