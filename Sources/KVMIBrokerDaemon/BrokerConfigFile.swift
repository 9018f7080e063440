import Foundation
import KVMIBrokerCore
import KVMIBrokerPolicy

#if canImport(Glibc)
    import Glibc
#endif

/// The defaults of `kvmi-broker run`'s options: one place for the command line's help, the
/// daemon, `broker.conf`'s schema and the example file `dist/broker.conf`.
public enum BrokerDefaults {
    public static let channelSocket = "/run/kvmi-broker/qemu.sock"
    public static let libvirtURI = "qemu:///system"
    public static let controlSocket = "/run/kvmi-broker/control.sock"
    /// Measured: `HandshakePacer` says why 64.
    public static let handshakesPerIntrospector = 64
    public static let logLevel = "info"
    /// Seconds a stop (SIGTERM, SIGINT) may take before the broker exits anyway.
    public static let stopTimeout = 10.0
    public static let abi = "v12"
    public static let backoffInitial = 0.5
    public static let backoffMax = 30.0
    public static let handshakeTimeout = 10.0
}

/// `/etc/kvmi-broker/broker.conf`: the daemon's options in a GLib key file (the policy's
/// format), one `[broker]` group holding `run`'s options by their long names; lists are
/// `;`-separated. Command-line options override the file. Read once at start: a SIGHUP
/// reloads the policy only.
public enum BrokerConfigFile {
    public static let defaultPath = "/etc/kvmi-broker/broker.conf"
    public static let group = "broker"
    /// A configuration file is small; a bigger one is refused rather than read.
    static let maximumSize = 1 << 20

    public enum Kind: Sendable, Equatable {
        /// One string, as given (may be empty where the option allows '').
        case text
        /// A whole number.
        case integer
        /// A number of seconds, such as 0.5 or 30.
        case seconds
        /// true or false (1 or 0): a flag of the command line.
        case flag
        /// A `;`-separated list: a repeatable option.
        case list
    }

    public struct Option: Sendable {
        public let key: String
        public let kind: Kind
        /// The default as the example file writes it (static mode's, for its options); empty: none
        /// (the option is off or unset).
        public let defaultValue: String

        init(_ key: String, _ kind: Kind, _ defaultValue: String = "") {
            self.key = key
            self.kind = kind
            self.defaultValue = defaultValue
        }
    }

    /// Every option of `kvmi-broker run` but `--config`, in the order of its help.
    public static let options: [Option] = [
        Option("channel-socket", .text, BrokerDefaults.channelSocket),
        Option("libvirt-uri", .text, BrokerDefaults.libvirtURI),
        Option("insecure-no-libvirt-identity", .flag, "false"),
        Option("control-socket", .text, BrokerDefaults.controlSocket),
        Option("control-group", .text),
        Option("socket-group", .text),
        Option("introspector", .text),
        Option("policy-root", .list, PolicySources.defaultRoots.joined(separator: ";")),
        Option("allow-non-root-owner", .flag, "false"),
        Option("secret-file", .text),
        Option("abi", .text, BrokerDefaults.abi),
        Option("commands", .text),
        Option("events", .text),
        Option("guest", .list),
        Option("status-file", .text),
        Option("backoff-initial", .seconds, "0.5"),
        Option("backoff-max", .seconds, "30"),
        Option("handshake-timeout", .seconds, "10"),
        Option("emulator", .list),
        Option("handshakes-per-introspector", .integer, "\(BrokerDefaults.handshakesPerIntrospector)"),
        Option("metrics-socket", .text),
        Option("metrics-group", .text),
        Option("metrics-listen", .text),
        Option("log-level", .text, BrokerDefaults.logLevel),
        Option("stop-timeout", .seconds, "10"),
    ]

    /// One key of the file: its line and its value(s) (one for all kinds but lists; a flag's is
    /// "true" or "false").
    public struct Setting: Sendable, Equatable {
        public let key: String
        public let line: Int
        public let values: [String]

        public var value: String { values.first ?? "" }
        public var flag: Bool { value == "true" }
    }

    /// What is wrong with the file: `path:line: message` (`path: message` for the file as a whole).
    public struct Problem: Error, Sendable, CustomStringConvertible {
        public let path: String
        public let line: Int
        public let message: String

        public init(path: String, line: Int, message: String) {
            self.path = path
            self.line = line
            self.message = message
        }

        public var description: String {
            line > 0 ? "\(escapedForLog(path)):\(line): \(message)" : "\(escapedForLog(path)): \(message)"
        }
    }

    /// Reads the file at `path`. A missing file is no settings unless `required` (the path was
    /// given explicitly). The file must be a regular file owned by root or by the broker's user,
    /// writable by no one else (it can turn identity checks off).
    public static func load(path: String, required: Bool) throws(Problem) -> [String: Setting] {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard descriptor >= 0 else {
            let error = errno
            if error == ENOENT && !required { return [:] }
            throw Problem(path: path, line: 0, message: "cannot read the configuration file: \(String(cString: strerror(error)))")
        }
        defer { close(descriptor) }
        var info = stat()
        guard fstat(descriptor, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
            throw Problem(path: path, line: 0, message: "not a regular file")
        }
        guard info.st_uid == 0 || info.st_uid == geteuid() else {
            throw Problem(path: path, line: 0, message: "owned by uid \(info.st_uid): the file must belong to root (or to the broker's user)")
        }
        guard info.st_mode & 0o022 == 0 else {
            throw Problem(
                path: path, line: 0,
                message: "writable by group or others (mode \(String(info.st_mode & 0o7777, radix: 8))): only its owner may write it")
        }
        guard Int(info.st_size) <= maximumSize else {
            throw Problem(path: path, line: 0, message: "larger than \(maximumSize / 1024) KiB")
        }
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size) + 1)
        var count = 0
        while count < bytes.count {
            let n = bytes.withUnsafeMutableBytes { read(descriptor, $0.baseAddress! + count, $0.count - count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw Problem(path: path, line: 0, message: "cannot read: \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            count += n
        }
        guard count <= maximumSize else { throw Problem(path: path, line: 0, message: "larger than \(maximumSize / 1024) KiB") }
        return try parse(Array(bytes.prefix(count)), path: path)
    }

    /// Parses the file's text: syntax (the policy's scanner and GKeyFile), the one `[broker]`
    /// group, known keys given once, and each value's type. What a value means (a group that
    /// exists, a level, a UUID) is the command's to check, with `Setting.line`.
    public static func parse(_ bytes: [UInt8], path: String) throws(Problem) -> [String: Setting] {
        let document: KeyFileDocument
        do {
            document = try KeyFileDocument(bytes)
        } catch {
            throw Problem(path: path, line: error.line, message: error.message)
        }
        var settings: [String: Setting] = [:]
        var seenGroup = false
        for group in document.groups {
            guard group.name == Self.group else {
                throw Problem(
                    path: path, line: group.line,
                    message: "unknown section '[\(escapedForLog(group.name, limit: 64))]': the file has one [broker] section")
            }
            guard !seenGroup else { throw Problem(path: path, line: group.line, message: "[broker] is given twice") }
            seenGroup = true
            for key in group.keys {
                guard let option = options.first(where: { $0.key == key.name }) else {
                    var message = "unknown key '\(escapedForLog(key.name, limit: 64))'"
                    if let near = closest(to: key.name) { message += " (did you mean '\(near)'?)" }
                    throw Problem(path: path, line: key.line, message: message)
                }
                if let earlier = settings[key.name] {
                    throw Problem(path: path, line: key.line, message: "\(key.name) is given twice (first on line \(earlier.line))")
                }
                settings[key.name] = try setting(option, key, document, path: path)
            }
        }
        return settings
    }

    private static func setting(_ option: Option, _ key: KeyFileDocument.Key, _ document: KeyFileDocument, path: String) throws(Problem)
        -> Setting
    {
        func refuse(_ message: String) -> Problem { Problem(path: path, line: key.line, message: "\(option.key) \(message)") }
        do {
            if option.kind == .list {
                return Setting(key: option.key, line: key.line, values: try document.list(group, key))
            }
            let value = try document.string(group, key).trimmingCharacters(in: .whitespaces)
            let shown = escapedForLog(value, limit: 64)
            switch option.kind {
            case .integer:
                guard let number = Int(value), number > 0 else { throw refuse("'\(shown)' is not a whole number greater than 0") }
                return Setting(key: option.key, line: key.line, values: ["\(number)"])
            case .seconds:
                guard let number = Double(value), number.isFinite else { throw refuse("'\(shown)' is not a number of seconds (such as 0.5 or 30)") }
                return Setting(key: option.key, line: key.line, values: [value])
            case .flag:
                switch value {
                case "true", "1": return Setting(key: option.key, line: key.line, values: ["true"])
                case "false", "0": return Setting(key: option.key, line: key.line, values: ["false"])
                default: throw refuse("'\(shown)' is not true or false")
                }
            case .text, .list:
                return Setting(key: option.key, line: key.line, values: [value])
            }
        } catch let problem as Problem {
            throw problem
        } catch let error as KeyFileProblem {
            throw Problem(path: path, line: error.line, message: "\(option.key): \(error.message)")
        } catch {
            throw Problem(path: path, line: key.line, message: "\(option.key): \(error)")
        }
    }

    /// The known key nearest to `name` (edit distance at most 3), for "did you mean".
    static func closest(to name: String) -> String? {
        func distance(_ a: [Character], _ b: [Character]) -> Int {
            var row = Array(0...b.count)
            for i in 1...max(a.count, 1) where !a.isEmpty {
                var previous = row[0]
                row[0] = i
                for j in stride(from: 1, through: b.count, by: 1) {
                    let current = row[j]
                    row[j] = min(row[j] + 1, row[j - 1] + 1, previous + (a[i - 1] == b[j - 1] ? 0 : 1))
                    previous = current
                }
            }
            return a.isEmpty ? b.count : row[b.count]
        }
        let candidates = options.map { ($0.key, distance(Array(name), Array($0.key))) }.filter { $0.1 <= 3 }
        return candidates.min { $0.1 < $1.1 }?.0
    }
}
