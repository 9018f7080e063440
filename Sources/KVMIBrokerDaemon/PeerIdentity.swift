import CKVMIBroker
import Foundation
import KVMIBrokerCore
import KVMIBrokerOS

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

/// The peer process, pinned while its identity is checked: a pidfd (from SO_PEERPIDFD where
/// the kernel has it, which names the process that connected whenever it is asked; else
/// pidfd_open on the SO_PEERCRED pid) stays bound to that process, so a pid that is reused
/// after the peer exits is never mistaken for it.
public struct ProcessPin: Sendable {
    public let pid: Int32
    public let pidfd: Descriptor?
    public let source: Source

    /// Where the pin came from, or why there is none.
    public enum Source: Sendable, Equatable {
        /// The channel socket's SO_PEERPIDFD: it names the process that connected whenever it
        /// is asked.
        case socket
        /// pidfd_open on the SO_PEERCRED pid (a kernel without SO_PEERPIDFD).
        case pidfdOpen
        /// No pidfd (a kernel without pidfds): the pid alone.
        case unpinned
        /// The socket names no live process: the peer has exited.
        case gone
        /// No descriptor was free for the pidfd: the identity cannot be checked now.
        case outOfDescriptors
    }

    public init(pid: Int32, pidfd: Descriptor?, source: Source) {
        self.pid = pid
        self.pidfd = pidfd
        self.source = source
    }

    /// What to do when SO_PEERPIDFD gave no pidfd.
    enum SocketPinFailure: Equatable {
        /// The kernel has no SO_PEERPIDFD (before 6.5): pin the pid with `pidfd_open`.
        case unsupported
        /// Out of descriptors: the identity cannot be checked now.
        case transient
        /// The kernel has it and names no live process (6.5 - 6.15 answer EINVAL once the
        /// process that connected is reaped): the pid may already be another process's, so it
        /// must not be pinned by number.
        case gone
    }

    static func socketPinFailure(_ error: Int32) -> SocketPinFailure {
        switch error {
        case ENOPROTOOPT, EOPNOTSUPP: return .unsupported
        case EMFILE, ENFILE, ENOMEM: return .transient
        default: return .gone
        }
    }

    /// Pins the peer of a connected unix socket.
    public static func peer(of socket: Int32, pid: Int32) -> ProcessPin {
        let fromSocket = kvmib_peer_pidfd(socket)
        if fromSocket >= 0 { return ProcessPin(pid: pid, pidfd: Descriptor(adopting: fromSocket), source: .socket) }
        switch socketPinFailure(errno) {
        case .unsupported: break
        case .transient: return ProcessPin(pid: pid, pidfd: nil, source: .outOfDescriptors)
        case .gone: return ProcessPin(pid: pid, pidfd: nil, source: .gone)
        }
        let opened = kvmib_pidfd_open(pid)
        if opened >= 0 { return ProcessPin(pid: pid, pidfd: Descriptor(adopting: opened), source: .pidfdOpen) }
        return ProcessPin(pid: pid, pidfd: nil, source: .unpinned)
    }

    /// Pinned by the channel socket (SO_PEERPIDFD): the socket names this process whenever it
    /// is asked, so the re-check before HOOK can ask it again instead of comparing start times.
    public var isFromSocket: Bool { pidfd != nil && source == .socket }

    /// False once the pinned process has exited.
    public var isAlive: Bool {
        if source == .gone { return false }
        guard let pidfd else { return kill(pid, 0) == 0 || errno == EPERM }
        return kvmib_pidfd_alive(pidfd.raw) != 0
    }
}

/// What identifies one process image: who it is (its start time, boot-relative clock ticks,
/// unique per pid over time; or nil when the channel socket itself names the process, see
/// `PeerVerifier.recheck`) and its executable (device and inode; the path only where those
/// could not be read or a message needs it). An exec changes the executable, a pid reuse
/// changes the start time.
public struct ProcessFacts: Sendable, Equatable {
    /// Nil: pinned by the channel socket (SO_PEERPIDFD names the process that connected, whenever
    /// it is asked), so that no start time is needed to tell it from a later process with its pid.
    public var startTime: UInt64?
    public var executable: String
    public var executableDevice: UInt64?
    public var executableInode: UInt64?

    public init(startTime: UInt64?, executable: String, executableDevice: UInt64?, executableInode: UInt64?) {
        self.startTime = startTime
        self.executable = executable
        self.executableDevice = executableDevice
        self.executableInode = executableInode
    }

    /// The same process image: the same start time (not a reused pid) and the same executable
    /// file (no exec since): by device and inode when both have them, else by path.
    public func isSameImage(as other: ProcessFacts) -> Bool {
        guard startTime == other.startTime else { return false }
        if let device = executableDevice, let inode = executableInode, let otherDevice = other.executableDevice,
            let otherInode = other.executableInode
        {
            return device == otherDevice && inode == otherInode
        }
        return !executable.isEmpty && executable == other.executable
    }
}

/// Checks that a channel peer is the QEMU it claims to be: the HELLO's pid is the socket
/// peer's, the peer runs an emulator it may run, and its `-uuid` argument is the HELLO's UUID.
/// A QEMU that lies about its identity must never get an introspector socket for another guest.
///
/// Which executable is a QEMU is never decided by its name (anyone can name a program
/// `qemu-system-x86_64`): with libvirt's identity check, it is the `<emulator>` libvirt records
/// for the domain (`verdict(for:uuid:facts:peer:)`); without it, the configured `emulators`.
public struct PeerVerifier: Sendable {
    /// The executables accepted as QEMU when libvirt's identity check is off (`--emulator`):
    /// paths, compared with the peer's executable by device and inode (symlinks resolved).
    public var emulators: [String]
    /// Where process information lives (tests point it elsewhere only to break it).
    public var procRoot: String

    public init(emulators: [String] = [], procRoot: String = "/proc") {
        self.emulators = emulators
        self.procRoot = procRoot
    }

    /// What the checks found.
    public enum Verdict: Sendable, Equatable {
        case accepted
        /// The peer is not who it claims to be: one sentence why.
        case refused(String)
        /// The checks could not be made now (out of descriptors, ...): QEMU may retry.
        case transient(String)
    }

    /// Nil when the peer checks out; otherwise why not, in one sentence.
    public func problem(with hello: Channel.Hello, from peer: PeerCredentials) -> String? {
        switch verdict(for: hello, from: peer) {
        case .accepted: return nil
        case .refused(let why), .transient(let why): return why
        }
    }

    /// Reads /proc: blocking file I/O, so the daemon calls it through `BlockingWork`, never on
    /// Swift's cooperative pool. Peer-controlled text (its `-uuid` value, its executable's
    /// path) is escaped and bounded in the sentences.
    public func verdict(for hello: Channel.Hello, from peer: PeerCredentials) -> Verdict {
        verdict(for: hello, from: peer, pin: ProcessPin(pid: peer.pid, pidfd: nil, source: .unpinned)).0
    }

    /// The checks against a pinned process: the facts are read before and after the checks and
    /// must agree, and the pinned process must still be alive afterwards, so every /proc read
    /// was of that one process image. Returns the facts to re-check before HOOK (and, with
    /// libvirt, to compare with the domain's emulator). With `emulatorList` false the
    /// executable is left to `verdict(for:uuid:facts:peer:)` (libvirt's `<emulator>`).
    ///
    /// A pin from the channel socket (SO_PEERPIDFD) needs no start time, now or at the re-check
    /// (which asks the socket again), so /proc/PID/stat is read only on kernels without it:
    /// in a boot storm that read and the re-check's were a third of the identity work.
    public func verdict(for hello: Channel.Hello, from peer: PeerCredentials, pin: ProcessPin, emulatorList: Bool = true) -> (
        Verdict, ProcessFacts?
    ) {
        if Int32(bitPattern: hello.pid) != peer.pid {
            return (.refused("HELLO claims pid \(hello.pid) but the socket peer is pid \(peer.pid)"), nil)
        }
        switch pin.source {
        case .gone: return (.refused("pid \(peer.pid), which connected the channel, has exited"), nil)
        case .outOfDescriptors: return (.transient("cannot pin pid \(peer.pid) now: out of descriptors"), nil)
        case .socket, .pidfdOpen, .unpinned: break
        }
        let socketPinned = pin.isFromSocket
        let before: ProcessFacts
        switch facts(of: peer.pid, startTime: socketPinned ? .pinnedBySocket : .read) {
        case .success(let facts): before = facts
        case .failure(let error) where Self.isTransient(error.code):
            return (.transient("cannot read the facts of pid \(peer.pid) now: \(errnoName(error.code))"), nil)
        case .failure(let error): return (.refused("cannot read the facts of pid \(peer.pid) (\(errnoName(error.code)))"), nil)
        }
        if emulatorList, let problem = emulatorProblem(before, peer) { return (.refused(problem), nil) }
        let verdict = checks(hello, peer)
        guard verdict == .accepted else { return (verdict, nil) }
        // With a pidfd that is still alive afterwards, the pid named the pinned process all along
        // (a pid is not reused before its process is reaped): only an exec can have changed the
        // image, so the executable is compared again but the start time is not read again.
        let known: StartTime =
            socketPinned ? .pinnedBySocket : pin.pidfd != nil && before.executableInode != nil ? .known(before.startTime) : .read
        guard case .success(let after) = facts(of: peer.pid, startTime: known), after.isSameImage(as: before), pin.isAlive
        else {
            return (.refused("pid \(peer.pid) exited, exec'd or was replaced while its identity was being checked"), nil)
        }
        return (.accepted, before)
    }

    /// With libvirt's identity check: the pinned peer (its `facts` from the verdict above) runs
    /// the very file libvirt records as the domain's `<emulator>` (same device and inode, so a
    /// copy or a look-alike path is not it), and runs as the user and group libvirt runs the
    /// domain's QEMU as, or as root. Blocking (stat, user and group look-ups): call it through
    /// `BlockingWork`.
    public func verdict(for domain: DomainIdentity, uuid: GuestUUID, facts: ProcessFacts, peer: PeerCredentials) -> Verdict {
        let name = escapedForLog(domain.name, limit: 64)
        // Read only for a refusal's message.
        var executable: String { shownExecutable(facts, pid: peer.pid) }
        guard let emulator = domain.emulator else {
            return .refused(
                "libvirt records no <emulator> for domain \(name) (\(uuid)), so QEMU pid \(peer.pid) (\(executable)) cannot be checked against it")
        }
        var info = stat()
        guard stat(emulator, &info) == 0 else {
            let error = errno
            let why = "cannot stat the <emulator> libvirt records for domain \(name) (\(uuid)), \(escapedForLog(emulator)): \(errnoName(error))"
            return Self.isTransient(error) ? .transient(why) : .refused(why)
        }
        guard facts.executableDevice == UInt64(info.st_dev), facts.executableInode == UInt64(info.st_ino) else {
            let real = Self.realPath(emulator).map { $0 == emulator ? "" : " (\(escapedForLog($0)))" } ?? ""
            return .refused(
                "QEMU pid \(peer.pid) of guest \(uuid) runs \(executable), not the emulator libvirt records for domain \(name): \(escapedForLog(emulator))\(real)"
            )
        }
        if peer.uid == 0 { return .accepted }
        guard let label = domain.processLabel else {
            return .refused(
                "QEMU pid \(peer.pid) of guest \(uuid) runs as uid \(peer.uid) gid \(peer.gid), but libvirt reports no DAC label for domain \(name), so only root may be its QEMU"
            )
        }
        let shown = escapedForLog(label.description, limit: 128)
        let uid: UInt32
        let gid: UInt32
        switch (Self.userID(label.user), Self.groupID(label.group)) {
        case (.success(let user), .success(let group)):
            uid = user
            gid = group
        case (.failure(let error), _), (_, .failure(let error)):
            return .refused("cannot resolve the DAC label \(shown) libvirt reports for domain \(name) (\(uuid)): \(error.why)")
        }
        guard peer.uid == uid, peer.gid == gid else {
            return .refused(
                "QEMU pid \(peer.pid) of guest \(uuid) runs as uid \(peer.uid) gid \(peer.gid), but libvirt runs domain \(name)'s QEMU as \(shown) (uid \(uid) gid \(gid)) and only that or root is accepted"
            )
        }
        return .accepted
    }

    /// Right before HOOK hands the introspector's socket over: pid `pid` is still the process
    /// image whose identity was checked (the same process: its start time, or, for facts pinned
    /// by the socket, the channel's own SO_PEERPIDFD, still alive; the same executable: no exec
    /// since). Nil when it is. (No pidfd is kept for this, so that a hooked guest costs the
    /// broker one descriptor, not two.)
    public func recheck(pid: Int32, _ facts: ProcessFacts, channel: Int32) -> String? {
        guard facts.startTime == nil else { return recheck(pid: pid, facts) }
        // The process that connected the channel, whoever holds it now.
        let pidfd = kvmib_peer_pidfd(channel)
        guard pidfd >= 0 else {
            let error = errno
            return Self.isTransient(error)
                ? "cannot check QEMU pid \(pid) now: \(errnoName(error))" : "QEMU pid \(pid), which connected the channel, has exited"
        }
        defer { close(pidfd) }
        let now = self.facts(of: pid, startTime: .pinnedBySocket)
        // Alive after the read: the pid named that process during it.
        guard kvmib_pidfd_alive(pidfd) != 0 else { return "QEMU pid \(pid), which connected the channel, has exited" }
        switch now {
        case .success(let now) where now.isSameImage(as: facts): return nil
        case .success(let now): return "QEMU pid \(pid) exec'd \(shownExecutable(now, pid: pid)) since its identity was checked"
        case .failure(let error) where Self.isTransient(error.code): return "cannot check QEMU pid \(pid) now: \(errnoName(error.code))"
        case .failure: return "QEMU pid \(pid) has exited"
        }
    }

    /// The re-check for facts with a start time (kernels without SO_PEERPIDFD).
    public func recheck(pid: Int32, _ facts: ProcessFacts) -> String? {
        guard case .success(let now) = self.facts(of: pid), now.startTime != nil else { return "QEMU pid \(pid) has exited" }
        if now.startTime != facts.startTime { return "pid \(pid) is now another process (its start time changed)" }
        if !now.isSameImage(as: facts) {
            return "QEMU pid \(pid) exec'd \(shownExecutable(now, pid: pid)) since its identity was checked"
        }
        return nil
    }

    /// Where a process's start time comes from.
    enum StartTime {
        /// /proc/PID/stat.
        case read
        /// Already known (a live pidfd pins the pid to the process it was read for).
        case known(UInt64?)
        /// Not needed: the channel socket names the process.
        case pinnedBySocket
    }

    /// Start time (field 22 of /proc/PID/stat, after the parenthesised command name, which may
    /// hold anything) and the executable: its device and inode (`fstatat` of /proc/PID/exe);
    /// its path only when those cannot be read (then the path is what is compared). A message
    /// that shows the executable reads the path (`shownExecutable`).
    func facts(of pid: Int32, startTime source: StartTime = .read) -> Result<ProcessFacts, SystemErrno> {
        let startTime: UInt64?
        switch source {
        case .known(let known):
            startTime = known
        case .pinnedBySocket:
            startTime = nil
        case .read:
            let stat: [UInt8]
            switch readFile("\(procRoot)/\(pid)/stat", limit: 4096) {
            case .success(let bytes): stat = bytes
            case .failure(let error): return .failure(error)
            }
            guard let read = Self.startTime(stat: stat) else { return .failure(SystemErrno(EINVAL)) }
            startTime = read
        }
        var info = Glibc.stat()
        if fstatat(AT_FDCWD, "\(procRoot)/\(pid)/exe", &info, 0) == 0 {
            return .success(
                ProcessFacts(startTime: startTime, executable: "", executableDevice: UInt64(info.st_dev), executableInode: UInt64(info.st_ino)))
        }
        let statError = errno
        switch readLink("\(procRoot)/\(pid)/exe") {
        case .success(let target):
            return .success(ProcessFacts(startTime: startTime, executable: target, executableDevice: nil, executableInode: nil))
        case .failure(let error):
            return .failure(Self.isTransient(statError) ? SystemErrno(statError) : error)
        }
    }

    /// The executable for a message: the path the facts hold, else read now (escaped); "an
    /// unreadable executable" when it cannot be read. A file that is no longer on disk under any
    /// name (a QEMU started before an upgrade replaced its binary: /proc shows the path with
    /// " (deleted)") is said to be so, since that is why it no longer matches the emulator at
    /// the same path. Only then: a file may be named "... (deleted)", and a program run from
    /// memory (`/memfd:NAME (deleted)`) was never on disk, so it is shown as the kernel names it.
    func shownExecutable(_ facts: ProcessFacts, pid: Int32) -> String {
        var path = facts.executable
        if path.isEmpty, case .success(let target) = readLink("\(procRoot)/\(pid)/exe") { path = target }
        guard !path.isEmpty else { return "an unreadable executable" }
        var info = Glibc.stat()
        if path.hasSuffix(Self.deletedSuffix), path.hasPrefix("/"), !path.hasPrefix("/memfd:"),
            fstatat(AT_FDCWD, "\(procRoot)/\(pid)/exe", &info, 0) == 0, info.st_nlink == 0
        {
            return escapedForLog(String(path.dropLast(Self.deletedSuffix.count))) + " (replaced or removed on disk since it started)"
        }
        return escapedForLog(path)
    }

    /// Without libvirt: the peer's executable must be one of `emulators` (same device and inode).
    private func emulatorProblem(_ facts: ProcessFacts, _ peer: PeerCredentials) -> String? {
        guard !emulators.isEmpty else {
            return
                "pid \(peer.pid) runs \(shownExecutable(facts, pid: peer.pid)), and no emulator is configured (--emulator): without libvirt's identity check only the listed executables are QEMUs"
        }
        if let device = facts.executableDevice, let inode = facts.executableInode {
            for emulator in emulators {
                var info = stat()
                if stat(emulator, &info) == 0, UInt64(info.st_dev) == device, UInt64(info.st_ino) == inode { return nil }
            }
        }
        let list = emulators.map { escapedForLog($0) }.joined(separator: ", ")
        return "pid \(peer.pid) runs \(shownExecutable(facts, pid: peer.pid)), which is not a configured emulator (\(list))"
    }

    /// Field 22 of /proc/PID/stat (the start time), counted after the parenthesised command
    /// name, which may hold anything.
    static func startTime(stat: [UInt8]) -> UInt64? {
        guard let close = stat.lastIndex(of: UInt8(ascii: ")")) else { return nil }
        // After ")" come " state ppid ...": field 3 follows the first space; field 22 the 20th.
        var spaces = 0
        var index = close + 1
        while index < stat.count {
            if stat[index] == UInt8(ascii: " ") {
                spaces += 1
                if spaces == 20 { break }
            }
            index += 1
        }
        guard spaces == 20 else { return nil }
        var value: UInt64 = 0
        var digits = 0
        index += 1
        while index < stat.count, stat[index] >= UInt8(ascii: "0"), stat[index] <= UInt8(ascii: "9") {
            let (times, overflow1) = value.multipliedReportingOverflow(by: 10)
            let (sum, overflow2) = times.addingReportingOverflow(UInt64(stat[index] - UInt8(ascii: "0")))
            guard !overflow1, !overflow2 else { return nil }
            value = sum
            digits += 1
            index += 1
        }
        return digits > 0 ? value : nil
    }

    private func checks(_ hello: Channel.Hello, _ peer: PeerCredentials) -> Verdict {
        let data: [UInt8]
        switch readFile("\(procRoot)/\(peer.pid)/cmdline", limit: 1 << 20) {
        case .success(let bytes): data = bytes
        case .failure(let error) where Self.isTransient(error.code):
            return .transient("cannot read the command line of pid \(peer.pid) now: \(errnoName(error.code))")
        case .failure(let error): return .refused("cannot read the command line of pid \(peer.pid) (\(errnoName(error.code)))")
        }
        // Only the values of -uuid become strings (a libvirt command line has a hundred arguments).
        let arguments = data.split(separator: 0, omittingEmptySubsequences: false)
        let values = arguments.indices.filter {
            ($0 + 1) < arguments.count && (arguments[$0].elementsEqual("-uuid".utf8) || arguments[$0].elementsEqual("--uuid".utf8))
        }.map { String(decoding: arguments[$0 + 1], as: UTF8.self) }
        guard let text = values.first else {
            return .refused("QEMU pid \(peer.pid) has no -uuid argument, so its identity cannot be checked")
        }
        guard Set(values).count == 1 else {
            return .refused(
                "QEMU pid \(peer.pid) has several different -uuid arguments (\(values.map { escapedForLog($0, limit: 64) }.joined(separator: ", "))), so its identity is ambiguous"
            )
        }
        guard let uuid = GuestUUID(text) else {
            return .refused("QEMU pid \(peer.pid) has -uuid '\(escapedForLog(text, limit: 64))', which is not a UUID")
        }
        guard uuid == hello.uuid else {
            return .refused("HELLO claims UUID \(hello.uuid) but QEMU pid \(peer.pid) was started with -uuid \(uuid)")
        }
        return .accepted
    }

    /// What /proc/PID/exe appends to the path of a program whose file was removed (or replaced,
    /// as by an upgrade).
    static let deletedSuffix = " (deleted)"

    static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// Why a user or group name could not be resolved.
    struct Unresolved: Error {
        let why: String
    }

    /// A DAC label's user: `+N` is a number; else a name (a name that is no user but all
    /// digits is a number, as libvirt reads it).
    static func userID(_ text: String) -> Result<UInt32, Unresolved> {
        resolve(text, "user") { name in
            var entry = passwd()
            var result: UnsafeMutablePointer<passwd>?
            var buffer = [CChar](repeating: 0, count: 16384)
            let error = getpwnam_r(name, &entry, &buffer, buffer.count, &result)
            return (error, result.map { $0.pointee.pw_uid })
        }
    }

    static func groupID(_ text: String) -> Result<UInt32, Unresolved> {
        resolve(text, "group") { name in
            var entry = group()
            var result: UnsafeMutablePointer<group>?
            var buffer = [CChar](repeating: 0, count: 16384)
            let error = getgrnam_r(name, &entry, &buffer, buffer.count, &result)
            return (error, result.map { $0.pointee.gr_gid })
        }
    }

    private static func resolve(_ text: String, _ kind: String, _ lookUp: (String) -> (Int32, UInt32?)) -> Result<UInt32, Unresolved> {
        if text.hasPrefix("+") {
            guard let number = UInt32(text.dropFirst()) else { return .failure(Unresolved(why: "'\(escapedForLog(text))' is not a \(kind) id")) }
            return .success(number)
        }
        let (error, found) = lookUp(text)
        if let found { return .success(found) }
        if let number = UInt32(text) { return .success(number) }
        let reason = error == 0 ? "no such \(kind)" : errnoName(error)
        return .failure(Unresolved(why: "\(kind) '\(escapedForLog(text))': \(reason)"))
    }

    /// Errors that say "not now" rather than "not so".
    static func isTransient(_ error: Int32) -> Bool {
        [EMFILE, ENFILE, ENOMEM, EAGAIN, EINTR].contains(error)
    }

    private func readLink(_ path: String) -> Result<String, SystemErrno> {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink(path, &buffer, buffer.count - 1)
        guard count >= 0 else { return .failure(SystemErrno(errno)) }
        return .success(String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }

    private func readFile(_ path: String, limit: Int) -> Result<[UInt8], SystemErrno> {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return .failure(SystemErrno(errno)) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while bytes.count < limit {
            let count = read(fd, &chunk, chunk.count)
            if count < 0 {
                if errno == EINTR { continue }
                return .failure(SystemErrno(errno))
            }
            if count == 0 { break }
            bytes += chunk.prefix(count)
            // A short read is the end: /proc/PID/stat is one record that a read returns whole,
            // and /proc/PID/cmdline fills the buffer unless its end comes first (one system call
            // per file, not two, for each guest that connects).
            if count < chunk.count { break }
        }
        return .success(bytes)
    }
}

/// An errno as an error value, for results of raw system calls.
struct SystemErrno: Error {
    let code: Int32
    init(_ code: Int32) { self.code = code }
}
