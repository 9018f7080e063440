import Foundation
import KVMIBrokerCore

#if canImport(Glibc)
    import Glibc
#endif

/// Who is on the other end of a channel connection, from SO_PEERCRED at accept time.
public struct PeerCredentials: Sendable, Equatable, CustomStringConvertible {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32

    public init(pid: Int32, uid: UInt32, gid: UInt32) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
    }

    public var description: String { "pid \(pid) uid \(uid)" }
}

/// Checks that a channel peer is the QEMU it claims to be: the HELLO's pid is the socket
/// peer's, the peer's executable is a QEMU, and its `-uuid` argument is the HELLO's UUID.
/// A QEMU that lies about its identity must never get an introspector socket for another guest.
public struct PeerVerifier: Sendable {
    /// Absolute paths of emulators accepted besides any `qemu-system-*` or `qemu-kvm`.
    public var extraEmulators: [String]
    /// Where process information lives (tests point it elsewhere only to break it).
    public var procRoot: String

    public init(extraEmulators: [String] = [], procRoot: String = "/proc") {
        self.extraEmulators = extraEmulators
        self.procRoot = procRoot
    }

    /// Nil when the peer checks out; otherwise why not, in one sentence.
    public func problem(with hello: Channel.Hello, from peer: PeerCredentials) -> String? {
        if Int32(bitPattern: hello.pid) != peer.pid {
            return "HELLO claims pid \(hello.pid) but the socket peer is pid \(peer.pid)"
        }
        guard let executable = try? FileManager.default.destinationOfSymbolicLink(atPath: "\(procRoot)/\(peer.pid)/exe") else {
            return "cannot read the executable of pid \(peer.pid)"
        }
        let path = executable.hasSuffix(" (deleted)") ? String(executable.dropLast(10)) : executable
        let name = (path as NSString).lastPathComponent
        guard name.hasPrefix("qemu-system-") || name == "qemu-kvm" || extraEmulators.contains(path) else {
            return "pid \(peer.pid) runs \(path), which is not a QEMU"
        }
        guard let data = FileManager.default.contents(atPath: "\(procRoot)/\(peer.pid)/cmdline") else {
            return "cannot read the command line of pid \(peer.pid)"
        }
        let arguments = data.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        let values = arguments.indices.filter { ($0 + 1) < arguments.count && (arguments[$0] == "-uuid" || arguments[$0] == "--uuid") }
            .map { arguments[$0 + 1] }
        guard let text = values.first else {
            return "QEMU pid \(peer.pid) has no -uuid argument, so its identity cannot be checked"
        }
        guard Set(values).count == 1 else {
            return "QEMU pid \(peer.pid) has several different -uuid arguments (\(values.joined(separator: ", "))), so its identity is ambiguous"
        }
        guard let uuid = GuestUUID(text) else {
            return "QEMU pid \(peer.pid) has -uuid '\(text)', which is not a UUID"
        }
        guard uuid == hello.uuid else {
            return "HELLO claims UUID \(hello.uuid) but QEMU pid \(peer.pid) was started with -uuid \(uuid)"
        }
        return nil
    }
}
