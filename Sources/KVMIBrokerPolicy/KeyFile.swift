import CGLib
import KVMIBrokerCore

/// One `[section]` of a key file as the line scanner saw it, with the line of every key.
struct ScannedGroup {
    var name: String
    var line: Int
    var keys: [(name: String, line: Int)]
}

/// A syntax error the scanner or GLib found, with the line it is on.
struct KeyFileSyntaxError: Error {
    var line: Int
    var message: String
}

/// GLib's key-file parser does not report line numbers, so this scanner walks the same grammar
/// (`[group]`, `Key=Value`, `#` comments, blank lines) to place groups and keys on lines and to
/// report syntax errors with their line. GKeyFile remains the parser of record for values.
enum KeyFileScanner {
    static func scan(_ bytes: [UInt8]) throws(KeyFileSyntaxError) -> [ScannedGroup] {
        var groups: [ScannedGroup] = []
        var lineNumber = 0
        for rawLine in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            lineNumber += 1
            if let nul = rawLine.firstIndex(of: 0) {
                // GKeyFile would cut the value at the NUL (C strings): `SecretFile=/a\0/b` would read as /a.
                throw KeyFileSyntaxError(
                    line: lineNumber, message: "the line holds a NUL byte (at byte \(nul - rawLine.startIndex + 1)); policy files are text")
            }
            guard let text = String(validating: rawLine, as: UTF8.self) else {
                throw KeyFileSyntaxError(line: lineNumber, message: "the line is not valid UTF-8")
            }
            let line = text.drop(while: { $0.isWhitespace })
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("[") {
                let trimmed = Substring(line.reversed().drop(while: { $0 == " " || $0 == "\t" || $0 == "\r" }).reversed())
                let name = trimmed.dropFirst().dropLast()
                guard trimmed.count >= 2, trimmed.last == "]", !name.isEmpty, !name.contains("["), !name.contains("]"),
                    !name.unicodeScalars.contains(where: { $0.value < 0x20 })
                else {
                    throw KeyFileSyntaxError(line: lineNumber, message: "malformed section header '\(shown(trimmed))': expected '[kind name]'")
                }
                groups.append(ScannedGroup(name: String(name), line: lineNumber, keys: []))
                continue
            }
            guard let equals = line.firstIndex(of: "=") else {
                throw KeyFileSyntaxError(
                    line: lineNumber, message: "'\(shown(line))' is not 'Key=Value', a [section] header or a '#' comment")
            }
            let key = String(line[..<equals].reversed().drop(while: { $0 == " " || $0 == "\t" }).reversed())
            guard !key.isEmpty else { throw KeyFileSyntaxError(line: lineNumber, message: "'\(shown(line))' has no key before '='") }
            guard !groups.isEmpty else {
                throw KeyFileSyntaxError(line: lineNumber, message: "key '\(shown(key))' appears before any [section] header")
            }
            groups[groups.count - 1].keys.append((key, lineNumber))
        }
        return groups
    }
}

/// A loaded GKeyFile. Local to one parse; not shared between threads.
final class GKeyFileHandle {
    private let file: OpaquePointer

    /// Loads `bytes`; on failure finds the offending line by re-parsing growing prefixes.
    init(_ bytes: [UInt8]) throws(KeyFileSyntaxError) {
        file = g_key_file_new()
        if let message = Self.load(file, bytes[...]) {
            // deinit frees `file`: a class's deinit runs when a fully initialised init throws.
            // GKeyFile stops at the first bad line, so "the first n lines fail" is monotonic in n.
            let ends = bytes.indices.filter { bytes[$0] == UInt8(ascii: "\n") }.map { $0 + 1 } + [bytes.count]
            var low = 0
            var high = ends.count - 1
            while low < high {
                let middle = (low + high) / 2
                let probe = g_key_file_new()
                let fails = Self.load(probe, bytes[0..<ends[middle]]) != nil
                g_key_file_free(probe)
                if fails { high = middle } else { low = middle + 1 }
            }
            throw KeyFileSyntaxError(line: low + 1, message: message)
        }
    }

    deinit { g_key_file_free(file) }

    private static func load(_ file: OpaquePointer?, _ bytes: ArraySlice<UInt8>) -> String? {
        var error: UnsafeMutablePointer<GError>? = nil
        let terminated = Array(bytes) + [0]
        let ok = terminated.withUnsafeBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { chars in
                g_key_file_load_from_data(file, chars.baseAddress, gsize(chars.count - 1), G_KEY_FILE_NONE, &error)
            }
        }
        return ok != 0 ? nil : takeMessage(&error) ?? "GLib could not parse the file"
    }

    /// The unescaped string value (GLib's `\s`, `\n`, `\t`, `\\` escapes).
    func string(_ group: String, _ key: String) throws(KeyFileSyntaxError) -> String {
        var error: UnsafeMutablePointer<GError>? = nil
        // On a bad escape GLib returns a value and sets the error too.
        let value = g_key_file_get_string(file, group, key, &error)
        defer { g_free(value) }
        if let message = Self.takeMessage(&error) { throw KeyFileSyntaxError(line: 0, message: message + Self.escapes) }
        guard let value else { throw KeyFileSyntaxError(line: 0, message: "cannot read \(key)") }
        return String(cString: value)
    }

    /// A `;`-separated list, items trimmed, empty items dropped.
    func list(_ group: String, _ key: String) throws(KeyFileSyntaxError) -> [String] {
        var error: UnsafeMutablePointer<GError>? = nil
        var length: gsize = 0
        let list = g_key_file_get_string_list(file, group, key, &length, &error)
        defer { g_strfreev(list) }
        if let message = Self.takeMessage(&error) { throw KeyFileSyntaxError(line: 0, message: message + Self.escapes) }
        guard let values = list else { throw KeyFileSyntaxError(line: 0, message: "cannot read \(key)") }
        var items: [String] = []
        for index in 0..<Int(length) {
            guard let item = values[index] else { continue }
            let text = String(cString: item).trimmingWhitespace()
            if !text.isEmpty { items.append(text) }
        }
        return items
    }

    static let escapes = " (escapes: \\s \\n \\t \\r \\\\, and \\; inside lists)"

    private static func takeMessage(_ error: inout UnsafeMutablePointer<GError>?) -> String? {
        guard let pointer = error else { return nil }
        defer {
            g_error_free(pointer)
            error = nil
        }
        return pointer.pointee.message.map { String(cString: $0) }
    }
}

/// File text quoted in a diagnostic: control bytes escaped, at most 256 bytes shown.
func shown(_ text: some StringProtocol) -> String { escapedForLog(text) }

extension String {
    func trimmingWhitespace() -> String {
        let utf8 = self.utf8
        guard let first = utf8.first, let last = utf8.last, isSpace(first) || isSpace(last) else { return self }
        return String(self.drop(while: { $0.isWhitespace }).reversed().drop(while: { $0.isWhitespace }).reversed())
    }
}

private func isSpace(_ byte: UInt8) -> Bool { byte == 0x20 || (0x09...0x0D).contains(byte) || byte >= 0x80 }

/// A problem in a key file read by `KeyFileDocument`, on the line it is on (0: the file as a whole).
public struct KeyFileProblem: Error, Sendable {
    public var line: Int
    /// One sentence; file text in it is escaped (`escapedForLog`).
    public var message: String

    public init(line: Int, message: String) {
        self.line = line
        self.message = message
    }
}

/// A key file other than the policy (the daemon's `broker.conf`) read with the policy's scanner
/// and GKeyFile: groups and keys placed on their lines, values unescaped by GLib. Local to one
/// parse; not shared between threads.
public final class KeyFileDocument {
    public struct Key: Sendable {
        public var name: String
        public var line: Int
    }

    public struct Group: Sendable {
        public var name: String
        public var line: Int
        public var keys: [Key]
    }

    /// The groups in file order, a group given twice appearing twice.
    public let groups: [Group]
    private let handle: GKeyFileHandle

    public init(_ bytes: [UInt8]) throws(KeyFileProblem) {
        do {
            groups = try KeyFileScanner.scan(bytes).map {
                Group(name: $0.name, line: $0.line, keys: $0.keys.map { Key(name: $0.name, line: $0.line) })
            }
            handle = try GKeyFileHandle(bytes)
        } catch {
            throw KeyFileProblem(line: error.line, message: error.message)
        }
    }

    /// The value of `key` in `group`, unescaped (`\s \n \t \r \\`).
    public func string(_ group: String, _ key: Key) throws(KeyFileProblem) -> String {
        do {
            return try handle.string(group, key.name)
        } catch {
            throw KeyFileProblem(line: key.line, message: error.message)
        }
    }

    /// The `;`-separated list of `key` in `group`, items trimmed, empty items dropped.
    public func list(_ group: String, _ key: Key) throws(KeyFileProblem) -> [String] {
        do {
            return try handle.list(group, key.name)
        } catch {
            throw KeyFileProblem(line: key.line, message: error.message)
        }
    }
}
