import CKVMIBroker

/// Has every thread allocate from glibc's main arena; call before any thread starts.
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
