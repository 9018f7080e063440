#if canImport(Glibc)
    import Glibc
#endif

/// The status file's JSON (a `StatusDocument`), written by hand: the same document `JSONEncoder` makes with
/// `.prettyPrinted`, `.sortedKeys` and `.iso8601` dates (a test compares them byte for
/// byte), at a fraction of the cost. During a boot storm the writer re-encodes every session
/// every 100 ms; through `Codable` that was about a fifth of the broker's CPU.
enum StatusJSON {
    static func encode(_ document: StatusDocument) -> [UInt8] {
        self.document(broker: document.broker, sessions: document.sessions.map(object))
    }

    /// The document from the broker's facts and session objects made by `object` (the writer
    /// keeps those of unchanged sessions).
    static func document(broker: BrokerStatus, sessions objects: [[UInt8]]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(160 + objects.reduce(0) { $0 + $1.count + 2 })
        out.append(contentsOf: "{\n  \"broker\" : {\n    \"pid\" : ".utf8)
        out.append(contentsOf: String(broker.pid).utf8)
        if let startTime = broker.startTime {
            out.append(contentsOf: ",\n    \"startTime\" : ".utf8)
            out.append(contentsOf: String(startTime).utf8)
        }
        out.append(contentsOf: ",\n    \"version\" : ".utf8)
        string(broker.version, to: &out)
        out.append(contentsOf: "\n  },\n  \"sessions\" : [\n".utf8)
        if objects.isEmpty { out.append(contentsOf: "\n".utf8) }
        for (index, object) in objects.enumerated() {
            if index > 0 { out.append(contentsOf: ",\n".utf8) }
            out.append(contentsOf: object)
        }
        out.append(contentsOf: (objects.isEmpty ? "  ]\n}" : "\n  ]\n}").utf8)
        return out
    }

    /// One session's object, its keys in the order `.sortedKeys` gives them.
    static func object(_ session: SessionStatus) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(512)
        append(session, to: &out)
        return out
    }

    private static func append(_ session: SessionStatus, to out: inout [UInt8]) {
        out.append(contentsOf: "    {\n".utf8)
        var first = true
        func key(_ name: String) {
            if !first { out.append(contentsOf: ",\n".utf8) }
            first = false
            out.append(contentsOf: "      \"".utf8)
            out.append(contentsOf: name.utf8)
            out.append(contentsOf: "\" : ".utf8)
        }
        if let commands = session.commands {
            key("commands")
            ids(commands, to: &out)
        }
        if let events = session.events {
            key("events")
            ids(events, to: &out)
        }
        key("failures")
        out.append(contentsOf: String(session.failures).utf8)
        if let flapping = session.flapping {
            key("flapping")
            out.append(contentsOf: (flapping ? "true" : "false").utf8)
        }
        key("hooked")
        out.append(contentsOf: (session.hooked ? "true" : "false").utf8)
        if let hookedSince = session.hookedSince {
            key("hookedSince")
            date(hookedSince.timeIntervalSince1970, to: &out)
        }
        key("hooks")
        out.append(contentsOf: String(session.hooks).utf8)
        if let identity = session.identity {
            key("identity")
            string(identity, to: &out)
        }
        if let introspector = session.introspector {
            key("introspector")
            string(introspector, to: &out)
        }
        if let lastFailure = session.lastFailure {
            key("lastFailure")
            string(lastFailure, to: &out)
        }
        if let value = session.lastHookMicroseconds {
            key("lastHookMicroseconds")
            out.append(contentsOf: String(value).utf8)
        }
        if let value = session.lastHookRequestMicroseconds {
            key("lastHookRequestMicroseconds")
            out.append(contentsOf: String(value).utf8)
        }
        key("name")
        string(session.name, to: &out)
        key("qemuPID")
        out.append(contentsOf: String(session.qemuPID).utf8)
        if let required = session.required {
            key("required")
            out.append(contentsOf: (required ? "true" : "false").utf8)
        }
        key("since")
        date(session.since.timeIntervalSince1970, to: &out)
        key("startTime")
        out.append(contentsOf: String(session.startTime).utf8)
        key("state")
        string(session.state, to: &out)
        key("uuid")
        string(session.uuid, to: &out)
        out.append(contentsOf: "\n    }".utf8)
    }

    /// An array of ids as `.prettyPrinted` writes it inside a session object.
    private static func ids(_ ids: [Int32], to out: inout [UInt8]) {
        out.append(contentsOf: "[\n".utf8)
        if ids.isEmpty { out.append(contentsOf: "\n".utf8) }
        for (index, id) in ids.enumerated() {
            if index > 0 { out.append(contentsOf: ",\n".utf8) }
            out.append(contentsOf: "        ".utf8)
            out.append(contentsOf: String(id).utf8)
        }
        out.append(contentsOf: (ids.isEmpty ? "      ]" : "\n      ]").utf8)
    }

    /// A JSON string with `JSONEncoder`'s escapes (including `\/`).
    private static func string(_ text: String, to out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "\""): out.append(contentsOf: "\\\"".utf8)
            case UInt8(ascii: "\\"): out.append(contentsOf: "\\\\".utf8)
            case UInt8(ascii: "/"): out.append(contentsOf: "\\/".utf8)
            case 0x08: out.append(contentsOf: "\\b".utf8)
            case 0x0C: out.append(contentsOf: "\\f".utf8)
            case 0x0A: out.append(contentsOf: "\\n".utf8)
            case 0x0D: out.append(contentsOf: "\\r".utf8)
            case 0x09: out.append(contentsOf: "\\t".utf8)
            case 0..<0x20:
                let hex: [UInt8] = Array("0123456789abcdef".utf8)
                out.append(contentsOf: "\\u00".utf8)
                out.append(hex[Int(byte >> 4)])
                out.append(hex[Int(byte & 0xF)])
            default: out.append(byte)
            }
        }
        out.append(UInt8(ascii: "\""))
    }

    /// ISO 8601 in UTC to the second, as `JSONEncoder.DateEncodingStrategy.iso8601` writes it.
    private static func date(_ seconds: Double, to out: inout [UInt8]) {
        var time = time_t(seconds.rounded(.down))
        var parts = tm()
        gmtime_r(&time, &parts)
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let text =
            "\"\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))Z\""
        out.append(contentsOf: text.utf8)
    }
}
