/// Appends and reads fixed-width integers in a chosen byte order. The handshake uses host
/// order (as QEMU and libkvmi do); the broker <-> QEMU channel uses little-endian.
public enum ByteOrder: Sendable {
    case host
    case little
}

extension Array where Element == UInt8 {
    @inlinable
    public mutating func append<T: FixedWidthInteger>(_ value: T, order: ByteOrder) {
        let ordered = order == .little ? value.littleEndian : value
        Swift.withUnsafeBytes(of: ordered) { self.append(contentsOf: $0) }
    }
}

extension Collection where Element == UInt8, Index == Int {
    /// Reads a `T` at `offset` (relative to `startIndex`); the caller checks the bounds.
    @inlinable
    public func read<T: FixedWidthInteger>(_: T.Type, at offset: Int, order: ByteOrder) -> T {
        var value: T = 0
        let start = startIndex + offset
        Swift.withUnsafeMutableBytes(of: &value) { raw in
            for index in 0..<MemoryLayout<T>.size { raw[index] = self[start + index] }
        }
        return order == .little ? T(littleEndian: value) : value
    }
}

extension Sequence where Element == UInt8 {
    /// Lower-case hex, two digits a byte (UUIDs, cookie hashes in logs).
    public var hexString: String {
        var text: [UInt8] = []
        text.reserveCapacity(underestimatedCount * 2)
        for byte in self {
            text.append(hexDigit(byte >> 4))
            text.append(hexDigit(byte & 0xF))
        }
        return String(decoding: text, as: UTF8.self)
    }
}

/// The lower-case hex digit of a value below 16, as ASCII.
@inline(__always)
func hexDigit(_ value: UInt8) -> UInt8 {
    value < 10 ? UInt8(ascii: "0") + value : UInt8(ascii: "a") + value - 10
}
