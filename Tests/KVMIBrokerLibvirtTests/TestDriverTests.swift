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

/// How long a test waits for something that should happen at once: generous, so that a busy
/// machine is never mistaken for a bug. Nothing waits this long unless something is broken.
let patience = Duration.seconds(60)

/// A wait that ran out of patience: says what was awaited, where, and what arrived instead.
struct WaitTimedOut: Error, CustomStringConvertible {
    let description: String
}

/// Collects a watcher's events; tests wait for a condition on them. A wait is woken by each
/// event (and by the end of the stream), not by a clock; `patience` only bounds a broken run.
final class EventLog: @unchecked Sendable {
    /// A condition on the events so far and on whether the stream has ended.
    typealias Condition = @Sendable (_ events: [LibvirtEvent], _ ended: Bool) -> Bool

    private struct Waiter {
        let condition: Condition
        let continuation: CheckedContinuation<Bool, Never>
        var timer: Task<Void, Never>?
    }

    private let lock = NSLock()
    private var items: [LibvirtEvent] = []
    private var ended = false
    private var waiters: [Int: Waiter] = [:]
    private var nextWaiter = 0

    init(_ stream: AsyncStream<LibvirtEvent>) {
        Task { [weak self] in
            for await event in stream { self?.append(event) }
            self?.end()
        }
    }

    var events: [LibvirtEvent] {
        lock.lock()
        defer { lock.unlock() }
        return items
    }

    /// Returns as soon as `condition` holds on the events so far; throws, naming `what`, if the
    /// stream ends without it or (a broken run) `timeout` passes.
    func wait(
        for what: String, timeout: Duration = patience, sourceLocation: SourceLocation = #_sourceLocation,
        until condition: @escaping @Sendable ([LibvirtEvent]) -> Bool
    ) async throws {
        try await awaitCondition(what, timeout: timeout, sourceLocation: sourceLocation) { events, _ in condition(events) }
    }

    /// Returns once the stream has ended (the watcher stopped).
    func waitForEnd(sourceLocation: SourceLocation = #_sourceLocation) async throws {
        try await awaitCondition("the end of the event stream", timeout: patience, sourceLocation: sourceLocation) { _, ended in ended }
    }

    private func awaitCondition(_ what: String, timeout: Duration, sourceLocation: SourceLocation, _ condition: @escaping Condition) async throws {
        guard await satisfied(condition, timeout: timeout) else {
            let (events, ended) = lock.withLock { (items, self.ended) }
            let why = ended ? "the event stream ended first" : "nothing satisfied it within \(timeout)"
            throw WaitTimedOut(description: "\(sourceLocation.fileName):\(sourceLocation.line): waited for \(what), but \(why); events: \(events)")
        }
    }

    /// True once `condition` holds; false when the stream has ended without it, or at `timeout`.
    private func satisfied(_ condition: @escaping Condition, timeout: Duration) async -> Bool {
        await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            lock.lock()
            let met = condition(items, ended)
            if met || ended {
                lock.unlock()
                continuation.resume(returning: met)
                return
            }
            let id = nextWaiter
            nextWaiter += 1
            // Registered before its timer starts, so an expiry finds it unless an event woke it first.
            waiters[id] = Waiter(condition: condition, continuation: continuation)
            waiters[id]?.timer = Task { [weak self] in
                guard (try? await Task.sleep(for: timeout)) != nil else { return }
                self?.expire(id)
            }
            lock.unlock()
        }
    }

    private func append(_ event: LibvirtEvent) {
        lock.lock()
        items.append(event)
        let woken = waiters.filter { $0.value.condition(items, false) }
        for id in woken.keys { waiters[id] = nil }
        lock.unlock()
        for waiter in woken.values {
            waiter.timer?.cancel()
            waiter.continuation.resume(returning: true)
        }
    }

    private func end() {
        lock.lock()
        ended = true
        let all = waiters.values.map { ($0, $0.condition(items, true)) }
        waiters = [:]
        lock.unlock()
        for (waiter, met) in all {
            waiter.timer?.cancel()
            waiter.continuation.resume(returning: met)
        }
    }

    private func expire(_ id: Int) {
        lock.lock()
        let waiter = waiters.removeValue(forKey: id)
        lock.unlock()
        waiter?.continuation.resume(returning: false)
    }
}

extension LibvirtEvent {
    var lifecycle: LifecycleEvent? { if case .lifecycle(let event) = self { event } else { nil } }
    var resynced: [LibvirtDomain]? { if case .resynced(let domains) = self { domains } else { nil } }
}

/// A watcher whose opener hands out handles on one shared test-driver connection, failing
/// `failures` times first after each `failNext` call, and, after `holdNextSuccess`, making the
/// next successful open wait for `release()` (a libvirtd that is still coming back).
final class SharedOpener: @unchecked Sendable {
    let base: LibvirtConnection
    private let lock = NSLock()
    private var failuresLeft = 0
    private var gate: DispatchSemaphore?
    private var holdArmed = false
    private var attemptCount = 0

    /// Opens tried so far, failed or not.
    var attempts: Int { lock.withLock { attemptCount } }

    init(_ base: LibvirtConnection) { self.base = base }

    func failNext(_ count: Int) {
        lock.lock()
        failuresLeft = count
        lock.unlock()
    }

    /// The next open that would succeed blocks (the watcher's queue with it) until `release()`.
    func holdNextSuccess() {
        lock.lock()
        gate = DispatchSemaphore(value: 0)
        holdArmed = true
        lock.unlock()
    }

    /// Lets a held open (or the next one to be held) proceed.
    func release() {
        lock.lock()
        gate?.signal()
        gate = nil
        holdArmed = false
        lock.unlock()
    }

    func open() throws(BrokerError) -> LibvirtConnection {
        lock.lock()
        attemptCount += 1
        if failuresLeft > 0 {
            failuresLeft -= 1
            lock.unlock()
            throw BrokerError(.connectFailed, "cannot connect to libvirt: simulated", at: base.uri)
        }
        let held = holdArmed ? gate : nil
        holdArmed = false
        lock.unlock()
        if let held, held.wait(timeout: .now() + patience.secondsDouble) == .timedOut {
            throw BrokerError(.timedOut, "the held open was never released", at: base.uri)
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
        try await log.wait(for: "the first resync, listing alpha") { $0.contains { $0.resynced?.map(\.name) == ["alpha"] } }
        #expect(log.events.first == .connected(uri: world.uri))

        try base.withDomain("beta") { domain throws(BrokerError) in
            guard virDomainCreate(domain) == 0 else { throw LibvirtConnection.lastError(.io, "create", at: "beta") }
        }
        try await log.wait(for: "beta's start event") { $0.contains { $0.lifecycle?.name == "beta" && $0.lifecycle?.kind == .started } }
        let started = try #require(log.events.compactMap(\.lifecycle).first { $0.kind == .started })
        #expect(started.uuid == betaUUID)
        #expect(started.domain?.state == .running)

        try base.withDomain("alpha") { domain throws(BrokerError) in
            guard virDomainDestroy(domain) == 0 else { throw LibvirtConnection.lastError(.io, "destroy", at: "alpha") }
        }
        try await log.wait(for: "alpha's stop event") { $0.contains { $0.lifecycle?.name == "alpha" && $0.lifecycle?.kind == .stopped } }
        #expect(log.events.compactMap(\.lifecycle).first { $0.kind == .stopped }?.domain?.state == .shutoff)

        // Our metadata changes on the running beta (live): a metadataChanged event with the new element.
        try base.withDomain("beta") { domain throws(BrokerError) in
            let status = virDomainSetMetadata(
                domain, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), "<introspection introspector=\"other\"/>", "kvmi",
                IntrospectionMetadata.namespace, UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue))
            guard status == 0 else { throw LibvirtConnection.lastError(.io, "set metadata", at: "beta") }
        }
        try await log.wait(for: "beta's metadata change to introspector other") {
            $0.contains { if case .metadataChanged(let d) = $0 { d.name == "beta" && d.metadata?.introspector == "other" } else { false } }
        }
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
        try await log.wait(for: "the first resync") { $0.contains { $0.resynced != nil } }
        #expect(watcher.isConnected)

        // libvirtd "restarts": the connection closes, the next two opens fail, and beta starts while
        // we are away. The third open is held until beta has started, so that happens while the
        // watcher is away however long this test takes to get here (the back-off does not wait for it).
        opener.failNext(2)
        opener.holdNextSuccess()
        defer { opener.release() }  // runs before `watcher.stop()`, which waits for the held open
        watcher.simulateClose(reason: .eof)
        try await log.wait(for: "the disconnection") { $0.contains(.disconnected(reason: .eof)) }
        // The watcher deregistered before it reported the disconnection: nobody listens on the test
        // driver now, and libvirt drops beta's start event.
        try base.withDomain("beta") { domain throws(BrokerError) in
            guard virDomainCreate(domain) == 0 else { throw LibvirtConnection.lastError(.io, "create", at: "beta") }
        }
        opener.release()
        try await log.wait(for: "the resync after the reconnection") { $0.compactMap(\.resynced).count == 2 }
        let events = log.events
        // In this order: disconnected, two failed attempts with the back-off's delays, connected, resynced
        // (so not connected in between: `isConnected` itself would wait for the held open).
        let afterClose = Array(events.drop { $0 != .disconnected(reason: .eof) })
        #expect(afterClose.count == 5, "\(afterClose)")
        let failures = afterClose.compactMap { if case .connectFailed(let attempt, _, let delay) = $0 { (attempt, delay) } else { nil } }
        #expect(failures.map(\.0) == [1, 2])
        #expect(failures.map(\.1) == [.milliseconds(100), .milliseconds(200)])
        #expect(afterClose.dropFirst(3).first == .connected(uri: world.uri))
        // Nothing missed while away: the resync lists beta, whose start event was never seen.
        #expect(afterClose.last?.resynced?.map(\.name) == ["alpha", "beta"])
        #expect(!events.contains { $0.lifecycle?.name == "beta" })
        #expect(opener.attempts == 4)
        #expect(watcher.isConnected)

        // Events flow again on the new connection, once each (the old registration is gone). beta
        // stops, then starts again: events arrive in order, so once the start is here, a duplicate
        // of the stop would be here too.
        try base.withDomain("beta") { domain throws(BrokerError) in
            guard virDomainDestroy(domain) == 0 else { throw LibvirtConnection.lastError(.io, "destroy", at: "beta") }
        }
        try base.withDomain("beta") { domain throws(BrokerError) in
            guard virDomainCreate(domain) == 0 else { throw LibvirtConnection.lastError(.io, "create", at: "beta") }
        }
        try await log.wait(for: "beta's start event after its stop event") {
            $0.contains { $0.lifecycle?.name == "beta" && $0.lifecycle?.kind == .started }
        }
        #expect(log.events.compactMap(\.lifecycle).filter { $0.name == "beta" }.map(\.kind) == [.stopped, .started])
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
        try await log.wait(for: "the resync after the retried connection") { $0.contains { $0.resynced != nil } }
        if case .connectFailed(1, let error, _) = log.events.first {
            #expect(error.code == .connectFailed)
        } else {
            Issue.record("first event is \(String(describing: log.events.first))")
        }
        #expect(log.events.dropFirst().first == .connected(uri: world.uri))
        watcher.stop()
        #expect(!watcher.isConnected)
        // The stream ends with the stop, and nothing came after the resync.
        try await log.waitForEnd()
        #expect(log.events.count == 3 && log.events.last?.resynced != nil, "\(log.events)")
        #expect(opener.attempts == 2)
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
        if case .unavailable = await watcher.verifyPeer(uuid: alphaUUID, pid: 4242, timeout: patience) {
        } else {
            Issue.record("expected unavailable")
        }
        let log = EventLog(watcher.events)
        watcher.start()
        defer { watcher.stop() }
        try await log.wait(for: "the first resync") { $0.contains { $0.resynced != nil } }

        guard case .accepted(let domain) = await watcher.verifyPeer(uuid: alphaUUID, pid: 4242, timeout: patience) else {
            Issue.record("alpha with its pid should be accepted")
            return
        }
        #expect(domain.name == "alpha" && domain.metadata?.introspector == "acme")
        // From the live XML: the emulator; the test driver reports no DAC label.
        #expect(domain.emulator == "/usr/bin/qemu-system-x86_64" && domain.processLabel == nil)
        #expect(
            await watcher.verifyPeer(uuid: alphaUUID, pid: 999, timeout: patience)
                == .refused("domain alpha (\(alphaUUID)) runs as QEMU pid 4242, not pid 999"))
        #expect(await watcher.verifyPeer(uuid: betaUUID, pid: 4242, timeout: patience) == .refused("libvirt runs no domain with UUID \(betaUUID)"))
        #expect(try await watcher.runningDomains(timeout: patience).map(\.name) == ["alpha"])
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
