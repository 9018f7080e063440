/*
 * hook_floor.c - the floor for "time from QEMU's trigger to hooked".
 *
 * A minimal C program doing the same socket, fd-passing and ioctl steps as
 * kvmi-broker + the patched QEMU, with no policy, no Swift and no QEMU main
 * loop. The parent plays the broker, a forked child plays QEMU with a real
 * KVM VM fd. Run it with the KERNEL DOUBLE preloaded (no kernel here has
 * KVMI; the double stands in for it) and a test introspector listening:
 *
 *   LD_PRELOAD=libkvmi-kernel-double.so hook_floor SOCKET SECRET_SHA1_HEX N
 *
 * Per cycle: child -> parent trigger (16 bytes); parent: connect to the
 * introspector, send the 104-byte handshake, read exactly 4 + 20 reply bytes,
 * compare the cookie, sendmsg HOOK (header + lists) with the fd as
 * SCM_RIGHTS, close its copy; child: recvmsg, ioctl HOOK, 3 x COMMAND,
 * 2 x EVENT, send a 32-byte result; parent: read the result (timed end).
 * Then, untimed, the child UNHOOKs and closes for the next cycle.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct hook { int32_t fd; uint32_t padding; uint8_t uuid[16]; };
struct feature { uint32_t allow; int32_t id; };

#define HOOK_V12 0x4018AEC8UL
#define UNHOOK_V12 0xAEC9UL
#define COMMAND_V12 0x4008AECAUL
#define EVENT_V12 0x4008AECBUL

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void read_exact(int fd, void *buf, size_t len)
{
    size_t got = 0;

    while (got < len) {
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n <= 0) {
            die("read");
        }
        got += n;
    }
}

static double now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void qemu_side(int chan, int cycles)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    int vm = kvm < 0 ? -1 : ioctl(kvm, KVM_CREATE_VM, 0);
    int32_t commands[] = { 12, 7, 10 }, events[] = { 0, 17 };
    int i;

    if (vm < 0) {
        die("KVM_CREATE_VM");
    }
    for (i = 0; i < cycles; i++) {
        char trigger[16] = { 0 }, frame[64], result[32] = { 0 };
        char control[CMSG_SPACE(sizeof(int))];
        struct iovec iov = { frame, sizeof(frame) };
        struct msghdr msg = { 0 };
        struct cmsghdr *cmsg;
        struct hook h = { 0 };
        int fd = -1, k;

        if (write(chan, trigger, sizeof(trigger)) != sizeof(trigger)) {
            die("write trigger");
        }
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof(control);
        if (recvmsg(chan, &msg, MSG_CMSG_CLOEXEC) <= 0) {
            die("recvmsg");
        }
        cmsg = CMSG_FIRSTHDR(&msg);
        if (!cmsg || cmsg->cmsg_type != SCM_RIGHTS) {
            die("no fd");
        }
        memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
        h.fd = fd;
        if (ioctl(vm, HOOK_V12, &h) < 0) {
            die("HOOK");
        }
        for (k = 0; k < 3; k++) {
            struct feature f = { 1, commands[k] };
            if (ioctl(vm, COMMAND_V12, &f) < 0) {
                die("COMMAND");
            }
        }
        for (k = 0; k < 2; k++) {
            struct feature f = { 1, events[k] };
            if (ioctl(vm, EVENT_V12, &f) < 0) {
                die("EVENT");
            }
        }
        if (write(chan, result, sizeof(result)) != sizeof(result)) {
            die("write result");
        }
        /* Untimed: back to unhooked for the next cycle. */
        ioctl(vm, UNHOOK_V12, 0);
        close(fd);
    }
    exit(0);
}

int main(int argc, char **argv)
{
    int sv[2], cycles, i;
    uint8_t cookie[20], request[104] = { 0 };
    double *samples;
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    pid_t child;

    if (argc != 4 || strlen(argv[2]) != 40) {
        fprintf(stderr, "usage: %s SOCKET SECRET_SHA1_HEX CYCLES\n", argv[0]);
        return 2;
    }
    for (i = 0; i < 20; i++) {
        sscanf(argv[2] + 2 * i, "%2hhx", &cookie[i]);
    }
    cycles = atoi(argv[3]);
    samples = calloc(cycles, sizeof(double));
    strncpy(addr.sun_path, argv[1], sizeof(addr.sun_path) - 1);
    request[0] = 104;
    memcpy(request + 32, "floor", 5);
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        die("socketpair");
    }
    child = fork();
    if (child == 0) {
        close(sv[0]);
        qemu_side(sv[1], cycles);
    }
    close(sv[1]);
    for (i = 0; i < cycles; i++) {
        char trigger[16], frame[16 + 8 + 20] = { 0 }, result[32];
        char control[CMSG_SPACE(sizeof(int))] = { 0 };
        struct iovec iov = { frame, sizeof(frame) };
        struct msghdr msg = { 0 };
        struct cmsghdr *cmsg;
        uint32_t size;
        uint8_t reply[20];
        double t0;
        int tool;

        read_exact(sv[0], trigger, sizeof(trigger));
        t0 = now_us();
        tool = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (connect(tool, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
            die("connect");
        }
        if (write(tool, request, sizeof(request)) != sizeof(request)) {
            die("write handshake");
        }
        read_exact(tool, &size, 4);
        read_exact(tool, reply, 20);
        if (size != 24 || memcmp(reply, cookie, 20) != 0) {
            fprintf(stderr, "bad reply\n");
            return 1;
        }
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof(control);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &tool, sizeof(int));
        if (sendmsg(sv[0], &msg, MSG_NOSIGNAL) < 0) {
            die("sendmsg");
        }
        close(tool);
        read_exact(sv[0], result, sizeof(result));
        samples[i] = now_us() - t0;
    }
    waitpid(child, NULL, 0);
    qsort(samples, cycles, sizeof(double), cmp_double);
    printf("C floor: %d hooks, p50 %.1f us  p99 %.1f us  max %.1f us\n", cycles,
           samples[cycles / 2], samples[(int)(cycles * 0.99)],
           samples[cycles - 1]);
    return 0;
}
