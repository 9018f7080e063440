import KVMIBrokerCore

/// What the broker reads from our element in a domain's `<metadata>`.
///
/// ```xml
/// <metadata>
///   <kvmi:introspection xmlns:kvmi="https://kvmi-broker.org/xmlns/1" wanted="yes" introspector="acme"/>
/// </metadata>
/// ```
public struct GuestMetadata: Sendable, Hashable, CustomStringConvertible {
    /// The namespace URI of our metadata element.
    public static let namespace = "https://kvmi-broker.org/xmlns/1"
    /// The local name of our metadata element.
    public static let elementName = "introspection"

    /// `wanted="no"` opts the domain out of metadata rules; absent means yes.
    public var wanted: Bool
    /// The introspector the domain asks for, if it names one.
    public var introspector: String?
    /// `required="yes"`: the domain asks not to run unmonitored. It can make a matching rule's
    /// decision required, never widen what the policy allows.
    public var required: Bool

    public init(wanted: Bool = true, introspector: String? = nil, required: Bool = false) {
        self.wanted = wanted
        self.introspector = introspector
        self.required = required
    }

    public var description: String {
        let name = introspector.map { " introspector=\"\($0)\"" } ?? ""
        return "<introspection wanted=\"\(wanted ? "yes" : "no")\"\(name)\(required ? " required=\"yes\"" : "")/>"
    }
}
