import Foundation
import KVMIBrokerCore

#if canImport(Glibc)
    import Glibc
#endif

/// The account the real libvirtd runs QEMU under with Debian's qemu.conf, which sets no `user`
/// or `group` (scripts/libvirtd-ci leaves it so): user libvirt-qemu, group libvirt-qemu (libvirt's
/// compiled-in defaults on Debian), with the user's supplementary group kvm, through which QEMU
/// opens /dev/kvm and the broker's channel socket (root:kvm 0660, `--socket-group kvm`).
struct StockQEMUAccount {
    let uid: uid_t
    let gid: gid_t
    let kvmGID: gid_t

    /// The DAC label libvirt reports for a running domain's QEMU: `+uid:+gid`.
    var label: String { "+\(uid):+\(gid)" }

    static func lookUp() throws -> StockQEMUAccount {
        guard let user = getpwnam("libvirt-qemu") else {
            throw BrokerError(.invalidArgument, "no user libvirt-qemu: scripts/libvirtd-ci creates it as libvirt-daemon-system's postinst does")
        }
        guard let group = getgrnam("libvirt-qemu") else { throw BrokerError(.invalidArgument, "no group libvirt-qemu") }
        let uid = user.pointee.pw_uid
        let gid = group.pointee.gr_gid
        guard let kvm = getgrnam("kvm") else { throw BrokerError(.invalidArgument, "no group kvm") }
        return StockQEMUAccount(uid: uid, gid: gid, kvmGID: kvm.pointee.gr_gid)
    }

    /// Fails with the path and the missing permission unless libvirt-qemu (with its groups) may
    /// `access` it: `-x` to run, `-r` to read, `-w` to connect to a socket. Asked of a real process
    /// of that user (`setpriv ... test`), so every directory along the path counts. A QEMU that
    /// cannot open one of these fails later with a far less specific error, or never connects.
    func requireReachable(_ path: String, _ access: String, what: String) throws {
        let (status, _, err) = try runProcess(
            URL(fileURLWithPath: "/usr/bin/setpriv"),
            ["--reuid=\(uid)", "--regid=\(gid)", "--init-groups", "--", "/usr/bin/test", access, path])
        guard status == 0 else {
            throw BrokerError(
                .insecureFile,
                "\(what) is not reachable by libvirt-qemu (test \(access) fails as uid \(uid) gid \(gid) with group kvm \(kvmGID)): check the modes of the file and of every directory above it \(err)",
                at: path)
        }
    }

    /// The uid and gid (real) a running process has, from /proc/PID/status.
    static func credentials(of pid: Int32) -> (uid: uid_t, gid: gid_t)? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        func first(_ key: String) -> UInt32? {
            text.split(separator: "\n").first { $0.hasPrefix(key + ":") }?.dropFirst(key.count + 1)
                .split(whereSeparator: { $0 == "\t" || $0 == " " }).first.flatMap { UInt32($0) }
        }
        guard let uid = first("Uid"), let gid = first("Gid") else { return nil }
        return (uid, gid)
    }
}

/// A directory for the channel sockets of QEMUs that libvirt starts: root's, mode 0755, so that
/// libvirt-qemu may search it (`privateSocketDirectory` is 0700) and no one else may write it
/// (the broker refuses a socket directory others may write). The sockets in it are root:kvm 0660.
let qemuReachableSocketDirectory: String = {
    let path = "/tmp/kvmib-test-\(getpid())-qemu"
    mkdir(path, 0o755)
    chmod(path, 0o755)
    return path
}()

/// A fresh channel socket path that a QEMU running as libvirt-qemu can reach (with the socket's
/// group kvm: `BrokerConfiguration.channelSocketGroup`).
func qemuReachableSocketPath(_ tag: String) -> String {
    "\(qemuReachableSocketDirectory)/\(tag)-\(UInt32.random(in: 0...UInt32.max)).sock"
}
