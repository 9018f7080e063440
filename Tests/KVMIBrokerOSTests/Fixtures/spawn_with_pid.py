#!/usr/bin/env python3
"""Test equipment: runs a program as a chosen pid, to force a pid reuse.

Usage: spawn_with_pid.py PID PROGRAM [ARGUMENTS...]
clone3() with set_tid (Linux 5.5+, CAP_SYS_ADMIN over the pid namespace) creates the child with
exactly PID in the caller's pid namespace, or fails (EEXIST while PID is taken): no race with
other processes' forks. Prints "child PID" (or the error and exits 1), then waits for the child.
"""
import ctypes
import os
import signal
import struct
import sys

SYS_CLONE3 = 435  # x86_64 and most architectures


def main():
    wanted = int(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    tids = (ctypes.c_int * 1)(wanted)
    # struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    # tls, set_tid, set_tid_size, cgroup.
    raw = struct.pack("<11Q", 0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, ctypes.addressof(tids), 1, 0)
    arguments = ctypes.create_string_buffer(raw, len(raw))
    pid = libc.syscall(SYS_CLONE3, arguments, ctypes.c_size_t(len(raw)))
    if pid == 0:
        try:
            os.execv(sys.argv[2], sys.argv[2:])
        finally:
            os._exit(127)
    if pid < 0:
        print("clone3 with pid %d: %s" % (wanted, os.strerror(ctypes.get_errno())), flush=True)
        return 1
    print("child %d" % pid, flush=True)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
