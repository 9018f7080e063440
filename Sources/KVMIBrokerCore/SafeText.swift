/// Text from a peer or a file, made safe to put in a log line, an error or a terminal.
///
/// Peer and file text never reaches a log raw: a newline could forge a log record, an escape
/// sequence could rewrite the administrator's terminal, a bidirectional override could make a
/// name read as another, and a megabyte line would drown the message around it. Everything
/// that comes from outside the broker (a guest name, a QEMU's or an introspector's bytes, a
/// policy line) goes through `escapedForLog` before it is interpolated.
///
/// - C0 controls (U+0000 to U+001F) and DEL become `\xNN` (`\x0a` for a newline);
/// - C1 controls (U+0080 to U+009F), the line and paragraph separators U+2028 and U+2029, the
///   bidirectional embeddings, overrides and isolates (U+202A to U+202E, U+2066 to U+2069) and
///   the byte-order mark U+FEFF become `\u{NNNN}`;
/// - bytes that are not valid UTF-8 become `\xNN`, one per byte;
/// - at most `limit` bytes of the input are shown (never cutting a character); the rest is
///   replaced by a visible `...(N more bytes)`.
///
/// Everything else, backslashes included, is kept as it is: the output is for people, and
/// escaping is idempotent (escaping an escaped text changes nothing but a length marker).
/// Whether `escapedForLog` would change `text`'s characters (a control character, a line or
/// paragraph separator, a bidirectional override, a byte-order mark): text that must not be
/// used where it is shown or logged as it is.
public func needsEscapingForLog(_ text: some StringProtocol) -> Bool {
    text.unicodeScalars.contains { SafeText.mustEscape($0.value) }
}

public func escapedForLog(_ text: some StringProtocol, limit: Int = 256) -> String {
    let utf8 = text.utf8
    // Fast path: short printable ASCII needs no copy into an array.
    if utf8.count <= limit, utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7F }) { return String(text) }
    return escapedForLog(Array(utf8), limit: limit)
}

/// The same for raw bytes (a peer's frame, a file's contents): invalid UTF-8 is shown as `\xNN`.
public func escapedForLog(_ bytes: some Collection<UInt8>, limit: Int = 256) -> String {
    let bytes = Array(bytes)
    let limit = max(0, limit)
    var out: [UInt8] = []
    out.reserveCapacity(min(bytes.count, limit) + 16)
    var index = 0
    while index < bytes.count {
        let length = SafeText.validSequenceLength(bytes, at: index)
        if index + max(length, 1) > limit { break }
        guard length > 0 else {
            SafeText.appendHex(bytes[index], to: &out)
            index += 1
            continue
        }
        let scalar = SafeText.decode(bytes, at: index, length: length)
        if SafeText.mustEscape(scalar) {
            if scalar < 0x80 {
                SafeText.appendHex(UInt8(scalar), to: &out)
            } else {
                out += Array("\\u{\(String(scalar, radix: 16, uppercase: true).leftPaddedToFour)}".utf8)
            }
        } else {
            out += bytes[index..<index + length]
        }
        index += length
    }
    var text = String(decoding: out, as: UTF8.self)
    if index < bytes.count { text += "...(\(bytes.count - index) more bytes)" }
    return text
}

enum SafeText {
    /// The length of the valid UTF-8 sequence starting at `index` (1 to 4), or 0 if the byte
    /// there does not start one (a stray continuation byte, an overlong form, a surrogate, a
    /// value above U+10FFFF, or a sequence cut short).
    static func validSequenceLength(_ bytes: [UInt8], at index: Int) -> Int {
        let lead = bytes[index]
        let length: Int
        var secondRange: ClosedRange<UInt8> = 0x80...0xBF
        switch lead {
        case 0x00...0x7F: return 1
        case 0xC2...0xDF: length = 2
        case 0xE0:
            length = 3
            secondRange = 0xA0...0xBF
        case 0xE1...0xEC, 0xEE...0xEF: length = 3
        case 0xED:
            length = 3
            secondRange = 0x80...0x9F
        case 0xF0:
            length = 4
            secondRange = 0x90...0xBF
        case 0xF1...0xF3: length = 4
        case 0xF4:
            length = 4
            secondRange = 0x80...0x8F
        default: return 0
        }
        guard index + length <= bytes.count, secondRange.contains(bytes[index + 1]) else { return 0 }
        for offset in 2..<length where !(0x80...0xBF).contains(bytes[index + offset]) { return 0 }
        return length
    }

    static func decode(_ bytes: [UInt8], at index: Int, length: Int) -> UInt32 {
        let lead = UInt32(bytes[index])
        switch length {
        case 1: return lead
        case 2: return (lead & 0x1F) << 6 | UInt32(bytes[index + 1] & 0x3F)
        case 3: return (lead & 0x0F) << 12 | UInt32(bytes[index + 1] & 0x3F) << 6 | UInt32(bytes[index + 2] & 0x3F)
        default:
            return (lead & 0x07) << 18 | UInt32(bytes[index + 1] & 0x3F) << 12 | UInt32(bytes[index + 2] & 0x3F) << 6
                | UInt32(bytes[index + 3] & 0x3F)
        }
    }

    static func mustEscape(_ scalar: UInt32) -> Bool {
        switch scalar {
        case 0x00...0x1F, 0x7F...0x9F: return true
        case 0x2028, 0x2029: return true
        case 0x202A...0x202E, 0x2066...0x2069: return true
        case 0xFEFF: return true
        default: return false
        }
    }

    static func appendHex(_ byte: UInt8, to out: inout [UInt8]) {
        let digits = Array("0123456789abcdef".utf8)
        out += [UInt8(ascii: "\\"), UInt8(ascii: "x"), digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]]
    }
}

extension String {
    fileprivate var leftPaddedToFour: String { count >= 4 ? self : String(repeating: "0", count: 4 - count) + self }
}
