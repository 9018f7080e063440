import CKVMIBroker

/// Has glibc serve every thread from its main arena: call it while the calling thread is the
/// only one that has allocated (`kvmi-broker`'s `main` calls it first thing). Arenas made
/// before the call stay, and glibc hands them out again to threads that start later, so a call
/// made after Swift's pool threads have allocated (as `run` made it until 2026-12-04) left the
/// reactor's thread on a pool thread's arena or not, depending on timing.
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
