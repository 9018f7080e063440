import CGLib

/// The 20-byte SHA-1 the tool proves it knows the shared secret with.
public struct CookieHash: Sendable, Hashable, CustomStringConvertible {
    public static let size = 20
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == Self.size else { return nil }
        self.bytes = bytes
    }

    /// SHA-1 of the secret's exact bytes (a trailing newline included, as QEMU hashes a
    /// secret file). GLib's GChecksum is the implementation QEMU's glib crypto backend uses.
    public init(secret: [UInt8]) {
        guard let checksum = g_checksum_new(G_CHECKSUM_SHA1) else { fatalError("g_checksum_new(SHA1) failed") }
        defer { g_checksum_free(checksum) }
        secret.withUnsafeBufferPointer { buffer in
            if let base = buffer.baseAddress { g_checksum_update(checksum, base, gssize(buffer.count)) }
        }
        var digest = [UInt8](repeating: 0, count: Self.size)
        var length = gsize(Self.size)
        g_checksum_get_digest(checksum, &digest, &length)
        precondition(length == gsize(Self.size))
        self.bytes = digest
    }

    public static let zero = CookieHash(uncheckedBytes: [UInt8](repeating: 0, count: size))
    private init(uncheckedBytes: [UInt8]) { self.bytes = uncheckedBytes }

    /// Compares in time independent of where the hashes differ.
    public func constantTimeEquals(_ other: CookieHash) -> Bool {
        var difference: UInt8 = 0
        for index in 0..<Self.size { difference |= bytes[index] ^ other.bytes[index] }
        return difference == 0
    }

    public var description: String {
        bytes.hexString
    }
}

/// SHA-256 with GLib's GChecksum (the implementation already used for the cookie).
public func sha256(_ bytes: [UInt8]) -> [UInt8] {
    guard let checksum = g_checksum_new(G_CHECKSUM_SHA256) else { fatalError("g_checksum_new(SHA256) failed") }
    defer { g_checksum_free(checksum) }
    bytes.withUnsafeBufferPointer { buffer in
        if let base = buffer.baseAddress { g_checksum_update(checksum, base, gssize(buffer.count)) }
    }
    var digest = [UInt8](repeating: 0, count: 32)
    var length = gsize(32)
    g_checksum_get_digest(checksum, &digest, &length)
    precondition(length == 32)
    return digest
}
