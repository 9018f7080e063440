/*
 * kvmib_shim.h - what Swift cannot import by itself: CMSG macros, ioctl
 * numbers built with _IOW/_IO, the KVMI structs of both ABI generations,
 * and the vsock address. Every symbol carries the kvmib_ / KVMIB_ prefix.
 */
#ifndef KVMIB_SHIM_H
#define KVMIB_SHIM_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>

/* struct kvm_introspection_hook, identical in v7 and v12 (24 bytes). */
struct kvmib_introspection_hook {
    int32_t fd;
    uint32_t padding;
    uint8_t uuid[16];
};

/* struct kvm_introspection_feature, identical in v7 and v12 (8 bytes). */
struct kvmib_introspection_feature {
    uint32_t allow;
    int32_t id;
};

/* The five introspection ioctls of one ABI generation. */
struct kvmib_introspection_ioctls {
    unsigned long hook;
    unsigned long unhook;
    unsigned long command;
    unsigned long event;
    unsigned long preunhook;
};

/* generation: 7 ("kvmi-v7 production") or 12 (last upstream submission). */
int kvmib_introspection_ioctls_for(int generation,
                                   struct kvmib_introspection_ioctls *out);

/* Peer credentials of a connected unix socket (SO_PEERCRED). */
int kvmib_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid);

/*
 * 1 if `gid` is among the supplementary groups the peer of a connected unix socket had when
 * it connected (SO_PEERGROUPS, Linux 4.13+), 0 if not, -1 with errno on failure.
 */
int kvmib_peer_in_group(int fd, gid_t gid);

/*
 * A pidfd for the peer of a connected unix socket (SO_PEERPIDFD, Linux 6.5+);
 * -1 with errno ENOPROTOOPT on older kernels.
 */
int kvmib_peer_pidfd(int fd);
/* pidfd_open(pid, 0) (Linux 5.3+); -1/errno. Close-on-exec. */
int kvmib_pidfd_open(pid_t pid);
/* 1 while the process of `pidfd` has not exited (pidfd_send_signal with 0;
 * EPERM, a live process this one may not signal, counts as alive). */
int kvmib_pidfd_alive(int pidfd);

/* Names the calling thread (at most 15 bytes kept), for ps -L and top -H. */
void kvmib_name_thread(const char *name);
/* The calling thread to SCHED_BATCH (its nice value kept): it no longer preempts the thread
 * that woke it. Returns 0 or an errno value. */
int kvmib_thread_batch(void);

/* Has threads that start from now on allocate from glibc's main arena (mallopt M_ARENA_MAX
 * 1); threads that have allocated keep their arenas.  0 on success. */
int kvmib_malloc_one_arena(void);

/* Grows this process's descriptor table now to hold descriptors 0 .. count - 1 (count at most
 * the soft RLIMIT_NOFILE), by duplicating a descriptor of /dev/null to count - 1 and closing
 * it.  0 on success, -1/errno. */
int kvmib_reserve_descriptor_table(int count);

/*
 * sendmsg() of `len` bytes with at most one descriptor as SCM_RIGHTS
 * (pass -1 for none). MSG_NOSIGNAL | MSG_DONTWAIT. Returns bytes or -1/errno.
 */
ssize_t kvmib_send_with_fd(int sock, const void *buf, size_t len, int fd);

/*
 * recvmsg() of up to `len` bytes, MSG_CMSG_CLOEXEC | MSG_DONTWAIT.
 * Received descriptors go to fds[0..*nfds) (at most max_fds; extra ones are
 * closed). *truncated is set when the kernel truncated control data
 * (MSG_CTRUNC): any descriptors it carried are lost, a protocol error.
 */
ssize_t kvmib_recv_with_fds(int sock, void *buf, size_t len, int *fds,
                            int max_fds, int *nfds, int *truncated);

/* Fills a sockaddr_vm for AF_VSOCK; returns its length. */
socklen_t kvmib_sockaddr_vsock(struct sockaddr_storage *ss, uint32_t cid,
                               uint32_t port);

/*
 * epoll, whose packed struct epoll_event Swift handles poorly. Events are
 * EPOLLIN/EPOLLOUT/EPOLLHUP/EPOLLERR bits; tokens are caller-chosen.
 */
enum {
    KVMIB_EV_IN = 0x001,
    KVMIB_EV_OUT = 0x004,
    KVMIB_EV_ERR = 0x008,
    KVMIB_EV_HUP = 0x010,
    KVMIB_EV_RDHUP = 0x2000,
};
int kvmib_epoll_create(void);
/* Registers fd once (EPOLLONESHOT) for `events`, reported with `token`. */
int kvmib_epoll_add_oneshot(int epfd, int fd, uint32_t events, uint64_t token);
/* Re-arms a oneshot registration with a new (combined) interest mask. */
int kvmib_epoll_mod_oneshot(int epfd, int fd, uint32_t events, uint64_t token);
/* Registers fd persistently (level-triggered). */
int kvmib_epoll_add(int epfd, int fd, uint32_t events, uint64_t token);
int kvmib_epoll_del(int epfd, int fd);
/* Waits; fills tokens[i] and events[i]; returns the count or -1/errno. */
int kvmib_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max,
                     int timeout_ms);
/* A non-blocking, close-on-exec eventfd. */
int kvmib_eventfd(void);

/* accept4(SOCK_CLOEXEC [| SOCK_NONBLOCK]); GNU, not visible to Swift. */
int kvmib_accept(int fd, int nonblock);
/* pipe2(O_CLOEXEC | O_NONBLOCK). */
int kvmib_pipe(int fds[2]);

/* socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0): with libsystemd's headers in a build, which
 * Clang module owns the SOCK_* constants varies, and Swift may not find them. */
int kvmib_unix_dgram_socket(void);

/* AF_VSOCK, since Glibc's module may not export it. */
int kvmib_af_vsock(void);


/*
 * sd_notify(0, state) from libsystemd: systemd's service notification (READY=1,
 * RELOADING=1, STOPPING=1, STATUS=...). 0 when NOTIFY_SOCKET is unset, > 0 when sent,
 * -errno on failure.
 */
int kvmib_sd_notify(const char *state);

/*
 * sd_journal_sendv(iov, n) from libsystemd: one journal entry, each iovec a FIELD=value.
 * 0 or -errno.
 */
int kvmib_sd_journal_sendv(const struct iovec *iov, int n);

#endif
