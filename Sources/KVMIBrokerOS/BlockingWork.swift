/// Runs blocking calls (reading /proc, loading files) on a thread of its own (`WorkThread`),
/// so they never occupy one of Swift's cooperative threads (two on this machine: one blocked
/// read would halve the broker). Serial on purpose: the work is short, and one thread keeps
/// the broker's thread count bounded however many guests arrive at once.
public final class BlockingWork: Sendable {
    public static let shared = BlockingWork(label: "kvmib-blocking")

    private let thread: WorkThread

    /// - Parameter label: the thread's name (at most 15 bytes).
    public init(label: String) {
        thread = WorkThread(name: label, background: true)
    }

    /// Runs `body` on the thread and returns its result. Not cancellable once queued: keep
    /// `body` short and bounded.
    public func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { (continuation: CheckedContinuation<T, Never>) in
            thread.submit { continuation.resume(returning: body()) }
        }
    }

    /// Runs `body` on the thread, for a caller that is not a task (a callback that continues
    /// from `body` itself). Not cancellable once queued: keep `body` short and bounded.
    public func submit(_ body: @escaping @Sendable () -> Void) {
        thread.submit(body)
    }
}
