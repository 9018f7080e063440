/// The broker <-> QEMU channel, versions 1 and 2 (Documentation/channel-protocol.md): framing
/// and every message, encoded and decoded without I/O. All integers are little-endian.
public enum Channel {
    /// The highest version the broker speaks.
    public static let version: UInt16 = 2
    /// The oldest version still understood (QEMU patches older than version 2 speak it).
    public static let minimumVersion: UInt16 = 1

    /// The version WELCOME answers a HELLO announcing `peer`: the lower of the two.
    public static func negotiatedVersion(_ peer: UInt16) -> UInt16 { min(peer, version) }
    public static let magic: UInt32 = 0x494D_564B
    public static let headerSize = 16
    public static let maximumPayload = 4096
    /// Per allow-list.
    public static let maximumIDs = 64

    public enum MessageType: UInt16, Sendable, CustomStringConvertible {
        case hello = 0x0001
        case welcome = 0x0002
        case refuse = 0x0003
        case hook = 0x0010
        case setAllowed = 0x0011
        case preunhook = 0x0012
        case unhook = 0x0013
        case release = 0x0014
        case event = 0x0040
        case result = 0x0080

        /// Smallest payload the message may have (version 1's; version 2 grows HELLO by a tail).
        public var minimumPayload: Int {
            switch self {
            case .hello: return Hello.sizeV1
            case .welcome: return 8
            case .refuse: return 4
            case .hook, .setAllowed: return 8
            case .preunhook, .unhook, .release: return 0
            case .event: return 24
            case .result: return 16
            }
        }

        public var description: String {
            switch self {
            case .hello: return "HELLO"
            case .welcome: return "WELCOME"
            case .refuse: return "REFUSE"
            case .hook: return "HOOK"
            case .setAllowed: return "SET_ALLOWED"
            case .preunhook: return "PREUNHOOK"
            case .unhook: return "UNHOOK"
            case .release: return "RELEASE"
            case .event: return "EVENT"
            case .result: return "RESULT"
            }
        }
    }

    /// One framed message: type, sequence number and payload.
    public struct Frame: Sendable, Equatable {
        public var type: UInt16
        public var seq: UInt32
        public var payload: [UInt8]

        public init(type: UInt16, seq: UInt32, payload: [UInt8]) {
            self.type = type
            self.seq = seq
            self.payload = payload
        }

        public init(_ type: MessageType, seq: UInt32, payload: [UInt8]) {
            self.init(type: type.rawValue, seq: seq, payload: payload)
        }

        public var knownType: MessageType? { MessageType(rawValue: type) }

        /// Header and payload, ready to send.
        public func encoded() -> [UInt8] {
            precondition(payload.count <= Channel.maximumPayload)
            var bytes: [UInt8] = []
            bytes.reserveCapacity(Channel.headerSize + payload.count)
            bytes.append(Channel.magic, order: .little)
            bytes.append(type, order: .little)
            bytes.append(UInt16(0), order: .little)
            bytes.append(seq, order: .little)
            bytes.append(UInt32(payload.count), order: .little)
            bytes += payload
            return bytes
        }
    }

    /// Incremental, bounded frame reader. It holds at most one largest frame's bytes.
    ///
    /// Two ways to feed it: `readLimit` bytes at a time, never a byte of the next frame (for a
    /// reader that hands the stream on after a frame), or up to `room` at a time, so that one
    /// `recv` takes a frame whole, header and payload, or several small ones: `consume` returns
    /// the first and `next` the others. The broker reads its channels the second way (one system
    /// call a frame where the first way takes two, and a third to learn that nothing follows).
    public struct FrameReader: Sendable {
        /// Bytes read and not yet returned in a frame.
        private var pending: [UInt8] = []

        public init() {}

        /// The most bytes a reader holds: one frame of the largest size.
        public static let capacity = Channel.headerSize + Channel.maximumPayload

        /// Bytes to read next without crossing into the following frame (never more than
        /// `room`, whatever a header announces: `consume` refuses an oversized one).
        public var readLimit: Int {
            guard pending.count >= Channel.headerSize else { return Channel.headerSize - pending.count }
            let size = Int(pending.read(UInt32.self, at: 12, order: .little))
            return min(room, max(0, Channel.headerSize + size - pending.count))
        }

        /// Bytes that may be read next (once `next` has returned nil: the frame in progress and
        /// more). Never less than `readLimit` then.
        public var room: Int { Self.capacity - pending.count }

        /// True between frames (nothing of the next one read yet).
        public var atFrameBoundary: Bool { pending.isEmpty }

        /// True when the bytes read hold a whole frame, or a header `next` refuses: `next` has
        /// something to say without another read.
        public var hasFrame: Bool {
            do {
                guard let size = try payloadSize() else { return false }
                return pending.count >= Channel.headerSize + size
            } catch {
                return true
            }
        }

        /// Feeds bytes read from the stream (at most `room`); returns the first frame complete.
        /// Bytes after it stay for `next`.
        public mutating func consume(_ bytes: some Collection<UInt8>) throws(BrokerError) -> Frame? {
            precondition(bytes.count <= room, "more bytes than a frame reader holds")
            pending.append(contentsOf: bytes)
            return try next()
        }

        /// The next complete frame among the bytes read; nil until there is one. A header is
        /// checked as soon as it is all there.
        public mutating func next() throws(BrokerError) -> Frame? {
            guard let size = try payloadSize() else { return nil }
            let end = Channel.headerSize + size
            guard pending.count >= end else { return nil }
            let frame = Frame(
                type: pending.read(UInt16.self, at: 4, order: .little), seq: pending.read(UInt32.self, at: 8, order: .little),
                payload: Array(pending[Channel.headerSize..<end]))
            if end == pending.count {
                pending = []
            } else {
                pending.removeSubrange(0..<end)
            }
            return frame
        }

        /// The payload size the header of the frame in progress announces, checked; nil until
        /// the header is all there.
        private func payloadSize() throws(BrokerError) -> Int? {
            guard pending.count >= Channel.headerSize else { return nil }
            let magic = pending.read(UInt32.self, at: 0, order: .little)
            guard magic == Channel.magic else {
                throw BrokerError(.protocolViolation, "channel frame has magic 0x\(String(magic, radix: 16)), not 0x494d564b")
            }
            let size = Int(pending.read(UInt32.self, at: 12, order: .little))
            guard size <= Channel.maximumPayload else {
                throw BrokerError(
                    .protocolViolation, "channel frame announces \(size) payload bytes, above the \(Channel.maximumPayload)-byte limit")
            }
            let type = pending.read(UInt16.self, at: 4, order: .little)
            if let known = MessageType(rawValue: type), size < known.minimumPayload {
                throw BrokerError(.protocolViolation, "\(known) payload is \(size) bytes, below its minimum of \(known.minimumPayload)")
            }
            return size
        }
    }

    // MARK: - Messages

    /// Version 2: what the broker told QEMU it applied with HOOK or SET_ALLOWED, which QEMU
    /// stores while hooked and echoes in HELLO, so that a restarted broker can compare it
    /// with its current decision. Opaque to QEMU; fixed-size so it needs no length checks.
    public struct Applied: Sendable, Equatable, CustomStringConvertible {
        /// Each field: a SHA-256.
        public static let fieldSize = 32
        /// Both fields, as they travel after HELLO's version 1 fields and after the ids of HOOK and SET_ALLOWED.
        public static let size = 2 * fieldSize

        /// Identifies the introspector (name, endpoint, ABI, allowed peers), not its secret.
        public let introspector: [UInt8]
        /// Digest of the allow-lists (`AllowLists.digest`).
        public let lists: [UInt8]

        public init?(introspector: [UInt8], lists: [UInt8]) {
            guard introspector.count == Self.fieldSize, lists.count == Self.fieldSize else { return nil }
            self.introspector = introspector
            self.lists = lists
        }

        /// Nil for all zeros: QEMU holds no record (not hooked, or hooked by a version 1 broker).
        /// A record with only one field set is treated the same way: it is not one QEMU stores.
        public init?(decoding bytes: some Collection<UInt8>) {
            let bytes = Array(bytes)
            guard bytes.count >= Self.size else { return nil }
            let introspector = Array(bytes[0..<Self.fieldSize])
            let lists = Array(bytes[Self.fieldSize..<Self.size])
            guard introspector.contains(where: { $0 != 0 }), lists.contains(where: { $0 != 0 }) else { return nil }
            self.introspector = introspector
            self.lists = lists
        }

        public func encoded() -> [UInt8] { introspector + lists }

        /// Hex only (safe in any log), shortened: enough to tell records apart.
        public var description: String {
            "introspector \(introspector.prefix(8).hexString), lists \(lists.prefix(8).hexString)"
        }
    }

    /// QEMU's introduction on every connection.
    public struct Hello: Sendable, Equatable {
        public struct Flags: OptionSet, Sendable, Equatable {
            public let rawValue: UInt16
            public init(rawValue: UInt16) { self.rawValue = rawValue }
            public static let hooked = Flags(rawValue: 1 << 0)
            public static let required = Flags(rawValue: 1 << 1)
            public static let held = Flags(rawValue: 1 << 2)
            public static let running = Flags(rawValue: 1 << 3)
        }

        /// Version 1's payload; version 2 appends `Applied`.
        public static let sizeV1 = 120
        public static let sizeV2 = sizeV1 + Applied.size

        public var version: UInt16
        public var flags: Flags
        public var pid: UInt32
        public var uuid: GuestUUID
        public var startTime: Int64
        public var maxGPA: UInt64
        /// The generation QEMU is hooked with, when `flags` has `.hooked`.
        public var hookedABI: ABIGeneration?
        public var capV12: Int32
        public var capV7: Int32
        /// -1 absent, 0 off, 1 on.
        public var introspectionParameter: Int32
        public var name: String
        /// Version 2: what QEMU says it was hooked with; nil when it does not know (version 1,
        /// not hooked, or hooked by a version 1 broker).
        public var applied: Applied?

        public init(
            version: UInt16 = Channel.version, flags: Flags, pid: UInt32, uuid: GuestUUID, startTime: Int64, maxGPA: UInt64,
            hookedABI: ABIGeneration?, capV12: Int32, capV7: Int32, introspectionParameter: Int32, name: String, applied: Applied? = nil
        ) {
            self.version = version
            self.flags = flags
            self.pid = pid
            self.uuid = uuid
            self.startTime = startTime
            self.maxGPA = maxGPA
            self.hookedABI = hookedABI
            self.capV12 = capV12
            self.capV7 = capV7
            self.introspectionParameter = introspectionParameter
            self.name = name
            self.applied = applied
        }

        /// Version 2 and later carry the `Applied` tail (zeros when there is none).
        public func encoded() -> [UInt8] {
            var bytes: [UInt8] = []
            bytes.append(version, order: .little)
            bytes.append(flags.rawValue, order: .little)
            bytes.append(pid, order: .little)
            bytes += uuid.bytes
            bytes.append(startTime, order: .little)
            bytes.append(maxGPA, order: .little)
            bytes.append(hookedABI?.channelCode ?? 0)
            bytes += [0, 0, 0]
            bytes.append(capV12, order: .little)
            bytes.append(capV7, order: .little)
            bytes.append(introspectionParameter, order: .little)
            bytes += HandshakeRequest.nameField(name)
            if version >= 2 { bytes += applied?.encoded() ?? [UInt8](repeating: 0, count: Applied.size) }
            return bytes
        }

        public init(decoding payload: [UInt8]) throws(BrokerError) {
            guard payload.count >= MessageType.hello.minimumPayload else {
                throw BrokerError(.protocolViolation, "HELLO payload is \(payload.count) bytes, below 120")
            }
            version = payload.read(UInt16.self, at: 0, order: .little)
            if version >= 2 {
                guard payload.count >= Self.sizeV2 else {
                    throw BrokerError(.protocolViolation, "a version \(version) HELLO is \(payload.count) bytes, below \(Self.sizeV2)")
                }
            }
            flags = Flags(rawValue: payload.read(UInt16.self, at: 2, order: .little))
            pid = payload.read(UInt32.self, at: 4, order: .little)
            uuid = GuestUUID(bytes: payload[8..<24])!
            startTime = payload.read(Int64.self, at: 24, order: .little)
            maxGPA = payload.read(UInt64.self, at: 32, order: .little)
            let abiCode = payload[40]
            if abiCode == 0 {
                hookedABI = nil
            } else {
                guard let abi = ABIGeneration(channelCode: abiCode) else {
                    throw BrokerError(.protocolViolation, "HELLO names hooked_abi \(abiCode); only 7 and 12 exist")
                }
                hookedABI = abi
            }
            capV12 = payload.read(Int32.self, at: 44, order: .little)
            capV7 = payload.read(Int32.self, at: 48, order: .little)
            introspectionParameter = payload.read(Int32.self, at: 52, order: .little)
            var nameBytes = Array(payload[56..<120])
            nameBytes[63] = 0
            name = String(decoding: nameBytes.prefix { $0 != 0 }, as: UTF8.self)
            applied = version >= 2 ? Applied(decoding: payload[Self.sizeV1..<Self.sizeV2]) : nil
            // QEMU clears its record whenever it unhooks: a record without HOOKED is not QEMU's.
            if applied != nil && !flags.contains(.hooked) {
                throw BrokerError(.protocolViolation, "HELLO names what the guest was hooked with, but says it is not hooked")
            }
        }
    }

    public static func welcome(version: UInt16) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.append(version, order: .little)
        bytes += [0, 0, 0, 0, 0, 0]
        return bytes
    }

    public static func refuse(errno: Int32, reason: String) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.append(errno, order: .little)
        bytes += Array(reason.utf8.prefix(maximumPayload - 4))
        return bytes
    }

    /// The allow-lists of HOOK and SET_ALLOWED. `[-1]` means all; empty means the kernel's defaults.
    public struct AllowLists: Sendable, Equatable {
        public var abi: ABIGeneration
        public var commands: [Int32]
        public var events: [Int32]

        public init(abi: ABIGeneration, commands: [Int32], events: [Int32]) throws(BrokerError) {
            guard commands.count <= Channel.maximumIDs, events.count <= Channel.maximumIDs else {
                throw BrokerError(.invalidArgument, "allow-lists hold at most \(Channel.maximumIDs) ids each")
            }
            for (kind, list) in [("command", commands), ("event", events)] {
                if list.contains(-1) && list.count > 1 { throw BrokerError(.invalidArgument, "a \(kind) list with -1 (all) must hold nothing else") }
                if let bad = list.first(where: { $0 < -1 }) { throw BrokerError(.invalidArgument, "\(kind) id \(bad) is not valid") }
            }
            self.abi = abi
            self.commands = commands
            self.events = events
        }

        /// Empty lists: only the kernel's defaults (for a session that is not introspected).
        public static func kernelDefaults(_ abi: ABIGeneration) -> AllowLists { AllowLists(unchecked: abi) }

        private init(unchecked abi: ABIGeneration) {
            self.abi = abi
            self.commands = []
            self.events = []
        }

        /// Version 2 appends `applied` after the ids (QEMU stores and echoes it).
        public func encoded(applied: Applied? = nil) -> [UInt8] {
            var bytes: [UInt8] = [abi.channelCode, 0]
            bytes.append(UInt16(commands.count), order: .little)
            bytes.append(UInt16(events.count), order: .little)
            bytes.append(UInt16(0), order: .little)
            for id in commands + events { bytes.append(id, order: .little) }
            if let applied { bytes += applied.encoded() }
            return bytes
        }

        /// SHA-256 over the encoded lists (ABI included) behind a domain label: what the
        /// broker gives QEMU to echo, compared after a restart with the current decision's.
        public var digest: [UInt8] { sha256(Array("kvmi-broker allow-lists\0".utf8) + encoded()) }

        /// Version 2's `Applied` in a HOOK or SET_ALLOWED payload, nil when absent (version 1).
        public static func applied(inPayload payload: [UInt8]) -> Applied? {
            guard payload.count >= 8 else { return nil }
            let end = 8 + 4 * (Int(payload.read(UInt16.self, at: 2, order: .little)) + Int(payload.read(UInt16.self, at: 4, order: .little)))
            guard payload.count >= end + Applied.size else { return nil }
            return Applied(decoding: payload[end..<end + Applied.size])
        }

        public init(decoding payload: [UInt8]) throws(BrokerError) {
            guard payload.count >= 8, let abi = ABIGeneration(channelCode: payload[0]) else {
                throw BrokerError(.protocolViolation, "allow-list payload is malformed")
            }
            let commandCount = Int(payload.read(UInt16.self, at: 2, order: .little))
            let eventCount = Int(payload.read(UInt16.self, at: 4, order: .little))
            guard payload.count >= 8 + 4 * (commandCount + eventCount) else {
                throw BrokerError(.protocolViolation, "allow-list payload holds fewer ids than it announces")
            }
            let ids = (0..<(commandCount + eventCount)).map { payload.read(Int32.self, at: 8 + 4 * $0, order: .little) }
            try self.init(abi: abi, commands: Array(ids[0..<commandCount]), events: Array(ids[commandCount...]))
        }
    }

    /// Which step of a request failed.
    public enum Step: UInt8, Sendable, CustomStringConvertible {
        case none = 0
        case hook = 1
        case command = 2
        case event = 3
        case preunhook = 4
        case unhook = 5
        case fd = 6
        case state = 7
        case request = 8

        public var description: String {
            switch self {
            case .none: return "none"
            case .hook: return "KVM_INTROSPECTION_HOOK"
            case .command: return "KVM_INTROSPECTION_COMMAND"
            case .event: return "KVM_INTROSPECTION_EVENT"
            case .preunhook: return "KVM_INTROSPECTION_PREUNHOOK"
            case .unhook: return "KVM_INTROSPECTION_UNHOOK"
            case .fd: return "descriptor"
            case .state: return "state"
            case .request: return "request"
            }
        }
    }

    /// QEMU's answer to one request.
    public struct Result: Sendable, Equatable {
        public var requestType: UInt16
        public var step: Step
        public var hooked: Bool
        /// 0 or a positive errno.
        public var error: Int32
        public var failedID: Int32

        public init(requestType: UInt16, step: Step, hooked: Bool, error: Int32, failedID: Int32) {
            self.requestType = requestType
            self.step = step
            self.hooked = hooked
            self.error = error
            self.failedID = failedID
        }

        public func encoded() -> [UInt8] {
            var bytes: [UInt8] = []
            bytes.append(requestType, order: .little)
            bytes.append(step.rawValue)
            bytes.append(hooked ? 1 : 0)
            bytes.append(error, order: .little)
            bytes.append(failedID, order: .little)
            bytes.append(UInt32(0), order: .little)
            return bytes
        }

        public init(decoding payload: [UInt8]) throws(BrokerError) {
            guard payload.count >= 16 else { throw BrokerError(.protocolViolation, "RESULT payload is \(payload.count) bytes, below 16") }
            guard let step = Step(rawValue: payload[2]) else { throw BrokerError(.protocolViolation, "RESULT names unknown step \(payload[2])") }
            self.init(
                requestType: payload.read(UInt16.self, at: 0, order: .little), step: step, hooked: payload[3] != 0,
                error: payload.read(Int32.self, at: 4, order: .little), failedID: payload.read(Int32.self, at: 8, order: .little))
        }
    }

    /// What QEMU reports without being asked.
    public struct Event: Sendable, Equatable {
        public enum Kind: UInt16, Sendable, CustomStringConvertible {
            case toolHangup = 1
            case paused = 2
            case resumed = 3
            case migrationOut = 4
            case migrationFailed = 5
            case migrationIn = 6
            case reset = 7
            case shutdown = 8
            case savevm = 9
            case requiredTimeout = 10

            public var description: String {
                switch self {
                case .toolHangup: return "TOOL_HANGUP"
                case .paused: return "PAUSED"
                case .resumed: return "RESUMED"
                case .migrationOut: return "MIGRATION_OUT"
                case .migrationFailed: return "MIGRATION_FAILED"
                case .migrationIn: return "MIGRATION_IN"
                case .reset: return "RESET"
                case .shutdown: return "SHUTDOWN"
                case .savevm: return "SAVEVM"
                case .requiredTimeout: return "REQUIRED_TIMEOUT"
                }
            }
        }

        /// Nil for kinds this version does not know (logged and ignored).
        public var kind: Kind?
        public var rawKind: UInt16
        public var error: Int32
        public var startTime: Int64
        public var hooked: Bool
        public var running: Bool

        public init(kind: Kind, error: Int32, startTime: Int64, hooked: Bool, running: Bool) {
            self.kind = kind
            self.rawKind = kind.rawValue
            self.error = error
            self.startTime = startTime
            self.hooked = hooked
            self.running = running
        }

        public func encoded() -> [UInt8] {
            var bytes: [UInt8] = []
            bytes.append(rawKind, order: .little)
            bytes.append(UInt16(0), order: .little)
            bytes.append(error, order: .little)
            bytes.append(startTime, order: .little)
            bytes.append(hooked ? 1 : 0)
            bytes.append(running ? 1 : 0)
            bytes += [UInt8](repeating: 0, count: 6)
            return bytes
        }

        public init(decoding payload: [UInt8]) throws(BrokerError) {
            guard payload.count >= 24 else { throw BrokerError(.protocolViolation, "EVENT payload is \(payload.count) bytes, below 24") }
            rawKind = payload.read(UInt16.self, at: 0, order: .little)
            kind = Kind(rawValue: rawKind)
            error = payload.read(Int32.self, at: 4, order: .little)
            startTime = payload.read(Int64.self, at: 8, order: .little)
            hooked = payload[16] != 0
            running = payload[17] != 0
        }
    }
}
