import CKVMIBroker

/// Has the threads that start from now on allocate from glibc's main arena (threads that
/// have allocated already keep the arenas they made): call it before the threads that matter
/// start. `kvmi-broker run` calls it before the reactor's, the log writer's and the blocking
/// work's threads exist, after Swift's own pool threads.
///
/// glibc gives each thread that allocates its own arena, and a thread's arena grows a page or
/// two at a time with `mprotect` (the main arena grows with `brk`, 128 KiB at a time). In a boot
/// storm the reactor's thread allocates each session's state as the guest arrives: measured
/// with `perf record -e raw_syscalls:sys_enter` on the broker during `kvmi-bench scale --guests
/// 1000`, 3.6 `mprotect` calls per guest, none with one arena. The broker's threads are few and
/// glibc's per-thread caches serve their small allocations without the arena's lock.
@discardableResult
public func useOneMallocArena() -> Bool {
    kvmib_malloc_one_arena() == 0
}
