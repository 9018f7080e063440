/// An introspector's `Endpoint=` as written: a fixed endpoint, or a per-guest one whose unix path
/// or abstract name holds `{uuid}` and `{name}` (`unix:/run/acme/{uuid}.sock`), for tools that
/// run one process per guest.
///
/// Placeholders are allowed only in unix paths and abstract names: a vsock CID or port and a
/// tcp address or port cannot name a guest. They are expanded from the identity the broker
/// verified with libvirt, never from QEMU's own HELLO, and the expanded value is checked (a name
/// must not leave the directory or smuggle bytes into the path) before anything connects to it.
public struct EndpointTemplate: Sendable, Hashable, CustomStringConvertible {
    public enum Placeholder: String, Sendable, Hashable, CaseIterable {
        /// The domain's UUID, canonical lower-case 8-4-4-4-12 (36 bytes).
        case uuid
        /// The domain's libvirt name.
        case name
    }

    enum Piece: Sendable, Hashable {
        case literal(String)
        case placeholder(Placeholder)
    }

    /// As written, `unix:/run/acme/{uuid}.sock`.
    public let text: String
    /// The endpoint itself when nothing is expanded.
    public let fixed: IntrospectorEndpoint?
    /// The unix path (or `@abstract` name) after `unix:`, cut at the placeholders; empty when fixed.
    let pieces: [Piece]

    /// A fixed endpoint.
    public init(_ endpoint: IntrospectorEndpoint) {
        self.init(text: endpoint.description, fixed: endpoint, pieces: [])
    }

    private init(text: String, fixed: IntrospectorEndpoint?, pieces: [Piece]) {
        self.text = text
        self.fixed = fixed
        self.pieces = pieces
    }

    /// True when the endpoint differs per guest (it holds a placeholder).
    public var isPerGuest: Bool { fixed == nil }

    /// The placeholders used, in order of first use.
    public var placeholders: [Placeholder] {
        var seen: [Placeholder] = []
        for case .placeholder(let placeholder) in pieces where !seen.contains(placeholder) { seen.append(placeholder) }
        return seen
    }

    /// An endpoint of the same kind (for checks that depend on the kind only: unix, abstract, vsock, tcp).
    public var sample: IntrospectorEndpoint {
        fixed ?? .unix(path: substitute(uuid: "00000000-0000-0000-0000-000000000000", name: "x"))
    }

    public var description: String { text }

    /// Parses `Endpoint=`; the error says which part is wrong and why.
    public init(parsing text: String) throws(BrokerError) {
        guard text.contains("{") || text.contains("}") else {
            self.init(try IntrospectorEndpoint(parsing: text))
            return
        }
        func fail(_ why: String) -> BrokerError {
            BrokerError(.invalidEndpoint, "invalid introspector endpoint '\(escapedForLog(text))': \(why)")
        }
        guard text.hasPrefix("unix:") else {
            throw fail(
                "placeholders ({uuid}, {name}) are allowed only in unix: socket paths and abstract names; a vsock CID or port and a tcp address or port cannot be per guest"
            )
        }
        let path = text.dropFirst(5)
        guard path.hasPrefix("/") || path.hasPrefix("@") else {
            throw fail("the unix socket path must start with '/' (or '@' for the abstract namespace), not with a placeholder")
        }
        var pieces: [Piece] = []
        var literal = ""
        var rest = Substring(path)
        while let first = rest.first {
            if first == "}" { throw fail("a '}' without its '{' (placeholders are {uuid} and {name}; braces cannot be written literally)") }
            guard first == "{" else {
                literal.append(first)
                rest = rest.dropFirst()
                continue
            }
            guard let close = rest.firstIndex(of: "}") else { throw fail("a '{' without its '}'") }
            let word = rest[rest.index(after: rest.startIndex)..<close]
            guard let placeholder = Placeholder(rawValue: String(word)) else {
                throw fail("unknown placeholder '{\(escapedForLog(String(word), limit: 64))}'; use {uuid} or {name}")
            }
            if !literal.isEmpty { pieces.append(.literal(literal)) }
            literal = ""
            pieces.append(.placeholder(placeholder))
            rest = rest[rest.index(after: close)...]
        }
        if !literal.isEmpty { pieces.append(.literal(literal)) }
        self.init(text: text, fixed: nil, pieces: pieces)
        let written = pieces.map { piece -> String in if case .literal(let text) = piece { return text } else { return "x" } }.joined()
        if written.split(separator: "/", omittingEmptySubsequences: false).contains("..") {
            throw fail("'..' as a path component")
        }
        // The shortest expansion must fit already (a UUID is always 36 bytes, a name at least 1).
        do throws(BrokerError) {
            _ = try IntrospectorEndpoint(parsing: "unix:" + substitute(uuid: GuestUUID.zero.description, name: "x"))
        } catch {
            throw fail("even the shortest expansion (a 1-byte name) fails: \(error.message)")
        }
    }

    /// The endpoint for one guest, from the identity the broker verified. Throws, naming the
    /// guest UUID and the rule broken, when the result would be unsafe or too long: a name that
    /// is empty, holds '/', NUL or a control character, or makes '..' a path component, and any
    /// result longer than `sun_path` holds (107 bytes and the NUL, for paths and abstract names).
    public func expanded(uuid: GuestUUID, name: String) throws(BrokerError) -> IntrospectorEndpoint {
        if let fixed { return fixed }
        func fail(_ why: String) -> BrokerError {
            BrokerError(
                .invalidEndpoint, "the per-guest endpoint \(escapedForLog(text)) cannot be expanded for this guest: \(why)", at: "guest \(uuid)")
        }
        if placeholders.contains(.name) {
            let shown = "'\(escapedForLog(name, limit: 64))'"
            guard !name.isEmpty else { throw fail("the domain name is empty") }
            guard !name.utf8.contains(0) else { throw fail("the domain name \(shown) contains a NUL byte") }
            guard !name.contains("/") else { throw fail("the domain name \(shown) contains '/', which would reach another directory") }
            // Control characters, and what a log would have to escape (line separators,
            // bidirectional overrides, a byte-order mark): the socket path is logged and shown.
            guard !name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }), !needsEscapingForLog(name) else {
                throw fail("the domain name \(shown) contains a control character or one a log must escape")
            }
        }
        let path = substitute(uuid: uuid.description, name: name)
        if path.split(separator: "/", omittingEmptySubsequences: false).contains("..") {
            throw fail("the expanded path \(escapedForLog(path)) has '..' as a component")
        }
        guard path.utf8.count <= IntrospectorEndpoint.maximumUnixPathBytes else {
            throw fail(
                "it expands to \(path.utf8.count) bytes (\(escapedForLog(path, limit: 64))); sun_path holds at most \(IntrospectorEndpoint.maximumUnixPathBytes) and the NUL"
            )
        }
        do throws(BrokerError) {
            return try IntrospectorEndpoint(parsing: "unix:" + path)
        } catch {
            throw fail(error.message)
        }
    }

    private func substitute(uuid: String, name: String) -> String {
        var path = ""
        for piece in pieces {
            switch piece {
            case .literal(let text): path += text
            case .placeholder(.uuid): path += uuid
            case .placeholder(.name): path += name
            }
        }
        return path
    }
}
