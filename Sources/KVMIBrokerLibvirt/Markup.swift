import KVMIBrokerCore

/// One node of a parsed XML document: just what libvirt's domain XML uses.
public enum MarkupNode: Sendable, Equatable {
    case element(MarkupElement)
    case text(String)
    case comment(String)
}

/// An XML element with its qualified name (`prefix:local`), ordered attributes and children.
///
/// A small DOM for libvirt's domain XML: enough to read a domain and to edit it (enrolment)
/// and write it back. Not a validating parser: no DTDs (refused), no external entities.
public struct MarkupElement: Sendable, Equatable {
    public var name: String
    public var attributes: [(name: String, value: String)]
    public var children: [MarkupNode]

    public init(_ name: String, attributes: [(name: String, value: String)] = [], children: [MarkupNode] = []) {
        self.name = name
        self.attributes = attributes
        self.children = children
    }

    public static func == (lhs: MarkupElement, rhs: MarkupElement) -> Bool {
        lhs.name == rhs.name && lhs.children == rhs.children && lhs.attributes.map(\.name) == rhs.attributes.map(\.name)
            && lhs.attributes.map(\.value) == rhs.attributes.map(\.value)
    }

    /// The prefix of `name` ("" when unprefixed).
    public var prefix: String {
        guard let colon = name.firstIndex(of: ":") else { return "" }
        return String(name[..<colon])
    }

    /// The local part of `name`.
    public var localName: String {
        guard let colon = name.firstIndex(of: ":") else { return name }
        return String(name[name.index(after: colon)...])
    }

    public subscript(attribute name: String) -> String? {
        get { attributes.first { $0.name == name }?.value }
        set {
            if let index = attributes.firstIndex(where: { $0.name == name }) {
                if let newValue { attributes[index].value = newValue } else { attributes.remove(at: index) }
            } else if let newValue {
                attributes.append((name, newValue))
            }
        }
    }

    /// The element children, in order.
    public var elements: [MarkupElement] {
        children.compactMap { if case .element(let element) = $0 { element } else { nil } }
    }

    /// The first child element with this qualified name.
    public func child(_ name: String) -> MarkupElement? {
        elements.first { $0.name == name }
    }

    /// The concatenated text of the direct text children.
    public var text: String {
        children.map { if case .text(let text) = $0 { text } else { "" } }.joined()
    }

    /// The namespace URI this element declares for `prefix` ("" = default namespace), if any.
    public func declaredNamespace(forPrefix prefix: String) -> String? {
        self[attribute: prefix.isEmpty ? "xmlns" : "xmlns:\(prefix)"]
    }

    /// The prefix this element declares for namespace `uri`, if any.
    public func declaredPrefix(forNamespace uri: String) -> String? {
        for attribute in attributes where attribute.value == uri {
            if attribute.name == "xmlns" { return "" }
            if attribute.name.hasPrefix("xmlns:") { return String(attribute.name.dropFirst(6)) }
        }
        return nil
    }

    /// Serialises the element. Whitespace text is kept as parsed, so parse + serialise keeps the layout.
    public func serialized() -> String {
        var out = ""
        write(to: &out)
        return out
    }

    /// Serialisation without whitespace-only text: for comparing documents whatever their indentation.
    public func canonical() -> String {
        var copy = self
        copy.dropWhitespace()
        return copy.serialized()
    }

    private mutating func dropWhitespace() {
        children = children.compactMap { node in
            switch node {
            case .text(let text): return text.allSatisfy(\.isXMLSpace) ? nil : node
            case .comment: return nil
            case .element(var element):
                element.dropWhitespace()
                return .element(element)
            }
        }
    }

    private func write(to out: inout String) {
        out += "<" + name
        for attribute in attributes {
            out += " \(attribute.name)=\"\(escapeAttribute(attribute.value))\""
        }
        if children.isEmpty {
            out += "/>"
            return
        }
        out += ">"
        for child in children {
            switch child {
            case .element(let element): element.write(to: &out)
            case .text(let text): out += escapeText(text)
            case .comment(let text): out += "<!--\(text)-->"
            }
        }
        out += "</\(name)>"
    }

    /// Parses a document and returns its root element (the XML declaration, comments and
    /// processing instructions around it are dropped). DOCTYPE is refused.
    public static func parse(_ text: String, limit: Int = 16 << 20) throws(BrokerError) -> MarkupElement {
        let bytes = Array(text.utf8)
        guard bytes.count <= limit else {
            throw BrokerError(.invalidArgument, "XML document of \(bytes.count) bytes is larger than the \(limit)-byte limit")
        }
        var parser = MarkupParser(bytes: bytes)
        return try parser.document()
    }
}

extension Character {
    fileprivate var isXMLSpace: Bool { self == " " || self == "\t" || self == "\n" || self == "\r" || self == "\r\n" }
}

private func escapeText(_ text: String) -> String {
    guard text.contains(where: { $0 == "&" || $0 == "<" || $0 == ">" }) else { return text }
    var out = ""
    for character in text {
        switch character {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        default: out.append(character)
        }
    }
    return out
}

private func escapeAttribute(_ text: String) -> String {
    var out = ""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "\n": out += "&#10;"
        case "\r": out += "&#13;"
        case "\t": out += "&#9;"
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out
}

private struct MarkupParser {
    let bytes: [UInt8]
    var index = 0
    static let maximumDepth = 256

    init(bytes: [UInt8]) { self.bytes = bytes }

    mutating func document() throws(BrokerError) -> MarkupElement {
        if hasPrefix([0xEF, 0xBB, 0xBF]) { index += 3 }
        var root: MarkupElement?
        while true {
            skipSpace()
            guard index < bytes.count else { break }
            if hasPrefix("<?") {
                try skip(past: "?>")
            } else if hasPrefix("<!--") {
                try skip(past: "-->")
            } else if hasPrefix("<!") {
                throw error("DOCTYPE and other declarations are not accepted")
            } else if bytes[index] == UInt8(ascii: "<") {
                guard root == nil else { throw error("a second root element") }
                root = try element(depth: 0)
            } else {
                throw error("text outside the root element")
            }
        }
        guard let root else { throw BrokerError(.invalidArgument, "XML document has no root element") }
        return root
    }

    private mutating func element(depth: Int) throws(BrokerError) -> MarkupElement {
        guard depth < Self.maximumDepth else { throw error("elements nested deeper than \(Self.maximumDepth)") }
        index += 1  // "<"
        let name = readName()
        guard !name.isEmpty else { throw error("an element without a name") }
        var element = MarkupElement(name)
        while true {
            let hadSpace = skipSpace()
            guard index < bytes.count else { throw error("<\(name)> is cut off") }
            if bytes[index] == UInt8(ascii: ">") {
                index += 1
                break
            }
            if hasPrefix("/>") {
                index += 2
                return element
            }
            guard hadSpace else { throw error("no space before an attribute of <\(name)>") }
            let key = readName()
            skipSpace()
            guard !key.isEmpty, index < bytes.count, bytes[index] == UInt8(ascii: "=") else {
                throw error("a malformed attribute in <\(name)>")
            }
            index += 1
            skipSpace()
            guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") || bytes[index] == UInt8(ascii: "'") else {
                throw error("the value of \(key) in <\(name)> is not quoted")
            }
            let quote = bytes[index]
            index += 1
            let start = index
            while index < bytes.count, bytes[index] != quote {
                guard bytes[index] != UInt8(ascii: "<") else { throw error("'<' in the value of \(key) in <\(name)>") }
                index += 1
            }
            guard index < bytes.count else { throw error("the value of \(key) in <\(name)> is never closed") }
            let value = try decode(bytes[start..<index])
            index += 1
            guard element[attribute: key] == nil else { throw error("attribute \(key) appears twice in <\(name)>") }
            element.attributes.append((key, value))
        }
        // Content.
        while true {
            guard index < bytes.count else { throw error("<\(name)> is never closed") }
            if hasPrefix("</") {
                index += 2
                let closing = readName()
                skipSpace()
                guard closing == name, index < bytes.count, bytes[index] == UInt8(ascii: ">") else {
                    throw error("</\(closing)> does not close <\(name)>")
                }
                index += 1
                return element
            } else if hasPrefix("<!--") {
                let start = index + 4
                try skip(past: "-->")
                element.children.append(.comment(String(decoding: bytes[start..<(index - 3)], as: UTF8.self)))
            } else if hasPrefix("<![CDATA[") {
                let start = index + 9
                try skip(past: "]]>")
                appendText(String(decoding: bytes[start..<(index - 3)], as: UTF8.self), to: &element)
            } else if hasPrefix("<?") {
                try skip(past: "?>")
            } else if hasPrefix("<!") {
                throw error("a declaration inside <\(name)>")
            } else if bytes[index] == UInt8(ascii: "<") {
                element.children.append(.element(try self.element(depth: depth + 1)))
            } else {
                let start = index
                while index < bytes.count, bytes[index] != UInt8(ascii: "<") { index += 1 }
                appendText(try decode(bytes[start..<index]), to: &element)
            }
        }
    }

    private func appendText(_ text: String, to element: inout MarkupElement) {
        if case .text(let previous) = element.children.last {
            element.children[element.children.count - 1] = .text(previous + text)
        } else {
            element.children.append(.text(text))
        }
    }

    private func error(_ what: String) -> BrokerError {
        BrokerError(.invalidArgument, "malformed XML at byte \(index): \(what)")
    }

    private func hasPrefix(_ text: String) -> Bool { hasPrefix(Array(text.utf8)) }

    private func hasPrefix(_ prefix: [UInt8]) -> Bool {
        guard bytes.count - index >= prefix.count else { return false }
        for offset in 0..<prefix.count where bytes[index + offset] != prefix[offset] { return false }
        return true
    }

    private mutating func skip(past terminator: String) throws(BrokerError) {
        let end = Array(terminator.utf8)
        while index < bytes.count {
            if hasPrefix(end) {
                index += end.count
                return
            }
            index += 1
        }
        throw error("'\(terminator)' never comes")
    }

    @discardableResult
    private mutating func skipSpace() -> Bool {
        let start = index
        while index < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[index]) { index += 1 }
        return index > start
    }

    private mutating func readName() -> String {
        let start = index
        while index < bytes.count,
            ![0x20, 0x09, 0x0A, 0x0D, UInt8(ascii: ">"), UInt8(ascii: "/"), UInt8(ascii: "="), UInt8(ascii: "<")].contains(bytes[index])
        {
            index += 1
        }
        return String(decoding: bytes[start..<index], as: UTF8.self)
    }

    private func decode(_ slice: ArraySlice<UInt8>) throws(BrokerError) -> String {
        let text = String(decoding: slice, as: UTF8.self)
        guard text.contains("&") else { return text }
        var out = ""
        var rest = Substring(text)
        while let amp = rest.firstIndex(of: "&") {
            out += rest[..<amp]
            guard let semi = rest[amp...].firstIndex(of: ";") else { throw error("an entity without ';' in '\(text)'") }
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
                guard let value, let scalar = Unicode.Scalar(value) else { throw error("unknown entity '&\(entity);'") }
                out.unicodeScalars.append(scalar)
            }
            rest = rest[rest.index(after: semi)...]
        }
        return out + rest
    }
}
