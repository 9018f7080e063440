import Foundation
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// A handler whose records the log writer renders into a buffer and writes a batch's lines
/// together (`LogWriter.textWriteLimit` bytes of whole lines a `write`), instead of calling
/// `log(event:)` (a formatted line and a `write` each).
protocol TextLineRendering {
    /// Where this handler's lines go; nil when it does not write text lines (the writer then
    /// calls `log(event:)`).
    var lineDescriptor: Int32? { get }
    /// Appends the line `log(event:)` writes, with `loggerMetadata` under the event's own and
    /// `timestamp` in front.
    func appendLine(for event: LogEvent, loggerMetadata: Logger.Metadata, timestamp: [UInt8], to text: inout [UInt8])
}

/// The broker's log on stderr as text: the line swift-log's `StreamLogHandler` writes, byte for
/// byte (`timestamp level label: key=value ... [source] message`), so that what administrators
/// read and grep stays as it was. Made for `LogWriter`, which writes a batch of these lines
/// together: in a boot storm, two audit lines per guest were a `write` each and most of the log
/// writer's time (measured with `perf record` during `kvmi-bench scale --guests 1000`: the
/// system calls, `strftime` for every line and the metadata merged twice).
public struct TextLogHandler: LogHandler, TextLineRendering {
    public let label: String
    /// The descriptor written to (stderr unless a test says otherwise).
    public let descriptor: Int32
    public var logLevel: Logger.Level = .info
    public var metadataProvider: Logger.MetadataProvider?
    public var metadata: Logger.Metadata = [:]

    /// With the process's metadata provider by default, as `StreamLogHandler.standardError`.
    public init(
        label: String, descriptor: Int32 = STDERR_FILENO, metadataProvider: Logger.MetadataProvider? = LoggingSystem.metadataProvider
    ) {
        self.label = label
        self.descriptor = descriptor
        self.metadataProvider = metadataProvider
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// Writes one line at once (a record that does not go through `LogWriter`).
    public func log(event: LogEvent) {
        var stamp = LogTimestamp()
        var line: [UInt8] = []
        appendLine(for: event, loggerMetadata: [:], timestamp: stamp.current(), to: &line)
        Self.write(line, to: descriptor)
    }

    var lineDescriptor: Int32? { descriptor }

    func appendLine(for event: LogEvent, loggerMetadata: Logger.Metadata, timestamp: [UInt8], to text: inout [UInt8]) {
        text.append(contentsOf: timestamp)
        text.append(UInt8(ascii: " "))
        text.append(contentsOf: "\(event.level)".utf8)
        if !label.isEmpty { text.append(UInt8(ascii: " ")) }
        text.append(contentsOf: label.utf8)
        text.append(UInt8(ascii: ":"))
        appendMetadata(of: event, loggerMetadata: loggerMetadata, to: &text)
        text.append(contentsOf: " [".utf8)
        text.append(contentsOf: event.source.utf8)
        text.append(contentsOf: "] ".utf8)
        text.append(contentsOf: "\(event.message)".utf8)
        text.append(UInt8(ascii: "\n"))
    }

    /// ` key=value ...`, sorted by key: this handler's metadata, then the provider's, the
    /// logger's, the record's own and its error, each over the one before (as swift-log merges
    /// them); nothing when all are empty.
    private func appendMetadata(of event: LogEvent, loggerMetadata: Logger.Metadata, to text: inout [UInt8]) {
        let provided = metadataProvider?.get() ?? [:]
        var all: Logger.Metadata
        if metadata.isEmpty && provided.isEmpty {
            all = loggerMetadata  // the usual case under `QueuedLogHandler`: no copy
        } else {
            all = metadata
            if !provided.isEmpty { all.merge(provided) { $1 } }
            if !loggerMetadata.isEmpty { all.merge(loggerMetadata) { $1 } }
        }
        if let explicit = event.metadata, !explicit.isEmpty {
            if all.isEmpty { all = explicit } else { all.merge(explicit) { $1 } }
        }
        if let error = event.error {
            all["error.message"] = "\(error)"
            all["error.type"] = "\(String(reflecting: type(of: error)))"
        }
        guard !all.isEmpty else { return }
        for (key, value) in all.sorted(by: { $0.key < $1.key }) {
            text.append(UInt8(ascii: " "))
            text.append(contentsOf: key.utf8)
            text.append(UInt8(ascii: "="))
            text.append(contentsOf: "\(value)".utf8)
        }
    }

    /// Writes all of `bytes` (waiting while a non-blocking descriptor is full); false when the
    /// descriptor fails (a closed pipe): the rest is lost, as it was with `fwrite`.
    @discardableResult
    static func write(_ bytes: [UInt8], to descriptor: Int32) -> Bool {
        bytes.withUnsafeBytes { buffer -> Bool in
            var offset = 0
            while offset < buffer.count {
                let count = Glibc.write(descriptor, buffer.baseAddress! + offset, buffer.count - offset)
                if count > 0 {
                    offset += count
                    continue
                }
                if count < 0 && errno == EINTR { continue }
                if count < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                    var ready = pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&ready, 1, -1)
                    continue
                }
                return false
            }
            return true
        }
    }
}

/// The timestamp of a log line as swift-log's `StreamLogHandler` writes it (local time, to the
/// second, `%Y-%m-%dT%H:%M:%S%z`), formatted once per second rather than once per line.
struct LogTimestamp {
    private var second: time_t = -1
    private var text: [UInt8] = []

    mutating func current() -> [UInt8] {
        let now = time(nil)
        if now != second {
            second = now
            text = Self.format(now)
        }
        return text
    }

    static func format(_ time: time_t) -> [UInt8] {
        var time = time
        var local = tm()
        guard localtime_r(&time, &local) != nil else { return Array("<unknown>".utf8) }
        var buffer = [CChar](repeating: 0, count: 64)
        let count = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S%z", &local)
        return buffer.prefix(count).map { UInt8(bitPattern: $0) }
    }
}
