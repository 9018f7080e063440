import KVMIBrokerCore

/// What `kvmi-broker enroll` writes into a domain.
public struct EnrollmentOptions: Sendable, Equatable {
    /// The broker's QEMU channel socket (`kvmi-broker run --channel-socket`).
    public static let defaultChannelSocket = "/run/kvmi-broker/qemu.sock"

    public var introspector: String?
    public var required: Bool
    /// The patched QEMU, when it is not the domain's current `<emulator>`.
    public var emulator: String?
    public var channelSocket: String

    public init(introspector: String? = nil, required: Bool = false, emulator: String? = nil, channelSocket: String = defaultChannelSocket)
        throws(BrokerError)
    {
        if let introspector, introspector.isEmpty || introspector.contains(where: { $0.isNewline }) {
            throw BrokerError(.invalidArgument, "introspector name '\(introspector)' is empty or has a line break")
        }
        if let emulator, !emulator.hasPrefix("/") {
            throw BrokerError(.invalidArgument, "emulator path '\(emulator)' is not absolute")
        }
        guard channelSocket.hasPrefix("/"), !channelSocket.contains(where: { $0.isNewline }) else {
            throw BrokerError(.invalidArgument, "channel socket path '\(channelSocket)' is not an absolute path")
        }
        self.introspector = introspector
        self.required = required
        self.emulator = emulator
        self.channelSocket = channelSocket
    }
}

/// The `<qemu:commandline>` lines that connect a QEMU to the broker.
public enum QEMUCommandLine {
    /// libvirt's namespace for QEMU pass-through (`<qemu:commandline>`).
    public static let namespace = "http://libvirt.org/schemas/domain/qemu/1.0"
    public static let chardevID = "kvmib0"
    public static let objectID = "kvmib-vmi0"

    /// The four `<qemu:arg>` values enrolment adds, in order.
    public static func arguments(channelSocket: String, required: Bool) -> [String] {
        // QEMU's option syntax: a comma inside a value is written twice.
        let path = channelSocket.replacingAll(",", with: ",,")
        return [
            "-chardev", "socket,id=\(chardevID),path=\(path),reconnect-ms=1000",
            "-object", "introspection-broker,id=\(objectID),chardev=\(chardevID)" + (required ? ",required=on" : ""),
        ]
    }

    static func isOurs(option: String, value: String) -> Bool {
        (option == "-chardev" && value.hasPrefix("socket,id=\(chardevID),"))
            || (option == "-object" && value.hasPrefix("introspection-broker,id=\(objectID),"))
    }

    /// The channel socket of our `-chardev` line in a domain, if it has one.
    static func enrolledChannelSocket(in root: MarkupElement) -> String? {
        guard let prefix = qemuPrefix(in: root), let commandline = root.child(qualified(prefix, "commandline")) else { return nil }
        let values = commandline.elements.filter { $0.name == qualified(prefix, "arg") }.compactMap { $0[attribute: "value"] }
        for (option, value) in zip(values, values.dropFirst()) where option == "-chardev" && isOurs(option: option, value: value) {
            for field in value.split(separator: ",", omittingEmptySubsequences: false) where field.hasPrefix("path=") {
                return String(field.dropFirst(5))
            }
        }
        return nil
    }

    static func qemuPrefix(in root: MarkupElement) -> String? {
        root.declaredPrefix(forNamespace: namespace)
    }

    static func qualified(_ prefix: String, _ local: String) -> String { prefix.isEmpty ? local : "\(prefix):\(local)" }
}

/// The result of editing a domain definition for (un)enrolment.
public struct EnrollmentEdit: Sendable {
    /// The edited `<domain>`.
    public var domain: MarkupElement
    /// Our metadata after the edit (nil: none).
    public var metadata: IntrospectionMetadata?
    /// Our metadata element changed.
    public var metadataChanged: Bool
    /// Anything other than our metadata changed (the command line, the emulator): the domain must be redefined.
    public var definitionChanged: Bool
    /// One line per change, for people.
    public var changes: [String]

    public var changed: Bool { metadataChanged || definitionChanged }
}

/// Enrolment as a pure function of the domain XML: `enroll` is `unenroll` followed by adding
/// exactly our pieces, so running it twice changes nothing the second time, and `unenroll`
/// removes exactly what `enroll` added (and restores the emulator it replaced).
public enum Enrollment {
    /// `commandLine: false` leaves out the `<qemu:commandline>` lines: only for libvirt drivers
    /// that drop them (the test driver), so that the rest can be tested there.
    public static func enroll(_ domain: MarkupElement, options: EnrollmentOptions, commandLine: Bool = true) throws(BrokerError)
        -> EnrollmentEdit
    {
        let place = DomainDescription.placeName(domain)
        var edited = try strip(domain, place: place)
        var metadata = IntrospectionMetadata(introspector: options.introspector, required: options.required)
        if let emulator = options.emulator {
            let current = edited.child("devices")?.child("emulator")?.text.trimmingXMLSpace()
            if current != emulator {
                guard edited.child("devices") != nil else {
                    throw BrokerError(.invalidArgument, "the domain has no <devices> to hold <emulator>", at: place)
                }
                metadata.originalEmulator = current
                edited.modifyChild("devices", depth: 1) { devices in
                    if devices.child("emulator") != nil {
                        devices.modifyChild("emulator", depth: 2) { $0.children = [.text(emulator)] }
                    } else {
                        devices.insertChild(MarkupElement("emulator", children: [.text(emulator)]), depth: 2, at: 0)
                    }
                }
            }
        }
        // <metadata><kvmi:introspection .../></metadata>
        if edited.child("metadata") == nil {
            // After <name>, <uuid>, <title> and <description>, where libvirt writes it.
            let position = (edited.elements.lastIndex { ["name", "uuid", "title", "description"].contains($0.name) }).map { $0 + 1 } ?? 0
            edited.insertChild(MarkupElement("metadata"), depth: 1, at: position)
        }
        edited.modifyChild("metadata", depth: 1) { $0.appendChild(metadata.element(), depth: 2) }
        guard commandLine else { return compare(domain, edited) }
        // <qemu:commandline> with the namespace declared on <domain>.
        var prefix = QEMUCommandLine.qemuPrefix(in: edited) ?? "qemu"
        if QEMUCommandLine.qemuPrefix(in: edited) == nil {
            if edited.declaredNamespace(forPrefix: "qemu") != nil {
                throw BrokerError(.invalidArgument, "the prefix 'qemu' is bound to another namespace on <domain>", at: place)
            }
            prefix = "qemu"
            edited[attribute: "xmlns:qemu"] = QEMUCommandLine.namespace
        }
        let commandlineName = QEMUCommandLine.qualified(prefix, "commandline")
        if edited.child(commandlineName) == nil {
            edited.appendChild(MarkupElement(commandlineName), depth: 1)
        }
        edited.modifyChild(commandlineName, depth: 1) { commandline in
            for value in QEMUCommandLine.arguments(channelSocket: options.channelSocket, required: options.required) {
                commandline.appendChild(MarkupElement(QEMUCommandLine.qualified(prefix, "arg"), attributes: [("value", value)]), depth: 2)
            }
        }
        return compare(domain, edited)
    }

    public static func unenroll(_ domain: MarkupElement) throws(BrokerError) -> EnrollmentEdit {
        let place = DomainDescription.placeName(domain)
        return compare(domain, try strip(domain, place: place))
    }

    /// Removes everything enrolment adds; restores the emulator recorded in our metadata.
    static func strip(_ domain: MarkupElement, place: String) throws(BrokerError) -> MarkupElement {
        guard domain.name == "domain" else {
            throw BrokerError(.invalidArgument, "the document element is <\(domain.name)>, not <domain>", at: place)
        }
        var edited = domain
        if let ours = DomainDescription.metadataElement(in: domain) {
            let metadata = try? IntrospectionMetadata(element: ours)
            if let original = metadata?.originalEmulator {
                edited.modifyChild("devices", depth: 1) { devices in
                    devices.modifyChild("emulator", depth: 2) { $0.children = [.text(original)] }
                }
            }
            edited.modifyChild("metadata", depth: 1) { metadataElement in
                metadataElement.removeChildren { $0 == ours }
            }
            if edited.child("metadata")?.elements.isEmpty == true {
                edited.removeChildren { $0.name == "metadata" }
            }
        }
        if let prefix = QEMUCommandLine.qemuPrefix(in: edited) {
            let commandlineName = QEMUCommandLine.qualified(prefix, "commandline")
            let argName = QEMUCommandLine.qualified(prefix, "arg")
            var conflict: String?
            edited.modifyChild(commandlineName, depth: 1) { commandline in
                let args = commandline.elements
                var drop = Set<Int>()
                for index in args.indices.dropLast() where args[index].name == argName && args[index + 1].name == argName {
                    let option = args[index][attribute: "value"] ?? ""
                    let value = args[index + 1][attribute: "value"] ?? ""
                    if QEMUCommandLine.isOurs(option: option, value: value) {
                        drop.insert(index)
                        drop.insert(index + 1)
                    } else if option == "-object", value.hasPrefix("introspection-broker,"), !drop.contains(index) {
                        conflict = value
                    }
                }
                var ordinal = -1
                commandline.removeChildren { _ in
                    ordinal += 1
                    return drop.contains(ordinal)
                }
            }
            if let conflict {
                throw BrokerError(
                    .invalidArgument,
                    "the domain already has '-object \(conflict)' in <\(commandlineName)>, not added by kvmi-broker; remove it first",
                    at: place)
            }
            if edited.child(commandlineName)?.elements.isEmpty == true {
                edited.removeChildren { $0.name == commandlineName }
            }
            if !edited.usesPrefix(prefix) { edited[attribute: "xmlns:\(prefix)"] = nil }
        }
        return edited
    }

    private static func compare(_ before: MarkupElement, _ after: MarkupElement) -> EnrollmentEdit {
        let oldMetadata = DomainDescription.metadataElement(in: before)
        let newMetadata = DomainDescription.metadataElement(in: after)
        let metadataChanged = oldMetadata?.canonical() != newMetadata?.canonical()
        let definitionChanged = withoutOurMetadata(before).canonical() != withoutOurMetadata(after).canonical()
        var changes: [String] = []
        if metadataChanged {
            switch (oldMetadata, newMetadata) {
            case (nil, let new?): changes.append("metadata: added \(new.serialized())")
            case (_?, nil): changes.append("metadata: removed")
            case (_, let new?): changes.append("metadata: now \(new.serialized())")
            default: break
            }
        }
        let oldArgs = QEMUCommandLine.ourArguments(in: before)
        let newArgs = QEMUCommandLine.ourArguments(in: after)
        if oldArgs != newArgs {
            if newArgs.isEmpty {
                changes.append("qemu:commandline: removed \(oldArgs.joined(separator: " "))")
            } else {
                changes.append("qemu:commandline: \(oldArgs.isEmpty ? "added" : "now") \(newArgs.joined(separator: " "))")
            }
        }
        let oldEmulator = before.child("devices")?.child("emulator")?.text.trimmingXMLSpace()
        let newEmulator = after.child("devices")?.child("emulator")?.text.trimmingXMLSpace()
        if oldEmulator != newEmulator { changes.append("emulator: \(oldEmulator ?? "(none)") -> \(newEmulator ?? "(none)")") }
        if definitionChanged && changes.isEmpty { changes.append("definition rewritten") }
        return EnrollmentEdit(
            domain: after, metadata: newMetadata.flatMap { try? IntrospectionMetadata(element: $0) },
            metadataChanged: metadataChanged, definitionChanged: definitionChanged, changes: changes)
    }

    private static func withoutOurMetadata(_ domain: MarkupElement) -> MarkupElement {
        guard let ours = DomainDescription.metadataElement(in: domain) else { return domain }
        var copy = domain
        copy.modifyChild("metadata", depth: 1) { $0.removeChildren { $0 == ours } }
        if copy.child("metadata")?.elements.isEmpty == true { copy.removeChildren { $0.name == "metadata" } }
        return copy
    }
}

extension QEMUCommandLine {
    /// Our argument values in a domain, in order (empty when not enrolled).
    static func ourArguments(in domain: MarkupElement) -> [String] {
        guard let prefix = qemuPrefix(in: domain), let commandline = domain.child(qualified(prefix, "commandline")) else { return [] }
        let values = commandline.elements.filter { $0.name == qualified(prefix, "arg") }.map { $0[attribute: "value"] ?? "" }
        var out: [String] = []
        var index = 0
        while index + 1 < values.count {
            if isOurs(option: values[index], value: values[index + 1]) {
                out += [values[index], values[index + 1]]
                index += 2
            } else {
                index += 1
            }
        }
        return out
    }
}

extension DomainDescription {
    static func placeName(_ domain: MarkupElement) -> String {
        let name = domain.child("name")?.text.trimmingXMLSpace() ?? ""
        return name.isEmpty ? "domain" : "domain \(name)"
    }
}

extension MarkupElement {
    /// Applies `body` to the first child element named `name`.
    mutating func modifyChild(_ name: String, depth: Int, _ body: (inout MarkupElement) -> Void) {
        guard let index = children.firstIndex(where: { if case .element(let e) = $0 { e.name == name } else { false } }),
            case .element(var element) = children[index]
        else { return }
        body(&element)
        if element.children.isEmpty == false, element.elements.isEmpty, element.text.allSatisfy({ $0.isWhitespace }) {
            element.children = []
        }
        children[index] = .element(element)
    }

    /// Removes the child elements matching `predicate` (called once per element, in order), each with the indentation before it.
    mutating func removeChildren(where predicate: (MarkupElement) -> Bool) {
        var out: [MarkupNode] = []
        for node in children {
            if case .element(let element) = node, predicate(element) {
                if case .text(let text) = out.last, text.allSatisfy({ $0.isWhitespace }) { out.removeLast() }
                continue
            }
            out.append(node)
        }
        if out.count == 1, case .text(let text) = out[0], text.allSatisfy({ $0.isWhitespace }) { out = [] }
        children = out
    }

    /// Appends a child element, indented like its siblings (this element is at `depth - 1`).
    mutating func appendChild(_ element: MarkupElement, depth: Int) {
        insertChild(element, depth: depth, at: elements.count)
    }

    /// Inserts a child element before the `position`-th child element, indented like libvirt does (2 spaces a level).
    mutating func insertChild(_ element: MarkupElement, depth: Int, at position: Int) {
        let indent = "\n" + String(repeating: " ", count: 2 * depth)
        let closing = "\n" + String(repeating: " ", count: 2 * (depth - 1))
        if children.isEmpty {
            children = [.text(indent), .element(element), .text(closing)]
            return
        }
        var ordinal = 0
        for (index, node) in children.enumerated() {
            guard case .element = node else { continue }
            if ordinal == position {
                // Before this element, after its indentation.
                children.insert(contentsOf: [.element(element), .text(indent)], at: index)
                return
            }
            ordinal += 1
        }
        // At the end: before the closing indentation, if there is one.
        if case .text(let text) = children.last, text.allSatisfy({ $0.isWhitespace }) {
            children.insert(contentsOf: [.text(indent), .element(element)], at: children.count - 1)
        } else {
            children.append(contentsOf: [.text(indent), .element(element), .text(closing)])
        }
    }

    /// Whether this element or a descendant uses `prefix` in an element or attribute name.
    func usesPrefix(_ prefix: String) -> Bool {
        if self.prefix == prefix { return true }
        if attributes.contains(where: { $0.name.hasPrefix("\(prefix):") }) { return true }
        return elements.contains { $0.usesPrefix(prefix) }
    }
}

extension String {
    func replacingAll(_ target: Character, with replacement: String) -> String {
        var out = ""
        for character in self {
            if character == target { out += replacement } else { out.append(character) }
        }
        return out
    }
}
