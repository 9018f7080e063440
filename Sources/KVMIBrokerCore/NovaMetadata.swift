/// What the broker reads from OpenStack Nova's element in a domain's `<metadata>`, so that
/// policy rules can choose guests by project, flavor and image (`MatchNovaProject=` and friends).
///
/// Nova (`nova/virt/libvirt/config.py`, `LibvirtConfigGuestMetaNovaInstance`) writes:
///
/// ```xml
/// <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
///   <nova:package version="29.0.0"/>
///   <nova:name>web-1</nova:name>
///   <nova:flavor name="m1.small" id="2">...</nova:flavor>
///   <nova:owner>
///     <nova:user uuid="0d9b2c6f...">alice</nova:user>
///     <nova:project uuid="8e6b2b4a...">demo</nova:project>
///   </nova:owner>
///   <nova:root type="image" uuid="4a5e2f7c-..."/>
/// </nova:instance>
/// ```
///
/// Like our own element it is a statement by whoever may edit the domain (Nova, or anyone with
/// write access to libvirt), not a permission: only rules decide.
public struct NovaMetadata: Sendable, Hashable, Codable, CustomStringConvertible {
    /// The namespace URIs this broker reads: Nova's 1.0 (2014) and 1.1 (2020, which added
    /// `<nova:ports>`). A later 1.x is read the same way (Nova's minor versions only add
    /// elements); another major version is reported as unreadable.
    public static let namespacePrefix = "http://openstack.org/xmlns/libvirt/nova/"
    public static let knownNamespaces = ["http://openstack.org/xmlns/libvirt/nova/1.1", "http://openstack.org/xmlns/libvirt/nova/1.0"]
    /// The local name of Nova's element.
    public static let elementName = "instance"
    /// Longest id kept (Keystone ids are at most 64 characters) and longest name.
    public static let idLimit = 64
    public static let nameLimit = 255

    /// The namespace URI the element was found under.
    public var namespace: String
    /// Keystone project id, as Nova wrote it (usually 32 hex digits); compare with `sameID`.
    public var projectID: String?
    public var projectName: String?
    public var userID: String?
    public var userName: String?
    public var flavorName: String?
    /// The Glance image the instance booted from (`<nova:root type="image" uuid>`); nil when it
    /// booted from a volume. A UUID in lower case with dashes (`GuestUUID.description`).
    public var imageID: String?
    /// Nova's display name of the instance (`<nova:name>`), shown only.
    public var instanceName: String?
    /// Set when the element is present but could not be read; then no Nova rule matches, and
    /// every other field is nil.
    public var problem: String?

    public init(
        namespace: String = NovaMetadata.knownNamespaces[0], projectID: String? = nil, projectName: String? = nil, userID: String? = nil,
        userName: String? = nil, flavorName: String? = nil, imageID: String? = nil, instanceName: String? = nil, problem: String? = nil
    ) {
        self.namespace = namespace
        self.projectID = projectID
        self.projectName = projectName
        self.userID = userID
        self.userName = userName
        self.flavorName = flavorName
        self.imageID = imageID
        self.instanceName = instanceName
        self.problem = problem
    }

    /// An element that is there but unreadable: `problem` says why (already escaped and bounded).
    public static func unreadable(namespace: String, _ problem: String) -> NovaMetadata {
        NovaMetadata(namespace: escapedForLog(namespace, limit: 256), problem: escapedForLog(problem, limit: 512))
    }

    /// Whether `uri` is a Nova namespace this broker reads (`.../nova/1.N`).
    public static func isReadable(namespace uri: String) -> Bool {
        guard uri.hasPrefix(namespacePrefix) else { return false }
        let version = uri.dropFirst(namespacePrefix.count)
        guard version.hasPrefix("1.") else { return false }
        let minor = version.dropFirst(2)
        return !minor.isEmpty && minor.utf8.count <= 4 && minor.utf8.allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
    }

    /// Keystone ids compare without case and, for UUID-shaped ids, without dashes: Keystone
    /// writes `8e6b2b4ab9e04d5f...`, a dashed copy of the same id is the same project.
    public static func canonicalID(_ text: String) -> String {
        let lower = text.lowercased()
        if let uuid = GuestUUID(lower) { return uuid.description.replacingDashes() }
        if lower.utf8.count == 32, let uuid = GuestUUID(lower.dashedUUID()) { return uuid.description.replacingDashes() }
        return lower
    }

    /// An id as Keystone makes them: 1 to 64 letters, digits, '-' and '_'.
    public static func isValidID(_ text: String) -> Bool {
        (1...idLimit).contains(text.utf8.count)
            && text.utf8.allSatisfy { byte in
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                    UInt8(ascii: "-"), UInt8(ascii: "_"):
                    return true
                default: return false
                }
            }
    }

    /// `project "demo" (8e6b...), flavor "m1.small", image 4a5e..., user "alice" (0d9b...)`; text from the domain escaped.
    public var description: String {
        if let problem { return "unreadable (\(problem))" }
        func quoted(_ text: String?) -> String { text.map { "\"\(escapedForLog($0, limit: 64))\"" } ?? "(none)" }
        var parts = ["project \(quoted(projectName)) (\(projectID.map { escapedForLog($0, limit: 64) } ?? "no id"))"]
        parts.append("flavor \(quoted(flavorName))")
        parts.append("image \(imageID ?? "(none: not booted from an image)")")
        if userName != nil || userID != nil { parts.append("user \(quoted(userName)) (\(userID.map { escapedForLog($0, limit: 64) } ?? "no id"))") }
        if let instanceName { parts.append("instance name \(quoted(instanceName))") }
        return parts.joined(separator: ", ")
    }
}

extension String {
    fileprivate func replacingDashes() -> String { split(separator: "-").joined() }

    /// `8e6b2b4ab9e04d5f8d9e3c9c5e1a2b3c` as `8e6b2b4a-b9e0-4d5f-8d9e-3c9c5e1a2b3c`.
    fileprivate func dashedUUID() -> String {
        let characters = Array(self)
        guard characters.count == 32 else { return self }
        return [0..<8, 8..<12, 12..<16, 16..<20, 20..<32].map { String(characters[$0]) }.joined(separator: "-")
    }
}
