import Dispatch

/// Runs blocking calls (reading /proc, loading files) on a serial dispatch queue of its own,
/// so they never occupy one of Swift's cooperative threads (two on this machine: one blocked
/// read would halve the broker). Serial on purpose: the work is short, and one thread keeps
/// the broker's thread count bounded however many guests arrive at once.
public final class BlockingWork: Sendable {
    public static let shared = BlockingWork(label: "kvmi-broker.blocking")

    private let queue: DispatchQueue

    public init(label: String) {
        queue = DispatchQueue(label: label)
    }

    /// Runs `body` on the queue and returns its result. Not cancellable once started: keep
    /// `body` short and bounded.
    public func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { (continuation: CheckedContinuation<T, Never>) in
            queue.async { continuation.resume(returning: body()) }
        }
    }
}
