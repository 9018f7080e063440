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

/// The identity and metadata of a libvirt domain, read from its XML (`virsh dumpxml`).
public struct DomainFacts: Sendable, Equatable {
    public var uuid: GuestUUID?
    public var name: String?
    public var metadata: GuestMetadata?

    /// A minimal reader: the `<domain>`'s own `<uuid>` and `<name>` children and our element in
    /// `<metadata>` (found by namespace URI, whatever its prefix). It is not a validating XML parser.
    public init(xml: String) throws(BrokerError) {
        var parser = MiniXML(Array(xml.utf8))
        var stack: [(name: String, namespaces: [String: String])] = []
        var text = ""
        while let event = try parser.next() {
            switch event {
            case .start(let tag, let attributes, let selfClosing):
                var namespaces = stack.last?.namespaces ?? [:]
                for (key, value) in attributes where key == "xmlns" || key.hasPrefix("xmlns:") {
                    namespaces[key == "xmlns" ? "" : String(key.dropFirst(6))] = value
                }
                let parts = tag.split(separator: ":", maxSplits: 1)
                let (prefix, local) = parts.count == 2 ? (String(parts[0]), String(parts[1])) : ("", tag)
                if stack.isEmpty, tag != "domain" {
                    throw BrokerError(.invalidArgument, "the document element is <\(tag)>, not <domain>")
                }
                if stack.count >= 2, stack[1].name == "metadata", stack[0].name == "domain",
                    namespaces[prefix] == GuestMetadata.namespace, local == GuestMetadata.elementName
                {
                    let attributeMap = Dictionary(attributes, uniquingKeysWith: { _, last in last })
                    func flag(_ key: String, default value: Bool) throws(BrokerError) -> Bool {
                        switch attributeMap[key]?.lowercased() {
                        case nil: return value
                        case "yes", "true", "1", "on": return true
                        case "no", "false", "0", "off": return false
                        case let other?: throw BrokerError(.invalidArgument, "<\(tag) \(key)=\"\(other)\">: \(key) must be yes or no")
                        }
                    }
                    var metadata = GuestMetadata()
                    metadata.wanted = try flag("wanted", default: true)
                    metadata.required = try flag("required", default: false)
                    metadata.introspector = attributeMap["introspector"].flatMap { $0.isEmpty ? nil : $0 }
                    self.metadata = metadata
                }
                if !selfClosing { stack.append((tag, namespaces)) }
                text = ""
            case .text(let content):
                text += content
            case .end(let tag):
                guard let open = stack.popLast(), open.name == tag else {
                    throw BrokerError(.invalidArgument, "</\(tag)> does not close the element that is open")
                }
                if stack.count == 1, stack[0].name == "domain" {
                    let value = text.trimmingWhitespace()
                    if tag == "uuid" {
                        guard let uuid = GuestUUID(value) else { throw BrokerError(.invalidArgument, "<uuid>\(value)</uuid> is not a UUID") }
                        self.uuid = uuid
                    } else if tag == "name" {
                        self.name = value
                    }
                }
                text = ""
            }
        }
        if let open = stack.last { throw BrokerError(.invalidArgument, "<\(open.name)> is never closed") }
        if uuid == nil && name == nil { throw BrokerError(.invalidArgument, "no <domain> element with a <uuid> or <name>") }
    }
}

/// Just enough XML: elements, attributes, text, entities; comments, PIs, CDATA and DOCTYPE skipped.
private struct MiniXML {
    enum Event {
        case start(String, [(String, String)], selfClosing: Bool)
        case end(String)
        case text(String)
    }

    let bytes: [UInt8]
    var index = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    mutating func next() throws(BrokerError) -> Event? {
        while index < bytes.count {
            if bytes[index] != UInt8(ascii: "<") {
                let start = index
                while index < bytes.count, bytes[index] != UInt8(ascii: "<") { index += 1 }
                return .text(try decodeEntities(bytes[start..<index]))
            }
            if hasPrefix("<!--") {
                try skip(past: "-->")
            } else if hasPrefix("<![CDATA[") {
                let start = index + 9
                try skip(past: "]]>")
                return .text(String(decoding: bytes[start..<(index - 3)], as: UTF8.self))
            } else if hasPrefix("<?") {
                try skip(past: "?>")
            } else if hasPrefix("<!") {
                try skip(past: ">")
            } else if hasPrefix("</") {
                index += 2
                let name = readName()
                skipSpace()
                guard index < bytes.count, bytes[index] == UInt8(ascii: ">") else { throw malformed() }
                index += 1
                return .end(name)
            } else {
                index += 1
                let name = readName()
                guard !name.isEmpty else { throw malformed() }
                var attributes: [(String, String)] = []
                while true {
                    skipSpace()
                    guard index < bytes.count else { throw malformed() }
                    if bytes[index] == UInt8(ascii: ">") {
                        index += 1
                        return .start(name, attributes, selfClosing: false)
                    }
                    if hasPrefix("/>") {
                        index += 2
                        return .start(name, attributes, selfClosing: true)
                    }
                    let key = readName()
                    skipSpace()
                    guard !key.isEmpty, index < bytes.count, bytes[index] == UInt8(ascii: "=") else { throw malformed() }
                    index += 1
                    skipSpace()
                    guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") || bytes[index] == UInt8(ascii: "'") else { throw malformed() }
                    let quote = bytes[index]
                    index += 1
                    let start = index
                    while index < bytes.count, bytes[index] != quote { index += 1 }
                    guard index < bytes.count else { throw malformed() }
                    attributes.append((key, try decodeEntities(bytes[start..<index])))
                    index += 1
                }
            }
        }
        return nil
    }

    private func malformed() -> BrokerError {
        BrokerError(.invalidArgument, "malformed XML at byte \(index)")
    }

    private func hasPrefix(_ text: String) -> Bool {
        let prefix = Array(text.utf8)
        return bytes.count - index >= prefix.count && Array(bytes[index..<(index + prefix.count)]) == prefix
    }

    private mutating func skip(past terminator: String) throws(BrokerError) {
        let end = Array(terminator.utf8)
        while index < bytes.count {
            if bytes.count - index >= end.count, Array(bytes[index..<(index + end.count)]) == end {
                index += end.count
                return
            }
            index += 1
        }
        throw BrokerError(.invalidArgument, "malformed XML: '\(terminator)' never comes")
    }

    private mutating func skipSpace() {
        while index < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[index]) { index += 1 }
    }

    private mutating func readName() -> String {
        let start = index
        while index < bytes.count, ![0x20, 0x09, 0x0A, 0x0D, UInt8(ascii: ">"), UInt8(ascii: "/"), UInt8(ascii: "=")].contains(bytes[index]) {
            index += 1
        }
        return String(decoding: bytes[start..<index], as: UTF8.self)
    }

    private func decodeEntities(_ slice: ArraySlice<UInt8>) throws(BrokerError) -> String {
        let text = String(decoding: slice, as: UTF8.self)
        guard text.contains("&") else { return text }
        var out = ""
        var rest = Substring(text)
        while let amp = rest.firstIndex(of: "&") {
            out += rest[..<amp]
            guard let semi = rest[amp...].firstIndex(of: ";") else { throw BrokerError(.invalidArgument, "malformed XML entity in '\(text)'") }
            let entity = rest[rest.index(after: amp)..<semi]
            switch entity {
            case "amp": out += "&"
            case "lt": out += "<"
            case "gt": out += ">"
            case "quot": out += "\""
            case "apos": out += "'"
            default:
                let value: UInt32? =
                    entity.hasPrefix("#x") ? UInt32(entity.dropFirst(2), radix: 16) : entity.hasPrefix("#") ? UInt32(entity.dropFirst()) : nil
                guard let value, let scalar = Unicode.Scalar(value) else {
                    throw BrokerError(.invalidArgument, "unknown XML entity '&\(entity);'")
                }
                out.unicodeScalars.append(scalar)
            }
            rest = rest[rest.index(after: semi)...]
        }
        return out + rest
    }
}
