import CLibvirt
import Foundation
import KVMIBrokerCore

/// libvirt's default event loop, run on its own thread (never on Swift's cooperative pool).
///
/// It must be registered before the first connection is opened for events, keepalive and the
/// close callback to work; `LibvirtConnection.open` starts it.
public enum LibvirtEventLoop {
    private static let started: Bool = {
        // libvirt's client writes to its socket with write(2): when libvirtd goes away (a
        // restart) the next write raises SIGPIPE, which kills a process that has not ignored
        // it. libvirt leaves that to the application; every process that talks to libvirt
        // through this layer (the daemon, the hook, the tests' in-process watcher) ignores it.
        signal(SIGPIPE, SIG_IGN)
        kvmib_virt_silence_errors()
        guard virInitialize() == 0, virEventRegisterDefaultImpl() == 0 else { return false }
        let thread = Thread {
            // SCHED_OTHER, not the SCHED_BATCH of a broker helper thread that may have started it
            // (KVMIBrokerOS's `useNormalScheduling`, which this layer does not import).
            var normal = sched_param()
            _ = pthread_setschedparam(pthread_self(), SCHED_OTHER, &normal)
            while virEventRunDefaultImpl() == 0 {}
        }
        thread.name = "libvirt-event-loop"
        thread.start()
        return true
    }()

    /// Starts the loop once; later calls return the first result.
    @discardableResult
    public static func start() -> Bool { started }
}

/// A domain's lifecycle state (`virDomainState`).
public enum DomainState: String, Sendable, Equatable {
    case noState = "nostate"
    case running, blocked, paused, shutdown, shutoff, crashed, pmsuspended

    init(raw: Int32) {
        switch UInt32(bitPattern: raw) {
        case VIR_DOMAIN_RUNNING.rawValue: self = .running
        case VIR_DOMAIN_BLOCKED.rawValue: self = .blocked
        case VIR_DOMAIN_PAUSED.rawValue: self = .paused
        case VIR_DOMAIN_SHUTDOWN.rawValue: self = .shutdown
        case VIR_DOMAIN_SHUTOFF.rawValue: self = .shutoff
        case VIR_DOMAIN_CRASHED.rawValue: self = .crashed
        case VIR_DOMAIN_PMSUSPENDED.rawValue: self = .pmsuspended
        default: self = .noState
        }
    }

    /// A QEMU process exists in these states.
    public var isActive: Bool { self != .shutoff && self != .noState }
}

/// What libvirt says about one domain.
public struct LibvirtDomain: Sendable, Equatable, CustomStringConvertible {
    public var uuid: GuestUUID
    public var name: String
    /// libvirt's id while running; nil when inactive.
    public var id: Int32?
    public var state: DomainState
    /// Our `<metadata>` element, if present and well formed.
    public var metadata: IntrospectionMetadata?
    /// Why our element could not be read, when it is present but malformed.
    public var metadataProblem: String?
    /// OpenStack Nova's `<nova:instance>` (project, flavor, image), read from the live XML with
    /// the emulator and DAC label (`domain(uuid:locator:live:)`); nil otherwise or when absent.
    public var nova: NovaMetadata?
    /// The QEMU process (from libvirt's pid file or status XML); nil when not running or unreadable.
    public var qemuPID: Int32?
    /// From the live XML, read only for a peer's identity check (`domain(uuid:locator:live:)`):
    /// the `<emulator>` libvirt started, and the DAC label it runs QEMU under.
    public var emulator: String?
    public var processLabel: DACLabel?

    public init(
        uuid: GuestUUID, name: String, id: Int32? = nil, state: DomainState, metadata: IntrospectionMetadata? = nil,
        metadataProblem: String? = nil, qemuPID: Int32? = nil, emulator: String? = nil, processLabel: DACLabel? = nil
    ) {
        self.uuid = uuid
        self.name = name
        self.id = id
        self.state = state
        self.metadata = metadata
        self.metadataProblem = metadataProblem
        self.qemuPID = qemuPID
        self.emulator = emulator
        self.processLabel = processLabel
    }

    public var description: String {
        var text = "\(name) \(uuid) \(state.rawValue)"
        if let id { text += " id=\(id)" }
        if let qemuPID { text += " pid=\(qemuPID)" }
        if let metadata { text += " \(metadata)" }
        if let metadataProblem { text += " (metadata: \(metadataProblem))" }
        if let nova { text += " nova: \(nova)" }
        return text
    }
}

/// Finds the pid of a running domain's QEMU in libvirt's run directory: `<name>.pid`, else the
/// `pid` attribute of `<domstatus>` in `<name>.xml`. Only root can read them on a system libvirtd.
public struct QEMUProcessLocator: Sendable {
    /// `/run/libvirt/qemu` for `qemu:///system`.
    public var runDirectory: String

    public static let system = QEMUProcessLocator(runDirectory: "/run/libvirt/qemu")

    public init(runDirectory: String) { self.runDirectory = runDirectory }

    public func pid(ofDomain name: String) -> Int32? {
        guard !name.contains("/") else { return nil }
        if let data = FileManager.default.contents(atPath: "\(runDirectory)/\(name).pid"),
            let pid = Int32(String(decoding: data, as: UTF8.self).trimmingXMLSpace()), pid > 0
        {
            return pid
        }
        guard let data = FileManager.default.contents(atPath: "\(runDirectory)/\(name).xml"),
            let status = try? MarkupElement.parse(String(decoding: data, as: UTF8.self)), status.name == "domstatus",
            let pid = status[attribute: "pid"].flatMap({ Int32($0) }), pid > 0
        else { return nil }
        return pid
    }
}

/// One libvirt connection. libvirt connections are thread-safe, hence `@unchecked Sendable`;
/// the pointer is closed (unreferenced) exactly once, in `deinit`.
public final class LibvirtConnection: @unchecked Sendable {
    let pointer: OpaquePointer
    public let uri: String
    public let readOnly: Bool

    private init(pointer: OpaquePointer, uri: String, readOnly: Bool) {
        self.pointer = pointer
        self.uri = uri
        self.readOnly = readOnly
    }

    deinit { virConnectClose(pointer) }

    /// Opens `uri`; read-only is enough for discovery, events and metadata reads.
    public static func open(_ uri: String, readOnly: Bool) throws(BrokerError) -> LibvirtConnection {
        guard LibvirtEventLoop.start() else {
            throw BrokerError(.unsupported, "libvirt's event loop could not be registered", at: uri)
        }
        let flags = readOnly ? UInt32(VIR_CONNECT_RO.rawValue) : 0
        guard let pointer = virConnectOpenAuth(uri, kvmib_virt_auth_default(), flags) else {
            throw LibvirtConnection.lastError(.connectFailed, "cannot connect to libvirt", at: uri)
        }
        return LibvirtConnection(pointer: pointer, uri: uri, readOnly: readOnly)
    }

    /// Another handle on the same underlying connection (for tests: one test-driver state).
    public func sharing() -> LibvirtConnection {
        virConnectRef(pointer)
        return LibvirtConnection(pointer: pointer, uri: uri, readOnly: readOnly)
    }

    /// Whether libvirt still considers the connection alive.
    public var isAlive: Bool { virConnectIsAlive(pointer) == 1 }

    /// libvirt's last error on this thread as a BrokerError.
    static func lastError(_ code: BrokerError.Code, _ what: String, at location: String) -> BrokerError {
        let message = virGetLastError().flatMap { error in error.pointee.message.map { String(cString: $0) } } ?? "unknown libvirt error"
        return BrokerError(code, "\(what): \(message)", at: location)
    }

    static var lastErrorCode: Int32 { virGetLastError()?.pointee.code ?? 0 }

    // MARK: Domains

    /// All running (active) domains, sorted by name.
    public func runningDomains(locator: QEMUProcessLocator = .system) throws(BrokerError) -> [LibvirtDomain] {
        try listDomains(flags: UInt32(VIR_CONNECT_LIST_DOMAINS_ACTIVE.rawValue), locator: locator)
    }

    /// All domains, running or not, sorted by name.
    public func allDomains(locator: QEMUProcessLocator = .system) throws(BrokerError) -> [LibvirtDomain] {
        try listDomains(flags: 0, locator: locator)
    }

    private func listDomains(flags: UInt32, locator: QEMUProcessLocator) throws(BrokerError) -> [LibvirtDomain] {
        var list: UnsafeMutablePointer<OpaquePointer?>?
        let count = virConnectListAllDomains(pointer, &list, flags)
        guard count >= 0, let list else { throw Self.lastError(.io, "cannot list domains", at: uri) }
        defer { free(list) }
        var out: [LibvirtDomain] = []
        for index in 0..<Int(count) {
            guard let domain = list[index] else { continue }
            defer { virDomainFree(domain) }
            if let facts = facts(of: domain, locator: locator) { out.append(facts) }
        }
        return out.sorted { $0.name < $1.name }
    }

    /// The domain with this UUID, or nil when libvirt has none. With `live`, a running domain's
    /// live XML is read too (its `<emulator>` and DAC label, for a peer's identity check); not
    /// being able to read it throws.
    public func domain(uuid: GuestUUID, locator: QEMUProcessLocator = .system, live: Bool = false) throws(BrokerError) -> LibvirtDomain? {
        guard let domain = virDomainLookupByUUIDString(pointer, uuid.description) else {
            if Self.lastErrorCode == Int32(VIR_ERR_NO_DOMAIN.rawValue) { return nil }
            throw Self.lastError(.io, "cannot look up the domain", at: uuid.description)
        }
        defer { virDomainFree(domain) }
        guard var facts = facts(of: domain, locator: locator) else { return nil }
        if live && facts.state.isActive {
            let root = try MarkupElement.parse(try liveXML(of: domain, place: uuid.description))
            facts.emulator = DomainDescription.emulator(in: root)
            facts.processLabel = DACLabel(seclabelsOf: root)
            facts.nova = NovaMetadata.read(inDomain: root)
        }
        return facts
    }

    /// The domain named or with the UUID `nameOrUUID`, or nil when libvirt has none.
    public func domain(named nameOrUUID: String, locator: QEMUProcessLocator = .system) throws(BrokerError) -> LibvirtDomain? {
        try withDomain(nameOrUUID) { domain throws(BrokerError) in facts(of: domain, locator: locator) }
    }

    /// Runs `body` with the domain named or with the UUID `nameOrUUID`.
    func withDomain<T>(_ nameOrUUID: String, _ body: (OpaquePointer) throws(BrokerError) -> T) throws(BrokerError) -> T {
        var domain: OpaquePointer?
        if GuestUUID(nameOrUUID) != nil { domain = virDomainLookupByUUIDString(pointer, nameOrUUID) }
        if domain == nil { domain = virDomainLookupByName(pointer, nameOrUUID) }
        guard let domain else {
            if Self.lastErrorCode == Int32(VIR_ERR_NO_DOMAIN.rawValue) {
                throw BrokerError(.invalidArgument, "libvirt has no domain with this name or UUID", at: "domain \(nameOrUUID)")
            }
            throw Self.lastError(.io, "cannot look up the domain", at: "domain \(nameOrUUID)")
        }
        defer { virDomainFree(domain) }
        return try body(domain)
    }

    /// Facts about a domain; nil if it vanished meanwhile.
    func facts(of domain: OpaquePointer, locator: QEMUProcessLocator) -> LibvirtDomain? {
        var buffer = [CChar](repeating: 0, count: Int(VIR_UUID_STRING_BUFLEN))
        guard virDomainGetUUIDString(domain, &buffer) == 0,
            let uuid = GuestUUID(buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }),
            let namePointer = virDomainGetName(domain)
        else { return nil }
        let name = String(cString: namePointer)
        var state: Int32 = 0
        var reason: Int32 = 0
        guard virDomainGetState(domain, &state, &reason, 0) == 0 else { return nil }
        let domainState = DomainState(raw: state)
        let rawID = virDomainGetID(domain)
        var facts = LibvirtDomain(uuid: uuid, name: name, id: rawID == UInt32.max ? nil : Int32(bitPattern: rawID), state: domainState)
        do {
            facts.metadata = try metadata(of: domain)
        } catch {
            facts.metadataProblem = error.message
        }
        if domainState.isActive { facts.qemuPID = locator.pid(ofDomain: name) }
        return facts
    }

    /// Our metadata element of the domain as it is now (live when running), nil when absent.
    func metadata(of domain: OpaquePointer, flags: UInt32 = 0) throws(BrokerError) -> IntrospectionMetadata? {
        guard
            let text = virDomainGetMetadata(domain, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), IntrospectionMetadata.namespace, flags)
        else {
            if Self.lastErrorCode == Int32(VIR_ERR_NO_DOMAIN_METADATA.rawValue) { return nil }
            throw Self.lastError(.io, "cannot read the domain's metadata", at: "domain")
        }
        defer { free(text) }
        return try IntrospectionMetadata(metadataString: String(cString: text))
    }

    /// The running domain's XML as libvirt holds it now (what it started, with the labels it
    /// chose); a read-only connection is enough.
    func liveXML(of domain: OpaquePointer, place: String) throws(BrokerError) -> String {
        guard let text = virDomainGetXMLDesc(domain, 0) else {
            throw Self.lastError(.io, "cannot read the domain's live XML", at: place)
        }
        defer { free(text) }
        return String(cString: text)
    }

    /// The persistent (inactive) definition's XML, as `virsh dumpxml --inactive --security-info`.
    func inactiveXML(of domain: OpaquePointer, place: String) throws(BrokerError) -> String {
        let flags = UInt32(VIR_DOMAIN_XML_INACTIVE.rawValue) | UInt32(VIR_DOMAIN_XML_SECURE.rawValue)
        guard let text = virDomainGetXMLDesc(domain, flags) else {
            throw Self.lastError(.io, "cannot read the domain's definition", at: place)
        }
        defer { free(text) }
        return String(cString: text)
    }
}
