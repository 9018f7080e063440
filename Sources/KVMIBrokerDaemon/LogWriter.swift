import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import Logging
import Synchronization

/// Writes the broker's log records on a thread of its own (`WorkThread`), so that a log call never
/// blocks the thread that makes it: a write to stderr (a pipe nobody drains quickly) or to the
/// journal's socket (journald busy or rate-limiting) would otherwise stall one of Swift's two
/// cooperative threads, and with it every guest on that thread. Formatting moves off the
/// session path too: a boot storm writes two audit records per guest.
///
/// The queue is bounded (`capacity` records, those being written included). When it is full, records below `notice` (the
/// broker's info and debug chatter) are dropped and counted, and the count is logged as a
/// warning once the writer catches up; records at `notice` and above (the audit trail,
/// warnings, errors) are never dropped: their caller waits for room, the back-pressure a
/// synchronous handler applies to every record. Records keep their order.
///
/// After a batch the writer lingers (`linger`, 2 ms) before it lets go: records queued meanwhile
/// do not wake it, and it takes them all at once when the linger ends. In a boot storm (two
/// audit records per guest, one every 100 us or so) that is a wake-up per millisecond of linger
/// instead of a futex wake-up per record on the session's thread and a sleep and a wake on the
/// writer's. A record that finds the writer idle is written at once; one that comes while it
/// lingers waits at most the linger. `flush` and a full queue end a linger early.
public final class LogWriter: @unchecked Sendable {
    /// The broker's writer (`kvmi-broker run` installs handlers that use it).
    public static let shared = LogWriter(capacity: 16_384)

    /// A record waiting to be written: the handler that writes it, the event and the logger's
    /// metadata, merged under the event's own on the writer's thread.
    fileprivate struct Pending {
        var handler: any LogHandler
        var event: LogEvent
        var loggerMetadata: Logger.Metadata

        /// The event with the logger's metadata under its own (as swift-log's handlers merge them).
        var merged: LogEvent {
            guard !loggerMetadata.isEmpty else { return event }
            var merged = event
            var all = loggerMetadata
            if let explicit = event.metadata { all.merge(explicit) { $1 } }
            merged.metadata = all
            return merged
        }
    }

    private let capacity: Int
    private let linger: Duration
    private let thread: WorkThread
    private let condition = NSCondition()
    // Guarded by `condition`.
    private var pending: [Pending] = []
    private var draining = false
    /// Records taken by the writer and not yet written: they count against `capacity` too, so
    /// at most `capacity` records are held in all.
    private var inFlight = 0
    private var dropped = 0
    /// Where the drop warning goes: the handler of the last record dropped.
    private var dropHandler: (any LogHandler)?
    /// Callers inside `flush`: a linger ends (within a millisecond) when one waits.
    private var flushing = 0
    /// The writer is lingering after a batch (for tests).
    private var lingering = false
    /// Times the writer's thread was handed the queue (woken) since it was created.
    private var handOvers = 0
    /// Writes of batched text lines (`TextLineRendering`) since it was created.
    private let textWriteCount = Atomic<Int>(0)

    /// - Parameters:
    ///   - label: the writer thread's name (at most 15 bytes).
    ///   - linger: how long the writer waits for more records after a batch before it sleeps.
    public init(capacity: Int, label: String = "kvmib-log", linger: Duration = .milliseconds(2)) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.linger = linger
        thread = WorkThread(name: label, background: true)
    }

    /// How many times a record had to hand the queue to the writer's thread (for tests: records
    /// queued while it writes or lingers need none).
    public var wakeUps: Int {
        condition.lock()
        defer { condition.unlock() }
        return handOvers
    }

    /// How many `write` calls the text lines took (for tests: one per `textWriteLimit` bytes of
    /// whole lines in a batch, not one per line).
    public var textWrites: Int { textWriteCount.load(ordering: .relaxed) }

    /// Whether the writer is lingering after a batch now (for tests).
    public var isLingering: Bool {
        condition.lock()
        defer { condition.unlock() }
        return lingering
    }

    /// Queues `event` for `handler`, with `loggerMetadata` to merge under the event's own when it
    /// is written. Returns at once unless the queue is full and the record is at `notice` or
    /// above (then it waits for room).
    public func write(_ event: LogEvent, loggerMetadata: Logger.Metadata = [:], with handler: any LogHandler) {
        condition.lock()
        if pending.count + inFlight >= capacity {
            guard event.level >= .notice else {
                dropped += 1
                dropHandler = handler
                condition.unlock()
                return
            }
            while pending.count + inFlight >= capacity { condition.wait() }
        }
        pending.append(Pending(handler: handler, event: event, loggerMetadata: loggerMetadata))
        let start = !draining
        draining = true
        if start { handOvers += 1 }
        condition.unlock()
        if start { thread.submit { self.drain() } }
    }

    /// Waits until every record queued so far is written, or `timeout` passed (a writer stuck
    /// on a full pipe must not keep the process from exiting). True when all were written.
    @discardableResult
    public func flush(timeout: Duration = .seconds(5)) -> Bool {
        let deadline = Date(timeIntervalSinceNow: timeout.secondsDouble)
        condition.lock()
        defer { condition.unlock() }
        flushing += 1  // a lingering writer stops lingering
        defer { flushing -= 1 }
        while draining || !pending.isEmpty {
            if !condition.wait(until: deadline) { return false }
        }
        return true
    }

    /// Sleeps for `linger` in slices of at most a millisecond, on the monotonic clock (a timed
    /// wait on the condition would run on the wall clock: a clock stepped back would stretch the
    /// linger, and the records with it), ending early when a flush starts or the queue is full.
    private func lingerUntilDue() {
        let due = ContinuousClock.now.advanced(by: linger)
        while true {
            let left = ContinuousClock.now.duration(to: due)
            if left <= .zero { return }
            let slice = min(left, .milliseconds(1)).components
            var request = timespec(tv_sec: Int(slice.seconds), tv_nsec: Int(slice.attoseconds / 1_000_000_000))
            _ = nanosleep(&request, nil)
            condition.lock()
            let cut = flushing > 0 || pending.count >= capacity
            condition.unlock()
            if cut { return }
        }
    }

    private func drain() {
        var lingered = false
        while true {
            condition.lock()
            inFlight = 0
            if pending.isEmpty && dropped == 0 && !lingered && flushing == 0 && linger > .zero {
                // Wait for more before letting go; a writer that queues meanwhile does not wake us.
                lingered = true
                lingering = true
                condition.broadcast()  // room again for callers waiting to queue
                condition.unlock()
                lingerUntilDue()
                condition.lock()
                lingering = false
                condition.unlock()
                continue
            }
            // The batch takes the buffer; a new one starts (no copy of the records).
            let batch = pending
            pending = []
            let lost = dropped
            let lostHandler = dropHandler
            dropped = 0
            dropHandler = nil
            if batch.isEmpty && lost == 0 {
                draining = false
                condition.broadcast()
                condition.unlock()
                return
            }
            inFlight = batch.count
            lingered = false
            // Room again (woken here, when a batch is taken, so a drop is reported after the
            // records queued before it and before those queued after): wake callers waiting
            // to queue a notice-or-above record.
            condition.broadcast()
            condition.unlock()
            write(batch)
            if lost > 0, let lostHandler {
                let warning = LogEvent(
                    level: .warning,
                    message: """
                        \(lost) log record\(lost == 1 ? "" : "s") below notice dropped: the log writer fell behind \
                        (the audit trail, warnings and errors are never dropped)
                        """,
                    metadata: nil, source: "KVMIBrokerDaemon", file: #fileID, function: #function, line: #line)
                lostHandler.log(event: warning)
            }
        }
    }
}

extension LogWriter {
    /// The most bytes of text lines one `write` takes: whole lines up to `PIPE_BUF`, which a
    /// pipe takes at once, so another writer to stderr never lands inside one of our lines
    /// (a line longer than that is written alone).
    static let textWriteLimit = Int(PIPE_BUF)

    /// Writes a batch in order: the lines of text handlers (`TextLineRendering`: stderr)
    /// gathered into writes of `textWriteLimit` bytes at most; any other handler's records one
    /// by one.
    private func write(_ batch: [Pending]) {
        var text: [UInt8] = []
        var line: [UInt8] = []
        var textDescriptor: Int32 = -1
        var stamp = LogTimestamp()
        func flushText() {
            guard !text.isEmpty else { return }
            TextLogHandler.write(text, to: textDescriptor)
            textWriteCount.add(1, ordering: .relaxed)
            text.removeAll(keepingCapacity: true)
        }
        for record in batch {
            if let renderer = record.handler as? any TextLineRendering, let descriptor = renderer.lineDescriptor {
                line.removeAll(keepingCapacity: true)
                renderer.appendLine(for: record.event, loggerMetadata: record.loggerMetadata, timestamp: stamp.current(), to: &line)
                if descriptor != textDescriptor || text.count + line.count > Self.textWriteLimit {
                    flushText()
                    textDescriptor = descriptor
                }
                text += line
            } else {
                flushText()
                record.handler.log(event: record.merged)
            }
        }
        flushText()
    }
}

/// A handler that hands each record to a `LogWriter` and returns: `base` formats and writes it
/// on the writer's thread, where the logger's metadata is merged with the record's too (a
/// dictionary copy per record, not on the session's thread). Metadata from the base's provider
/// (task-local values) is read here, on the caller's task, where it is set.
///
/// The logger's metadata is kept here, not in `base`, and handed to `base` with each record:
/// swift-log's stream handler renders all of its metadata again on every change of one key, and
/// a session sets several keys (guest, QEMU pid, introspector) as it learns them.
public struct QueuedLogHandler: LogHandler {
    public var base: any LogHandler
    let writer: LogWriter
    public var metadata: Logger.Metadata

    public init(wrapping base: any LogHandler, writer: LogWriter = .shared) {
        var base = base
        metadata = base.metadata
        if !base.metadata.isEmpty { base.metadata = [:] }
        self.base = base
        self.writer = writer
    }

    public func log(event: LogEvent) {
        guard let provider = base.metadataProvider else {
            // The merge with the logger's metadata happens on the writer's thread.
            writer.write(event, loggerMetadata: metadata, with: base)
            return
        }
        var event = event
        var handler = base
        handler.metadataProvider = nil
        // The provider's, then the logger's, then the call's own: as swift-log's handlers merge them.
        var all = provider.get()
        if !metadata.isEmpty { all.merge(metadata) { $1 } }
        if let explicit = event.metadata {
            if all.isEmpty { all = explicit } else { all.merge(explicit) { $1 } }
        }
        event.metadata = all.isEmpty ? event.metadata : all
        writer.write(event, with: handler)
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public var metadataProvider: Logger.MetadataProvider? {
        get { base.metadataProvider }
        set { base.metadataProvider = newValue }
    }

    public var logLevel: Logger.Level {
        get { base.logLevel }
        set { base.logLevel = newValue }
    }
}
