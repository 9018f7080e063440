/// The KVMI ABI generation a host speaks. Ioctl numbers, handshake size and message ids all
/// differ between them, and a capability number alone cannot tell which one a kernel has, so
/// the administrator chooses it and the broker verifies it at run time.
public enum ABIGeneration: String, Sendable, CaseIterable, Equatable, CustomStringConvertible {
    /// KVM-VMI kvm branch kvmi-v7, libkvmi master, QEMU kvmi-v7.
    case v7
    /// The last upstream submission (v12), QEMU kvmi-v12.
    case v12

    /// Size of the QEMU -> introspector handshake struct this generation sends.
    public var handshakeSize: Int {
        switch self {
        case .v7: return 96
        case .v12: return 104
        }
    }

    /// The number the broker <-> QEMU channel uses for this generation.
    public var channelCode: UInt8 {
        switch self {
        case .v7: return 7
        case .v12: return 12
        }
    }

    public init?(channelCode: UInt8) {
        switch channelCode {
        case 7: self = .v7
        case 12: self = .v12
        default: return nil
        }
    }

    /// Accepts "v7", "7", "v12" and "12".
    public init?(parsing text: String) {
        switch text.lowercased() {
        case "v7", "7": self = .v7
        case "v12", "12": self = .v12
        default: return nil
        }
    }

    public var description: String { rawValue }
}
