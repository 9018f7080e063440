import CKVMIBroker
import Foundation
import KVMIBrokerCore
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// Where the broker's log goes, chosen once at start (`kvmi-broker run` bootstraps swift-log
/// with `BrokerLog.handler`): the systemd journal, natively, when stderr is connected to it
/// (the service), else stderr as text.
public enum BrokerLog {
    /// SYSLOG_IDENTIFIER of the broker's records in the journal.
    public static let identifier = "kvmi-broker"
    /// SYSLOG_IDENTIFIER of the audit trail (`journalctl -t kvmi-broker-audit`), and the label of
    /// the audit logger.
    public static let auditIdentifier = "kvmi-broker-audit"
    /// What starts an audit record's message on stderr.
    public static let auditPrefix = "audit: "

    /// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to the device and
    /// inode of the stream it connects to stdout/stderr (systemd.exec(5)); the broker logs
    /// natively only when they are those of its fd 2, so a child that inherited the variable
    /// with another stderr (a shell, a redirection) keeps writing to stderr.
    public static func stderrIsJournal(_ journalStream: String? = ProcessInfo.processInfo.environment["JOURNAL_STREAM"]) -> Bool {
        guard let journalStream else { return false }
        let parts = journalStream.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]) else { return false }
        var info = stat()
        guard fstat(2, &info) == 0 else { return false }
        return UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }

    /// The `TZ` to set before logging starts, or nil to leave it. Without `TZ`, glibc's
    /// `strftime` (each stderr record's timestamp) stats /etc/localtime for every record, a
    /// system call per line in a boot storm; `:/etc/localtime` names the same zone and is read
    /// once. (A time zone changed while the broker runs then shows after a restart.)
    public static func timeZoneSetting(current: String?) -> String? {
        current == nil ? ":/etc/localtime" : nil
    }

    /// The handler for a logger labelled `label`: the audit logger for `auditIdentifier`, the
    /// broker's for any other label (in the journal all are `kvmi-broker`; on stderr the line
    /// shows the label, as before).
    public static func handler(label: String, level: Logger.Level, journal: Bool) -> any LogHandler {
        var base: any LogHandler
        if journal {
            base = JournalLogHandler(identifier: identifier)
        } else {
            base = TextLogHandler(label: label == auditIdentifier ? identifier : label)
        }
        base.logLevel = level
        // Written on the log writer's queue: a slow stderr or journal never stalls a session.
        return QueuedLogHandler(wrapping: label == auditIdentifier ? AuditLogHandler(wrapping: base) : base)
    }

    /// The audit trail's handler over a logger's `handler`: the audit identifier or prefix
    /// applied to the handler that writes (inside a `QueuedLogHandler`, so the journal handler
    /// underneath still takes the audit identifier).
    public static func auditHandler(wrapping handler: any LogHandler) -> any LogHandler {
        if let queued = handler as? QueuedLogHandler {
            var audit = QueuedLogHandler(wrapping: AuditLogHandler(wrapping: queued.base), writer: queued.writer)
            audit.metadata = queued.metadata
            return audit
        }
        return AuditLogHandler(wrapping: handler)
    }

    /// Waits (bounded) until the log records queued so far are written: before the process exits.
    public static func flush() {
        LogWriter.shared.flush()
    }
}

extension Logger {
    /// The audit trail's logger with this logger's metadata (the guest, its QEMU...): its records
    /// carry SYSLOG_IDENTIFIER=kvmi-broker-audit in the journal and start with `audit: ` on
    /// stderr. Every decision, hook, unhook, RELEASE and policy reload is logged through it, once.
    public var audit: Logger {
        let handler = self.handler
        return Logger(label: BrokerLog.auditIdentifier) { _ in BrokerLog.auditHandler(wrapping: handler) }
    }
}

/// The audit logger's handler: the broker's handler with the audit identifier (journal) or
/// the `audit: ` prefix (any other handler: stderr, a test's).
public struct AuditLogHandler: LogHandler {
    public private(set) var base: any LogHandler
    private let prefix: String

    public init(wrapping base: any LogHandler) {
        if let audit = base as? AuditLogHandler {
            self = audit
        } else if var journal = base as? JournalLogHandler {
            journal.identifier = BrokerLog.auditIdentifier
            self.base = journal
            prefix = ""
        } else {
            self.base = base
            prefix = BrokerLog.auditPrefix
        }
    }

    public func log(event: LogEvent) {
        base.log(event: prefixed(event))
    }

    private func prefixed(_ event: LogEvent) -> LogEvent {
        guard !prefix.isEmpty else { return event }
        var event = event
        event.message = "\(prefix)\(event.message)"
        return event
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { base[metadataKey: key] }
        set { base[metadataKey: key] = newValue }
    }

    public var metadata: Logger.Metadata {
        get { base.metadata }
        set { base.metadata = newValue }
    }

    public var metadataProvider: Logger.MetadataProvider? {
        get { base.metadataProvider }
        set { base.metadataProvider = newValue }
    }

    /// The broker's level, but never above notice: `--log-level warning` or `error` quiets the
    /// broker's own lines, not the audit trail (its records are notice and above, apart from the
    /// info of a reload that changed nothing for a guest).
    public var logLevel: Logger.Level {
        get { min(base.logLevel, .notice) }
        set { base.logLevel = newValue }
    }
}

extension AuditLogHandler: TextLineRendering {
    var lineDescriptor: Int32? { (base as? any TextLineRendering)?.lineDescriptor }

    func appendLine(for event: LogEvent, loggerMetadata: Logger.Metadata, timestamp: [UInt8], to text: inout [UInt8]) {
        (base as? any TextLineRendering)?.appendLine(for: prefixed(event), loggerMetadata: loggerMetadata, timestamp: timestamp, to: &text)
    }
}

/// Writes records to the systemd journal natively (sd_journal_sendv(3), libsystemd): MESSAGE,
/// PRIORITY, SYSLOG_IDENTIFIER, CODE_FILE/CODE_LINE/CODE_FUNC and the logger's metadata as
/// fields (`JournalFields`). A record the journal does not take is written to stderr instead.
public struct JournalLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    public var logLevel: Logger.Level = .info
    /// SYSLOG_IDENTIFIER: `kvmi-broker`, or `kvmi-broker-audit` for the audit trail.
    public var identifier: String

    public init(identifier: String = BrokerLog.identifier) {
        self.identifier = identifier
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadataProvider?.get() ?? [:]
        all.merge(metadata) { $1 }
        if let more = event.metadata { all.merge(more) { $1 } }
        let fields = JournalFields.fields(
            level: event.level, message: "\(event.message)", metadata: all, identifier: identifier, file: event.file, line: event.line,
            function: event.function)
        guard JournalFields.send(fields) < 0 else { return }
        var fallback = StreamLogHandler.standardError(label: identifier)
        fallback.logLevel = logLevel
        fallback.metadata = all
        var line = event
        line.metadata = nil
        if identifier == BrokerLog.auditIdentifier { line.message = "\(BrokerLog.auditPrefix)\(event.message)" }
        fallback.log(event: line)
    }
}

/// The journal fields of a record: pure, so the mapping and the escaping are tested alone.
public enum JournalFields {
    /// The logger's metadata keys with a documented journal field (service.md, "Logs and the
    /// audit trail"). Other keys are upper-cased with `.` and other characters as `_`.
    public static let names: [String: String] = [
        "guest.uuid": "GUEST_UUID", "guest.name": "GUEST_NAME", "qemu.pid": "QEMU_PID", "introspector": "INTROSPECTOR",
        "policy.rule": "RULE", "errno": "ERRNO", "policy.generation": "POLICY_GENERATION", "session.state": "SESSION_STATE",
    ]
    /// Fields the handler writes itself: a metadata key never takes one of these names.
    static let reserved: Set<String> = [
        "MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "SYSLOG_FACILITY", "SYSLOG_PID", "SYSLOG_TIMESTAMP", "CODE_FILE",
        "CODE_LINE", "CODE_FUNC",
    ]
    /// The longest message and metadata value written, in bytes (escaped as in every log line).
    public static let messageLimit = 8192
    public static let valueLimit = 512

    /// syslog(3) priorities: 2 critical, 3 error, 4 warning, 5 notice, 6 info, 7 debug.
    public static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    /// The journal field for a metadata key: the documented name, else the key upper-cased with
    /// every character outside [A-Z0-9] as `_`, without leading `_` or digits (journald drops
    /// such names), at most 64 characters, prefixed `KVMIB_` if it would take one of the
    /// handler's own or documented names. nil when nothing is left.
    public static func name(forMetadataKey key: String) -> String? {
        if let name = names[key] { return name }
        var name = String(
            key.uppercased().unicodeScalars.map { scalar -> Character in
                (scalar >= "A" && scalar <= "Z") || (scalar >= "0" && scalar <= "9") ? Character(scalar) : "_"
            })
        while let first = name.first, first == "_" || first.isNumber { name.removeFirst() }
        guard !name.isEmpty else { return nil }
        if reserved.contains(name) || Set(names.values).contains(name) { name = "KVMIB_" + name }
        return String(name.prefix(64))
    }

    /// The record's fields in order: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, the metadata (sorted by
    /// field name), CODE_FILE, CODE_LINE, CODE_FUNC. Every value goes through `escapedForLog`
    /// (no control character, no newline, bounded); ERRNO is the number (`EACCES` -> 13), or
    /// left out when the value names none.
    public static func fields(
        level: Logger.Level, message: String, metadata: Logger.Metadata, identifier: String, file: String, line: UInt, function: String
    ) -> [(name: String, value: String)] {
        var fields: [(name: String, value: String)] = [
            ("MESSAGE", escapedForLog(message, limit: messageLimit)), ("PRIORITY", "\(priority(level))"), ("SYSLOG_IDENTIFIER", identifier),
        ]
        var extra: [String: String] = [:]
        for (key, value) in metadata {
            guard let name = name(forMetadataKey: key) else { continue }
            if name == "ERRNO" {
                guard let number = errnoNumber("\(value)") else { continue }
                extra[name] = "\(number)"
            } else {
                extra[name] = escapedForLog("\(value)", limit: valueLimit)
            }
        }
        fields += extra.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
        fields += [
            ("CODE_FILE", escapedForLog(file, limit: valueLimit)), ("CODE_LINE", "\(line)"),
            ("CODE_FUNC", escapedForLog(function, limit: valueLimit)),
        ]
        return fields
    }

    /// An errno from a metadata value: a number, an `errnoName` (`EACCES`, `errno 75`).
    static func errnoNumber(_ text: String) -> Int32? {
        if let number = Int32(text), number > 0 { return number }
        if text.hasPrefix("errno "), let number = Int32(text.dropFirst(6)), number > 0 { return number }
        return KVMIBrokerCore.errnoNumber(named: text)
    }

    /// Sends one record (sd_journal_sendv: the journal's native protocol on
    /// /run/systemd/journal/socket). Returns 0, or a negative errno.
    public static func send(_ fields: [(name: String, value: String)]) -> Int32 {
        let buffers = fields.map { field -> UnsafeMutableRawBufferPointer in
            let bytes = Array("\(field.name)=\(field.value)".utf8)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 1)
            buffer.copyBytes(from: bytes)
            return buffer
        }
        defer { buffers.forEach { $0.deallocate() } }
        let vectors = buffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        return vectors.withUnsafeBufferPointer { kvmib_sd_journal_sendv($0.baseAddress, Int32($0.count)) }
    }
}
