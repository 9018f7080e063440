/// What QEMU tells the introspection tool when the connection opens
/// (`struct qemu_vmi_to_introspector`). The broker sends it on the guest's behalf.
///
/// Layout, host byte order, zero-initialised:
/// `u32 struct_size @0; u8 uuid[16] @4; u32 padding @20; s64 start_time @24; char name[64] @32;`
/// and, for ABI v12 only, `u64 max_gpa @96`. `struct_size` is 96 (v7) or 104 (v12).
public struct HandshakeRequest: Sendable, Equatable {
    public var uuid: GuestUUID
    public var name: String
    /// Host wall-clock seconds; the tool's session id for this guest boot.
    public var startTime: Int64
    /// Exclusive end of the highest guest RAM range in bytes; sent by v12 only.
    public var maxGPA: UInt64

    public static let nameFieldSize = 64
    /// libkvmi refuses less than `offsetof(name)`.
    public static let minimumSize = 32
    /// libkvmi's `MAX_HANDSHAKE_DATA`; the same bound applies to replies.
    public static let maximumSize = 64 * 1024

    public init(uuid: GuestUUID, name: String, startTime: Int64, maxGPA: UInt64) {
        self.uuid = uuid
        self.name = name
        self.startTime = startTime
        self.maxGPA = maxGPA
    }

    /// The exact bytes QEMU would send for `abi`.
    public func encoded(for abi: ABIGeneration) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(abi.handshakeSize)
        bytes.append(UInt32(abi.handshakeSize), order: .host)
        bytes.append(contentsOf: uuid.bytes)
        bytes.append(UInt32(0), order: .host)
        bytes.append(startTime, order: .host)
        bytes.append(contentsOf: Self.nameField(name))
        if abi == .v12 { bytes.append(maxGPA, order: .host) }
        return bytes
    }

    /// The name as QEMU's snprintf leaves it: at most 63 bytes, NUL-terminated, zero-filled.
    public static func nameField(_ name: String) -> [UInt8] {
        var field = Array(name.utf8.prefix(nameFieldSize - 1))
        field.append(contentsOf: [UInt8](repeating: 0, count: nameFieldSize - field.count))
        return field
    }
}

/// What the tool answers (`struct qemu_vmi_from_introspector`): `u32 struct_size; u8 cookie_hash[20]`.
public struct HandshakeReply: Sendable, Equatable {
    /// `offsetof(cookie_hash) + 20`: anything shorter is refused.
    public static let minimumSize = 24
    public static let maximumSize = HandshakeRequest.maximumSize

    /// The size the tool announced, i.e. how many bytes were read.
    public var structSize: UInt32
    public var cookieHash: CookieHash

    public init(structSize: UInt32, cookieHash: CookieHash) {
        self.structSize = structSize
        self.cookieHash = cookieHash
    }

    /// The 24 bytes libkvmi sends.
    public static func encoded(cookieHash: CookieHash) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.append(UInt32(minimumSize), order: .host)
        bytes.append(contentsOf: cookieHash.bytes)
        return bytes
    }
}

/// Reads the tool's reply from a stream without ever taking a byte beyond it.
///
/// The tool may queue its first KVMI message right behind the reply, and that message belongs
/// to the kernel, so the I/O layer asks `readLimit` before every read and reads at most that.
/// The reader keeps the first 24 bytes, discards an unknown tail and bounds the size.
///
/// The first read asks for 24 bytes, not for the 4 of the size: a valid reply has at least
/// 24, and a reply announcing fewer fails the handshake, whose socket is then closed, so the
/// bytes read past it never were the kernel's. A reply of the usual size takes one `recv`.
public struct HandshakeReplyReader: Sendable {
    public enum Progress: Sendable, Equatable {
        case needMore
        case complete(HandshakeReply)
    }

    private var kept: [UInt8] = []
    private var structSize: UInt32?
    /// Bytes taken from the stream so far.
    public private(set) var bytesRead = 0

    public init() {}

    /// How many bytes may be read next without passing the end of a valid reply (0 once
    /// complete).
    public var readLimit: Int {
        guard let structSize else { return HandshakeReply.minimumSize - bytesRead }
        return Int(structSize) - bytesRead
    }

    /// Feeds bytes that were read (at most `readLimit` of them).
    public mutating func consume(_ bytes: some Collection<UInt8>) throws(BrokerError) -> Progress {
        precondition(bytes.count <= readLimit, "read past the handshake reply")
        bytesRead += bytes.count
        if kept.count < HandshakeReply.minimumSize {
            // One allocation for the part that is kept, not one per doubling.
            if kept.isEmpty { kept.reserveCapacity(HandshakeReply.minimumSize) }
            kept.append(contentsOf: bytes.prefix(HandshakeReply.minimumSize - kept.count))
        }
        if structSize == nil, bytesRead >= 4 {
            let size = kept.read(UInt32.self, at: 0, order: .host)
            guard size >= UInt32(HandshakeReply.minimumSize) else {
                throw BrokerError(
                    .protocolViolation,
                    "handshake reply announces struct_size \(size), less than the \(HandshakeReply.minimumSize) bytes that hold the cookie hash"
                )
            }
            guard size <= UInt32(HandshakeReply.maximumSize) else {
                throw BrokerError(
                    .protocolViolation,
                    "handshake reply announces struct_size \(size), more than the \(HandshakeReply.maximumSize)-byte limit")
            }
            structSize = size
        }
        guard let structSize, bytesRead == Int(structSize) else { return .needMore }
        let hash = CookieHash(bytes: Array(kept[4..<24]))!
        return .complete(HandshakeReply(structSize: structSize, cookieHash: hash))
    }
}

/// The tool side's view of QEMU's struct, read with libkvmi's rules: at least 32 and at most
/// 64 KiB, the known part copied, the name NUL-terminated, an unknown tail consumed.
public struct ReceivedHandshake: Sendable, Equatable {
    public var structSize: UInt32
    public var uuid: GuestUUID
    public var startTime: Int64
    public var name: String
    /// Present only when the struct is at least 104 bytes (ABI v12).
    public var maxGPA: UInt64?
}

/// Incremental reader for QEMU's struct (the tool side). Like the reply reader, it never asks
/// for more than the struct holds.
public struct HandshakeRequestReader: Sendable {
    private var kept: [UInt8] = []
    private var structSize: UInt32?
    public private(set) var bytesRead = 0
    /// Bytes of the struct the reader keeps: the v12 layout; the rest is consumed.
    static let knownSize = 104

    public init() {}

    public var readLimit: Int {
        guard let structSize else { return 4 - bytesRead }
        return Int(structSize) - bytesRead
    }

    public mutating func consume(_ bytes: some Collection<UInt8>) throws(BrokerError) -> ReceivedHandshake? {
        precondition(bytes.count <= readLimit, "read past the handshake struct")
        bytesRead += bytes.count
        for byte in bytes where kept.count < Self.knownSize { kept.append(byte) }
        if structSize == nil, bytesRead >= 4 {
            let size = kept.read(UInt32.self, at: 0, order: .host)
            guard size >= UInt32(HandshakeRequest.minimumSize) else {
                throw BrokerError(
                    .protocolViolation, "QEMU handshake struct_size \(size) is below the minimum of \(HandshakeRequest.minimumSize) (ENODATA)")
            }
            guard size <= UInt32(HandshakeRequest.maximumSize) else {
                throw BrokerError(
                    .protocolViolation, "QEMU handshake struct_size \(size) is above the maximum of \(HandshakeRequest.maximumSize) (E2BIG)")
            }
            structSize = size
        }
        guard let structSize, bytesRead == Int(structSize) else { return nil }
        var padded = kept
        if padded.count < 96 { padded.append(contentsOf: [UInt8](repeating: 0, count: 96 - padded.count)) }
        var nameBytes = Array(padded[32..<96])
        nameBytes[63] = 0
        let name = String(decoding: nameBytes.prefix { $0 != 0 }, as: UTF8.self)
        return ReceivedHandshake(
            structSize: structSize,
            uuid: GuestUUID(bytes: padded[4..<20])!,
            startTime: padded.read(Int64.self, at: 24, order: .host),
            name: name,
            maxGPA: kept.count >= 104 ? kept.read(UInt64.self, at: 96, order: .host) : nil)
    }
}
