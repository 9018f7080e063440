import KVMIBrokerCore

/// A shell-style name glob compiled once: `*` any run, `?` one character, `[abc]`, `[a-z]`,
/// `[!abc]` one character from (or not from) a set. Everything else is literal; matching is
/// case-sensitive, as libvirt names are.
struct NamePattern: Sendable, Equatable {
    enum Token: Sendable, Equatable {
        case literal(UInt8)
        case any
        case star
        case set(ranges: [ClosedRange<UInt32>], negated: Bool)
    }

    let text: String
    let tokens: [Token]

    /// True when the pattern has no wildcard: it names exactly one guest.
    var isLiteral: Bool { tokens.allSatisfy { if case .literal = $0 { true } else { false } } }

    /// The text every matching name starts with (before the first wildcard).
    var literalPrefix: String {
        var bytes: [UInt8] = []
        for token in tokens {
            guard case .literal(let byte) = token else { break }
            bytes.append(byte)
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    init(_ text: String) throws(BrokerError) {
        guard !text.isEmpty else { throw BrokerError(.invalidArgument, "an empty name pattern matches nothing") }
        self.text = text
        var tokens: [Token] = []
        let scalars = Array(text.unicodeScalars)
        var index = 0
        while index < scalars.count {
            let scalar = scalars[index]
            switch scalar {
            case "*":
                if tokens.last != .star { tokens.append(.star) }
            case "?":
                tokens.append(.any)
            case "[":
                var cursor = index + 1
                var negated = false
                if cursor < scalars.count, scalars[cursor] == "!" || scalars[cursor] == "^" {
                    negated = true
                    cursor += 1
                }
                var ranges: [ClosedRange<UInt32>] = []
                var first = true
                while cursor < scalars.count, scalars[cursor] != "]" || first {
                    first = false
                    let low = scalars[cursor].value
                    if cursor + 2 < scalars.count, scalars[cursor + 1] == "-", scalars[cursor + 2] != "]" {
                        let high = scalars[cursor + 2].value
                        guard low <= high else {
                            throw BrokerError(
                                .invalidArgument, "name pattern '\(shown(text))': range '\(scalars[cursor])-\(scalars[cursor + 2])' is reversed")
                        }
                        ranges.append(low...high)
                        cursor += 3
                    } else {
                        ranges.append(low...low)
                        cursor += 1
                    }
                }
                guard cursor < scalars.count else {
                    throw BrokerError(.invalidArgument, "name pattern '\(shown(text))': '[' at character \(index + 1) is never closed by ']'")
                }
                tokens.append(.set(ranges: ranges, negated: negated))
                index = cursor
            default:
                tokens += String(scalar).utf8.map(Token.literal)
            }
            index += 1
        }
        self.tokens = tokens
    }

    func matches(_ name: String) -> Bool {
        var utf8 = Array(name.utf8)
        return utf8.withUnsafeMutableBufferPointer { matches($0) }
    }

    /// Iterative glob matching with single-star backtracking: linear for typical patterns.
    func matches(_ name: UnsafeMutableBufferPointer<UInt8>) -> Bool {
        var t = 0
        var n = 0
        var starToken = -1
        var starName = 0
        while n < name.count {
            if t < tokens.count {
                switch tokens[t] {
                case .literal(let byte) where byte == name[n]:
                    t += 1
                    n += 1
                    continue
                case .any:
                    t += 1
                    n = nextCharacter(name, n)
                    continue
                case .set(let ranges, let negated):
                    let (scalar, next) = decode(name, n)
                    if ranges.contains(where: { $0.contains(scalar) }) != negated {
                        t += 1
                        n = next
                        continue
                    }
                case .star:
                    starToken = t
                    starName = n
                    t += 1
                    continue
                default:
                    break
                }
            }
            guard starToken >= 0 else { return false }
            t = starToken + 1
            starName = nextCharacter(name, starName)
            n = starName
        }
        while t < tokens.count, tokens[t] == .star { t += 1 }
        return t == tokens.count
    }
}

private func nextCharacter(_ bytes: UnsafeMutableBufferPointer<UInt8>, _ index: Int) -> Int {
    var next = index + 1
    while next < bytes.count, bytes[next] & 0xC0 == 0x80 { next += 1 }
    return next
}

private func decode(_ bytes: UnsafeMutableBufferPointer<UInt8>, _ index: Int) -> (UInt32, Int) {
    let next = nextCharacter(bytes, index)
    var decoder = UTF8()
    var iterator = bytes[index..<next].makeIterator()
    if case .scalarValue(let scalar) = decoder.decode(&iterator) { return (scalar.value, next) }
    return (UInt32(bytes[index]), next)
}
