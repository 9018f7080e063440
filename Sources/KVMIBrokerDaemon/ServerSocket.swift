import CKVMIBroker
import KVMIBrokerCore
import KVMIBrokerOS

#if canImport(Glibc)
    import Glibc
#endif

/// The unix sockets the daemon serves (QEMU's channel, the hook's control socket), created so
/// that no one else can take or widen them:
///
/// - the socket's directory must be owned by root or the broker's user and writable by no
///   one else (whoever can write it could replace the socket with their own);
/// - one broker per socket: under an exclusive `flock` on `<socket>.lock` (held from the check
///   to the rename, so two brokers starting at once cannot both win), a socket already at the
///   path is probed with a non-blocking connect: if it accepts (or its backlog is full), a live
///   broker serves it, and this one refuses to start and leaves it alone; if it refuses, it was
///   left by a broker that stopped, and is replaced. No descriptor outlives `bind`;
/// - the socket is bound in a private 0700 directory beside its final name, given its group
///   and mode there (by name within that private directory, never following a symlink), set
///   listening, and only then renamed into place: it never exists anywhere reachable with a
///   wider mode, it accepts from the moment it appears, and the process-wide umask is not
///   touched;
/// - nothing follows a symlink: the directory is opened with O_NOFOLLOW and every later step
///   works relative to that descriptor.
public enum ServerSocket {
    /// Binds and listens on `path` (non-blocking, close-on-exec) with `mode`, and `group` as
    /// the socket's group when given. Throws a `BrokerError` that names the path and says why.
    public static func bind(path: String, mode: mode_t, group: gid_t? = nil, what: String) throws(BrokerError) -> Descriptor {
        func fail(_ message: String, _ errno: Int32? = nil) -> BrokerError {
            BrokerError(.invalidArgument, "\(what): \(message)", at: path, errno: errno)
        }
        guard path.hasPrefix("/"), !path.hasSuffix("/"), !path.utf8.contains(0) else {
            throw fail("the socket path must be an absolute file name")
        }
        let slash = path.utf8.lastIndex(of: UInt8(ascii: "/"))!
        let directory = slash == path.utf8.startIndex ? "/" : String(path[..<slash])
        let name = String(path[path.utf8.index(after: slash)...])
        guard name != ".", name != ".." else { throw fail("the socket path must name a file") }
        guard name.utf8.count + 5 <= 255 else { throw fail("the socket's name is too long") }

        try makeDirectories(directory, what: what, socket: path)
        let directoryFD = open(directory, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard directoryFD >= 0 else {
            let error = errno
            if error == ELOOP || error == ENOTDIR {
                throw fail("the socket directory \(escapedForLog(directory)) is a symbolic link or not a directory; name the directory itself")
            }
            throw fail("cannot open the socket directory \(escapedForLog(directory))", error)
        }
        defer { close(directoryFD) }
        var info = stat()
        guard fstat(directoryFD, &info) == 0 else { throw fail("cannot stat the socket directory", errno) }
        let me = geteuid()
        guard info.st_uid == 0 || info.st_uid == me else {
            throw BrokerError(
                .insecureFile,
                "\(what): the socket directory \(escapedForLog(directory)) is owned by uid \(info.st_uid), not root or the broker's uid \(me): its owner could replace the socket",
                at: path)
        }
        let directoryMode = info.st_mode & 0o7777
        if directoryMode & 0o022 != 0 {
            let who = directoryMode & 0o022 == 0o022 ? "group and others" : directoryMode & 0o020 != 0 ? "group" : "others"
            throw BrokerError(
                .insecureFile,
                "\(what): the socket directory \(escapedForLog(directory)) is writable by \(who) (mode \(octal(directoryMode))): anyone who may write it could replace the socket; use a directory only root or uid \(me) can write, such as /run/kvmi-broker",
                at: path)
        }

        // One broker per socket: the lock serialises starting brokers; the probe finds a live one.
        let lockName = name + ".lock"
        let lock = openat(directoryFD, lockName, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0o600)
        guard lock >= 0 else { throw fail("cannot open the lock file \(escapedForLog(lockPath(for: path)))", errno) }
        defer { close(lock) }
        var lockInfo = stat()
        guard fstat(lock, &lockInfo) == 0, lockInfo.st_mode & S_IFMT == S_IFREG else {
            throw fail("the lock file \(escapedForLog(lockPath(for: path))) is not a regular file")
        }
        if flock(lock, LOCK_EX | LOCK_NB) != 0 {
            let error = errno
            guard error == EWOULDBLOCK else { throw fail("cannot lock \(escapedForLog(lockPath(for: path)))", error) }
            throw BrokerError(
                .busy, "\(what): another kvmi-broker is starting on this socket right now (it holds \(escapedForLog(lockPath(for: path))))", at: path)
        }
        var existing = stat()
        if fstatat(directoryFD, name, &existing, AT_SYMLINK_NOFOLLOW) == 0 {
            let kind = existing.st_mode & S_IFMT
            guard kind == S_IFSOCK else {
                let what = kind == S_IFLNK ? "a symbolic link" : kind == S_IFDIR ? "a directory" : kind == S_IFREG ? "a regular file" : "not a socket"
                throw fail("the path exists and is \(what); remove it (the broker replaces only a socket left by a broker that stopped)")
            }
            if isServed(directoryFD, name) {
                throw BrokerError(
                    .busy,
                    "\(what): another kvmi-broker already serves this socket (it accepts connections); stop it first, or give this one another socket path",
                    at: path)
            }
        } else if errno != ENOENT {
            throw fail("cannot stat the socket path", errno)
        }
        return try bindInPrivateDirectory(directoryFD, name: name, mode: mode, group: group, fail: fail)
    }

    /// The lock file beside a socket.
    public static func lockPath(for path: String) -> String { path + ".lock" }

    /// The identity (device, inode) of the socket file at `path`, taken when a server starts
    /// serving it; nil if the path is not a socket. `fstat` of the listening descriptor cannot
    /// serve: it names the socket in sockfs, never the file the bind created.
    public static func fileIdentity(_ path: String) -> SocketFileIdentity? {
        var named = stat()
        guard lstat(path, &named) == 0, named.st_mode & S_IFMT == S_IFSOCK else { return nil }
        return SocketFileIdentity(device: UInt64(named.st_dev), inode: UInt64(named.st_ino))
    }

    /// Removes the socket file at `path` if it is still the one this server bound (`identity`,
    /// taken at start): a broker that stops must not unlink a socket another broker now serves.
    public static func remove(path: String, ifStill identity: SocketFileIdentity?) {
        guard let identity, fileIdentity(path) == identity else { return }
        unlink(path)
    }

    // MARK: -

    /// Whether a listener answers at `name`: a non-blocking connect that succeeds, or finds the
    /// backlog full, means a live server; refused means a socket left behind.
    private static func isServed(_ directoryFD: Int32, _ name: String) -> Bool {
        let raw = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard raw >= 0 else { return true }
        defer { close(raw) }
        let result = withUnixAddress("/proc/self/fd/\(directoryFD)/\(name)") { Glibc.connect(raw, $0, $1) }
        guard let result else { return true }
        if result == 0 { return true }
        return errno == EAGAIN || errno == EINPROGRESS || errno == EINTR
    }

    /// Calls `body` with a `sockaddr_un` for `path`, or returns nil if the path does not fit.
    private static func withUnixAddress(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in bytes.enumerated() { raw[index] = byte }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
        return withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) }
        }
    }

    private static func bindInPrivateDirectory(
        _ directoryFD: Int32, name: String, mode: mode_t, group: gid_t?, fail: (String, Int32?) -> BrokerError
    ) throws(BrokerError) -> Descriptor {
        var privateName = ""
        for _ in 0..<16 {
            let candidate = ".\(name).bind-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            if mkdirat(directoryFD, candidate, 0o700) == 0 {
                privateName = candidate
                break
            }
            if errno != EEXIST { throw fail("cannot create a private directory to bind in", errno) }
        }
        guard !privateName.isEmpty else { throw fail("cannot create a private directory to bind in", EEXIST) }
        let privateFD = openat(directoryFD, privateName, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        defer {
            if privateFD >= 0 {
                unlinkat(privateFD, "s", 0)
                close(privateFD)
            }
            unlinkat(directoryFD, privateName, AT_REMOVEDIR)
        }
        guard privateFD >= 0 else { throw fail("cannot open the private directory", errno) }
        let raw = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard raw >= 0 else { throw fail("socket() failed", errno) }
        let listener = Descriptor(adopting: raw)
        // The private directory by its descriptor: a short path whatever the final one's length.
        let bound = withUnixAddress("/proc/self/fd/\(privateFD)/s") { Glibc.bind(raw, $0, $1) }
        guard bound == 0 else {
            let error = errno
            listener.close()
            throw fail("bind() failed", error)
        }
        if let group, fchownat(privateFD, "s", uid_t.max, group, AT_SYMLINK_NOFOLLOW) != 0 {
            let error = errno
            listener.close()
            throw fail("cannot give the socket to group \(group)", error)
        }
        guard fchmodat(privateFD, "s", mode, 0) == 0 else {
            let error = errno
            listener.close()
            throw fail("cannot set the socket's mode to \(octal(mode))", error)
        }
        guard listen(raw, 1024) == 0 else {
            let error = errno
            listener.close()
            throw fail("listen() failed", error)
        }
        guard renameat(privateFD, "s", directoryFD, name) == 0 else {
            let error = errno
            listener.close()
            throw fail("cannot move the socket into place", error)
        }
        return listener
    }

    /// Creates the missing directories of `path` with mode 0755 (never following a symlink
    /// for the last one: `open` with O_NOFOLLOW checks it next).
    private static func makeDirectories(_ path: String, what: String, socket: String) throws(BrokerError) {
        var prefix = ""
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
                throw BrokerError(.io, "\(what): cannot create the socket directory \(escapedForLog(prefix))", at: socket, errno: errno)
            }
        }
    }

    private static func octal(_ mode: mode_t) -> String {
        let text = String(mode, radix: 8)
        return text.count >= 4 ? text : String(repeating: "0", count: 4 - text.count) + text
    }
}

/// Which file a server's unix socket is (see `ServerSocket.fileIdentity`).
public struct SocketFileIdentity: Equatable, Sendable {
    public let device: UInt64
    public let inode: UInt64
}
