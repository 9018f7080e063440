import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMITestIntrospector
import Testing

@testable import KVMIBrokerDaemon

#if canImport(Glibc)
    import Glibc
#endif

@Suite("/proc facts: the start time and the process image")
struct ProcFactsTests {
    static func stat(comm: String, startTime: String) -> [UInt8] {
        // Fields 3 to 21, then 22 (the start time), then more.
        let middle = (3...21).map { $0 == 3 ? "S" : "\($0)" }.joined(separator: " ")
        return Array("4242 (\(comm)) \(middle) \(startTime) 23 24 25\n".utf8)
    }

    @Test("field 22 is counted after the last ')', whatever the command name holds")
    func startTime() {
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: "qemu-system-x86", startTime: "987654321")) == 987_654_321)
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: ") 1 2 3 (", startTime: "77")) == 77)
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: "a b c d e f g h i j k l m n o p q r s t u v", startTime: "5")) == 5)
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: "x", startTime: "99999999999999999999999")) == nil)
        #expect(PeerVerifier.startTime(stat: Self.stat(comm: "x", startTime: "")) == nil)
        #expect(PeerVerifier.startTime(stat: Array("4242 (x) S 1 2".utf8)) == nil)
        #expect(PeerVerifier.startTime(stat: Array("no parenthesis".utf8)) == nil)
    }

    @Test("the same image: start time, then device and inode, else the path")
    func sameImage() {
        let checked = ProcessFacts(startTime: 10, executable: "/usr/bin/qemu-system-x86_64", executableDevice: 1, executableInode: 2)
        var socketPinned = checked
        socketPinned.startTime = nil
        #expect(!socketPinned.isSameImage(as: checked))
        var quick = checked
        quick.executable = ""
        #expect(quick.isSameImage(as: checked))
        var reused = quick
        reused.startTime = 11
        #expect(!reused.isSameImage(as: checked))
        var execd = quick
        execd.executableInode = 3
        #expect(!execd.isSameImage(as: checked))
        let noInode = ProcessFacts(startTime: 10, executable: "/usr/bin/qemu-system-x86_64", executableDevice: nil, executableInode: nil)
        #expect(noInode.isSameImage(as: checked))
        var noInodeNoPath = noInode
        noInodeNoPath.executable = ""
        #expect(!noInodeNoPath.isSameImage(as: checked))
    }

    /// The command line is read to its end however long it is (a read stops early only at a
    /// short read, which /proc gives at the end): libvirt's QEMUs have long ones, and the
    /// `-uuid` argument can come after the first pages.
    @Test("a command line of several pages with -uuid at the end is read whole; the peer is accepted")
    func longCommandLine() throws {
        let uuid = GuestUUID("5eed0000-1111-4222-8333-444455556666")!
        // Three pages and a bit of arguments that the shell ignores, then -uuid.
        let filler = (0..<26).map { _ in String(repeating: "x", count: 500) }
        let log = "\(NSTemporaryDirectory())kvmib-long-cmdline-\(getpid()).log"
        defer { unlink(log) }
        // The shell waits in open() of a FIFO nobody writes: no child of its own, so nothing
        // outlives it holding descriptors it inherited (a pipe another test reads to its end).
        let fifo = "\(NSTemporaryDirectory())kvmib-long-cmdline-\(getpid()).fifo"
        unlink(fifo)
        #expect(mkfifo(fifo, 0o600) == 0)
        defer { unlink(fifo) }
        let child = try SpawnedProcess("/bin/sh", ["-c", "read line < \"$0\"", fifo] + filler + ["-uuid", "\(uuid)"], logPath: log)
        defer { child.terminate(SIGKILL) }
        let hello = Channel.Hello(
            flags: [.running], pid: UInt32(child.pid), uuid: uuid, startTime: 0, maxGPA: 0, hookedABI: nil, capV12: -25, capV7: -25,
            introspectionParameter: -1, name: "long")
        let verifier = PeerVerifier(emulators: ["/bin/sh"])
        let peer = PeerCredentials(pid: child.pid, uid: getuid(), gid: getgid())
        // posix_spawn returns once the exec has replaced the child's memory, which is before the
        // kernel has laid out the new command line (it reads as empty until then): wait for it.
        var cmdline = Data()
        #expect(
            eventually {
                cmdline = FileManager.default.contents(atPath: "/proc/\(child.pid)/cmdline") ?? Data()
                return !cmdline.isEmpty
            })
        #expect(cmdline.count > 3 * 4096)
        #expect(verifier.verdict(for: hello, from: peer) == .accepted)
        var other = hello
        other.uuid = GuestUUID("5eed0000-1111-4222-8333-444455556667")!
        #expect(verifier.verdict(for: other, from: peer) != .accepted)
    }

    /// A QEMU started before an upgrade replaced its binary runs a file that is on disk under no
    /// name any more, and the emulator at the same path is another file: the peer is refused
    /// until the guest restarts (security.md). The refusal says why, instead of naming the same
    /// path twice; a file that is merely named "... (deleted)" is shown as it is.
    @Test("a QEMU whose binary was replaced since it started is refused, and the refusal says so")
    func replacedExecutableIsNamedSo() throws {
        // Under /tmp (no symlink in the path: the messages name these paths exactly).
        let directory = freshPrivateDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let emulator = "\(directory)/qemu-system-x86_64"
        let lookAlike = "\(directory)/qemu-system-x86_64 (deleted)"
        // A copy of the shell itself (/bin/sh may be a symlink).
        let shell = URL(fileURLWithPath: "/bin/sh").resolvingSymlinksInPath().path
        for path in [emulator, lookAlike] { try copyExecutable(shell, to: path) }
        // Each shell waits in open() of a FIFO nobody writes (no child of its own).
        let fifo = "\(directory)/wait.fifo"
        try #require(mkfifo(fifo, 0o600) == 0)
        let uuid = GuestUUID("5eed0000-1111-4222-8333-444455556666")!
        func started(_ executable: String) throws -> SpawnedProcess {
            let child = try SpawnedProcess(executable, ["-c", "read line < \"$0\"", fifo, "-uuid", "\(uuid)"], logPath: "\(directory)/log")
            // The command line reads as empty until the kernel has laid it out after the exec.
            #expect(eventually { !(FileManager.default.contents(atPath: "/proc/\(child.pid)/cmdline") ?? Data()).isEmpty })
            return child
        }
        let qemu = try started(emulator)
        defer { qemu.terminate(SIGKILL) }
        let other = try started(lookAlike)
        defer { other.terminate(SIGKILL) }

        let verifier = PeerVerifier(emulators: [emulator])
        /// The HELLO and the socket credentials of a child claiming the guest.
        func claim(_ child: SpawnedProcess) -> (Channel.Hello, PeerCredentials) {
            let hello = Channel.Hello(
                flags: [.running], pid: UInt32(child.pid), uuid: uuid, startTime: 0, maxGPA: 0, hookedABI: nil, capV12: -25, capV7: -25,
                introspectionParameter: -1, name: "upgraded")
            return (hello, PeerCredentials(pid: child.pid, uid: getuid(), gid: getgid()))
        }
        func verdict(_ child: SpawnedProcess) -> PeerVerifier.Verdict {
            let (hello, peer) = claim(child)
            return verifier.verdict(for: hello, from: peer)
        }
        let (hello, peer) = claim(qemu)
        let (first, checked) = verifier.verdict(for: hello, from: peer, pin: ProcessPin(pid: qemu.pid, pidfd: nil, source: .unpinned))
        #expect(first == .accepted)
        let facts = try #require(checked)

        // The upgrade: a new file renamed over the old one, which keeps running.
        try copyExecutable(shell, to: "\(directory)/new")
        #expect(rename("\(directory)/new", emulator) == 0)
        let replaced = "\(emulator) (replaced or removed on disk since it started)"
        #expect(
            verdict(qemu) == .refused("pid \(qemu.pid) runs \(replaced), which is not a configured emulator (\(emulator))")
        )
        // With libvirt's identity check: the domain's <emulator> is that path.
        let domain = DomainIdentity(name: "upgraded", emulator: emulator)
        #expect(
            verifier.verdict(for: domain, uuid: uuid, facts: facts, peer: peer)
                == .refused(
                    "QEMU pid \(qemu.pid) of guest \(uuid) runs \(replaced), not the emulator libvirt records for domain upgraded: \(emulator)"))

        // A file named like that, still on disk: shown as it is.
        #expect(
            verdict(other)
                == .refused("pid \(other.pid) runs \(lookAlike), which is not a configured emulator (\(emulator))"))

        // A program run from memory (a memfd, which has no links either) was never on disk: it
        // is shown as the kernel names it, not as an upgrade. Python makes the memfd and execs
        // the shell's copy in it (read-only: a descriptor open for writing forbids the exec).
        let python = URL(fileURLWithPath: "/usr/bin/python3").resolvingSymlinksInPath().path
        let fromMemory = try SpawnedProcess(
            python,
            [
                "-c",
                """
                import os, sys
                fd = os.memfd_create("kvmib-test")
                os.write(fd, open(sys.argv[1], "rb").read())
                ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
                os.close(fd)
                os.execv(f"/proc/self/fd/{ro}", ["sh", "-c", 'read line < "$0"', sys.argv[2], "-uuid", sys.argv[3]])
                """,
                shell, fifo, "\(uuid)",
            ], logPath: "\(directory)/log")
        defer { fromMemory.terminate(SIGKILL) }
        #expect(
            eventually { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(fromMemory.pid)/exe"))?.hasPrefix("/memfd:") == true })
        #expect(
            verdict(fromMemory)
                == .refused("pid \(fromMemory.pid) runs /memfd:kvmib-test (deleted), which is not a configured emulator (\(emulator))"))
    }

    /// A kernel with SO_PEERPIDFD names the process that connected whenever it is asked, so the
    /// identity needs no start time: /proc/PID/stat (the costliest read, once in the checks and
    /// once before each HOOK) is not read. Here /proc is a copy without it: the checks pass and
    /// the re-check passes, until the executable changes. Without SO_PEERPIDFD (Debian 12's
    /// 6.1), the start time is read, so the same copy fails the checks.
    @Test("with the channel socket as the pin, neither the checks nor the re-check before HOOK read /proc/PID/stat")
    func socketPinNeedsNoStartTime() throws {
        let root = "\(NSTemporaryDirectory())kvmib-proc-\(getpid())"
        let directory = "\(root)/\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: root) }
        let uuid = GuestUUID("5eed0000-1111-4222-8333-444455556666")!
        #expect(FileManager.default.createFile(atPath: "\(directory)/cmdline", contents: Data("qemu\0-uuid\0\(uuid)\0".utf8)))
        #expect(symlink("/bin/sh", "\(directory)/exe") == 0)
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        defer { pair.forEach { _ = close($0) } }

        let verifier = PeerVerifier(emulators: ["/bin/sh"], procRoot: root)
        let hello = Channel.Hello(
            flags: [.running], pid: UInt32(getpid()), uuid: uuid, startTime: 0, maxGPA: 0, hookedABI: nil, capV12: -25, capV7: -25,
            introspectionParameter: -1, name: "pinned")
        let pin = ProcessPin.peer(of: pair[0], pid: getpid())
        defer { pin.pidfd?.close() }
        let (verdict, facts) = verifier.verdict(for: hello, from: PeerCredentials(pid: getpid(), uid: getuid(), gid: getgid()), pin: pin)
        guard pin.isFromSocket else {
            // No SO_PEERPIDFD: the start time is needed, and this /proc has none.
            #expect(verdict == .refused("cannot read the facts of pid \(getpid()) (ENOENT)"), "\(verdict)")
            return
        }
        #expect(verdict == .accepted)
        let checked = try #require(facts)
        #expect(checked.startTime == nil)
        #expect(verifier.recheck(pid: getpid(), checked, channel: pair[0]) == nil)
        // An exec: /proc/PID/exe is another file now.
        #expect(unlink("\(directory)/exe") == 0 && symlink("/usr/bin/env", "\(directory)/exe") == 0)
        let problem = verifier.recheck(pid: getpid(), checked, channel: pair[0])
        #expect(problem == "QEMU pid \(getpid()) exec'd /usr/bin/env since its identity was checked", "\(problem ?? "nil")")
    }

    /// Where SO_PEERPIDFD gives no pidfd, only a kernel without it sends the check to
    /// `pidfd_open` on the pid's number; a kernel with it that names no process (6.5 - 6.15
    /// once the process that connected is reaped) must not, or a reused pid would be pinned.
    @Test("a failed SO_PEERPIDFD: pidfd_open only on a kernel without it; out of descriptors is 'not now'; else the peer is gone")
    func socketPinFailures() {
        #expect(ProcessPin.socketPinFailure(ENOPROTOOPT) == .unsupported)
        #expect(ProcessPin.socketPinFailure(EMFILE) == .transient)
        #expect(ProcessPin.socketPinFailure(ENFILE) == .transient)
        #expect(ProcessPin.socketPinFailure(EINVAL) == .gone)
        #expect(ProcessPin.socketPinFailure(ESRCH) == .gone)
        let gone = ProcessPin(pid: getpid(), pidfd: nil, source: .gone)
        #expect(!gone.isAlive)
        let hello = Channel.Hello(
            flags: [.running], pid: UInt32(getpid()), uuid: GuestUUID.zero, startTime: 0, maxGPA: 0, hookedABI: nil, capV12: -25,
            capV7: -25, introspectionParameter: -1, name: "gone")
        let peer = PeerCredentials(pid: getpid(), uid: getuid(), gid: getgid())
        #expect(
            PeerVerifier(emulators: ["/bin/sh"]).verdict(for: hello, from: peer, pin: gone).0
                == .refused("pid \(getpid()), which connected the channel, has exited"))
        let short = ProcessPin(pid: getpid(), pidfd: nil, source: .outOfDescriptors)
        #expect(
            PeerVerifier(emulators: ["/bin/sh"]).verdict(for: hello, from: peer, pin: short).0
                == .transient("cannot pin pid \(getpid()) now: out of descriptors"))
    }
}
