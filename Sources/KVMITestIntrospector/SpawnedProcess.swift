import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// Test equipment: a child process started with posix_spawn, its output in a log file, reaped
/// with waitpid. (Foundation's Process reaps children on its own and its waitUntilExit can
/// hang when tests kill children with signals; this keeps the pid under our control.)
public final class SpawnedProcess: @unchecked Sendable {
    public let pid: pid_t
    public let logPath: String
    private let lock = NSLock()
    private var exitStatus: Int32?

    /// `descriptors` are passed to the child as 3, 4, 5, ...; with `ownProcessGroup` the child
    /// leads a process group of its own (so `kill(-pid, ...)` reaches all it starts).
    public init(
        _ executable: String, _ arguments: [String], environment: [String: String]? = nil, logPath: String, descriptors: [Int32] = [],
        ownProcessGroup: Bool = false
    ) throws {
        self.logPath = logPath
        // Move the descriptors out of the way of their targets before the dup2s.
        let high = descriptors.map { fcntl($0, F_DUPFD_CLOEXEC, 100) }
        defer { high.filter { $0 >= 0 }.forEach { close($0) } }
        guard !high.contains(where: { $0 < 0 }) else {
            throw NSError(domain: "spawn", code: Int(errno), userInfo: [NSLocalizedDescriptionKey: "cannot duplicate the descriptors to pass"])
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        for (offset, fd) in high.enumerated() { posix_spawn_file_actions_adddup2(&actions, fd, Int32(3 + offset)) }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // A clean signal state: the test runner's blocked or ignored signals must not leak into children.
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        var defaults = sigset_t()
        sigfillset(&defaults)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF
        if ownProcessGroup {
            posix_spawnattr_setpgroup(&attributes, 0)
            flags |= POSIX_SPAWN_SETPGROUP
        }
        posix_spawnattr_setflags(&attributes, Int16(flags))
        let environment = (environment ?? ProcessInfo.processInfo.environment).map { "\($0.key)=\($0.value)" }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var child: pid_t = 0
        let result = posix_spawn(&child, executable, &actions, &attributes, argv, envp)
        guard result == 0 else {
            throw NSError(
                domain: "spawn", code: Int(result),
                userInfo: [NSLocalizedDescriptionKey: "posix_spawn \(executable): \(String(cString: strerror(result)))"])
        }
        pid = child
    }

    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// True until the child has exited (reaps it when it has).
    public var isRunning: Bool {
        lock.lock()
        defer { lock.unlock() }
        if exitStatus != nil { return false }
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == pid {
            exitStatus = status
            return false
        }
        return true
    }

    /// Waits for the exit (up to `timeout`); returns the exit status, or nil if it still runs.
    public func wait(timeout: TimeInterval) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while isRunning && Date() < deadline { usleep(10_000) }
        lock.lock()
        defer { lock.unlock() }
        guard let status = exitStatus else { return nil }
        return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }

    /// Sends `signal`, waits up to `grace` for the exit, then SIGKILLs and reaps.
    public func terminate(_ signal: Int32 = SIGTERM, grace: TimeInterval = 5) {
        guard isRunning else { return }
        kill(pid, signal)
        let deadline = Date().addingTimeInterval(grace)
        while isRunning && Date() < deadline { usleep(10_000) }
        if isRunning {
            kill(pid, SIGKILL)
            while isRunning { usleep(5_000) }
        }
    }

    deinit { terminate(SIGKILL, grace: 0) }
}
