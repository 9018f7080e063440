import KVMIBrokerCore

/// Our element in a domain's `<metadata>`: the domain asks to be introspected.
///
/// ```xml
/// <metadata>
///   <kvmi:introspection xmlns:kvmi="https://kvmi-broker.org/xmlns/1" introspector="acme" required="yes"/>
/// </metadata>
/// ```
///
/// libvirt keeps only namespaced metadata, one top-level element per namespace. The element is
/// a request, not a permission: anyone who may edit the domain may write it, and the policy has
/// the final word. Attributes (all optional):
/// - `wanted="yes|no"`: `no` opts the domain out; absent means yes.
/// - `introspector="NAME"`: the introspector the domain asks for (a name the policy defines).
/// - `required="yes|no"`: the guest must not start unless it can be introspected; absent means no.
/// - `original-emulator="PATH"`: written by `kvmi-broker enroll --qemu`: the `<emulator>` it
///   replaced, so that `unenroll` can put it back.
public struct IntrospectionMetadata: Sendable, Hashable, CustomStringConvertible {
    /// The namespace URI (shared with the policy layer's reader).
    public static let namespace = "https://kvmi-broker.org/xmlns/1"
    /// The local name of the element.
    public static let elementName = "introspection"
    /// The prefix we write (`virDomainSetMetadata`'s key); readers accept any prefix.
    public static let prefix = "kvmi"

    public var wanted: Bool
    public var introspector: String?
    public var required: Bool
    public var originalEmulator: String?

    public init(wanted: Bool = true, introspector: String? = nil, required: Bool = false, originalEmulator: String? = nil) {
        self.wanted = wanted
        self.introspector = introspector
        self.required = required
        self.originalEmulator = originalEmulator
    }

    /// Reads our element (already identified by namespace and local name).
    public init(element: MarkupElement) throws(BrokerError) {
        func flag(_ name: String, default value: Bool) throws(BrokerError) -> Bool {
            switch element[attribute: name]?.lowercased() {
            case nil: return value
            case "yes", "true", "1", "on": return true
            case "no", "false", "0", "off": return false
            case let other?:
                throw BrokerError(.invalidArgument, "<\(element.name) \(name)=\"\(other)\">: \(name) must be yes or no")
            }
        }
        self.wanted = try flag("wanted", default: true)
        self.required = try flag("required", default: false)
        self.introspector = element[attribute: "introspector"].flatMap { $0.isEmpty ? nil : $0 }
        self.originalEmulator = element[attribute: "original-emulator"].flatMap { $0.isEmpty ? nil : $0 }
    }

    /// Reads the string `virDomainGetMetadata` returns (the element with its namespace declared).
    public init(metadataString: String) throws(BrokerError) {
        let element = try MarkupElement.parse(metadataString)
        guard element.localName == Self.elementName else {
            throw BrokerError(.invalidArgument, "metadata element <\(element.name)> is not <\(Self.elementName)>")
        }
        try self.init(element: element)
    }

    /// The element, with `prefix` and the namespace declared on it.
    public func element(prefix: String = IntrospectionMetadata.prefix, declareNamespace: Bool = true) -> MarkupElement {
        var element = MarkupElement(prefix.isEmpty ? Self.elementName : "\(prefix):\(Self.elementName)")
        if declareNamespace { element.attributes.append((prefix.isEmpty ? "xmlns" : "xmlns:\(prefix)", Self.namespace)) }
        if !wanted { element.attributes.append(("wanted", "no")) }
        if let introspector { element.attributes.append(("introspector", introspector)) }
        if required { element.attributes.append(("required", "yes")) }
        if let originalEmulator { element.attributes.append(("original-emulator", originalEmulator)) }
        return element
    }

    /// The unprefixed element as `virDomainSetMetadata` wants it (it adds the namespace from its key and uri).
    public var setMetadataString: String { element(prefix: "", declareNamespace: false).serialized() }

    public var description: String { element().serialized() }
}
