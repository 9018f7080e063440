import Testing

@testable import KVMIBrokerCore

@Suite("Handshake codec")
struct HandshakeCodecTests {
    static let uuid = GuestUUID("6695eb01-f6a4-8304-79aa-97f2502e193f")!
    static let request = HandshakeRequest(uuid: uuid, name: "win10", startTime: 0x0102_0304_0506_0708, maxGPA: 0x1_2000_0000)

    /// Golden bytes, written out by hand from the layout (x86_64, little-endian host).
    static func golden(withMaxGPA: Bool) -> [UInt8] {
        var bytes: [UInt8] = withMaxGPA ? [104, 0, 0, 0] : [96, 0, 0, 0]
        bytes += [0x66, 0x95, 0xeb, 0x01, 0xf6, 0xa4, 0x83, 0x04, 0x79, 0xaa, 0x97, 0xf2, 0x50, 0x2e, 0x19, 0x3f]
        bytes += [0, 0, 0, 0]
        bytes += [0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01]
        bytes += Array("win10".utf8) + [UInt8](repeating: 0, count: 59)
        if withMaxGPA { bytes += [0x00, 0x00, 0x00, 0x20, 0x01, 0x00, 0x00, 0x00] }
        return bytes
    }

    @Test("v7 sends the 96-byte struct without max_gpa")
    func v7Golden() {
        let bytes = Self.request.encoded(for: .v7)
        #expect(bytes.count == 96)
        #expect(bytes == Self.golden(withMaxGPA: false))
    }

    @Test("v12 sends 104 bytes with max_gpa at offset 96")
    func v12Golden() {
        let bytes = Self.request.encoded(for: .v12)
        #expect(bytes.count == 104)
        #expect(bytes == Self.golden(withMaxGPA: true))
        #expect(bytes.read(UInt64.self, at: 96, order: .host) == 0x1_2000_0000)
    }

    @Test("the name is truncated to 63 bytes plus NUL, like QEMU's snprintf")
    func nameTruncation() {
        let long = String(repeating: "n", count: 100)
        let field = HandshakeRequest.nameField(long)
        #expect(field.count == 64)
        #expect(field[0..<63].allSatisfy { $0 == UInt8(ascii: "n") })
        #expect(field[63] == 0)
        let exact = HandshakeRequest.nameField(String(repeating: "x", count: 63))
        #expect(exact[62] == UInt8(ascii: "x") && exact[63] == 0)
        #expect(HandshakeRequest.nameField("") == [UInt8](repeating: 0, count: 64))
    }

    @Test("the tool's 24-byte reply: struct_size 24 then the hash")
    func replyGolden() {
        let hash = CookieHash(secret: Array("abc".utf8))
        let bytes = HandshakeReply.encoded(cookieHash: hash)
        #expect(bytes.count == 24)
        #expect(Array(bytes[0..<4]) == [24, 0, 0, 0])
        #expect(Array(bytes[4...]) == hash.bytes)
    }

    @Test("the cookie is SHA-1 of the exact bytes, newline included")
    func cookieIsSHA1() {
        // FIPS 180 test vector: SHA-1("abc").
        #expect(CookieHash(secret: Array("abc".utf8)).description == "a9993e364706816aba3e25717850c26c9cd0d89d")
        #expect(CookieHash(secret: []).description == "da39a3ee5e6b4b0d3255bfef95601890afd80709")
        #expect(CookieHash(secret: Array("abc\n".utf8)) != CookieHash(secret: Array("abc".utf8)))
    }

    @Test("constant-time comparison tells equal from different hashes")
    func constantTimeCompare() {
        let a = CookieHash(secret: Array("one".utf8))
        var flipped = a.bytes
        flipped[19] ^= 1
        #expect(a.constantTimeEquals(CookieHash(secret: Array("one".utf8))))
        #expect(!a.constantTimeEquals(CookieHash(bytes: flipped)!))
        #expect(CookieHash(bytes: [1, 2, 3]) == nil)
    }
}

@Suite("Reply reader never reads past the reply")
struct ReplyReaderTests {
    static let hash = CookieHash(secret: Array("s".utf8))

    /// Feeds `stream` the way the engine does: never more than `readLimit` at a time.
    static func run(_ stream: [UInt8], chunk: Int) throws(BrokerError) -> (HandshakeReply?, Int) {
        let (reply, consumed, _) = try runCountingReads(stream, chunk: chunk)
        return (reply, consumed)
    }

    /// `run`, with the number of reads it took.
    static func runCountingReads(_ stream: [UInt8], chunk: Int) throws(BrokerError) -> (HandshakeReply?, Int, Int) {
        var reader = HandshakeReplyReader()
        var offset = 0
        var reads = 0
        while offset < stream.count {
            let take = min(chunk, reader.readLimit, stream.count - offset)
            if take == 0 { break }
            reads += 1
            let progress = try reader.consume(stream[offset..<offset + take])
            offset += take
            if case .complete(let reply) = progress { return (reply, offset, reads) }
        }
        return (nil, offset, reads)
    }

    @Test("the usual 24-byte reply is taken in one read, the KVMI message behind it left alone")
    func usualReplyInOneRead() throws {
        #expect(HandshakeReplyReader().readLimit == HandshakeReply.minimumSize)
        let getVersion: [UInt8] = [2, 0, 0, 0, 1, 0, 0, 0]
        let (reply, consumed, reads) = try Self.runCountingReads(HandshakeReply.encoded(cookieHash: Self.hash) + getVersion, chunk: 1024)
        #expect(reply?.cookieHash == Self.hash && consumed == 24 && reads == 1)
    }

    @Test("a 24-byte reply followed by a KVMI message: exactly 24 bytes consumed", arguments: [1, 3, 4, 5, 24, 4096])
    func stopsAtStructSize(chunk: Int) throws {
        let getVersion: [UInt8] = [2, 0, 0, 0, 1, 0, 0, 0]
        let stream = HandshakeReply.encoded(cookieHash: Self.hash) + getVersion
        let (reply, consumed) = try Self.run(stream, chunk: chunk)
        #expect(consumed == 24)
        #expect(reply?.cookieHash == Self.hash)
    }

    @Test("a longer reply is accepted and its unknown tail consumed, nothing more", arguments: [1, 7, 4096])
    func consumesTail(chunk: Int) throws {
        var stream: [UInt8] = []
        stream.append(UInt32(100), order: .host)
        stream += Self.hash.bytes + [UInt8](repeating: 0xAB, count: 76) + [9, 9, 9]
        let (reply, consumed) = try Self.run(stream, chunk: chunk)
        #expect(consumed == 100)
        #expect(reply?.structSize == 100)
        #expect(reply?.cookieHash == Self.hash)
    }

    @Test("struct_size below 24 is refused as soon as it is read", arguments: [UInt32(0), 3, 4, 23])
    func rejectsShort(size: UInt32) {
        var stream: [UInt8] = []
        stream.append(size, order: .host)
        stream += [UInt8](repeating: 0, count: 20)
        #expect(throws: BrokerError.self) { try Self.run(stream, chunk: 4096) }
        do {
            _ = try Self.run(stream, chunk: 4096)
        } catch {
            #expect(error.code == .protocolViolation)
            #expect(error.message.contains("struct_size \(size)"))
        }
    }

    @Test("struct_size above 64 KiB is refused", arguments: [UInt32(65_537), 0xFFFF_FFFF])
    func rejectsHuge(size: UInt32) {
        var reader = HandshakeReplyReader()
        var header: [UInt8] = []
        header.append(size, order: .host)
        #expect(throws: BrokerError.self) { _ = try reader.consume(header) }
    }

    @Test("exactly 64 KiB is still accepted")
    func acceptsLimit() throws {
        var stream: [UInt8] = []
        stream.append(UInt32(65_536), order: .host)
        stream += Self.hash.bytes + [UInt8](repeating: 0, count: 65_536 - 24)
        let (reply, consumed) = try Self.run(stream, chunk: 4096)
        #expect(consumed == 65_536)
        #expect(reply != nil)
    }
}

@Suite("Tool-side reader (libkvmi's rules)")
struct RequestReaderTests {
    static func read(_ stream: [UInt8]) throws(BrokerError) -> (ReceivedHandshake?, Int) {
        var reader = HandshakeRequestReader()
        var offset = 0
        while offset < stream.count {
            let take = min(reader.readLimit, stream.count - offset)
            if take == 0 { break }
            let result = try reader.consume(stream[offset..<offset + take])
            offset += take
            if let result { return (result, offset) }
        }
        return (nil, offset)
    }

    @Test("v7 and v12 structs decode to the identity they carry")
    func decodesBoth() throws {
        let request = HandshakeCodecTests.request
        let (v7, used7) = try Self.read(request.encoded(for: .v7) + [1, 2, 3])
        #expect(used7 == 96)
        #expect(v7?.uuid == request.uuid && v7?.name == "win10" && v7?.startTime == request.startTime && v7?.maxGPA == nil)
        let (v12, used12) = try Self.read(request.encoded(for: .v12))
        #expect(used12 == 104)
        #expect(v12?.maxGPA == request.maxGPA)
    }

    @Test("below 32 bytes is ENODATA, above 64 KiB is E2BIG")
    func bounds() {
        for size: UInt32 in [0, 31, 65_537] {
            var stream: [UInt8] = []
            stream.append(size, order: .host)
            #expect(throws: BrokerError.self) { _ = try Self.read(stream) }
        }
    }

    @Test("an unterminated name is cut at 63 bytes")
    func unterminatedName() throws {
        var bytes = HandshakeCodecTests.request.encoded(for: .v7)
        for index in 32..<96 { bytes[index] = UInt8(ascii: "z") }
        let (decoded, _) = try Self.read(bytes)
        #expect(decoded?.name == String(repeating: "z", count: 63))
    }
}
