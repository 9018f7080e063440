import Foundation
import Logging
import Synchronization
import Testing

@testable import KVMIBrokerDaemon
@testable import KVMIBrokerOS

#if canImport(Glibc)
    import Glibc
#endif

/// The calling thread's name and id, from /proc.
func currentThread() -> (name: String, tid: Int32) {
    let name = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    // /proc/thread-self links to "PID/task/TID".
    let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self")) ?? ""
    return (name ?? "?", Int32(link.split(separator: "/").last ?? "") ?? -1)
}

/// SCHED_BATCH (<linux/sched.h>; not among Glibc's names in Swift).
let schedBatch: Int32 = 3

/// A handler that notes the thread each record is written on, and its scheduling policy.
private struct ThreadNotingHandler: LogHandler {
    let seen: Seen<String>
    var policies: Seen<Int32>? = nil
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        let name = currentThread().name
        seen.value.withLock { $0.append(name) }
        let policy = sched_getscheduler(0)
        policies?.value.withLock { $0.append(policy) }
    }
}

/// What jobs on other threads saw, shared with the test.
final class Seen<Element: Sendable>: Sendable {
    let value = Mutex<[Element]>([])
}

extension OSLayerTests {
    @Suite("Threads of their own: blocking work and log writes")
    struct WorkThreadTests {
        @Test("a work thread runs its jobs in order, on one thread with its name, started by the first job")
        func jobsInOrderOnOneNamedThread() async throws {
            let before = threadNames().filter { $0 == "kvmib-t-order" }.count
            let thread = WorkThread(name: "kvmib-t-order")
            // Not started before it has work: a component that is never used costs no thread.
            #expect(threadNames().filter { $0 == "kvmib-t-order" }.count == before)
            let seen = Seen<(Int, String, Int32)>()
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                for index in 0..<1_000 {
                    thread.submit {
                        let (name, tid) = currentThread()
                        seen.value.withLock { $0.append((index, name, tid)) }
                        if index == 999 { done.resume() }
                    }
                }
            }
            let jobs = seen.value.withLock { $0 }
            #expect(jobs.map(\.0) == Array(0..<1_000))
            #expect(Set(jobs.map(\.1)) == ["kvmib-t-order"])
            #expect(Set(jobs.map(\.2)).count == 1)
        }

        @Test("a work thread ends when its owner goes away")
        func endsWithItsOwner() async throws {
            var thread: WorkThread? = WorkThread(name: "kvmib-t-end")
            let tid = await withCheckedContinuation { (done: CheckedContinuation<Int32, Never>) in
                thread?.submit { done.resume(returning: currentThread().tid) }
            }
            #expect(FileManager.default.fileExists(atPath: "/proc/self/task/\(tid)"))
            thread = nil
            // Waits for the thread's exit (no event to wait on from outside; bounded generously).
            let deadline = ContinuousClock.now.advanced(by: .seconds(60))
            while FileManager.default.fileExists(atPath: "/proc/self/task/\(tid)") && ContinuousClock.now < deadline {
                await Task.yield()
                usleep(1_000)
            }
            #expect(!FileManager.default.fileExists(atPath: "/proc/self/task/\(tid)"), "thread \(tid) is still there")
            _ = thread
        }

        @Test("a reactor or a plain work thread started from a SCHED_BATCH helper runs SCHED_OTHER all the same (no inherited policy)")
        func noInheritedBatch() async throws {
            // Started on the blocking-work thread (SCHED_BATCH), as whatever touches them first may be.
            let reactor = await BlockingWork.shared.run { IOReactor() }
            let reactorPolicy = await withTaskExecutorPreference(reactor) { sched_getscheduler(0) }
            #expect(reactorPolicy == SCHED_OTHER)
            let plain = WorkThread(name: "kvmib-t-plain")
            let plainPolicy = await withCheckedContinuation { (done: CheckedContinuation<Int32, Never>) in
                BlockingWork.shared.submit { plain.submit { done.resume(returning: sched_getscheduler(0)) } }
            }
            #expect(plainPolicy == SCHED_OTHER)
            // And one that is background from a plain thread is SCHED_BATCH.
            let background = WorkThread(name: "kvmib-t-batch", background: true)
            let backgroundPolicy = await withCheckedContinuation { (done: CheckedContinuation<Int32, Never>) in
                background.submit { done.resume(returning: sched_getscheduler(0)) }
            }
            #expect(backgroundPolicy == schedBatch)
        }

        @Test("a task that prefers the reactor runs on its thread, before and after a socket wait")
        func reactorIsAnExecutor() async throws {
            let reactor = IOReactor.shared
            // (LoadTests' helper: spelling Glibc's SOCK_ constants here failed to compile in a
            // fresh build of this module on this toolchain, depending on the files compiled with it.)
            let (near, far) = try socketPair()
            let peer = far.raw
            let names = try await withTaskExecutorPreference(reactor) { () async throws -> [String] in
                let before = currentThread().name
                Thread { _ = send(peer, "x", 1, 0) }.start()
                _ = try await reactor.wait(for: .readable, on: near.raw)
                return [before, currentThread().name]
            }
            #expect(names == ["kvmib-reactor", "kvmib-reactor"])
            _ = far
        }

        @Test(
            "/proc reads and log records run on the broker's own threads, not on libdispatch's workers; those run as SCHED_BATCH, the reactor not"
        )
        func brokerThreadsAreItsOwn() async throws {
            let (blocking, blockingPolicy) = await BlockingWork.shared.run { (currentThread().name, sched_getscheduler(0)) }
            #expect(blocking == "kvmib-blocking")
            let seen = Seen<String>()
            let policies = Seen<Int32>()
            let writer = LogWriter(capacity: 16)
            writer.write(
                LogEvent(level: .info, message: "where am I", metadata: nil, source: "test", file: #fileID, function: #function, line: #line),
                with: ThreadNotingHandler(seen: seen, policies: policies))
            #expect(writer.flush(timeout: .seconds(60)))
            #expect(seen.value.withLock { $0 } == ["kvmib-log"])
            // Handed work by the reactor's thread, they must not preempt it where they are woken.
            #expect(blockingPolicy == schedBatch)
            #expect(policies.value.withLock { $0 } == [schedBatch])
            let reactorPolicy = await withTaskExecutorPreference(IOReactor.shared) { sched_getscheduler(0) }
            #expect(reactorPolicy == SCHED_OTHER)
        }
    }
}

/// The names of a process's threads (this process's by default).
func threadNames(pid: String = "self") -> [String] {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
    return tasks.compactMap { task in
        (try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
