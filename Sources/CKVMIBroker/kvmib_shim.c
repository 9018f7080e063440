/*
 * kvmib_shim.c - C helpers for kvmi-broker (see kvmib_shim.h).
 */
#define _GNU_SOURCE
#include "kvmib_shim.h"

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <systemd/sd-daemon.h>
/* Without this, sd_journal_sendv is a macro that adds this file's CODE_FILE/CODE_LINE/CODE_FUNC
 * to every record; the Swift caller supplies the log call's own location. */
#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>
#include <linux/vm_sockets.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>

#define KVMIB_KVMIO 0xAE

int kvmib_introspection_ioctls_for(int generation,
                                   struct kvmib_introspection_ioctls *out)
{
    switch (generation) {
    case 7:
        out->hook = _IOW(KVMIB_KVMIO, 0xff, struct kvmib_introspection_hook);
        out->unhook = _IO(KVMIB_KVMIO, 0xfb);
        out->command = _IOW(KVMIB_KVMIO, 0xfd, struct kvmib_introspection_feature);
        out->event = _IOW(KVMIB_KVMIO, 0xfc, struct kvmib_introspection_feature);
        out->preunhook = _IO(KVMIB_KVMIO, 0xfe);
        return 0;
    case 12:
        out->hook = _IOW(KVMIB_KVMIO, 0xc8, struct kvmib_introspection_hook);
        out->unhook = _IO(KVMIB_KVMIO, 0xc9);
        out->command = _IOW(KVMIB_KVMIO, 0xca, struct kvmib_introspection_feature);
        out->event = _IOW(KVMIB_KVMIO, 0xcb, struct kvmib_introspection_feature);
        out->preunhook = _IO(KVMIB_KVMIO, 0xcc);
        return 0;
    default:
        errno = EINVAL;
        return -1;
    }
}

int kvmib_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        return -1;
    }
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

int kvmib_peer_in_group(int fd, gid_t gid)
{
    gid_t groups[1024];
    socklen_t len = sizeof(groups);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0) {
        return -1;
    }
    for (socklen_t i = 0; i < len / sizeof(gid_t); i++) {
        if (groups[i] == gid) {
            return 1;
        }
    }
    return 0;
}

/* SO_PEERPIDFD arrived in Linux 6.5; Debian 12's headers predate it. */
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

int kvmib_peer_pidfd(int fd)
{
    int pidfd = -1;
    socklen_t len = sizeof(pidfd);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) < 0) {
        return -1;
    }
    return pidfd;
}

int kvmib_pidfd_open(pid_t pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}

int kvmib_pidfd_alive(int pidfd)
{
#ifdef SYS_pidfd_send_signal
    if (syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0) == 0) {
        return 1;
    }
    /*
     * The kernel finds the process before it checks permission: ESRCH once it
     * has exited, EPERM for a live process this one may not signal (root
     * without CAP_KILL, as the service runs, and a QEMU of another user).
     */
    return errno == EPERM;
#else
    (void)pidfd;
    return 1;
#endif
}

ssize_t kvmib_send_with_fd(int sock, const void *buf, size_t len, int fd)
{
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg;

    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0) {
        struct cmsghdr *cmsg;

        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
}

ssize_t kvmib_recv_with_fds(int sock, void *buf, size_t len, int *fds,
                            int max_fds, int *nfds, int *truncated)
{
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union {
        char buf[CMSG_SPACE(sizeof(int) * 8)];
        struct cmsghdr align;
    } control;
    struct msghdr msg;
    struct cmsghdr *cmsg;
    ssize_t n;

    *nfds = 0;
    *truncated = 0;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) {
        return n;
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        *truncated = 1;
    }
    for (cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
            size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            size_t i;

            for (i = 0; i < count; i++) {
                int fd;

                memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
                if (*nfds < max_fds) {
                    fds[(*nfds)++] = fd;
                } else {
                    close(fd);
                    *truncated = 1;
                }
            }
        }
    }
    return n;
}

socklen_t kvmib_sockaddr_vsock(struct sockaddr_storage *ss, uint32_t cid,
                               uint32_t port)
{
    struct sockaddr_vm *vm = (struct sockaddr_vm *)ss;

    memset(ss, 0, sizeof(*ss));
    vm->svm_family = AF_VSOCK;
    vm->svm_cid = cid;
    vm->svm_port = port;
    return sizeof(*vm);
}

int kvmib_af_vsock(void)
{
    return AF_VSOCK;
}

int kvmib_epoll_create(void)
{
    return epoll_create1(EPOLL_CLOEXEC);
}

static int kvmib_epoll_ctl(int epfd, int op, int fd, uint32_t events,
                           uint64_t token)
{
    struct epoll_event ev;

    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.u64 = token;
    return epoll_ctl(epfd, op, fd, &ev);
}

static int kvmib_epoll_ctl_add(int epfd, int fd, uint32_t events,
                               uint64_t token)
{
    return kvmib_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, events, token);
}

int kvmib_epoll_mod_oneshot(int epfd, int fd, uint32_t events, uint64_t token)
{
    return kvmib_epoll_ctl(epfd, EPOLL_CTL_MOD, fd, events | EPOLLONESHOT,
                           token);
}

int kvmib_epoll_add_oneshot(int epfd, int fd, uint32_t events, uint64_t token)
{
    return kvmib_epoll_ctl_add(epfd, fd, events | EPOLLONESHOT, token);
}

int kvmib_epoll_add(int epfd, int fd, uint32_t events, uint64_t token)
{
    return kvmib_epoll_ctl_add(epfd, fd, events, token);
}

int kvmib_epoll_del(int epfd, int fd)
{
    return epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
}

int kvmib_epoll_wait(int epfd, uint64_t *tokens, uint32_t *events, int max,
                     int timeout_ms)
{
    struct epoll_event evs[128];
    int n, i;

    if (max > 128) {
        max = 128;
    }
    n = epoll_wait(epfd, evs, max, timeout_ms);
    for (i = 0; i < n; i++) {
        tokens[i] = evs[i].data.u64;
        events[i] = evs[i].events;
    }
    return n;
}

int kvmib_eventfd(void)
{
    return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

int kvmib_accept(int fd, int nonblock)
{
    return accept4(fd, NULL, NULL,
                   SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0));
}

int kvmib_pipe(int fds[2])
{
    return pipe2(fds, O_CLOEXEC | O_NONBLOCK);
}

int kvmib_sd_notify(const char *state)
{
    return sd_notify(0, state);
}

int kvmib_sd_journal_sendv(const struct iovec *iov, int n)
{
    return sd_journal_sendv(iov, n);
}

int kvmib_unix_dgram_socket(void)
{
    return socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
}

void kvmib_name_thread(const char *name)
{
    pthread_setname_np(pthread_self(), name);
}

int kvmib_thread_batch(void)
{
    struct sched_param param = { .sched_priority = 0 };

    return pthread_setschedparam(pthread_self(), SCHED_BATCH, &param);
}

int kvmib_malloc_one_arena(void)
{
    return mallopt(M_ARENA_MAX, 1) == 1 ? 0 : -1;
}

int kvmib_reserve_descriptor_table(int count)
{
    int fd;
    int high;
    int saved;

    if (count < 1) {
        errno = EINVAL;
        return -1;
    }
    /* Open already: the table holds it (and duplicating above it would double it again). */
    if (fcntl(count - 1, F_GETFD) >= 0) {
        return 0;
    }
    fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    /* The lowest free number at or above count - 1: the table grows to hold it. */
    high = fcntl(fd, F_DUPFD_CLOEXEC, count - 1);
    saved = errno;
    close(fd);
    if (high < 0) {
        errno = saved;
        return -1;
    }
    close(high);
    return 0;
}
