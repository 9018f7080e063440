/// A guest's UUID as the 16 raw bytes QEMU's `-uuid` holds, in canonical (textual) order.
///
/// Stored as two words, not an array: a UUID keys the registry and every session's status
/// update, so hashing and comparing it (and making one from a HELLO) allocates nothing and
/// touches two integers, not sixteen bytes one at a time.
public struct GuestUUID: Sendable, Hashable, CustomStringConvertible {
    /// Bytes 0 to 7 and 8 to 15, most significant first.
    private let high: UInt64
    private let low: UInt64

    /// The 16 bytes in canonical order.
    public var bytes: [UInt8] {
        (0..<16).map { index in
            let word = index < 8 ? high : low
            return UInt8(truncatingIfNeeded: word >> (8 * (7 - UInt64(index % 8))))
        }
    }

    public init?<Bytes: Collection<UInt8>>(bytes: Bytes) {
        guard bytes.count == 16 else { return nil }
        self.init(uncheckedBytes: bytes)
    }

    /// Parses the canonical 8-4-4-4-12 form (either case), the form libvirt and QEMU print.
    public init?(_ text: String) {
        var words: (UInt64, UInt64) = (0, 0)
        var nibbles = 0
        var index = 0
        for character in text.utf8 {
            defer { index += 1 }
            if index == 8 || index == 13 || index == 18 || index == 23 {
                guard character == UInt8(ascii: "-") else { return nil }
                continue
            }
            guard index < 36, let value = hexValue(character) else { return nil }
            if nibbles < 16 {
                words.0 = words.0 << 4 | UInt64(value)
            } else {
                words.1 = words.1 << 4 | UInt64(value)
            }
            nibbles += 1
        }
        guard index == 36 else { return nil }
        high = words.0
        low = words.1
    }

    /// A random version-4 UUID, for identities made up by `probe`.
    public static func random<G: RandomNumberGenerator>(using generator: inout G) -> GuestUUID {
        var bytes = (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
        bytes[6] = (bytes[6] & 0x0F) | 0x40
        bytes[8] = (bytes[8] & 0x3F) | 0x80
        return GuestUUID(uncheckedBytes: bytes)
    }

    public static let zero = GuestUUID(uncheckedBytes: [UInt8](repeating: 0, count: 16))

    /// From 16 bytes (callers checked the count).
    private init<Bytes: Collection<UInt8>>(uncheckedBytes: Bytes) {
        var words: (UInt64, UInt64) = (0, 0)
        for (index, byte) in uncheckedBytes.enumerated() {
            if index < 8 {
                words.0 = words.0 << 8 | UInt64(byte)
            } else {
                words.1 = words.1 << 8 | UInt64(byte)
            }
        }
        high = words.0
        low = words.1
    }

    /// The canonical 8-4-4-4-12 form (built directly: it is in every session's log metadata).
    public var description: String {
        String(unsafeUninitializedCapacity: 36) { text in
            var out = 0
            for index in 0..<16 {
                if index == 4 || index == 6 || index == 8 || index == 10 {
                    text[out] = UInt8(ascii: "-")
                    out += 1
                }
                let word = index < 8 ? high : low
                let byte = UInt8(truncatingIfNeeded: word >> (8 * (7 - UInt64(index % 8))))
                text[out] = hexDigit(byte >> 4)
                text[out + 1] = hexDigit(byte & 0xF)
                out += 2
            }
            return out
        }
    }
}

private func hexValue(_ c: UInt8) -> UInt8? {
    switch c {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
    default: return nil
    }
}
