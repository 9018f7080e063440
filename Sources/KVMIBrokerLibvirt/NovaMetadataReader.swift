import KVMIBrokerCore

extension NovaMetadata {
    /// Nova's `<nova:instance>` among a domain's `<metadata>` children, found by namespace URI
    /// whatever its prefix, read strictly: nil when the domain has none; `problem` set when it
    /// is there but cannot be read (an unknown major version, two Nova elements, a repeated or
    /// malformed child, an oversized value). A problem never fails the domain's other facts.
    public static func read(inDomain root: MarkupElement) -> NovaMetadata? {
        guard let metadata = root.child("metadata") else { return nil }
        var found: [(element: MarkupElement, uri: String)] = []
        for element in metadata.elements {
            if let uri = DomainDescription.namespace(ofPrefix: element.prefix, scopes: [element, metadata, root]), uri.hasPrefix(namespacePrefix) {
                found.append((element, uri))
            }
        }
        guard let first = found.first else { return nil }
        guard found.count == 1 else {
            return .unreadable(
                namespace: first.uri, "the domain carries \(found.count) Nova elements (\(found.map(\.uri).joined(separator: ", "))); expected one")
        }
        guard isReadable(namespace: first.uri) else {
            return .unreadable(namespace: first.uri, "Nova namespace \(first.uri) is not a version this broker reads (1.x)")
        }
        do {
            return try NovaMetadata(instance: first.element, namespace: first.uri, scopes: [metadata, root])
        } catch {
            return .unreadable(namespace: first.uri, error.message)
        }
    }

    /// Reads `<nova:instance>`: at most one of each child we use, each value bounded.
    init(instance: MarkupElement, namespace: String, scopes: [MarkupElement]) throws(BrokerError) {
        guard instance.localName == NovaMetadata.elementName else {
            throw BrokerError(.invalidArgument, "Nova's element is <\(instance.name)>, not <nova:\(NovaMetadata.elementName)>")
        }
        let outer = [instance] + scopes
        func single(_ local: String, in parent: MarkupElement, _ parentScopes: [MarkupElement]) throws(BrokerError) -> MarkupElement? {
            let matching = parent.elements.filter { child in
                child.localName == local && DomainDescription.namespace(ofPrefix: child.prefix, scopes: [child] + parentScopes) == namespace
            }
            guard matching.count <= 1 else {
                throw BrokerError(.invalidArgument, "<nova:\(local)> appears \(matching.count) times in <\(parent.name)>")
            }
            return matching.first
        }
        func name(_ text: String, _ what: String) throws(BrokerError) -> String? {
            let value = text.trimmingXMLSpace()
            if value.isEmpty { return nil }
            guard value.utf8.count <= NovaMetadata.nameLimit else {
                throw BrokerError(.invalidArgument, "\(what) is \(value.utf8.count) bytes long (at most \(NovaMetadata.nameLimit))")
            }
            guard !value.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) else {
                throw BrokerError(.invalidArgument, "\(what) holds a control character")
            }
            return value
        }
        func id(_ text: String?, _ what: String) throws(BrokerError) -> String? {
            guard let text, !text.isEmpty else { return nil }
            guard NovaMetadata.isValidID(text) else {
                throw BrokerError(.invalidArgument, "\(what) '\(text)' is not an id (1 to \(NovaMetadata.idLimit) letters, digits, '-' or '_')")
            }
            return text
        }
        func uuid(_ text: String?, _ what: String) throws(BrokerError) -> String? {
            guard let text, !text.isEmpty else { return nil }
            guard let parsed = GuestUUID(text) else { throw BrokerError(.invalidArgument, "\(what) '\(text)' is not a UUID") }
            return parsed.description
        }
        self.init(namespace: namespace)
        instanceName = try single("name", in: instance, outer).flatMap { element throws(BrokerError) in try name(element.text, "<nova:name>") }
        if let flavor = try single("flavor", in: instance, outer) {
            flavorName = try name(flavor[attribute: "name"] ?? "", "<nova:flavor name>")
        }
        if let owner = try single("owner", in: instance, outer) {
            let ownerScopes = [owner] + outer
            if let user = try single("user", in: owner, ownerScopes) {
                userID = try id(user[attribute: "uuid"], "<nova:user uuid>")
                userName = try name(user.text, "<nova:user>")
            }
            if let project = try single("project", in: owner, ownerScopes) {
                projectID = try id(project[attribute: "uuid"], "<nova:project uuid>")
                projectName = try name(project.text, "<nova:project>")
            }
        }
        // The image booted from: <nova:root type="image" uuid> (every version), and since 2024
        // <nova:image uuid> (empty when booted from a volume). Both present must agree.
        var image: String?
        if let root = try single("root", in: instance, outer), root[attribute: "type"] == "image" {
            image = try uuid(root[attribute: "uuid"], "<nova:root type=\"image\" uuid>")
        }
        if let element = try single("image", in: instance, outer), let stated = try uuid(element[attribute: "uuid"], "<nova:image uuid>") {
            if let image, image != stated {
                throw BrokerError(.invalidArgument, "<nova:image uuid=\"\(stated)\"> contradicts <nova:root type=\"image\" uuid=\"\(image)\">")
            }
            image = stated
        }
        imageID = image
    }
}
