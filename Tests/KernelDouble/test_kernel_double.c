/*
 * Tests of the kvmi-kernel-double (TEST EQUIPMENT: a stand-in for a KVMI kernel).
 *
 * Run under LD_PRELOAD=libkvmi-kernel-double.so (Tests/KernelDouble/run-tests does
 * this). Opens /dev/kvm, creates a VM (no vCPU) and checks the double's ioctl errno
 * table, allow-lists and socket service for both ABI generations.
 * Prints one line per check and ends with "N passed, M failed".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kernel_double_abi.h"

static int passed, failed;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...)
{
	va_list ap;
	printf("%s: ", ok ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (ok)
		passed++;
	else
		failed++;
}

/* ioctl result as 0 or -errno */
static int xioctl(int fd, unsigned long req, void *arg)
{
	errno = 0;
	int r = ioctl(fd, req, arg);
	return r < 0 ? -errno : r;
}

/* the real kernel's answer, bypassing the double */
static int raw_ioctl(int fd, unsigned long req, void *arg)
{
	long r = syscall(SYS_ioctl, fd, req, arg);
	return r < 0 ? -errno : (int)r;
}

static int count_dir(const char *path)
{
	DIR *d = opendir(path);
	struct dirent *e;
	int n = 0;
	if (!d)
		return -1;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

/* the serving thread exits shortly after it shut the socket down: wait for it */
static int wait_tasks(int expected, int timeout_ms)
{
	for (int waited = 0; waited <= timeout_ms; waited += 10) {
		if (count_dir("/proc/self/task") == expected)
			return 1;
		usleep(10000);
	}
	return 0;
}

struct gen {
	const char *name;
	int v7;
	unsigned long hook, unhook, command, event, preunhook;
	int num_commands, num_events;
	uint16_t get_version, check_command, check_event, control_events, get_info;
};

static const struct gen V7 = { "v7", 1, KD_V7_HOOK, KD_V7_UNHOOK, KD_V7_COMMAND, KD_V7_EVENT,
			       KD_V7_PREUNHOOK, KD_V7_NUM_COMMANDS, KD_V7_NUM_EVENTS,
			       KD_V7_GET_VERSION, KD_V7_VM_CHECK_COMMAND, KD_V7_VM_CHECK_EVENT,
			       KD_V7_VM_CONTROL_EVENTS, KD_V7_VM_GET_INFO };
static const struct gen V12 = { "v12", 0, KD_V12_HOOK, KD_V12_UNHOOK, KD_V12_COMMAND, KD_V12_EVENT,
				KD_V12_PREUNHOOK, KD_V12_NUM_COMMANDS, KD_V12_NUM_EVENTS,
				KD_V12_GET_VERSION, KD_V12_VM_CHECK_COMMAND, KD_V12_VM_CHECK_EVENT,
				KD_V12_VM_CONTROL_EVENTS, KD_V12_VM_GET_INFO };

static int hook(const struct gen *g, int vm, int fd, uint32_t padding)
{
	struct kd_introspection_hook h = { .fd = fd, .padding = padding };
	memset(h.uuid, 0xab, sizeof(h.uuid));
	return xioctl(vm, g->hook, &h);
}

static int feature(const struct gen *g, int vm, int is_cmd, uint32_t allow, int32_t id)
{
	struct kd_introspection_feature f = { .allow = allow, .id = id };
	return xioctl(vm, is_cmd ? g->command : g->event, &f);
}

/* read exactly n bytes with a timeout; returns bytes read (short on EOF/timeout) */
static size_t read_n(int fd, void *buf, size_t n, int timeout_ms)
{
	size_t done = 0;
	while (done < n) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (poll(&p, 1, timeout_ms) <= 0)
			break;
		ssize_t r = read(fd, (char *)buf + done, n - done);
		if (r <= 0)
			break;
		done += (size_t)r;
	}
	return done;
}

static uint32_t next_seq = 100;

/* send a request; read the reply; returns err field, fills payload (up to cap) */
static int request(int tool, uint16_t id, const void *body, uint16_t size, void *payload,
		   size_t cap, size_t *payload_len, struct kd_msg_hdr *rh_out)
{
	struct kd_msg_hdr h = { .id = id, .size = size, .seq = next_seq++ };
	char buf[sizeof(h) + 64];
	struct kd_msg_hdr rh;
	struct kd_error_code ec;

	memcpy(buf, &h, sizeof(h));
	if (size)
		memcpy(buf + sizeof(h), body, size);
	if (write(tool, buf, sizeof(h) + size) != (ssize_t)(sizeof(h) + size))
		return 9999;
	if (read_n(tool, &rh, sizeof(rh), 60000) != sizeof(rh))
		return 9998;
	if (rh_out)
		*rh_out = rh;
	if (rh.id != id || rh.seq != h.seq || rh.size < sizeof(ec))
		return 9997;
	if (read_n(tool, &ec, sizeof(ec), 60000) != sizeof(ec))
		return 9996;
	size_t rest = rh.size - sizeof(ec);
	if (ec.err != 0 && rest != 0)
		return 9995; /* payload only when err == 0 */
	char tmp[256];
	if (rest > sizeof(tmp) || read_n(tool, tmp, rest, 60000) != rest)
		return 9994;
	if (payload)
		memcpy(payload, tmp, rest < cap ? rest : cap);
	if (payload_len)
		*payload_len = rest;
	return ec.err;
}

static int check_cmd(int tool, const struct gen *g, uint16_t id)
{
	struct kd_check_id c = { .id = id };
	return request(tool, g->check_command, &c, sizeof(c), NULL, 0, NULL, NULL);
}

static int check_ev(int tool, const struct gen *g, uint16_t id)
{
	struct kd_check_id c = { .id = id };
	return request(tool, g->check_event, &c, sizeof(c), NULL, 0, NULL, NULL);
}

static int control_unhook(int tool, const struct gen *g, uint8_t enable)
{
	struct kd_control_vm_events c = { .event_id = 0, .enable = enable };
	return request(tool, g->control_events, &c, sizeof(c), NULL, 0, NULL, NULL);
}

static int wait_hup(int fd, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		p.revents = 0;
		if (poll(&p, 1, 100) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR)))
			return 1;
		char c;
		if (p.revents & POLLIN) {
			ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT | MSG_PEEK);
			if (r == 0)
				return 1;
		}
		clock_gettime(CLOCK_MONOTONIC, &t);
		if ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 > timeout_ms)
			return 0;
	}
}

/* ---- concurrency: replies from the serving thread and PREUNHOOK events interleave
 * only at message boundaries ---- */
#define STRESS_N 300

struct stress {
	const struct gen *g;
	int tool;
	int replies, events, bad;
	uint32_t last_ev_seq;
};

static void *stress_writer(void *arg)
{
	struct stress *st = arg;
	for (int i = 0; i < STRESS_N; i++) {
		struct kd_msg_hdr h = { .id = st->g->get_version, .size = 0, .seq = 5000 + (uint32_t)i };
		if (write(st->tool, &h, sizeof(h)) != sizeof(h))
			st->bad++;
	}
	return NULL;
}

static void *stress_reader(void *arg)
{
	struct stress *st = arg;
	uint8_t buf[8 + 544];
	while (st->replies + st->events < 2 * STRESS_N && !st->bad) {
		struct kd_msg_hdr h;
		if (read_n(st->tool, &h, sizeof(h), 5000) != sizeof(h)) {
			st->bad++;
			break;
		}
		if (h.size > sizeof(buf) || read_n(st->tool, buf, h.size, 5000) != h.size) {
			st->bad++;
			break;
		}
		if (h.id == st->g->get_version && h.size == 24 && h.seq == 5000 + (uint32_t)st->replies) {
			st->replies++;
		} else if (h.id == (st->g->v7 ? 1 : 0) && h.size == (st->g->v7 ? 544 : 8) &&
			   h.seq == st->last_ev_seq + 1) {
			st->last_ev_seq = h.seq;
			st->events++;
		} else {
			st->bad++;
		}
	}
	return NULL;
}

static void test_stress(const struct gen *g, int vm)
{
	int sv[2];
	struct stress st = { .g = g };
	pthread_t w, r;
	int pre_fail = 0;

	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	st.tool = sv[1];
	if (hook(g, vm, sv[0], 0) != 0) {
		check(0, "%s stress: HOOK -> 0", g->name);
		close(sv[0]);
		close(sv[1]);
		return;
	}
	check(1, "%s stress: HOOK -> 0", g->name);
	feature(g, vm, 1, 1, -1);
	feature(g, vm, 0, 1, -1);
	check(control_unhook(st.tool, g, 1) == 0, "%s stress: unhook event enabled", g->name);
	pthread_create(&r, NULL, stress_reader, &st);
	pthread_create(&w, NULL, stress_writer, &st);
	for (int i = 0; i < STRESS_N; i++)
		if (xioctl(vm, g->preunhook, NULL) != 0)
			pre_fail++;
	pthread_join(w, NULL);
	pthread_join(r, NULL);
	check(pre_fail == 0 && st.bad == 0 && st.replies == STRESS_N && st.events == STRESS_N,
	      "%s stress: %d replies and %d unhook events (seq 1..%u) arrive whole and in order while "
	      "the serving thread and PREUNHOOK write at once", g->name, st.replies, st.events, st.last_ev_seq);
	check(xioctl(vm, g->unhook, NULL) == 0, "%s stress: UNHOOK -> 0", g->name);
	close(sv[0]);
	close(sv[1]);
}

static void test_generation(const struct gen *g, int vm)
{
	const char *n = g->name;
	int sv[2];
	int r;

	printf("# generation %s\n", n);

	/* not hooked */
	check(feature(g, vm, 1, 1, -1) == -EFAULT, "%s COMMAND before HOOK -> EFAULT", n);
	check(feature(g, vm, 0, 1, -1) == -EFAULT, "%s EVENT before HOOK -> EFAULT", n);
	check(xioctl(vm, g->preunhook, NULL) == -EFAULT, "%s PREUNHOOK before HOOK -> EFAULT", n);
	check(xioctl(vm, g->unhook, NULL) == 0, "%s UNHOOK before HOOK -> 0", n);
	check(feature(g, vm, 1, 2, -1) == -EINVAL, "%s COMMAND allow=2 before HOOK -> EINVAL (checked first)", n);

	/* HOOK argument checks */
	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	int devnull = open("/dev/null", O_RDWR);
	check(hook(g, vm, sv[0], 1) == -EINVAL, "%s HOOK padding!=0 -> EINVAL", n);
	check(hook(g, vm, -1, 0) == -EINVAL, "%s HOOK fd=-1 -> EINVAL", n);
	check(hook(g, vm, devnull, 0) == -EINVAL, "%s HOOK fd not a socket -> EINVAL", n);
	close(devnull);

	int fds_before = count_dir("/proc/self/fd");
	int tasks_before = count_dir("/proc/self/task");
	r = hook(g, vm, sv[0], 0);
	check(r == 0, "%s HOOK -> 0 (got %d)", n, r);
	if (r != 0) {
		check(0, "%s: no session, the rest of this generation is skipped", n);
		close(sv[0]);
		close(sv[1]);
		return;
	}
	check(count_dir("/proc/self/task") == tasks_before + 1, "%s HOOK starts one serving thread", n);
	check(hook(g, vm, sv[0], 0) == -EEXIST, "%s second HOOK -> EEXIST", n);
	check(hook(g, vm, sv[0], 1) == -EINVAL, "%s HOOK padding!=0 while hooked -> EINVAL (checked first)", n);
	/* the other generation's numbers are unknown to a kernel of this generation */
	const struct gen *o = g->v7 ? &V12 : &V7;
	check(feature(o, vm, 1, 1, -1) == -ENOTTY, "%s hooked: %s COMMAND number -> ENOTTY", n, o->name);

	/* COMMAND / EVENT argument checks */
	check(feature(g, vm, 1, 2, 0) == -EINVAL, "%s COMMAND allow=2 -> EINVAL", n);
	check(feature(g, vm, 1, 1, -2) == -EINVAL, "%s COMMAND id=-2 -> EINVAL", n);
	check(feature(g, vm, 1, 1, g->num_commands) == -EINVAL, "%s COMMAND id=%d -> EINVAL", n, g->num_commands);
	check(feature(g, vm, 0, 1, g->num_events) == -EINVAL, "%s EVENT id=%d -> EINVAL", n, g->num_events);
	check(feature(g, vm, 0, 3, 0) == -EINVAL, "%s EVENT allow=3 -> EINVAL", n);
	check(feature(g, vm, 1, 0, g->get_version) == -EPERM, "%s COMMAND disallow GET_VERSION -> EPERM", n);
	check(feature(g, vm, 1, 0, g->check_command) == -EPERM, "%s COMMAND disallow VM_CHECK_COMMAND -> EPERM", n);
	check(feature(g, vm, 1, 0, g->check_event) == -EPERM, "%s COMMAND disallow VM_CHECK_EVENT -> EPERM", n);
	check(feature(g, vm, 1, 1, g->num_commands - 1) == 0, "%s COMMAND allow id=%d -> 0", n, g->num_commands - 1);
	check(feature(g, vm, 1, 0, g->num_commands - 1) == 0, "%s COMMAND disallow id=%d -> 0", n, g->num_commands - 1);

	int tool = sv[1];

	/* GET_VERSION */
	uint8_t pl[64];
	size_t pl_len = 0;
	struct kd_msg_hdr rh;
	memset(pl, 0xee, sizeof(pl));
	r = request(tool, g->get_version, NULL, 0, pl, sizeof(pl), &pl_len, &rh);
	check(r == 0 && pl_len == 16 && rh.size == 24, "%s GET_VERSION -> err 0, reply size 8+16 (got err %d, size %u)", n, r, rh.size);
	if (g->v7) {
		struct kd_v7_get_version_reply v;
		memcpy(&v, pl, sizeof(v));
		check(v.version == 1 && v.padding == 0 && v.features.spp == 0 && v.features.ve == 0,
		      "%s GET_VERSION reply {version 1, padding 0, features zero}", n);
	} else {
		struct kd_v12_get_version_reply v;
		memcpy(&v, pl, sizeof(v));
		check(v.version == 1 && v.max_msg_size == 8184 && v.features.singlestep == 0,
		      "%s GET_VERSION reply {version 1, max_msg_size 8184, features zero}", n);
	}

	/* default allow-lists */
	check(check_cmd(tool, g, g->get_version) == 0, "%s default: CHECK_COMMAND(GET_VERSION) -> 0", n);
	check(check_cmd(tool, g, g->check_event) == 0, "%s default: CHECK_COMMAND(VM_CHECK_EVENT) -> 0", n);
	check(check_cmd(tool, g, g->control_events) == -KD_KVM_EPERM, "%s default: CHECK_COMMAND(VM_CONTROL_EVENTS) -> -KVM_EPERM", n);
	check(check_ev(tool, g, 0) == -KD_KVM_EPERM, "%s default: CHECK_EVENT(UNHOOK) -> -KVM_EPERM", n);
	check(control_unhook(tool, g, 1) == -KD_KVM_EPERM, "%s default: VM_CONTROL_EVENTS (disallowed command) -> -KVM_EPERM", n);
	r = request(tool, 0x7fff, NULL, 0, NULL, 0, NULL, NULL);
	check(r == -KD_KVM_ENOSYS, "%s unknown message id 0x7fff -> -KVM_ENOSYS (got %d)", n, r);
	{
		struct kd_check_id c = { .id = g->get_version, .padding2 = 1 };
		r = request(tool, g->check_command, &c, sizeof(c), NULL, 0, NULL, NULL);
		check(r == -KD_KVM_EINVAL, "%s CHECK_COMMAND with padding -> -KVM_EINVAL (got %d)", n, r);
	}
	if (g->v7) {
		check(check_cmd(tool, g, 64) == -KD_KVM_EINVAL, "%s CHECK_COMMAND(64) -> -KVM_EINVAL", n);
		check(check_ev(tool, g, 14) == -KD_KVM_EINVAL, "%s CHECK_EVENT(14) -> -KVM_EINVAL", n);
	} else {
		check(check_cmd(tool, g, 0xffff) == -KD_KVM_ENOENT, "%s CHECK_COMMAND(0xffff) -> -KVM_ENOENT", n);
		check(check_ev(tool, g, 0xffff) == -KD_KVM_ENOENT, "%s CHECK_EVENT(0xffff) -> -KVM_ENOENT", n);
		check(check_ev(tool, g, 2) == -KD_KVM_ENOENT, "%s CHECK_EVENT(2, unassigned) -> -KVM_ENOENT", n);
	}

	/* PREUNHOOK without the unhook event enabled */
	check(xioctl(vm, g->preunhook, NULL) == -ENOENT, "%s PREUNHOOK, unhook event not enabled -> ENOENT", n);

	/* allow VM_CONTROL_EVENTS; event still disallowed */
	check(feature(g, vm, 1, 1, g->control_events) == 0, "%s COMMAND allow VM_CONTROL_EVENTS -> 0", n);
	check(check_cmd(tool, g, g->control_events) == 0, "%s CHECK_COMMAND(VM_CONTROL_EVENTS) now -> 0", n);
	check(control_unhook(tool, g, 1) == -KD_KVM_EPERM, "%s VM_CONTROL_EVENTS(unhook) with event disallowed -> -KVM_EPERM", n);
	check(feature(g, vm, 0, 1, 0) == 0, "%s EVENT allow UNHOOK -> 0", n);
	check(check_ev(tool, g, 0) == 0, "%s CHECK_EVENT(UNHOOK) now -> 0", n);
	{
		struct kd_control_vm_events c = { .event_id = 1, .enable = 1 };
		r = request(tool, g->control_events, &c, sizeof(c), NULL, 0, NULL, NULL);
		check(r == -KD_KVM_EINVAL, "%s VM_CONTROL_EVENTS(event 1, not a VM event) -> -KVM_EINVAL (got %d)", n, r);
	}
	check(control_unhook(tool, g, 1) == 0, "%s VM_CONTROL_EVENTS(unhook, enable) -> 0", n);
	check(check_cmd(tool, g, g->get_info) == -KD_KVM_EPERM, "%s CHECK_COMMAND(VM_GET_INFO) -> -KVM_EPERM", n);

	/* PREUNHOOK delivers the unhook event, exact bytes */
	for (uint32_t seq = 1; seq <= 2; seq++) {
		check(xioctl(vm, g->preunhook, NULL) == 0, "%s PREUNHOOK #%u -> 0", n, seq);
		uint8_t ev[8 + 544];
		size_t want = g->v7 ? 8 + 544 : 16;
		size_t got = read_n(tool, ev, want, 60000);
		uint8_t expect[8 + 544];
		memset(expect, 0, sizeof(expect));
		struct kd_msg_hdr eh = { .id = g->v7 ? 1 : 0, .size = g->v7 ? 544 : 8, .seq = seq };
		memcpy(expect, &eh, sizeof(eh));
		if (g->v7) {
			uint16_t sz = 544;
			memcpy(expect + 8, &sz, 2); /* kvmi_event.size; vcpu 0, event 0, arch zeroed */
		}
		check(got == want && memcmp(ev, expect, want) == 0,
		      "%s unhook event bytes: hdr{id %u, size %u, seq %u} + %s (%zu bytes)", n, eh.id, eh.size,
		      seq, g->v7 ? "kvmi_event{size 544, vcpu 0, event 0, zeros}" : "kvmi_event_hdr{event 0}",
		      want);
	}
	check(control_unhook(tool, g, 0) == 0, "%s VM_CONTROL_EVENTS(unhook, disable) -> 0", n);
	check(xioctl(vm, g->preunhook, NULL) == -ENOENT, "%s PREUNHOOK after disable -> ENOENT", n);
	check(control_unhook(tool, g, 1) == 0, "%s VM_CONTROL_EVENTS(unhook, enable) again -> 0", n);

	/* -1 semantics */
	check(feature(g, vm, 1, 1, -1) == 0, "%s COMMAND {1,-1} -> 0", n);
	check(check_cmd(tool, g, g->get_info) == 0, "%s after allow-all: CHECK_COMMAND(VM_GET_INFO) -> 0", n);
	r = request(tool, g->get_info, NULL, 0, NULL, 0, NULL, NULL);
	check(r == -KD_KVM_EOPNOTSUPP, "%s allowed but not implemented VM_GET_INFO -> -KVM_EOPNOTSUPP (got %d)", n, r);
	check(feature(g, vm, 1, 0, -1) == 0, "%s COMMAND {0,-1} -> 0", n);
	check(check_cmd(tool, g, g->get_info) == -KD_KVM_EPERM, "%s after reset: CHECK_COMMAND(VM_GET_INFO) -> -KVM_EPERM", n);
	check(check_cmd(tool, g, g->get_version) == 0, "%s after reset: CHECK_COMMAND(GET_VERSION) -> 0", n);
	check(control_unhook(tool, g, 1) == -KD_KVM_EPERM, "%s after reset: VM_CONTROL_EVENTS -> -KVM_EPERM", n);
	check(feature(g, vm, 0, 1, -1) == 0, "%s EVENT {1,-1} -> 0", n);
	check(check_ev(tool, g, (uint16_t)(g->v7 ? 13 : 19)) == 0, "%s after allow-all: CHECK_EVENT(last id) -> 0", n);
	check(feature(g, vm, 0, 0, -1) == 0, "%s EVENT {0,-1} -> 0", n);
	check(check_ev(tool, g, 0) == -KD_KVM_EPERM, "%s after reset: CHECK_EVENT(UNHOOK) -> -KVM_EPERM", n);
	/* the unhook event stays enabled (revoking does not disable), as the kernel */
	check(xioctl(vm, g->preunhook, NULL) == 0, "%s PREUNHOOK after revoking the event (still enabled) -> 0", n);
	{
		uint8_t ev[8 + 544];
		size_t want = g->v7 ? 8 + 544 : 16;
		struct kd_msg_hdr eh;
		check(read_n(tool, ev, want, 60000) == want && (memcpy(&eh, ev, 8), eh.seq == 3),
		      "%s third unhook event has seq 3", n);
	}

	/* oversized message closes the session; state stays until UNHOOK */
	{
		struct kd_msg_hdr h = { .id = g->get_version, .size = KD_MAX_MSG_SIZE + 1, .seq = 1 };
		ssize_t w = write(tool, &h, sizeof(h));
		check(w == sizeof(h) && wait_hup(tool, 60000), "%s message size 8185 -> the double closes the socket", n);
		check(wait_hup(sv[0], 60000), "%s caller's fd sees the hang-up (shared socket)", n);
		check(wait_tasks(tasks_before, 60000), "%s serving thread exited after the close", n);
		check(hook(g, vm, sv[0], 0) == -EEXIST, "%s HOOK after the close, before UNHOOK -> EEXIST", n);
		check(xioctl(vm, g->preunhook, NULL) == -ENOENT, "%s PREUNHOOK after the close -> ENOENT", n);
		check(feature(g, vm, 1, 1, -1) == 0, "%s COMMAND after the close (state kept) -> 0", n);
		check(xioctl(vm, g->unhook, NULL) == 0, "%s UNHOOK -> 0", n);
		check(xioctl(vm, g->unhook, NULL) == 0, "%s UNHOOK again -> 0 (idempotent)", n);
		check(feature(g, vm, 1, 1, -1) == -EFAULT, "%s COMMAND after UNHOOK -> EFAULT", n);
		check(fcntl(sv[0], F_GETFD) >= 0, "%s caller's fd still open after UNHOOK (independent)", n);
	}
	close(sv[0]);
	close(sv[1]);
	check(count_dir("/proc/self/fd") == fds_before - 2, "%s no fd leaked after UNHOOK", n);

	/* tool closes -> EEXIST until UNHOOK */
	socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv); /* non-blocking, as QEMU's */
	tool = sv[1];
	{
		int fl = fcntl(tool, F_GETFL);
		fcntl(tool, F_SETFL, fl & ~O_NONBLOCK);
		/* libkvmi sends GET_VERSION before QEMU hooks: it waits in the socket */
		struct kd_msg_hdr q = { .id = g->get_version, .size = 0, .seq = 77 };
		check(write(tool, &q, sizeof(q)) == sizeof(q), "%s GET_VERSION queued before HOOK", n);
	}
	check(hook(g, vm, sv[0], 0) == 0, "%s HOOK on a non-blocking socket -> 0", n);
	{
		uint8_t rep[32];
		struct kd_msg_hdr rh2;
		struct kd_error_code ec2;
		size_t got = read_n(tool, rep, sizeof(rep), 60000);
		memcpy(&rh2, rep, sizeof(rh2));
		memcpy(&ec2, rep + 8, sizeof(ec2));
		check(got == 32 && rh2.id == g->get_version && rh2.seq == 77 && rh2.size == 24 && ec2.err == 0,
		      "%s the queued GET_VERSION is answered after HOOK", n);
	}
	r = request(tool, g->get_version, NULL, 0, NULL, 0, NULL, NULL);
	check(r == 0, "%s fresh hook: GET_VERSION -> 0", n);
	check(check_cmd(tool, g, g->control_events) == -KD_KVM_EPERM, "%s fresh hook: default allow-list again", n);
	close(tool);
	check(wait_hup(sv[0], 60000), "%s tool closed: caller's fd sees the hang-up", n);
	check(hook(g, vm, sv[0], 0) == -EEXIST, "%s tool closed: HOOK -> EEXIST until UNHOOK", n);
	check(xioctl(vm, g->unhook, NULL) == 0, "%s UNHOOK after tool close -> 0", n);
	check(wait_tasks(tasks_before, 60000), "%s no thread left after UNHOOK", n);
	close(sv[0]);

	/* UNHOOK while the tool is connected: the tool sees EOF */
	socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
	check(hook(g, vm, sv[0], 0) == 0, "%s HOOK -> 0", n);
	check(xioctl(vm, g->unhook, NULL) == 0, "%s UNHOOK with the tool connected -> 0", n);
	{
		char c;
		check(read_n(sv[1], &c, 1, 60000) == 0, "%s tool sees EOF after UNHOOK", n);
	}
	close(sv[0]);
	close(sv[1]);
	check(count_dir("/proc/self/fd") == fds_before - 2, "%s fd count back to the start", n);
	check(wait_tasks(tasks_before, 60000), "%s thread count back to the start", n);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!dlsym(RTLD_DEFAULT, "kvmi_kernel_double_marker")) {
		check(0, "kernel double is preloaded (LD_PRELOAD)");
		printf("%d passed, %d failed\n", passed, failed);
		return 1;
	}
	check(1, "kernel double is preloaded (LD_PRELOAD)");

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	check(kvm >= 0, "open /dev/kvm");
	if (kvm < 0) {
		printf("%d passed, %d failed\n", passed, failed + 1);
		return 1;
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	check(vm >= 0, "KVM_CREATE_VM");
	if (vm < 0) {
		printf("%d passed, %d failed\n", passed, failed);
		return 1;
	}

	/* passthrough */
	int cap = ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY);
	check(cap == raw_ioctl(vm, KVM_CHECK_EXTENSION, (void *)(long)KVM_CAP_USER_MEMORY) && cap > 0,
	      "KVM_CHECK_EXTENSION on the VM fd passes through (%d)", cap);
	int real = raw_ioctl(vm, KD_V12_PREUNHOOK, NULL);
	check(real < 0, "the real kernel rejects v12 PREUNHOOK on the VM fd (errno %d): the double is needed", -real);
	{
		int sv[2];
		socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
		struct kd_introspection_hook h = { .fd = sv[0] };
		const unsigned long nums[] = { KD_V7_HOOK, KD_V7_UNHOOK, KD_V7_COMMAND, KD_V7_EVENT, KD_V7_PREUNHOOK,
					       KD_V12_HOOK, KD_V12_UNHOOK, KD_V12_COMMAND, KD_V12_EVENT, KD_V12_PREUNHOOK };
		int all = 1;
		for (size_t i = 0; i < sizeof(nums) / sizeof(nums[0]); i++) {
			struct kd_introspection_feature f = { 1, -1 };
			void *arg = (nums[i] & 0x40000000UL) ? ((nums[i] >> 16 & 0x3fff) == 24 ? (void *)&h : (void *)&f) : NULL;
			int a = xioctl(kvm, nums[i], arg), b = raw_ioctl(kvm, nums[i], arg);
			int c = xioctl(sv[1], nums[i], arg), d = raw_ioctl(sv[1], nums[i], arg);
			if (a != b || a >= 0 || c != d || c >= 0)
				all = 0;
		}
		check(all, "introspection numbers on /dev/kvm and on a socket fd get the real kernel's errno");
		close(sv[0]);
		close(sv[1]);
	}

	test_generation(&V12, vm);
	test_generation(&V7, vm);
	test_stress(&V12, vm);
	test_stress(&V7, vm);

	/* KVMI_KERNEL_DOUBLE_ABI restricts the generation; the rest is passed through */
	{
		int sv[2];
		socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
		setenv("KVMI_KERNEL_DOUBLE_ABI", "v12", 1);
		int r7 = hook(&V7, vm, sv[0], 0);
		int raw7 = 0;
		{
			struct kd_introspection_hook h = { .fd = sv[0] };
			raw7 = raw_ioctl(vm, KD_V7_HOOK, &h);
		}
		check(r7 == raw7 && r7 < 0, "ABI=v12: v7 HOOK goes to the real kernel (errno %d)", -r7);
		check(hook(&V12, vm, sv[0], 0) == 0, "ABI=v12: v12 HOOK -> 0");
		check(xioctl(vm, KD_V12_UNHOOK, NULL) == 0, "ABI=v12: v12 UNHOOK -> 0");
		unsetenv("KVMI_KERNEL_DOUBLE_ABI");
		setenv("KVMI_KERNEL_DOUBLE_INTROSPECTION", "0", 1);
		check(hook(&V12, vm, sv[0], 0) == -EPERM, "INTROSPECTION=0: HOOK -> EPERM");
		check(xioctl(vm, KD_V7_UNHOOK, NULL) == -EPERM, "INTROSPECTION=0: UNHOOK -> EPERM");
		unsetenv("KVMI_KERNEL_DOUBLE_INTROSPECTION");
		close(sv[0]);
		close(sv[1]);
	}

	/* a forked child closing the VM fd leaves the parent's hook alone */
	{
		int sv[2];
		socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
		check(hook(&V12, vm, sv[0], 0) == 0, "fork: HOOK in the parent -> 0");
		pid_t pid = fork();
		if (pid == 0) {
			close(vm);
			_exit(0);
		}
		int st = 0;
		waitpid(pid, &st, 0);
		check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "fork: child closed its copy of the VM fd and exited");
		check(hook(&V12, vm, sv[0], 0) == -EEXIST, "fork: parent still hooked (HOOK -> EEXIST)");
		check(request(sv[1], KD_V12_GET_VERSION, NULL, 0, NULL, 0, NULL, NULL) == 0,
		      "fork: parent's session still answers GET_VERSION");

		/* closing the hooked VM fd unhooks, as VM destruction does */
		int tasks = count_dir("/proc/self/task");
		int old_vm = vm;
		close(vm);
		char c;
		check(read_n(sv[1], &c, 1, 60000) == 0, "close(VM fd): the tool sees EOF");
		check(wait_tasks(tasks - 1, 60000), "close(VM fd): the serving thread is gone");
		vm = ioctl(kvm, KVM_CREATE_VM, 0);
		check(vm >= 0, "KVM_CREATE_VM again (fd %d, the old one was %d)", vm, old_vm);
		check(hook(&V12, vm, sv[0], 0) == 0, "new VM starts unhooked: HOOK -> 0");
		check(xioctl(vm, KD_V12_UNHOOK, NULL) == 0, "new VM: UNHOOK -> 0");
		close(sv[0]);
		close(sv[1]);
	}

	close(vm);
	close(kvm);
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
