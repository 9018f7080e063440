import CLibvirt
import Dispatch
import Foundation
import KVMIBrokerCore
import Logging
import Synchronization

/// A lifecycle event (`VIR_DOMAIN_EVENT_ID_LIFECYCLE`).
public enum LifecycleKind: String, Sendable, Equatable {
    case defined, undefined, started, suspended, resumed, stopped, shutdown, pmsuspended, crashed, unknown

    init(raw: Int32) {
        switch UInt32(bitPattern: raw) {
        case VIR_DOMAIN_EVENT_DEFINED.rawValue: self = .defined
        case VIR_DOMAIN_EVENT_UNDEFINED.rawValue: self = .undefined
        case VIR_DOMAIN_EVENT_STARTED.rawValue: self = .started
        case VIR_DOMAIN_EVENT_SUSPENDED.rawValue: self = .suspended
        case VIR_DOMAIN_EVENT_RESUMED.rawValue: self = .resumed
        case VIR_DOMAIN_EVENT_STOPPED.rawValue: self = .stopped
        case VIR_DOMAIN_EVENT_SHUTDOWN.rawValue: self = .shutdown
        case VIR_DOMAIN_EVENT_PMSUSPENDED.rawValue: self = .pmsuspended
        case VIR_DOMAIN_EVENT_CRASHED.rawValue: self = .crashed
        default: self = .unknown
        }
    }
}

/// Why libvirt closed the connection (`virConnectCloseReason`).
public enum CloseReason: String, Sendable, Equatable {
    case error, eof, keepalive, client, unknown

    init(raw: Int32) {
        switch UInt32(bitPattern: raw) {
        case VIR_CONNECT_CLOSE_REASON_ERROR.rawValue: self = .error
        case VIR_CONNECT_CLOSE_REASON_EOF.rawValue: self = .eof
        case VIR_CONNECT_CLOSE_REASON_KEEPALIVE.rawValue: self = .keepalive
        case VIR_CONNECT_CLOSE_REASON_CLIENT.rawValue: self = .client
        default: self = .unknown
        }
    }
}

/// One domain lifecycle event with what libvirt said about the domain when it was handled.
public struct LifecycleEvent: Sendable, Equatable {
    public var uuid: GuestUUID
    public var name: String
    public var kind: LifecycleKind
    /// The event's detail (`VIR_DOMAIN_EVENT_STARTED_BOOTED`, ...), as libvirt's number.
    public var detail: Int32
    /// The domain as it was when the event was handled (it may have changed again since);
    /// nil when it no longer exists (a transient domain that stopped).
    public var domain: LibvirtDomain?
}

/// What discovery reports, in order.
public enum LibvirtEvent: Sendable, Equatable {
    /// Connected (first time or again); a `resynced` follows.
    case connected(uri: String)
    /// The full list of running domains after every (re)connection: whatever happened while
    /// disconnected is in it. Consumers reconcile against it.
    case resynced([LibvirtDomain])
    case lifecycle(LifecycleEvent)
    /// Our metadata element of a domain changed (any change of ours, live or config).
    case metadataChanged(LibvirtDomain)
    /// The connection is gone (libvirtd restarted, keepalive timed out); reconnection follows.
    case disconnected(reason: CloseReason)
    /// A (re)connection attempt failed; the next one comes after `retryIn`.
    case connectFailed(attempt: Int, error: BrokerError, retryIn: Duration)
}

extension LibvirtEvent {
    /// One line for the log, or nil for the events the watcher logs itself (connects,
    /// disconnects and connect failures, which it summarises while they repeat).
    public var logLine: String? {
        switch self {
        case .connected, .disconnected, .connectFailed:
            return nil
        case .resynced(let domains):
            return "libvirt runs \(domains.count) domain\(domains.count == 1 ? "" : "s")"
        case .lifecycle(let event):
            return "libvirt: domain \(escapedForLog(event.name, limit: 64)) (\(event.uuid)) \(event.kind)"
        case .metadataChanged(let domain):
            return "libvirt: the introspection metadata of domain \(escapedForLog(domain.name, limit: 64)) (\(domain.uuid)) changed"
        }
    }
}

/// The answer to "is this QEMU the domain it claims to be?"
public enum IdentityVerdict: Sendable, Equatable {
    /// libvirt runs a domain with that UUID and its QEMU is the peer.
    case accepted(LibvirtDomain)
    /// libvirt contradicts the claim: one sentence why.
    case refused(String)
    /// libvirt could not be asked (not connected, timed out): one sentence why.
    case unavailable(String)
}

/// Discovery: a (read-only) libvirt connection whose lifecycle and metadata events arrive as an
/// `AsyncStream`, with keepalive, a close callback, and reconnection with back-off followed by a
/// full resync.
///
/// libvirt's event loop runs on its own thread (`LibvirtEventLoop`); the C callbacks only hand
/// the event to a private serial queue, which asks libvirt for the domain's facts and yields.
/// All mutable state is confined to that queue, hence `@unchecked Sendable`. The callbacks
/// retain the watcher until `stop()`.
public final class LibvirtWatcher: @unchecked Sendable {
    public struct Configuration: Sendable {
        public var uri: String
        public var readOnly: Bool
        public var backoff: Backoff
        /// `virConnectSetKeepAlive(interval, count)`: seconds between probes, probes missed before closing.
        public var keepAliveInterval: Int32
        public var keepAliveCount: UInt32
        public var locator: QEMUProcessLocator

        public init(
            uri: String = "qemu:///system", readOnly: Bool = true, backoff: Backoff = .default, keepAliveInterval: Int32 = 5,
            keepAliveCount: UInt32 = 3, locator: QEMUProcessLocator = .system
        ) {
            self.uri = uri
            self.readOnly = readOnly
            self.backoff = backoff
            self.keepAliveInterval = keepAliveInterval
            self.keepAliveCount = keepAliveCount
            self.locator = locator
        }
    }

    /// Opens a connection; tests inject one that shares a test-driver connection or fails on purpose.
    public typealias Opener = @Sendable (_ uri: String, _ readOnly: Bool) throws(BrokerError) -> LibvirtConnection

    public let configuration: Configuration
    /// The events, in order. One consumer.
    public let events: AsyncStream<LibvirtEvent>

    private let continuation: AsyncStream<LibvirtEvent>.Continuation
    private let opener: Opener
    private let logger: Logger
    private let queue = DispatchQueue(label: "kvmi-broker.libvirt-watcher")

    // Confined to `queue`.
    private var connection: LibvirtConnection?
    private var callbackIDs: [Int32] = []
    private var closeCallbackRegistered = false
    private var generation: UInt64 = 0
    private var failures = 0
    /// The connect failures in a row, for the log: once when they start or change, then
    /// summaries, then once when it connects (never a line per retry).
    private var connectStreak = FailureStreak()
    private var started = false
    private var stopped = false
    private var random = SystemRandomNumberGenerator()

    public init(
        configuration: Configuration = Configuration(), logger: Logger = Logger(label: "kvmi-broker.libvirt"),
        opener: @escaping Opener = { uri, readOnly throws(BrokerError) in try LibvirtConnection.open(uri, readOnly: readOnly) }
    ) {
        self.configuration = configuration
        self.logger = logger
        self.opener = opener
        (events, continuation) = AsyncStream.makeStream(of: LibvirtEvent.self, bufferingPolicy: .unbounded)
    }

    /// Connects (or starts retrying with back-off); events follow on `events`.
    public func start() {
        queue.async {
            guard !self.started, !self.stopped else { return }
            self.started = true
            self.connect()
        }
    }

    /// Deregisters everything, closes the connection and finishes `events`.
    public func stop() {
        queue.sync {
            guard !stopped else { return }
            stopped = true
            generation += 1
            tearDown()
            continuation.finish()
        }
    }

    /// Whether a connection is up now.
    public var isConnected: Bool { queue.sync { connection != nil } }

    /// Whether a connection is open now, without waiting for the watcher's queue (which may be
    /// in a libvirt call): for the live status, asked from Swift's cooperative pool.
    public var connectedNow: Bool { connectedFlag.load(ordering: .relaxed) }
    private let connectedFlag = Atomic<Bool>(false)

    // MARK: Identity and lookups

    /// The running domain with this UUID (nil if libvirt has none running), with its emulator and
    /// DAC label from the live XML, asked on the watcher's queue so no Swift thread blocks on libvirt. Throws when not connected or when
    /// libvirt does not answer within `timeout` (it holds a domain's lock while its hooks run).
    public func runningDomain(uuid: GuestUUID, timeout: Duration = .seconds(5)) async throws(BrokerError) -> LibvirtDomain? {
        let result: Result<LibvirtDomain?, BrokerError> = await withTimeout(timeout, place: uuid.description) { () throws(BrokerError) in
            guard let connection = self.connection else {
                throw BrokerError(.connectFailed, "not connected to libvirt (\(self.configuration.uri))", at: uuid.description)
            }
            guard let domain = try connection.domain(uuid: uuid, locator: self.configuration.locator, live: true), domain.state.isActive else {
                return nil
            }
            return domain
        }
        return try result.get()
    }

    /// Checks a QEMU's claim to be the domain with `uuid`: libvirt must run a domain with that
    /// UUID whose QEMU pid is `pid`. Name and metadata in the verdict come from libvirt.
    public func verifyPeer(uuid: GuestUUID, pid: Int32, timeout: Duration = .seconds(5)) async -> IdentityVerdict {
        let domain: LibvirtDomain?
        do {
            domain = try await runningDomain(uuid: uuid, timeout: timeout)
        } catch {
            return .unavailable(error.description)
        }
        return Self.verdict(for: domain, uuid: uuid, pid: pid)
    }

    /// The pure part of `verifyPeer`.
    public static func verdict(for domain: LibvirtDomain?, uuid: GuestUUID, pid: Int32) -> IdentityVerdict {
        guard let domain else { return .refused("libvirt runs no domain with UUID \(uuid)") }
        guard let qemuPID = domain.qemuPID else {
            return .refused("cannot find the QEMU pid of domain \(domain.name) (\(uuid)) in libvirt's run directory")
        }
        guard qemuPID == pid else {
            return .refused("domain \(domain.name) (\(uuid)) runs as QEMU pid \(qemuPID), not pid \(pid)")
        }
        return .accepted(domain)
    }

    /// All running domains now (throws when not connected).
    public func runningDomains(timeout: Duration = .seconds(10)) async throws(BrokerError) -> [LibvirtDomain] {
        let result: Result<[LibvirtDomain], BrokerError> = await withTimeout(timeout, place: configuration.uri) { () throws(BrokerError) in
            guard let connection = self.connection else {
                throw BrokerError(.connectFailed, "not connected to libvirt", at: self.configuration.uri)
            }
            return try connection.runningDomains(locator: self.configuration.locator)
        }
        return try result.get()
    }

    private func withTimeout<T: Sendable>(_ timeout: Duration, place: String, _ body: @escaping @Sendable () throws(BrokerError) -> T) async
        -> Result<T, BrokerError>
    {
        let once = ResumeOnce<Result<T, BrokerError>>()
        return await withCheckedContinuation { (waiter: CheckedContinuation<Result<T, BrokerError>, Never>) in
            once.set(waiter)
            queue.async {
                do throws(BrokerError) {
                    once.resume(.success(try body()))
                } catch {
                    once.resume(.failure(error))
                }
            }
            DispatchQueue.global().asyncAfter(deadline: .now() + timeout.secondsDouble) {
                once.resume(.failure(BrokerError(.timedOut, "libvirt did not answer within \(timeout.humanReadable)", at: place)))
            }
        }
    }

    // MARK: Connection (on `queue`)

    private func connect() {
        guard !stopped, connection == nil else { return }
        generation += 1
        let current = generation
        do {
            let opened = try opener(configuration.uri, configuration.readOnly)
            connection = opened
            connectedFlag.store(true, ordering: .relaxed)
            try register(opened, generation: current)
            failures = 0
            if let report = connectStreak.succeeded(at: .now) {
                logger.notice("\(report.sentence(connectingActivity))")
            } else {
                logger.info("connected to libvirt", metadata: ["uri": "\(escapedForLog(configuration.uri))"])
            }
            continuation.yield(.connected(uri: configuration.uri))
            resync()
        } catch {
            tearDown()
            failures += 1
            let delay = configuration.backoff.delay(afterFailures: failures, using: &random)
            if let report = connectStreak.failed(escapedForLog(error.message, limit: 512), at: .now) {
                logger.warning(
                    "\(report.sentence(connectingActivity))",
                    metadata: [
                        "attempt": "\(failures)", "retry-in": "\(delay.humanReadable)",
                        "backoff-max": "\(configuration.backoff.maximum.humanReadable)",
                    ])
            } else {
                logger.debug("\(connectingActivity): attempt \(failures) failed the same way; next in \(delay.humanReadable)")
            }
            continuation.yield(.connectFailed(attempt: failures, error: error, retryIn: delay))
            scheduleConnect(after: delay)
        }
    }

    private var connectingActivity: String { "connecting to libvirt (\(escapedForLog(configuration.uri)))" }

    private func scheduleConnect(after delay: Duration) {
        queue.asyncAfter(deadline: .now() + delay.secondsDouble) { [self] in connect() }
    }

    private func resync() {
        guard let connection else { return }
        do {
            let domains = try connection.runningDomains(locator: configuration.locator)
            continuation.yield(.resynced(domains))
        } catch {
            // The connection broke between open and list: treat it as closed.
            logger.warning("cannot list running domains", metadata: ["error": "\(error)"])
            connectionClosed(reason: .error, generation: generation)
        }
    }

    private func register(_ opened: LibvirtConnection, generation: UInt64) throws(BrokerError) {
        let context = Unmanaged.passRetained(CallbackContext(watcher: self, generation: generation)).toOpaque()
        let release: virFreeCallback = { opaque in
            if let opaque { Unmanaged<CallbackContext>.fromOpaque(opaque).release() }
        }
        // The close callback: libvirtd went away, keepalive timed out, or an I/O error.
        if virConnectRegisterCloseCallback(opened.pointer, watcherCloseCallback, context, release) == 0 {
            closeCallbackRegistered = true
        } else {
            Unmanaged<CallbackContext>.fromOpaque(context).release()
            logger.debug("no close callback on this connection", metadata: ["uri": "\(opened.uri)"])
        }
        let lifecycleContext = Unmanaged.passRetained(CallbackContext(watcher: self, generation: generation)).toOpaque()
        let lifecycle = virConnectDomainEventRegisterAny(
            opened.pointer, nil, Int32(VIR_DOMAIN_EVENT_ID_LIFECYCLE.rawValue), kvmib_virt_lifecycle_callback(watcherLifecycleCallback),
            lifecycleContext, release)
        guard lifecycle >= 0 else {
            Unmanaged<CallbackContext>.fromOpaque(lifecycleContext).release()
            throw LibvirtConnection.lastError(.io, "cannot register for lifecycle events", at: opened.uri)
        }
        callbackIDs.append(lifecycle)
        let metadataContext = Unmanaged.passRetained(CallbackContext(watcher: self, generation: generation)).toOpaque()
        let metadata = virConnectDomainEventRegisterAny(
            opened.pointer, nil, Int32(VIR_DOMAIN_EVENT_ID_METADATA_CHANGE.rawValue), kvmib_virt_metadata_callback(watcherMetadataCallback),
            metadataContext, release)
        if metadata >= 0 {
            callbackIDs.append(metadata)
        } else {
            Unmanaged<CallbackContext>.fromOpaque(metadataContext).release()
            logger.warning("no metadata-change events on this connection", metadata: ["uri": "\(opened.uri)"])
        }
        // Keepalive: the remote driver closes the connection (reason keepalive) when libvirtd stops answering.
        if virConnectSetKeepAlive(opened.pointer, configuration.keepAliveInterval, configuration.keepAliveCount) < 0 {
            logger.debug("no keepalive on this connection", metadata: ["uri": "\(opened.uri)"])
        }
    }

    /// Drops the connection: deregisters the callbacks (errors ignored: it may be dead) and closes it.
    private func tearDown() {
        guard let connection else {
            callbackIDs = []
            closeCallbackRegistered = false
            return
        }
        for id in callbackIDs { _ = virConnectDomainEventDeregisterAny(connection.pointer, id) }
        callbackIDs = []
        if closeCallbackRegistered { _ = virConnectUnregisterCloseCallback(connection.pointer, watcherCloseCallback) }
        closeCallbackRegistered = false
        self.connection = nil
        connectedFlag.store(false, ordering: .relaxed)
    }

    // MARK: Callbacks (called on the event-loop thread; they only hop to `queue`)

    fileprivate func closeCallback(reason: Int32, generation: UInt64) {
        queue.async { [self] in connectionClosed(reason: CloseReason(raw: reason), generation: generation) }
    }

    /// The connection of `generation` is gone: report, drop it, reconnect after a back-off delay.
    func connectionClosed(reason: CloseReason, generation: UInt64) {
        dispatchPrecondition(condition: .onQueue(queue))
        guard !stopped, generation == self.generation, connection != nil else { return }
        logger.warning("libvirt connection closed", metadata: ["uri": "\(escapedForLog(configuration.uri))", "reason": "\(reason.rawValue)"])
        tearDown()
        continuation.yield(.disconnected(reason: reason))
        failures = 0
        scheduleConnect(after: configuration.backoff.delay(afterFailures: 1, using: &random))
    }

    /// For tests: behave as if libvirt had closed the current connection.
    func simulateClose(reason: CloseReason) {
        queue.async { [self] in connectionClosed(reason: reason, generation: generation) }
    }

    fileprivate func lifecycleCallback(uuid: GuestUUID, name: String, event: Int32, detail: Int32, generation: UInt64) {
        queue.async { [self] in
            guard !stopped, generation == self.generation, let connection else { return }
            let domain = try? connection.domain(uuid: uuid, locator: configuration.locator)
            continuation.yield(.lifecycle(LifecycleEvent(uuid: uuid, name: name, kind: LifecycleKind(raw: event), detail: detail, domain: domain)))
        }
    }

    fileprivate func metadataCallback(uuid: GuestUUID, type: Int32, namespace: String?, generation: UInt64) {
        guard UInt32(bitPattern: type) == VIR_DOMAIN_METADATA_ELEMENT.rawValue, namespace == IntrospectionMetadata.namespace else { return }
        queue.async { [self] in
            guard !stopped, generation == self.generation, let connection else { return }
            if let domain = try? connection.domain(uuid: uuid, locator: configuration.locator) {
                continuation.yield(.metadataChanged(domain))
            }
        }
    }
}

/// What libvirt holds for each callback registration (retained until its free callback).
private final class CallbackContext: Sendable {
    let watcher: LibvirtWatcher
    let generation: UInt64

    init(watcher: LibvirtWatcher, generation: UInt64) {
        self.watcher = watcher
        self.generation = generation
    }
}

private func domainUUID(_ domain: OpaquePointer) -> GuestUUID? {
    var buffer = [CChar](repeating: 0, count: Int(VIR_UUID_STRING_BUFLEN))
    guard virDomainGetUUIDString(domain, &buffer) == 0 else { return nil }
    return GuestUUID(buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) })
}

// C callbacks: global functions, so the same pointer is passed to register and unregister,
// and no closure captures anything (context travels through `opaque`).

private func watcherCloseCallback(_ connection: OpaquePointer?, _ reason: Int32, _ opaque: UnsafeMutableRawPointer?) {
    guard let opaque else { return }
    let context = Unmanaged<CallbackContext>.fromOpaque(opaque).takeUnretainedValue()
    context.watcher.closeCallback(reason: reason, generation: context.generation)
}

private func watcherLifecycleCallback(
    _ connection: OpaquePointer?, _ domain: OpaquePointer?, _ event: Int32, _ detail: Int32, _ opaque: UnsafeMutableRawPointer?
) -> Int32 {
    guard let opaque, let domain, let uuid = domainUUID(domain) else { return 0 }
    let context = Unmanaged<CallbackContext>.fromOpaque(opaque).takeUnretainedValue()
    let name = virDomainGetName(domain).map { String(cString: $0) } ?? ""
    context.watcher.lifecycleCallback(uuid: uuid, name: name, event: event, detail: detail, generation: context.generation)
    return 0
}

private func watcherMetadataCallback(
    _ connection: OpaquePointer?, _ domain: OpaquePointer?, _ type: Int32, _ namespace: UnsafePointer<CChar>?,
    _ opaque: UnsafeMutableRawPointer?
) {
    guard let opaque, let domain, let uuid = domainUUID(domain) else { return }
    let context = Unmanaged<CallbackContext>.fromOpaque(opaque).takeUnretainedValue()
    context.watcher.metadataCallback(uuid: uuid, type: type, namespace: namespace.map { String(cString: $0) }, generation: context.generation)
}

/// Resumes a continuation once, from whichever of the answer and the timeout comes first.
private final class ResumeOnce<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var waiter: CheckedContinuation<T, Never>?
    private var done = false

    func set(_ waiter: CheckedContinuation<T, Never>) {
        lock.lock()
        self.waiter = waiter
        lock.unlock()
    }

    func resume(_ value: T) {
        lock.lock()
        guard !done, let waiter else {
            lock.unlock()
            return
        }
        done = true
        self.waiter = nil
        lock.unlock()
        waiter.resume(returning: value)
    }
}
