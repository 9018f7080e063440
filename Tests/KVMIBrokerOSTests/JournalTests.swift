import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMITestIntrospector
import Logging
import Testing

@testable import KVMIBrokerDaemon

#if canImport(Glibc)
    import Glibc
#endif

/// One record of the journal's native protocol, as journald receives it: `KEY=value\n`, or
/// `KEY\n`, a 64-bit little-endian length, the value's bytes and `\n` (values with newlines).
struct JournalRecord: CustomStringConvertible {
    var fields: [(name: String, value: String)] = []

    /// nil when the datagram does not follow the protocol.
    init?(datagram bytes: [UInt8]) {
        var index = 0
        while index < bytes.count {
            guard let end = bytes[index...].firstIndex(where: { $0 == UInt8(ascii: "=") || $0 == UInt8(ascii: "\n") }) else { return nil }
            let name = String(decoding: bytes[index..<end], as: UTF8.self)
            if bytes[end] == UInt8(ascii: "=") {
                let stop = bytes[(end + 1)...].firstIndex(of: UInt8(ascii: "\n")) ?? bytes.count
                fields.append((name, String(decoding: bytes[(end + 1)..<stop], as: UTF8.self)))
                index = stop + 1
            } else {
                guard end + 9 <= bytes.count else { return nil }
                var length = 0
                for offset in 0..<8 { length |= Int(bytes[end + 1 + offset]) << (8 * offset) }
                let start = end + 9
                guard length >= 0, start + length < bytes.count, bytes[start + length] == UInt8(ascii: "\n") else { return nil }
                fields.append((name, String(decoding: bytes[start..<start + length], as: UTF8.self)))
                index = start + length + 1
            }
        }
    }

    subscript(_ name: String) -> String? { fields.last { $0.name == name }?.value }

    var description: String { fields.map { "\($0.name)=\($0.value)" }.joined(separator: " ") }
}

/// journald's side: a datagram socket bound at `DIR/journal/socket`, which the broker sees as
/// /run/systemd/journal/socket in its own mount namespace. A thread of its own receives every
/// datagram as it comes (a unix datagram socket queues only a few: the broker's logging would
/// wait for a reader otherwise).
final class JournalReceiver: @unchecked Sendable {
    let socket: NotifySocket
    private let lock = NSLock()
    private var received: [JournalRecord] = []
    private var malformedCount = 0
    private var stopped = false
    private var thread: Thread?

    init(directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory + "/journal", withIntermediateDirectories: true)
        socket = try NotifySocket(path: directory + "/journal/socket")
        let thread = Thread { [self] in receive() }
        self.thread = thread
        thread.start()
    }

    private func receive() {
        var buffer = [UInt8](repeating: 0, count: 256 * 1024)
        while !lock.withLock({ stopped }) {
            var poller = pollfd(fd: socket.descriptor, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 50) > 0 else { continue }
            let count = buffer.withUnsafeMutableBytes { recv(socket.descriptor, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { continue }
            let record = JournalRecord(datagram: Array(buffer[..<count]))
            lock.withLock {
                if let record { received.append(record) } else { malformedCount += 1 }
            }
        }
    }

    /// Ends the receiving thread (waits for it: the socket is closed only after).
    func stop() {
        lock.withLock { stopped = true }
        while thread?.isFinished == false { usleep(1000) }
    }

    /// The records received so far.
    @discardableResult
    func drain() -> [JournalRecord] { lock.withLock { received } }

    var records: [JournalRecord] { drain() }

    var malformed: Int { lock.withLock { malformedCount } }

    func records(_ identifier: String, _ message: String) -> [JournalRecord] {
        drain().filter { $0["SYSLOG_IDENTIFIER"] == identifier && ($0["MESSAGE"] ?? "").hasPrefix(message) }
    }
}

/// Captures what a logger writes (the audit logger wraps it).
final class CapturedLines: LogHandler, @unchecked Sendable {
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?
    var logLevel: Logger.Level = .trace
    private let lock = NSLock()
    private var lines: [(String, Logger.Metadata)] = []

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        lock.withLock { lines.append(("\(event.message)", metadata.merging(event.metadata ?? [:]) { $1 })) }
    }

    var captured: [(String, Logger.Metadata)] { lock.withLock { lines } }
}

/// A log handler whose first write does not return until `open()`: a writer stuck on a full pipe.
final class StuckHandler: LogHandler, @unchecked Sendable {
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?
    var logLevel: Logger.Level = .trace
    private let condition = NSCondition()
    private var isOpen = false
    private var lines: [String] = []
    private var metadataByLine: [String: Logger.Metadata] = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        condition.lock()
        lines.append("\(event.message)")
        metadataByLine["\(event.message)"] = event.metadata ?? [:]
        while !isOpen { condition.wait() }
        condition.unlock()
    }

    func open() {
        condition.lock()
        isOpen = true
        condition.broadcast()
        condition.unlock()
    }

    var written: [String] {
        condition.lock()
        defer { condition.unlock() }
        return lines
    }

    /// The metadata the record `line` came with.
    func metadata(of line: String) -> Logger.Metadata? {
        condition.lock()
        defer { condition.unlock() }
        return metadataByLine[line]
    }
}

/// What a `StreamLogHandler` wrote, for comparing lines.
final class CapturedStream: TextOutputStream, @unchecked Sendable {
    private let lock = NSLock()
    private var written = ""

    func write(_ string: String) { lock.withLock { written += string } }

    var text: String { lock.withLock { written } }
}

@Suite("Journal fields and the audit logger (no process)")
struct JournalFieldsTests {
    func field(_ fields: [(name: String, value: String)], _ name: String) -> String? { fields.first { $0.name == name }?.value }

    @Test("metadata keys become documented journal fields; values escaped and bounded; ERRNO numeric; call site in CODE_*")
    func mapping() {
        let metadata: Logger.Metadata = [
            "guest.uuid": "4b1d2c3e-0f00-4aaa-8bbb-0123456789cd", "guest.name": "evil\u{1b}[2J\nMESSAGE=forged", "qemu.pid": "4242",
            "introspector": "tool", "policy.rule": "guests.d/50-lab.conf:1", "errno": "EACCES", "policy.generation": "3",
            "session.state": "hooked", "peer.pid": "7", "message": "not the message", "9-lives": "x", "...": "dropped",
            "long": "\(String(repeating: "a", count: 5000))",
        ]
        let fields = JournalFields.fields(
            level: .notice, message: "guest hooked\u{7}", metadata: metadata, identifier: "kvmi-broker-audit", file: "Sources/X.swift",
            line: 42, function: "run()")
        #expect(fields.prefix(3).map(\.name) == ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"])
        #expect(field(fields, "MESSAGE") == "guest hooked\\x07")
        #expect(field(fields, "PRIORITY") == "5")
        #expect(field(fields, "SYSLOG_IDENTIFIER") == "kvmi-broker-audit")
        #expect(field(fields, "GUEST_UUID") == "4b1d2c3e-0f00-4aaa-8bbb-0123456789cd")
        #expect(field(fields, "GUEST_NAME") == "evil\\x1b[2J\\x0aMESSAGE=forged")
        #expect(field(fields, "QEMU_PID") == "4242")
        #expect(field(fields, "INTROSPECTOR") == "tool")
        #expect(field(fields, "RULE") == "guests.d/50-lab.conf:1")
        #expect(field(fields, "ERRNO") == "13")
        #expect(field(fields, "POLICY_GENERATION") == "3")
        #expect(field(fields, "SESSION_STATE") == "hooked")
        #expect(field(fields, "PEER_PID") == "7")
        #expect(field(fields, "KVMIB_MESSAGE") == "not the message")
        #expect(field(fields, "LIVES") == "x")
        #expect(field(fields, "CODE_FILE") == "Sources/X.swift")
        #expect(field(fields, "CODE_LINE") == "42")
        #expect(field(fields, "CODE_FUNC") == "run()")
        let long = field(fields, "LONG") ?? ""
        #expect(long.utf8.count < 600 && long.hasSuffix("...(\(5000 - JournalFields.valueLimit) more bytes)"), "\(long)")
        #expect(fields.filter { $0.name == "MESSAGE" }.count == 1)
        for (name, value) in fields {
            #expect(!name.isEmpty && name.utf8.count <= 64 && name.first!.isLetter, "\(name)")
            #expect(name.unicodeScalars.allSatisfy { ($0 >= "A" && $0 <= "Z") || ($0 >= "0" && $0 <= "9") || $0 == "_" }, "\(name)")
            #expect(!value.contains("\n"), "\(name)")
        }
        #expect(fields.count == 3 + 12 + 3, "\(fields.map(\.name))")
        // ERRNO only where a number is known.
        let errnos = [("EPIPE", "32"), ("75", "75"), ("errno 200", "200"), ("Operation not permitted", nil)].map { text, expected in
            (
                field(
                    JournalFields.fields(
                        level: .error, message: "m", metadata: ["errno": "\(text)"], identifier: "i", file: "f", line: 1, function: "g"), "ERRNO"),
                expected
            )
        }
        for (got, expected) in errnos { #expect(got == expected) }
    }

    @Test("swift-log levels as syslog priorities")
    func priorities() {
        let levels: [(Logger.Level, Int)] = [(.trace, 7), (.debug, 7), (.info, 6), (.notice, 5), (.warning, 4), (.error, 3), (.critical, 2)]
        for (level, priority) in levels { #expect(JournalFields.priority(level) == priority, "\(level)") }
    }

    @Test("without TZ the broker names the system's zone file once (no stat per record); a TZ given is kept")
    func timeZone() {
        #expect(BrokerLog.timeZoneSetting(current: nil) == ":/etc/localtime")
        #expect(BrokerLog.timeZoneSetting(current: "Europe/Bucharest") == nil)
        #expect(BrokerLog.timeZoneSetting(current: "") == nil)
    }

    @Test("JOURNAL_STREAM counts only when it names this process's stderr (device:inode)")
    func journalStream() {
        var info = stat()
        #expect(fstat(2, &info) == 0)
        #expect(BrokerLog.stderrIsJournal("\(info.st_dev):\(info.st_ino)"))
        #expect(!BrokerLog.stderrIsJournal(nil))
        #expect(!BrokerLog.stderrIsJournal("\(info.st_dev):\(info.st_ino + 1)"))
        #expect(!BrokerLog.stderrIsJournal("\(info.st_dev + 1):\(info.st_ino)"))
        #expect(!BrokerLog.stderrIsJournal("\(info.st_dev)"))
        #expect(!BrokerLog.stderrIsJournal("x:y"))
    }

    @Test("the audit logger keeps the logger's metadata; prefixed on a text handler, the audit identifier on the journal's")
    func auditLogger() throws {
        let lines = CapturedLines()
        var logger = Logger(label: "test") { _ in lines }
        logger[metadataKey: "guest.uuid"] = "u"
        logger.audit.notice("policy decision: x", metadata: ["policy.rule": "r"])
        logger.notice("plain")
        let captured = lines.captured
        #expect(captured.map(\.0) == ["audit: policy decision: x", "plain"])
        #expect(captured.first?.1["guest.uuid"] == "u" && captured.first?.1["policy.rule"] == "r")
        // A quiet broker (--log-level error) still writes the audit trail; its own notices are dropped.
        logger.logLevel = .error
        logger.audit.notice("audited")
        logger.notice("dropped")
        #expect(lines.captured.map(\.0).suffix(1) == ["audit: audited"])
        // An audit logger's audit logger is the same (no double prefix).
        logger.audit.audit.notice("once")
        #expect(lines.captured.last?.0 == "audit: once")

        let journal = Logger(label: "kvmi-broker") { _ in JournalLogHandler() }
        let handler = try #require(journal.audit.handler as? AuditLogHandler)
        #expect((handler.base as? JournalLogHandler)?.identifier == "kvmi-broker-audit")
        // The daemon's handlers write on the log writer's queue, with the same handler underneath.
        let queuedAudit = try #require(BrokerLog.handler(label: "kvmi-broker-audit", level: .info, journal: true) as? QueuedLogHandler)
        #expect(((queuedAudit.base as? AuditLogHandler)?.base as? JournalLogHandler)?.identifier == "kvmi-broker-audit")
        let queued = try #require(BrokerLog.handler(label: "kvmi-broker", level: .info, journal: true) as? QueuedLogHandler)
        #expect((queued.base as? JournalLogHandler)?.identifier == "kvmi-broker")
        #expect((BrokerLog.handler(label: "kvmi-broker", level: .info, journal: false) as? QueuedLogHandler)?.base is TextLogHandler)
        // A queued broker logger's audit logger stays queued, with the audit identifier underneath.
        let daemon = Logger(label: "kvmi-broker") { _ in QueuedLogHandler(wrapping: JournalLogHandler()) }
        let daemonAudit = try #require(daemon.audit.handler as? QueuedLogHandler)
        #expect(((daemonAudit.base as? AuditLogHandler)?.base as? JournalLogHandler)?.identifier == "kvmi-broker-audit")
        #expect(daemon.audit.logLevel == .info && daemon.audit.audit.handler is QueuedLogHandler)
    }

    @Test(
        "a log call returns while the writer is stuck (a full pipe, a busy journald); past the bound info is dropped and counted, notice and above wait; order kept",
        .timeLimit(.minutes(1)))
    func queuedWriter() throws {
        let stuck = StuckHandler()
        let writer = LogWriter(capacity: 4, label: "test.log-writer")
        let logger = Logger(label: "kvmi-broker") { _ in QueuedLogHandler(wrapping: stuck, writer: writer) }
        logger.notice("r0")
        #expect(eventually { stuck.written == ["r0"] })  // the writer is now inside a write that does not return
        // r0 is being written: r1-r3 fill the bound (4 records in all); r4-r6 are dropped.
        for index in 1...6 { logger.info("r\(index)") }  // a synchronous handler would block here, on r1
        // A notice past the bound waits for room (never dropped): from another thread.
        let noticeQueued = NSCondition()
        nonisolated(unsafe) var queued = false
        Thread.detachNewThread {
            logger.audit.notice("n7")
            noticeQueued.withLock { queued = true }
        }
        stuck.open()
        #expect(eventually { noticeQueued.withLock { queued } })
        #expect(writer.flush())
        // The drop is reported where it happened: after the records queued before it, before n7
        // (which could only be queued once the writer took r1-r3).
        #expect(
            stuck.written == [
                "r0", "r1", "r2", "r3",
                "3 log records below notice dropped: the log writer fell behind (the audit trail, warnings and errors are never dropped)",
                "audit: n7",
            ])
        // Caught up: nothing dropped any more, and a flush with nothing queued returns at once.
        logger.info("r8")
        #expect(writer.flush())
        #expect(stuck.written.last == "r8")
    }

    /// A writer whose linger (an hour) outlasts the test, so only a flush or a full queue ends
    /// it, over a handler that writes at once.
    func writerThatLingers(capacity: Int, label: String) -> (handler: StuckHandler, writer: LogWriter, logger: Logger) {
        let handler = StuckHandler()
        handler.open()
        let writer = LogWriter(capacity: capacity, label: label, linger: .seconds(3600))
        return (handler, writer, Logger(label: "kvmi-broker") { _ in QueuedLogHandler(wrapping: handler, writer: writer) })
    }

    @Test(
        "a record that finds the writer idle is written at once; records queued while it lingers after it need no wake-up; flush ends the linger",
        .timeLimit(.minutes(1)))
    func lingeringWriter() throws {
        // The queue never fills here: only `flush` can end the linger.
        let (handler, writer, logger) = writerThatLingers(capacity: 64, label: "test.log-linger")
        logger.notice("r0")
        #expect(eventually { handler.written == ["r0"] })
        // The writer took r0 alone and lingers now (without a linger it would go to sleep).
        #expect(eventually { writer.isLingering })
        for index in 1...5 { logger.notice("r\(index)") }
        // Queued while it lingers: no hand-over, and nothing written before the linger ends.
        #expect(writer.wakeUps == 1)
        #expect(handler.written == ["r0"])
        #expect(writer.flush(timeout: .seconds(30)))
        #expect(handler.written == ["r0", "r1", "r2", "r3", "r4", "r5"])
        // After the flush the writer let go: the next record hands it the queue again.
        logger.notice("r6")
        #expect(eventually { handler.written.last == "r6" })
        #expect(writer.wakeUps == 2)
        #expect(writer.flush(timeout: .seconds(30)))  // ends the linger that followed r6
    }

    /// The merge of the logger's metadata with the record's happens on the writer's thread: it
    /// must still be the logger's metadata as it was when the record was logged, under the
    /// record's own.
    @Test("a queued record carries the logger's metadata of when it was logged, under its own", .timeLimit(.minutes(1)))
    func queuedMetadata() throws {
        let (handler, writer, base) = writerThatLingers(capacity: 64, label: "test.log-meta")
        var logger = base
        logger[metadataKey: "guest.uuid"] = "one"
        logger[metadataKey: "rule"] = "logger"
        logger.notice("m0")
        #expect(eventually { writer.isLingering })
        logger.notice("m1", metadata: ["rule": "record", "errno": "EPERM"])
        logger[metadataKey: "guest.uuid"] = "two"
        logger.audit.notice("m2")
        #expect(writer.flush(timeout: .seconds(30)))
        #expect(handler.metadata(of: "m0") == ["guest.uuid": "one", "rule": "logger"])
        #expect(handler.metadata(of: "m1") == ["guest.uuid": "one", "rule": "record", "errno": "EPERM"])
        #expect(handler.metadata(of: "audit: m2") == ["guest.uuid": "two", "rule": "logger"])
    }

    @Test("a full queue ends the writer's linger: the records are written without a flush", .timeLimit(.minutes(1)))
    func fullQueueEndsTheLinger() throws {
        let (handler, writer, logger) = writerThatLingers(capacity: 4, label: "test.log-full")
        logger.info("r0")
        #expect(eventually { writer.isLingering })
        // Four info records fill the queue; the fifth would be dropped unless the writer takes them.
        for index in 1...4 { logger.info("r\(index)") }
        #expect(eventually { handler.written == ["r0", "r1", "r2", "r3", "r4"] })
        #expect(writer.flush(timeout: .seconds(30)))
    }

    /// The line swift-log's `StreamLogHandler` writes for `event`, without its timestamp (the
    /// text before the first space), and `TextLogHandler`'s with the timestamp "T".
    func bothLines(_ event: LogEvent, label: String, handlerMetadata: Logger.Metadata = [:], loggerMetadata: Logger.Metadata = [:])
        -> (stream: String, text: String)
    {
        let captured = CapturedStream()
        var stream = StreamLogHandler(label: label, stream: captured, metadataProvider: nil)
        stream.metadata = handlerMetadata
        var merged = event
        if !loggerMetadata.isEmpty {
            var all = loggerMetadata
            if let own = event.metadata { all.merge(own) { $1 } }
            merged.metadata = all
        }
        stream.log(event: merged)
        var text = TextLogHandler(label: label, metadataProvider: nil)
        text.metadata = handlerMetadata
        var bytes: [UInt8] = []
        text.appendLine(for: event, loggerMetadata: loggerMetadata, timestamp: Array("T".utf8), to: &bytes)
        let line = captured.text
        let space = line.firstIndex(of: " ") ?? line.startIndex
        return ("T" + line[space...], String(decoding: bytes, as: UTF8.self))
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String { "no \u{1b} such thing" }
    }

    @Test("the text handler writes swift-log's StreamLogHandler line, byte for byte, but its timestamp (formatted once a second)")
    func textLineAsSwiftLog() throws {
        func event(_ message: Logger.Message, _ metadata: Logger.Metadata? = nil, level: Logger.Level = .notice, error: (any Error)? = nil)
            -> LogEvent
        {
            LogEvent(
                level: level, message: message, error: error, metadata: metadata, source: "KVMIBrokerDaemon", file: #fileID,
                function: #function, line: #line)
        }
        let nested: Logger.Metadata = [
            "list": ["a", "b"], "map": ["k": "v", "j": ["x"]], "number": .stringConvertible(42), "text": "two words",
        ]
        let cases: [(LogEvent, String, Logger.Metadata, Logger.Metadata)] = [
            (event("plain"), "kvmi-broker", [:], [:]),
            (event("no label", level: .info), "", [:], [:]),
            (event("handler's only"), "kvmi-broker", ["guest.uuid": "one"], [:]),
            (event("logger's and own", ["rule": "record", "errno": "EPERM"]), "kvmi-broker", [:], ["guest.uuid": "one", "rule": "logger"]),
            (event("all three", ["z": "own"]), "x", ["a": "handler", "z": "handler"], ["m": "logger", "a": "logger"]),
            (event("nested", nested, level: .warning), "kvmi-broker", [:], ["qemu.pid": "12"]),
            (event("with an error", ["k": "v"], level: .error, error: Failure()), "kvmi-broker", [:], [:]),
            (event("error alone", level: .error, error: Failure()), "kvmi-broker", ["h": "1"], [:]),
            (event("empty own", [:]), "kvmi-broker", ["h": "1"], [:]),
        ]
        for (event, label, handlerMetadata, loggerMetadata) in cases {
            let (stream, text) = bothLines(event, label: label, handlerMetadata: handlerMetadata, loggerMetadata: loggerMetadata)
            #expect(text == stream)
        }
        // The audit handler's prefix, on the batched path too.
        let audit = AuditLogHandler(wrapping: TextLogHandler(label: "kvmi-broker", metadataProvider: nil))
        #expect(audit.lineDescriptor == STDERR_FILENO)
        var bytes: [UInt8] = []
        audit.appendLine(for: event("hooked"), loggerMetadata: ["guest.uuid": "one"], timestamp: Array("T".utf8), to: &bytes)
        #expect(String(decoding: bytes, as: UTF8.self) == "T notice kvmi-broker: guest.uuid=one [KVMIBrokerDaemon] audit: hooked\n")
        #expect(AuditLogHandler(wrapping: JournalLogHandler()).lineDescriptor == nil)
        // The timestamp: swift-log's format, in local time, for the second it is asked in.
        let fixed: time_t = 1_780_000_000
        var time = fixed
        var local = tm()
        _ = localtime_r(&time, &local)
        var expected = [CChar](repeating: 0, count: 64)
        let count = strftime(&expected, expected.count, "%Y-%m-%dT%H:%M:%S%z", &local)
        #expect(LogTimestamp.format(fixed) == expected.prefix(count).map { UInt8(bitPattern: $0) })
        #expect(String(decoding: LogTimestamp.format(fixed), as: UTF8.self).count == 24)
    }

    @Test(
        "a batch of text lines goes out in writes of whole lines up to PIPE_BUF, not a write a line; in order, audit lines prefixed",
        .timeLimit(.minutes(1)))
    func textLinesBatched() throws {
        // Close-on-exec: a process another test starts meanwhile must not hold the write end
        // (the read below ends only when every copy of it is closed).
        var ends: [Int32] = [0, 0]
        try #require(kvmib_pipe(&ends) == 0)
        defer { close(ends[0]) }
        let writer = LogWriter(capacity: 256, label: "test.log-text", linger: .seconds(3600))
        var logger = Logger(label: "kvmi-broker") { label in
            QueuedLogHandler(wrapping: TextLogHandler(label: label, descriptor: ends[1], metadataProvider: nil), writer: writer)
        }
        logger[metadataKey: "guest.uuid"] = "one"
        logger.notice("r0")
        #expect(eventually { writer.isLingering })
        #expect(writer.textWrites == 1)
        for index in 1...100 {
            if index % 2 == 0 { logger.audit.notice("r\(index)") } else { logger.notice("r\(index)", metadata: ["n": "\(index)"]) }
        }
        // (Not closed while the writer may still write to it: the number could be another test's.)
        try #require(writer.flush(timeout: .seconds(30)))
        close(ends[1])
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = read(ends[0], &chunk, chunk.count)
            if count <= 0 { break }
            output += chunk.prefix(count)
        }
        let written = String(decoding: output, as: UTF8.self).split(separator: "\n")
        // r0 alone, then the batch in whole lines of at most PIPE_BUF bytes a write (so that no
        // other writer to a pipe lands inside a line), not a write a line.
        var writes = 1
        var filled = 0
        for line in written.dropFirst() {
            let size = line.utf8.count + 1
            if filled > 0 && filled + size > Int(PIPE_BUF) {
                writes += 1
                filled = 0
            }
            filled += size
        }
        if filled > 0 { writes += 1 }
        #expect(writes >= 3 && writer.textWrites == writes, "\(writer.textWrites) writes")
        let lines = written.map { line in String(line[line.index(after: line.firstIndex(of: " ")!)...]) }
        #expect(lines.count == 101)
        #expect(lines.first == "notice kvmi-broker: guest.uuid=one [KVMIBrokerOSTests] r0")
        #expect(lines[1] == "notice kvmi-broker: guest.uuid=one n=1 [KVMIBrokerOSTests] r1")
        #expect(lines[2] == "notice kvmi-broker: guest.uuid=one [KVMIBrokerOSTests] audit: r2")
        #expect(lines.last == "notice kvmi-broker: guest.uuid=one [KVMIBrokerOSTests] audit: r100")
    }

    @Test("the test's parser reads both forms of the native protocol")
    func nativeProtocol() throws {
        var bytes = Array("MESSAGE=a\nPRIORITY=5\nMULTI\n".utf8)
        let value = Array("two\nlines".utf8)
        for offset in 0..<8 { bytes.append(UInt8((value.count >> (8 * offset)) & 0xff)) }
        bytes += value + [UInt8(ascii: "\n")] + Array("LAST=z\n".utf8)
        let record = try #require(JournalRecord(datagram: bytes))
        #expect(record.fields.map(\.name) == ["MESSAGE", "PRIORITY", "MULTI", "LAST"])
        #expect(record["MULTI"] == "two\nlines" && record["LAST"] == "z")
    }
}

extension OSLayerTests {
    /// The real broker writing to a journal: journald's socket is bound by the test and mounted
    /// over /run/systemd in the broker's own mount namespace (`unshare --mount`, as root).
    @Suite("journal: native records with fields, the audit trail under its own identifier")
    struct JournalTests {
        let uuid = GuestUUID("10a2b3c4-d5e6-4f70-8a9b-0c1d2e3f4a5b")!
        let products = productsDirectory()
        let bound = Duration.seconds(60)

        /// A fresh directory; the broker's stderr file, created first (its inode is JOURNAL_STREAM's).
        func stderrFile(_ directory: String) -> (path: String, stream: String) {
            let path = directory + "/broker.log"
            _ = FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o600])
            var info = stat()
            stat(path, &info)
            return (path, "\(info.st_dev):\(info.st_ino)")
        }

        /// `kvmi-broker run` in a mount namespace where /run/systemd is `directory` (so the
        /// journal's socket is `directory/journal/socket`), in policy mode.
        func broker(_ directory: String, tree: PolicyTree, journalStream: String?, logPath: String, extra: [String] = []) throws -> SpawnedProcess {
            var environment = ProcessInfo.processInfo.environment
            environment["JOURNAL_STREAM"] = journalStream
            environment["NOTIFY_SOCKET"] = nil
            let arguments =
                [
                    "--mount", "/bin/sh", "-c", "mount --bind \"$1\" /run/systemd && shift && exec \"$@\"", "sh", directory,
                    products.appendingPathComponent("kvmi-broker").path, "run", "--policy-root", tree.root, "--channel-socket",
                    directory + "/qemu.sock", "--control-socket", "", "--libvirt-uri", "", "--insecure-no-libvirt-identity", "--emulator",
                    try patchedQEMU(),
                ] + (geteuid() != 0 ? ["--allow-non-root-owner"] : []) + extra
            return try SpawnedProcess("/usr/bin/unshare", arguments, environment: environment, logPath: logPath)
        }

        @Test("a hooked guest: PRIORITY, SYSLOG_IDENTIFIER, GUEST_UUID, QEMU_PID, RULE...; the decision and the hook once each in kvmi-broker-audit")
        func guestSessionInTheJournal() throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let journal = try JournalReceiver(directory: directory)
            defer { journal.stop() }
            let toolSocket = directory + "/tool.sock"
            let tree = try PolicyTree(toolSocket: toolSocket)
            defer { tree.cleanUp() }
            tree.write(
                "guests.d/50-journal.conf", "[guest journal]\nMatchUUID=\(uuid)\nIntrospector=tool\nEvents=UNHOOK\nCommands=VM_READ_PHYSICAL\n")
            let tool = try ChildProcess(
                products.appendingPathComponent("kvmi-test-introspector"),
                ["--listen", "unix:\(toolSocket)", "--secret-file", tree.secret, "--kvmi", "v12", "--check-commands", "VM_READ_PHYSICAL"])
            #expect(eventually(timeout: bound) { tool.log.contains("listening") })
            let (logPath, stream) = stderrFile(directory)
            let broker = try broker(directory, tree: tree, journalStream: stream, logPath: logPath)
            defer { broker.terminate(SIGKILL, grace: 0) }

            let ready = eventually(timeout: bound) { !journal.records("kvmi-broker", "ready: the sockets listen").isEmpty }
            try #require(ready, "no 'ready' record; journal: \(journal.drain()); stderr: \(broker.log)")
            let readyRecord = journal.records("kvmi-broker", "ready: the sockets listen")[0]
            #expect(readyRecord["PRIORITY"] == "5")
            #expect(readyRecord["CODE_FILE"]?.hasSuffix("RunCommand.swift") == true, "\(readyRecord)")
            #expect(readyRecord["CODE_LINE"].flatMap { Int($0) } != nil && readyRecord["CODE_FUNC"] != nil, "\(readyRecord)")

            let qemu = try QEMUProcess(channelSocket: directory + "/qemu.sock", uuid: uuid, name: "journal-guest", kernelDouble: try kernelDouble())
            defer { qemu.stop() }
            _ = try qemu.qmp(#"{"execute":"cont"}"#)
            let hooked = eventually(timeout: bound) { !journal.records("kvmi-broker-audit", "guest hooked").isEmpty }
            try #require(hooked, "journal: \(journal.drain())\nstderr: \(broker.log)\nQEMU: \(qemu.log)")

            let decisions = journal.records("kvmi-broker-audit", "policy decision: ")
            #expect(decisions.count == 1, "\(decisions)")
            let decision = try #require(decisions.first)
            #expect(decision["PRIORITY"] == "5")
            #expect(decision["GUEST_UUID"] == "\(uuid)")
            #expect(decision["GUEST_NAME"] == "journal-guest")
            #expect(decision["QEMU_PID"] == "\(qemu.pid)")
            #expect(decision["RULE"]?.contains("50-journal.conf") == true, "\(decision)")
            #expect(decision["INTROSPECTOR"] == "tool", "\(decision)")
            #expect(decision["CODE_FILE"]?.hasSuffix("SessionDriver.swift") == true, "\(decision)")

            let hooks = journal.records("kvmi-broker-audit", "guest hooked")
            #expect(hooks.count == 1, "\(hooks)")
            let hook = try #require(hooks.first)
            #expect(hook["PRIORITY"] == "5" && hook["GUEST_UUID"] == "\(uuid)" && hook["QEMU_PID"] == "\(qemu.pid)", "\(hook)")
            #expect(hook["SESSION_STATE"] != nil && hook["RULE"] == decision["RULE"] && hook["INTROSPECTOR"] == "tool", "\(hook)")

            // A reload is audited with its generation.
            kill(broker.pid, SIGHUP)
            let reloaded = eventually(timeout: bound) { !journal.records("kvmi-broker-audit", "policy reloaded").isEmpty }
            #expect(reloaded, "\(journal.drain())")
            let reload = journal.drain().filter { $0["MESSAGE"] == "policy reloaded" }
            #expect(reload.count == 1 && reload.first?["SYSLOG_IDENTIFIER"] == "kvmi-broker-audit", "\(reload)")
            #expect(reload.first?["POLICY_GENERATION"] == "2", "\(reload)")
            #expect(eventually(timeout: bound) { !journal.records("kvmi-broker-audit", "policy reloaded: unchanged").isEmpty })

            // Each audit event once, under the audit identifier only; every record well-formed.
            let all = journal.drain()
            for message in ["policy decision: ", "guest hooked", "policy reloaded"] {
                #expect(all.filter { ($0["MESSAGE"] ?? "").hasPrefix(message) && $0["SYSLOG_IDENTIFIER"] != "kvmi-broker-audit" }.isEmpty)
            }
            #expect(all.allSatisfy { $0["PRIORITY"] != nil && $0["MESSAGE"] != nil && $0.fields.allSatisfy { !$0.name.hasPrefix("_") } })
            #expect(Set(all.compactMap { $0["SYSLOG_IDENTIFIER"] }) == ["kvmi-broker", "kvmi-broker-audit"])
            #expect(journal.malformed == 0)
            // Nothing went to stderr.
            #expect(!broker.log.contains("guest hooked") && !broker.log.contains("ready"), "\(broker.log)")
            broker.terminate(SIGTERM, grace: 30)
            tool.kill()
        }

        @Test(
            "JOURNAL_STREAM unset, or naming another file: text on stderr, audit lines prefixed 'audit: ', nothing to the journal",
            arguments: [false, true])
        func stderrWithoutTheJournal(mismatched: Bool) throws {
            let directory = freshPrivateDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let journal = try JournalReceiver(directory: directory)
            defer { journal.stop() }
            let tree = try PolicyTree(toolSocket: directory + "/tool.sock")
            defer { tree.cleanUp() }
            let (logPath, _) = stderrFile(directory)
            let (_, other) = stderrFile(directory + "/journal")  // another file: another inode
            let broker = try broker(directory, tree: tree, journalStream: mismatched ? other : nil, logPath: logPath)
            defer { broker.terminate(SIGKILL, grace: 0) }
            #expect(eventually(timeout: bound) { broker.log.contains("ready: the sockets listen") }, "\(broker.log)")
            kill(broker.pid, SIGHUP)
            #expect(eventually(timeout: bound) { broker.log.contains("audit: policy reloaded") }, "\(broker.log)")
            let lines = broker.log.split(separator: "\n")
            #expect(lines.filter { $0.contains("policy reloaded") }.count == 1, "\(broker.log)")
            #expect(lines.filter { $0.contains("policy reloaded") }.allSatisfy { $0.contains("audit: policy reloaded") })
            #expect(!lines.contains { $0.contains("audit: ready") })
            broker.terminate(SIGTERM, grace: 30)
            #expect(journal.drain().isEmpty, "\(journal.records)")
        }
    }
}
