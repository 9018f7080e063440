import Foundation
import KVMIBrokerCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Wakes the sessions waiting for a unix endpoint to appear, so that a guest is connected when
/// its introspector binds its socket, not a back-off later.
///
/// One inotify descriptor for the process, read through the `IOReactor` (no thread of its own);
/// one watch per directory, shared by every path waited for in it; waiters kept by directory and
/// file name, so an event costs O(sessions waiting on that path), never O(guests). A waiter is
/// woken at most once and then forgotten. Missing an event is harmless: the caller keeps its
/// back-off timer as the fallback. A directory that does not exist cannot be watched (`watch`
/// returns nil and the caller relies on the back-off alone).
public final class EndpointWatcher: Sendable {
    /// The process-wide watcher; nil when inotify is unavailable (every wait is then the back-off).
    public static let shared: EndpointWatcher? = try? EndpointWatcher()

    /// What wakes a waiter: a file created, moved or renamed into the directory. A unix socket
    /// created by bind() is an IN_CREATE.
    static let mask = UInt32(IN_CREATE | IN_MOVED_TO) | UInt32(IN_ONLYDIR)

    private struct Directory {
        /// The paths naming it (two, when a symlink leads here too).
        var paths: Set<String>
        /// File name -> waiter token -> wake-up.
        var waiters: [String: [UInt64: @Sendable () -> Void]] = [:]
        var count = 0
    }

    private struct State {
        var directories: [Int32: Directory] = [:]
        var byPath: [String: Int32] = [:]
        var tokens: [UInt64: (wd: Int32, name: String)] = [:]
        var nextToken: UInt64 = 1

        /// Drops a directory and the paths naming it (O(its paths)).
        mutating func forget(_ wd: Int32) {
            guard let directory = directories.removeValue(forKey: wd) else { return }
            for path in directory.paths { byPath[path] = nil }
        }
    }

    private let descriptor: Descriptor
    private let reactor: IOReactor
    private let state = Mutex(State())

    public init(reactor: IOReactor = .shared) throws(BrokerError) {
        let fd = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        guard fd >= 0 else { throw BrokerError(.io, "inotify_init1 failed", errno: errno) }
        descriptor = Descriptor(adopting: fd)
        self.reactor = reactor
        Task.detached { [self] in await self.readLoop() }
    }

    /// Waiters and directory watches held, for tests that prove nothing piles up.
    public var footprint: (waiters: Int, directories: Int) {
        state.withLock { ($0.tokens.count, $0.directories.count) }
    }

    /// Calls `wake` (once, from the watcher's task) when a file named like `path` is created in
    /// or moved into its directory. With `ifPresent`, a file already there when the watch is in
    /// place wakes at once (the endpoint appeared between the failed connect and this call).
    /// Returns the waiter's token for `cancel`, or nil when the path cannot be watched (an
    /// abstract name, a missing directory, no inotify watches left).
    public func watch(_ path: String, ifPresent: Bool, wake: @escaping @Sendable () -> Void) -> UInt64? {
        guard path.hasPrefix("/"), let slash = path.lastIndex(of: "/") else { return nil }
        let directory = slash == path.startIndex ? "/" : String(path[..<slash])
        let name = String(path[path.index(after: slash)...])
        guard !name.isEmpty else { return nil }
        let token = state.withLock { state -> UInt64? in
            let wd: Int32
            if let known = state.byPath[directory] {
                wd = known
            } else {
                wd = inotify_add_watch(descriptor.raw, directory, Self.mask)
                guard wd >= 0 else { return nil }
                // Two paths naming one directory (a symlink) share the kernel's watch.
                state.directories[wd, default: Directory(paths: [])].paths.insert(directory)
                state.byPath[directory] = wd
            }
            let token = state.nextToken
            state.nextToken += 1
            state.directories[wd]!.waiters[name, default: [:]][token] = wake
            state.directories[wd]!.count += 1
            state.tokens[token] = (wd, name)
            return token
        }
        guard let token else { return nil }
        if ifPresent, access(path, F_OK) == 0, let waiter = take(token) { waiter() }
        return token
    }

    /// Forgets a waiter that no longer waits (its retry came first, its session ended).
    public func cancel(_ token: UInt64) {
        _ = take(token)
    }

    /// Removes a waiter and returns its wake-up; drops the directory's watch with its last waiter.
    private func take(_ token: UInt64) -> (@Sendable () -> Void)? {
        state.withLock { state in
            guard let (wd, name) = state.tokens.removeValue(forKey: token), state.directories[wd] != nil else { return nil }
            // Edited in place (no copy of the directory's table): O(1) per waiter however many
            // guests wait in the same directory (per-guest sockets).
            let wake = state.directories[wd]!.waiters[name]?.removeValue(forKey: token)
            if state.directories[wd]!.waiters[name]?.isEmpty == true { state.directories[wd]!.waiters[name] = nil }
            state.directories[wd]!.count -= 1
            if state.directories[wd]!.count == 0 {
                state.forget(wd)
                _ = inotify_rm_watch(descriptor.raw, wd)
            }
            return wake
        }
    }

    private func readLoop() async {
        var buffer = [UInt8](repeating: 0, count: 16 * 1024)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(descriptor.raw, $0.baseAddress, $0.count) }
            if count < 0 {
                guard errno == EAGAIN || errno == EINTR else { return }
                if errno == EAGAIN {
                    // The reactor cannot watch the descriptor (or the task is cancelled): stop here
                    // rather than spin on EAGAIN; every wait falls back to its back-off timer.
                    guard (try? await reactor.wait(for: .readable, on: descriptor.raw)) != nil else { return }
                }
                continue
            }
            for wake in woken(by: buffer[..<count]) { wake() }
        }
    }

    /// The waiters a batch of `inotify_event` records wakes, removed from the table.
    private func woken(by bytes: ArraySlice<UInt8>) -> [@Sendable () -> Void] {
        var offset = bytes.startIndex
        var wakes: [@Sendable () -> Void] = []
        state.withLock { state in
            func wakeAll(_ wd: Int32, dropWatch: Bool) {
                guard let directory = state.directories[wd] else { return }
                for (_, waiters) in directory.waiters {
                    for (token, wake) in waiters {
                        state.tokens[token] = nil
                        wakes.append(wake)
                    }
                }
                state.forget(wd)
                if !dropWatch { _ = inotify_rm_watch(descriptor.raw, wd) }
            }
            while bytes.endIndex - offset >= 16 {
                func word(_ at: Int) -> UInt32 {
                    bytes[(offset + at)..<(offset + at + 4)].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
                }
                let wd = Int32(bitPattern: word(0))
                let mask = word(4)
                let length = Int(word(12))
                let nameBytes = bytes[(offset + 16)..<min(offset + 16 + length, bytes.endIndex)].prefix { $0 != 0 }
                offset += 16 + length
                if mask & UInt32(IN_Q_OVERFLOW) != 0 {
                    // Events were lost: wake everyone, each session simply tries again.
                    for wd in Array(state.directories.keys) { wakeAll(wd, dropWatch: false) }
                    continue
                }
                if mask & UInt32(IN_IGNORED) != 0 {
                    // The directory went away (or was unmounted): its waiters try again and fall back to the back-off.
                    wakeAll(wd, dropWatch: true)
                    continue
                }
                guard state.directories[wd] != nil, let name = String(validating: nameBytes, as: UTF8.self),
                    let waiters = state.directories[wd]!.waiters.removeValue(forKey: name)
                else { continue }
                for (token, wake) in waiters {
                    state.tokens[token] = nil
                    wakes.append(wake)
                }
                state.directories[wd]!.count -= waiters.count
                if state.directories[wd]!.count == 0 {
                    state.forget(wd)
                    _ = inotify_rm_watch(descriptor.raw, wd)
                }
            }
        }
        return wakes
    }
}
