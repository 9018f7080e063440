import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Test equipment: the tool side of the handshake, as libkvmi does it, plus the ways a real
/// tool or an attacker can misbehave. It listens, reads QEMU's struct with libkvmi's rules
/// (at least 32 bytes, at most 64 KiB, unknown tail consumed) and answers 24 bytes with the
/// SHA-1 of the shared secret.
///
/// It runs on its own threads with blocking sockets; it is never part of the broker.
public final class TestIntrospector: Sendable {
    /// How the introspector answers.
    public enum Behaviour: Sendable, Equatable, CustomStringConvertible {
        /// The 24-byte reply, as libkvmi sends it.
        case normal
        /// Reads the struct and never answers.
        case silent
        /// The correct reply, one byte per `interval`.
        case slow(interval: Duration)
        /// A 24-byte reply whose struct_size says `size` (0, 3, 23, 0xFFFFFFFF ...).
        case announcedSize(UInt32)
        /// A valid longer reply: struct_size 24 + `extra`, with an unknown tail.
        case longReply(extra: Int)
        /// A well-formed reply with a hash that is not the secret's.
        case wrongCookie
        /// Sends the first `bytes` bytes of the reply, then closes.
        case closeMidReply(bytes: Int)
        /// The reply, then `bytes` of junk right behind it.
        case flood(bytes: Int)
        /// The whole reply, then closes: a tool in a crash loop, which accepts each guest and
        /// lets go right after.
        case closeAfterReply

        public var description: String {
            switch self {
            case .normal: return "normal"
            case .silent: return "silent"
            case .slow(let interval): return "slow (one byte every \(format(interval)))"
            case .announcedSize(let size): return "struct_size \(size)"
            case .longReply(let extra): return "long reply (+\(extra) bytes)"
            case .wrongCookie: return "wrong cookie"
            case .closeMidReply(let bytes): return "close after \(bytes) reply bytes"
            case .flood(let bytes): return "flood of \(bytes) bytes after the reply"
            case .closeAfterReply: return "close after the reply"
            }
        }

        /// Parses the CLI spelling: normal, silent, slow, size=N, long=N, wrong-cookie,
        /// close-mid-reply, flood, close-after-reply.
        public init?(parsing text: String) {
            switch text {
            case "normal": self = .normal
            case "silent": self = .silent
            case "slow": self = .slow(interval: .seconds(1))
            case "wrong-cookie": self = .wrongCookie
            case "close-mid-reply": self = .closeMidReply(bytes: 10)
            case "flood": self = .flood(bytes: 1 << 20)
            case "close-after-reply": self = .closeAfterReply
            default:
                if text.hasPrefix("size="), let value = UInt32(text.dropFirst(5)) {
                    self = .announcedSize(value)
                } else if text.hasPrefix("long="), let value = Int(text.dropFirst(5)), value >= 0, value <= 65_000 {
                    self = .longReply(extra: value)
                } else {
                    return nil
                }
            }
        }
    }

    public struct Configuration: Sendable {
        public var endpoint: IntrospectorEndpoint
        /// The shared secret; its SHA-1 is the cookie. Nil sends a zero hash.
        public var secret: [UInt8]?
        public var behaviour: Behaviour
        /// Put a KVMI_GET_VERSION message right behind the reply, in the same write, as libkvmi does.
        public var sendsFirstMessage: Bool
        /// After the handshake, speak KVMI to the kernel as a real tool does first (implies the first message).
        public var kvmiClient: KVMIClientPlan?
        /// One guest at a time, as libkvmi accepts them: listen with a backlog of 0; accept one
        /// connection, read the handshake, reply with GET_VERSION behind the reply, wait (up to
        /// libkvmi's 15 s) for the kernel's GET_VERSION reply, park the connection, then accept the
        /// next (implies the first message; not combined with the KVMI client mode).
        public var serial: Bool

        public init(
            endpoint: IntrospectorEndpoint, secret: [UInt8]?, behaviour: Behaviour = .normal, sendsFirstMessage: Bool = false,
            kvmiClient: KVMIClientPlan? = nil, serial: Bool = false
        ) {
            self.endpoint = endpoint
            self.secret = secret
            self.behaviour = behaviour
            self.sendsFirstMessage = sendsFirstMessage || kvmiClient != nil || serial
            self.kvmiClient = kvmiClient
            self.serial = serial
        }
    }

    /// What one connection brought.
    public struct Record: Sendable, Equatable {
        public var handshake: ReceivedHandshake?
        public var error: String?
        public var bytesReplied: Int
        /// In KVMI client mode: what the session with the kernel saw, updated live.
        public var kvmi: KVMISessionRecord?
        /// When the connection was accepted.
        public var acceptedAt: ContinuousClock.Instant = .now
    }

    /// The KVMI_GET_VERSION request libkvmi sends first: `kvmi_msg_hdr {u16 id=2; u16 size=0; u32 seq=1}`.
    public static let getVersionMessage: [UInt8] = {
        var bytes: [UInt8] = []
        bytes.append(UInt16(2), order: .host)
        bytes.append(UInt16(0), order: .host)
        bytes.append(UInt32(1), order: .host)
        return bytes
    }()

    /// libkvmi's per-read timeout.
    static let readTimeoutMilliseconds: Int32 = 15_000

    public let configuration: Configuration
    /// Where it listens (TCP port 0 resolved).
    public let endpoint: IntrospectorEndpoint
    private let listener: Descriptor
    private let stopPipe: (Descriptor, Descriptor)
    private let state = Mutex(State())

    private struct State {
        var records: [Record] = []
        var stopped = false
        /// The accept loop plus one per slow connection.
        var runningThreads = 0
    }

    /// Binds and starts serving.
    public init(_ configuration: Configuration) throws {
        self.configuration = configuration
        (listener, endpoint) = try listenSocket(on: configuration.endpoint, backlog: configuration.serial ? 0 : 1024)
        var fds: [Int32] = [0, 0]
        guard kvmib_pipe(&fds) == 0 else { throw BrokerError(.io, "pipe2 failed", errno: errno) }
        stopPipe = (Descriptor(adopting: fds[0]), Descriptor(adopting: fds[1]))
        spawn("test-introspector") { [self] in self.acceptLoop() }
    }

    private func spawn(_ name: String, _ body: @escaping @Sendable () -> Void) {
        state.withLock { $0.runningThreads += 1 }
        let thread = Thread { [self] in
            body()
            state.withLock { $0.runningThreads -= 1 }
        }
        thread.name = name
        thread.start()
    }

    private var isStopped: Bool { state.withLock { $0.stopped } }

    /// Every connection so far.
    public var records: [Record] { state.withLock { $0.records } }

    /// Stops accepting, closes the listening socket and every connection, and returns once
    /// all its threads have finished (so descriptor counts are settled).
    public func stop() {
        let alreadyStopped = state.withLock { state -> Bool in
            defer { state.stopped = true }
            return state.stopped
        }
        if !alreadyStopped {
            var one: UInt8 = 1
            _ = write(stopPipe.1.raw, &one, 1)
        }
        let deadline = ContinuousClock.now.advanced(by: .seconds(60))
        while state.withLock({ $0.runningThreads }) > 0 && ContinuousClock.now < deadline { usleep(1000) }
    }

    deinit { stop() }

    /// Waits (polling) until `count` connections have been recorded, or `timeout` passes.
    public func waitForRecords(_ count: Int, timeout: Duration = .seconds(60)) -> [Record] {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while ContinuousClock.now < deadline {
            let current = records
            if current.count >= count { return current }
            usleep(2000)
        }
        return records
    }

    private func acceptLoop() {
        var parked: [Descriptor] = []
        defer {
            for connection in parked { connection.close() }
            listener.close()
            if case .unix(let path) = endpoint, path.hasPrefix("/") { unlink(path) }
        }
        while true {
            var fds = [pollfd(fd: listener.raw, events: Int16(POLLIN), revents: 0), pollfd(fd: stopPipe.0.raw, events: Int16(POLLIN), revents: 0)]
            fds += parked.map { pollfd(fd: $0.raw, events: Int16(POLLIN), revents: 0) }
            if poll(&fds, nfds_t(fds.count), -1) < 0 { continue }
            if fds[1].revents != 0 { return }
            // A parked connection that turns readable is the broker (or the kernel) closing, or
            // talking KVMI we don't serve here: drain it, and close on end of stream.
            var keep: [Descriptor] = []
            for (index, connection) in parked.enumerated() {
                if fds[index + 2].revents == 0 {
                    keep.append(connection)
                    continue
                }
                var buffer = [UInt8](repeating: 0, count: 4096)
                if recv(connection.raw, &buffer, buffer.count, Int32(MSG_DONTWAIT)) > 0 { keep.append(connection) } else { connection.close() }
            }
            parked = keep
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let raw = kvmib_accept(listener.raw, 0)
            if raw < 0 { continue }
            let connection = Descriptor(adopting: raw)
            if configuration.serial, configuration.behaviour == .normal {
                // The next accept waits until this guest's kernel has answered GET_VERSION.
                if let index = serve(connection, keepRecordIndex: true), awaitVersionReply(connection, record: index) {
                    parked.append(connection)
                } else {
                    connection.close()
                }
                continue
            }
            if configuration.kvmiClient != nil, configuration.behaviour == .normal {
                spawn("test-introspector-kvmi") { [self] in
                    if let index = self.serve(connection, keepRecordIndex: true) { self.runKVMI(connection, record: index) }
                    connection.close()
                }
                continue
            }
            switch configuration.behaviour {
            case .normal, .longReply, .wrongCookie, .announcedSize, .flood, .closeAfterReply:
                if serve(connection) { parked.append(connection) } else { connection.close() }
            case .silent, .slow, .closeMidReply:
                spawn("test-introspector-connection") { [self] in
                    _ = self.serve(connection)
                    connection.close()
                }
            }
        }
    }

    /// Handshake, then the KVMI client on the same socket; its progress goes into the record.
    private func runKVMI(_ connection: Descriptor, record index: Int) {
        guard let plan = configuration.kvmiClient else { return }
        state.withLock { $0.records[index].kvmi = KVMISessionRecord() }
        let client = KVMIClient(fd: connection.raw, plan: plan, stopFD: stopPipe.0.raw) { change in
            self.state.withLock { state in
                var session = state.records[index].kvmi ?? KVMISessionRecord()
                change(&session)
                state.records[index].kvmi = session
            }
        }
        client.run()
    }

    /// Serial mode: libkvmi's first round trip with the kernel, through the descriptor QEMU
    /// received: the reply to the GET_VERSION (seq 1) sent behind the handshake reply, read within
    /// 15 s. The outcome goes into the record's `kvmi` (version, or why it ended).
    private func awaitVersionReply(_ connection: Descriptor, record index: Int) -> Bool {
        var session = KVMISessionRecord()
        defer { state.withLock { [session] state in state.records[index].kvmi = session } }
        let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int64(Self.readTimeoutMilliseconds)))
        var bytes: [UInt8] = []
        var wanted = KVMIWire.headerSize
        while bytes.count < wanted {
            let remaining = ContinuousClock.now.duration(to: deadline)
            var fds = [
                pollfd(fd: connection.raw, events: Int16(POLLIN), revents: 0), pollfd(fd: stopPipe.0.raw, events: Int16(POLLIN), revents: 0),
            ]
            let ready = remaining > .zero ? poll(&fds, 2, Int32(max(1, remaining.millisecondsDouble.rounded(.up)))) : 0
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 {
                session.ended = "no reply to GET_VERSION within 15 s (is the guest hooked?)"
                return false
            }
            if fds[1].revents != 0 {
                session.ended = "test introspector stopped"
                return false
            }
            var buffer = [UInt8](repeating: 0, count: wanted - bytes.count)
            let count = recv(connection.raw, &buffer, buffer.count, 0)
            if count <= 0 {
                session.ended = "the socket was closed before the GET_VERSION reply"
                return false
            }
            bytes += buffer.prefix(count)
            if bytes.count == KVMIWire.headerSize {
                let header = KVMIWire.Header(bytes)
                guard header.id == 2, header.seq == 1, header.size >= 8, Int(header.size) <= KVMIWire.maximumMessageSize else {
                    session.ended = "expected the reply to GET_VERSION, got id \(header.id) seq \(header.seq)"
                    return false
                }
                wanted += Int(header.size)
            }
        }
        let error = bytes.read(Int32.self, at: KVMIWire.headerSize, order: .host)
        let hasVersion = error == 0 && bytes.count >= KVMIWire.headerSize + 12
        session.version = hasVersion ? bytes.read(UInt32.self, at: KVMIWire.headerSize + 8, order: .host) : 0
        if error != 0 { session.ended = "GET_VERSION answered with error \(error)" }
        return error == 0
    }

    /// Handles the handshake of one connection and records it; returns the record's index when
    /// the connection succeeded.
    private func serve(_ connection: Descriptor, keepRecordIndex: Bool) -> Int? {
        var index: Int?
        let kept = serve(connection) { record in
            self.state.withLock { state in
                state.records.append(record)
                index = state.records.count - 1
            }
        }
        return kept ? index : nil
    }

    private func serve(_ connection: Descriptor) -> Bool {
        serve(connection) { record in self.state.withLock { $0.records.append(record) } }
    }

    /// Handles one connection; returns true when it should stay open.
    private func serve(_ connection: Descriptor, recording: (Record) -> Void) -> Bool {
        var record = Record(handshake: nil, error: nil, bytesReplied: 0)
        defer { recording(record) }
        do {
            record.handshake = try readHandshake(connection.raw)
        } catch {
            record.error = "\(error)"
            return false
        }
        let cookie = configuration.secret.map { CookieHash(secret: $0) } ?? .zero
        var reply = HandshakeReply.encoded(cookieHash: cookie)
        switch configuration.behaviour {
        case .normal, .slow, .closeMidReply, .closeAfterReply:
            break
        case .silent:
            // Hold the connection without a word until the broker gives up.
            var buffer = [UInt8](repeating: 0, count: 64)
            var fds = [pollfd(fd: connection.raw, events: Int16(POLLIN), revents: 0), pollfd(fd: stopPipe.0.raw, events: Int16(POLLIN), revents: 0)]
            while poll(&fds, 2, 60_000) > 0 && fds[1].revents == 0 && recv(connection.raw, &buffer, buffer.count, 0) > 0 {}
            return false
        case .announcedSize(let size):
            reply.replaceSubrange(0..<4, with: withUnsafeBytes(of: size) { Array($0) })
        case .longReply(let extra):
            reply.replaceSubrange(0..<4, with: withUnsafeBytes(of: UInt32(24 + extra)) { Array($0) })
            reply += (0..<extra).map { UInt8(truncatingIfNeeded: 0xA0 &+ $0) }
        case .wrongCookie:
            reply = HandshakeReply.encoded(cookieHash: CookieHash(secret: Array("not the secret".utf8)))
        case .flood(let bytes):
            reply += [UInt8](repeating: 0xEE, count: bytes)
        }
        if configuration.sendsFirstMessage { reply += Self.getVersionMessage }
        switch configuration.behaviour {
        case .slow(let interval):
            for byte in reply {
                if isStopped || send(connection.raw, [byte], 1, Int32(MSG_NOSIGNAL)) != 1 { return false }
                record.bytesReplied += 1
                Thread.sleep(forTimeInterval: interval.secondsDouble)
            }
            return false
        case .closeMidReply(let bytes):
            record.bytesReplied = sendAll(connection.raw, Array(reply.prefix(bytes)))
            return false
        case .closeAfterReply:
            record.bytesReplied = sendAll(connection.raw, reply)
            return false
        default:
            record.bytesReplied = sendAll(connection.raw, reply)
            return true
        }
    }

    /// libkvmi's `read_qemu_data`: size first, bounds, then the rest with the tail consumed.
    private func readHandshake(_ fd: Int32) throws -> ReceivedHandshake {
        var reader = HandshakeRequestReader()
        while true {
            var pollFD = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&pollFD, 1, Self.readTimeoutMilliseconds) > 0 else {
                throw BrokerError(.timedOut, "no handshake from QEMU within 15 s")
            }
            let limit = min(reader.readLimit, 4096)
            var buffer = [UInt8](repeating: 0, count: limit)
            let count = recv(fd, &buffer, limit, 0)
            if count <= 0 { throw BrokerError(.peerClosed, "QEMU closed after \(reader.bytesRead) handshake bytes") }
            if let handshake = try reader.consume(buffer.prefix(count)) { return handshake }
        }
    }

    private func sendAll(_ fd: Int32, _ bytes: [UInt8]) -> Int {
        var offset = 0
        while offset < bytes.count {
            let count = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
            if count <= 0 { break }
            offset += count
        }
        return offset
    }
}
