import KVMIBrokerCore

/// What the broker reads from a domain's XML: `virsh dumpxml`, `virDomainGetXMLDesc`, or the
/// XML a libvirt hook receives on stdin.
public struct DomainDescription: Sendable, Equatable {
    public var uuid: GuestUUID
    public var name: String
    /// The `id` attribute of `<domain>`: present while the domain runs.
    public var id: Int32?
    /// Our `<metadata>` element, if the domain has one.
    public var metadata: IntrospectionMetadata?
    /// OpenStack Nova's `<nova:instance>`, if the domain has one (`problem` set when unreadable).
    public var nova: NovaMetadata?
    /// `<devices><emulator>`.
    public var emulator: String?
    /// The DAC label QEMU runs under (`<seclabel model='dac'><label>`), as libvirt reports it in
    /// a running domain's live XML; nil when there is none.
    public var processLabel: DACLabel?
    /// The channel socket path in the `-chardev` line `kvmi-broker enroll` adds, if present.
    public var enrolledChannelSocket: String?

    /// Parses a domain XML document. Errors name the domain when its name could be read.
    public init(xml: String) throws(BrokerError) {
        try self.init(root: MarkupElement.parse(xml))
    }

    public init(root: MarkupElement) throws(BrokerError) {
        guard root.name == "domain" else {
            throw BrokerError(.invalidArgument, "the document element is <\(root.name)>, not <domain>")
        }
        let name = root.child("name")?.text.trimmingXMLSpace() ?? ""
        let place = name.isEmpty ? "domain XML" : "domain \(name)"
        guard !name.isEmpty else { throw BrokerError(.invalidArgument, "the domain XML has no <name>") }
        guard let uuidText = root.child("uuid")?.text.trimmingXMLSpace() else {
            throw BrokerError(.invalidArgument, "the domain XML has no <uuid>", at: place)
        }
        guard let uuid = GuestUUID(uuidText) else {
            throw BrokerError(.invalidArgument, "<uuid>\(uuidText)</uuid> is not a UUID", at: place)
        }
        self.uuid = uuid
        self.name = name
        self.id = root[attribute: "id"].flatMap { Int32($0) }
        self.emulator = Self.emulator(in: root)
        self.processLabel = DACLabel(seclabelsOf: root)
        do {
            self.metadata = try DomainDescription.metadataElement(in: root).map { element throws(BrokerError) in
                try IntrospectionMetadata(element: element)
            }
        } catch {
            throw error.located(at: place)
        }
        self.enrolledChannelSocket = QEMUCommandLine.enrolledChannelSocket(in: root)
        self.nova = NovaMetadata.read(inDomain: root)
    }

    /// `<devices><emulator>`, trimmed; nil when absent or empty.
    static func emulator(in root: MarkupElement) -> String? {
        guard let text = root.child("devices")?.child("emulator")?.text.trimmingXMLSpace(), !text.isEmpty else { return nil }
        return text
    }

    /// Our element among `<metadata>`'s children, found by namespace URI whatever its prefix.
    static func metadataElement(in root: MarkupElement) -> MarkupElement? {
        guard let metadata = root.child("metadata") else { return nil }
        return metadata.elements.first { element in
            element.localName == IntrospectionMetadata.elementName
                && namespace(ofPrefix: element.prefix, scopes: [element, metadata, root]) == IntrospectionMetadata.namespace
        }
    }

    /// Resolves `prefix` through the declarations of `scopes`, innermost first.
    static func namespace(ofPrefix prefix: String, scopes: [MarkupElement]) -> String? {
        for scope in scopes {
            if let uri = scope.declaredNamespace(forPrefix: prefix) { return uri }
        }
        return nil
    }
}

/// The user and group libvirt runs a domain's QEMU as: the `<label>` of the domain's
/// `<seclabel model='dac'>` (`user:group`, each a name or `+number`). The broker compares the
/// channel peer's uid/gid with it, so a local process of another user cannot pose as the QEMU.
public struct DACLabel: Sendable, Equatable, CustomStringConvertible {
    public var user: String
    public var group: String

    public init(user: String, group: String) {
        self.user = user
        self.group = group
    }

    /// Parses `user:group`; nil when either half is missing.
    public init?(_ text: String) {
        let parts = text.trimmingXMLSpace().split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else { return nil }
        self.init(user: String(parts[0]), group: String(parts[1]))
    }

    /// The label of the domain-level `<seclabel model='dac'>` (not a disk's), if it has one.
    public init?(seclabelsOf root: MarkupElement) {
        let dac = root.elements.first { $0.name == "seclabel" && $0[attribute: "model"] == "dac" }
        guard let text = dac?.child("label")?.text, let label = DACLabel(text) else { return nil }
        self = label
    }

    public var description: String { "\(user):\(group)" }
}

extension String {
    func trimmingXMLSpace() -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == "\r" || $0 == "\r\n" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(self[first...last])
    }
}
