import CKVMIBroker
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// One thread of its own that runs the jobs given to it, in order. What the broker keeps off
/// Swift's cooperative threads (blocking `/proc` reads, log writes) runs on one of these rather
/// than on a dispatch queue: a serial dispatch queue borrows a worker from libdispatch's
/// overcommit pool each time it becomes busy, and that pool grows with the number of queues
/// busy at once and keeps idle workers around, so the broker's thread count depended on timing.
/// A `WorkThread` is exactly one thread, started when the first job arrives (a component
/// that is never used costs none), named for `top -H` and `ps -L`, and ended when its owner
/// goes away.
public final class WorkThread: Sendable {
    private let box: Box

    /// - Parameters:
    ///   - name: the thread's name, at most 15 bytes (what the kernel keeps).
    ///   - background: the thread runs as SCHED_BATCH (its nice value kept): when the reactor's
    ///     thread hands it work it does not preempt the reactor where it is woken, and runs when a
    ///     CPU is free or the reactor's slice ends, with the same share of the CPU. In a
    ///     1,000-guest boot storm the blocking-work thread preempted the reactor about 340 times
    ///     (`perf sched timehist --state`), and the reactor's thread is what the storm waits for.
    public init(name: String, background: Bool = false) {
        precondition(name.utf8.count <= 15, "a thread name holds at most 15 bytes: \(name)")
        box = Box(name: name, background: background)
    }

    deinit {
        box.close()
    }

    /// Queues `job`; it runs on the thread after the jobs queued before it. Never blocks
    /// (the queue is the caller's to bound).
    public func submit(_ job: @escaping @Sendable () -> Void) {
        box.submit(job)
    }

    /// The queue and the thread's state, shared by the owner and the thread (the thread must
    /// not keep the owner alive).
    private final class Box: @unchecked Sendable {
        let name: String
        let background: Bool
        // Guarded by `condition`.
        private let condition = NSCondition()
        private var jobs: [@Sendable () -> Void] = []
        private var started = false
        private var idle = false
        private var closed = false

        init(name: String, background: Bool) {
            self.name = name
            self.background = background
        }

        func submit(_ job: @escaping @Sendable () -> Void) {
            condition.lock()
            jobs.append(job)
            let start = !started
            started = true
            // Only a thread waiting for work needs a wake-up (no system call otherwise); given
            // after unlocking, so the woken thread does not block at once on the lock we hold.
            let wake = idle
            condition.unlock()
            if wake { condition.signal() }
            if start {
                let thread = Thread { [self] in run() }
                thread.start()
            }
        }

        func close() {
            condition.lock()
            closed = true
            condition.signal()
            condition.unlock()
        }

        private func run() {
            kvmib_name_thread(name)
            // Best effort: a thread that stays SCHED_OTHER works the same, only less politely. One
            // that is not `background` says SCHED_OTHER, whatever it inherited from the thread
            // that started it (the first `submit`'s, perhaps a background one's).
            if background { _ = kvmib_thread_batch() } else { useNormalScheduling() }
            var batch: [@Sendable () -> Void] = []
            while true {
                condition.lock()
                while jobs.isEmpty && !closed {
                    idle = true
                    condition.wait()
                    idle = false
                }
                if jobs.isEmpty {
                    condition.unlock()
                    return
                }
                // Takes every job queued so far at once: one lock per batch, not per job.
                swap(&batch, &jobs)
                condition.unlock()
                for job in batch { job() }
                batch.removeAll(keepingCapacity: true)
            }
        }
    }
}

/// Puts the calling thread in SCHED_OTHER, whatever it inherited from the thread that created it
/// (a thread started from a SCHED_BATCH one is SCHED_BATCH). Best effort.
func useNormalScheduling() {
    var normal = sched_param()
    _ = pthread_setschedparam(pthread_self(), SCHED_OTHER, &normal)
}
