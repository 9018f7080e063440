/*
 * kvmi-kernel-double: a KERNEL DOUBLE for KVM VM introspection (KVMI).
 *
 * TEST EQUIPMENT ONLY - NEVER FOR PRODUCTION.
 *
 * No kernel with KVMI exists on the project's machines. This shared library is
 * loaded into QEMU (or a test program) with LD_PRELOAD. It defines ioctl() and
 * answers the five KVMI VM ioctls (HOOK, UNHOOK, COMMAND, EVENT, PREUNHOOK) of
 * both ABI generations ("v7" production and "v12"), and only on file
 * descriptors that are KVM VM fds (/proc/self/fd/N -> "anon_inode:kvm-vm").
 * Everything else goes to the real ioctl unchanged.
 *
 * After a successful HOOK a thread serves the introspection socket the way the
 * kernel's "kvmi-recv" thread does, for the VM-level messages an introspector
 * sends first: GET_VERSION, VM_CHECK_COMMAND, VM_CHECK_EVENT and
 * VM_CONTROL_EVENTS (unhook event). PREUNHOOK sends the UNHOOK event.
 *
 * It also defines close(): closing the hooked VM fd unhooks first, as the kernel
 * does when the VM is destroyed (only in the process that hooked).
 *
 * Behaviour, errno table, layouts and their sources:
 * Documentation/kernel-double.md. Log lines start with "kvmi-kernel-double:".
 *
 * Environment (read on every intercepted call):
 *   KVMI_KERNEL_DOUBLE_ABI=v7|v12   answer only that generation's numbers; the
 *                                   other generation goes to the real ioctl.
 *                                   Unset or "both": both generations.
 *   KVMI_KERNEL_DOUBLE_INTROSPECTION=0  act as a kernel whose kvm.introspection
 *                                   parameter is off: all five give EPERM.
 *   KVMI_KERNEL_DOUBLE_LOG=0        no log lines on stderr.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernel_double_abi.h"

#define KD_EXPORT __attribute__((visibility("default")))

/* Marker so that tests can tell the double is loaded. */
KD_EXPORT const char kvmi_kernel_double_marker[] =
	"kvmi-kernel-double: test equipment, not a kernel";

enum kd_gen { KD_GEN_NONE = 0, KD_GEN_V7 = 7, KD_GEN_V12 = 12 };
enum kd_op { KD_OP_HOOK, KD_OP_UNHOOK, KD_OP_COMMAND, KD_OP_EVENT, KD_OP_PREUNHOOK };

struct kd_vm {
	struct kd_vm *next;
	int vm_fd;               /* key: the VM fd number the HOOK came on */
	enum kd_gen gen;
	int sock;                /* the double's own reference (dup) */
	pthread_t thread;
	pthread_mutex_t lock;    /* allow/enable masks, dead flag */
	pthread_mutex_t wlock;   /* serialises writes to the socket */
	uint64_t cmd_allow;      /* bit n = command id n allowed */
	uint64_t ev_allow;       /* bit n = event id n allowed */
	uint64_t vm_ev_enabled;  /* VM events enabled by the tool */
	uint32_t ev_seq;         /* last event sequence number used */
	int dead;                /* the serving thread ended (socket shut down) */
	pid_t pid;               /* process that hooked (a forked child has no thread) */
	uint8_t uuid[16];
};

typedef int (*kd_ioctl_fn)(int, unsigned long, ...);
typedef int (*kd_close_fn)(int);

static pthread_mutex_t kd_lock = PTHREAD_MUTEX_INITIALIZER; /* like kvm->kvmi_lock */
static struct kd_vm *kd_vms;
static int kd_nr_vms;            /* states in kd_vms; read without the lock by close() */
static pid_t kd_hook_pid;        /* process that created the states (not a forked child) */
static kd_ioctl_fn kd_real_ioctl;
static kd_close_fn kd_real_close;
static pthread_once_t kd_once = PTHREAD_ONCE_INIT;

static void kd_resolve(void)
{
	kd_real_ioctl = (kd_ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
	kd_real_close = (kd_close_fn)dlsym(RTLD_NEXT, "close");
}

/* close() for the double's own fds: never through the exported close() below */
static void kd_close_own(int fd)
{
	pthread_once(&kd_once, kd_resolve);
	if (kd_real_close)
		kd_real_close(fd);
}

static int kd_log_enabled(void)
{
	const char *v = getenv("KVMI_KERNEL_DOUBLE_LOG");
	return !(v && strcmp(v, "0") == 0);
}

static void kd_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void kd_log(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	if (!kd_log_enabled())
		return;
	n = snprintf(line, sizeof(line), "kvmi-kernel-double: ");
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
	va_end(ap);
	/* one write(2) per line, so lines from threads do not interleave */
	{
		size_t len = strlen(line);
		if (len > sizeof(line) - 2)
			len = sizeof(line) - 2;
		line[len++] = '\n';
		ssize_t w = write(STDERR_FILENO, line, len);
		(void)w;
	}
}

/*
 * QEMU's log says how the process ended: this line comes from exit() (a
 * signal such as SIGKILL or SIGSEGV ends it without), so a log without QEMU's
 * "terminating on signal" line still tells a clean exit from a kill.
 */
static void kd_at_exit(void) __attribute__((destructor));
static void kd_at_exit(void)
{
	kd_log("pid %d exits (exit, not a signal)", (int)getpid());
}

/* ---- generation tables ----------------------------------------------------------- */

static int kd_num_commands(enum kd_gen g)
{
	return g == KD_GEN_V7 ? KD_V7_NUM_COMMANDS : KD_V12_NUM_COMMANDS;
}

static int kd_num_events(enum kd_gen g)
{
	return g == KD_GEN_V7 ? KD_V7_NUM_EVENTS : KD_V12_NUM_EVENTS;
}

static uint64_t kd_always_allowed(enum kd_gen g)
{
	if (g == KD_GEN_V7)
		return (1ULL << KD_V7_GET_VERSION) | (1ULL << KD_V7_VM_CHECK_COMMAND) |
		       (1ULL << KD_V7_VM_CHECK_EVENT);
	return (1ULL << KD_V12_GET_VERSION) | (1ULL << KD_V12_VM_CHECK_COMMAND) |
	       (1ULL << KD_V12_VM_CHECK_EVENT);
}

static uint64_t kd_all_bits(int n)
{
	return n >= 64 ? ~0ULL : ((1ULL << n) - 1);
}

/*
 * v7 production kernel (virt/kvm/introspection/kvmi_msg.c, kvmi-v7 line): the
 * message ids that have a handler. VM-thread handlers and vCPU handlers.
 */
static const uint8_t kd_v7_vm_msgs[] = { 2, 3, 4, 5, 7, 8, 17, 18, 21, 22, 24, 26, 27, 29, 30 };
static const uint8_t kd_v7_vcpu_msgs[] = { 0, 6, 9, 10, 11, 13, 14, 15, 16, 19, 23, 28,
					   32, 33, 34, 35, 36, 37, 38, 60, 63 };

static int kd_in(const uint8_t *set, size_t n, unsigned id)
{
	for (size_t i = 0; i < n; i++)
		if (set[i] == id)
			return 1;
	return 0;
}

static int kd_v7_is_vm_msg(unsigned id)
{
	return kd_in(kd_v7_vm_msgs, sizeof(kd_v7_vm_msgs), id);
}

static int kd_v7_is_vcpu_msg(unsigned id)
{
	return kd_in(kd_v7_vcpu_msgs, sizeof(kd_v7_vcpu_msgs), id);
}

/* v12: VM commands are even ids 2..20, vCPU messages odd ids 1..29 (1 = event reply) */
static int kd_v12_is_vm_cmd(unsigned id)
{
	return id >= 2 && id <= 20 && (id & 1) == 0;
}

static int kd_v12_is_vcpu_msg(unsigned id)
{
	return id >= 1 && id <= 29 && (id & 1) == 1;
}

static int kd_v12_is_known_event(unsigned id)
{
	return id == 0 || (id <= 19 && (id & 1) == 1);
}

/* ---- socket I/O (the socket may be O_NONBLOCK: it is shared with the caller) ---- */

static int kd_wait(int fd, short ev)
{
	struct pollfd p = { .fd = fd, .events = ev };
	for (;;) {
		int r = poll(&p, 1, -1);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return -1;
	}
}

/* Read exactly len bytes. 0 = ok, -1 = EOF or error (both end the session). */
static int kd_read_full(int fd, void *buf, size_t len)
{
	size_t done = 0;
	while (done < len) {
		ssize_t r = recv(fd, (char *)buf + done, len - done, 0);
		if (r > 0) {
			done += (size_t)r;
		} else if (r == 0) {
			return -1;
		} else if (errno == EINTR) {
			continue;
		} else if (errno == EAGAIN || errno == EWOULDBLOCK) {
			if (kd_wait(fd, POLLIN) < 0)
				return -1;
		} else {
			return -1;
		}
	}
	return 0;
}

/* Write one message (header + parts) completely, as one sendmsg where possible. */
static int kd_write_msg(struct kd_vm *vm, struct iovec *iov, int n)
{
	size_t total = 0;
	int rc = 0;

	for (int i = 0; i < n; i++)
		total += iov[i].iov_len;

	pthread_mutex_lock(&vm->wlock);
	while (total > 0) {
		struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)n };
		ssize_t w = sendmsg(vm->sock, &m, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if ((errno == EAGAIN || errno == EWOULDBLOCK) && kd_wait(vm->sock, POLLOUT) == 0)
				continue;
			rc = -1;
			break;
		}
		total -= (size_t)w;
		while (w > 0 && n > 0) {
			if ((size_t)w >= iov[0].iov_len) {
				w -= (ssize_t)iov[0].iov_len;
				iov++;
				n--;
			} else {
				iov[0].iov_base = (char *)iov[0].iov_base + w;
				iov[0].iov_len -= (size_t)w;
				w = 0;
			}
		}
	}
	pthread_mutex_unlock(&vm->wlock);
	return rc;
}

static int kd_reply(struct kd_vm *vm, const struct kd_msg_hdr *req, int err,
		    const void *payload, size_t payload_len)
{
	struct kd_msg_hdr h;
	struct kd_error_code ec;
	struct iovec iov[3];
	int n = 2;

	if (err)
		payload_len = 0;
	memset(&h, 0, sizeof(h));
	h.id = req->id;
	h.seq = req->seq;
	h.size = (uint16_t)(sizeof(ec) + payload_len);
	memset(&ec, 0, sizeof(ec));
	ec.err = err;

	iov[0].iov_base = &h;
	iov[0].iov_len = sizeof(h);
	iov[1].iov_base = &ec;
	iov[1].iov_len = sizeof(ec);
	if (payload_len) {
		iov[2].iov_base = (void *)payload;
		iov[2].iov_len = payload_len;
		n = 3;
	}
	return kd_write_msg(vm, iov, n);
}

/* Send the UNHOOK event. Caller holds kd_lock. 0 = sent. */
static int kd_send_unhook_event(struct kd_vm *vm)
{
	struct kd_msg_hdr h;
	struct iovec iov[2];
	struct kd_v12_event_hdr ev12;
	struct kd_v7_event ev7;
	uint32_t seq;

	pthread_mutex_lock(&vm->lock);
	seq = ++vm->ev_seq;
	pthread_mutex_unlock(&vm->lock);

	memset(&h, 0, sizeof(h));
	h.seq = seq;
	iov[0].iov_base = &h;
	iov[0].iov_len = sizeof(h);
	if (vm->gen == KD_GEN_V12) {
		memset(&ev12, 0, sizeof(ev12));
		ev12.event = KD_V12_EVENT_UNHOOK;
		h.id = KD_V12_VM_EVENT;
		h.size = sizeof(ev12);
		iov[1].iov_base = &ev12;
		iov[1].iov_len = sizeof(ev12);
	} else {
		memset(&ev7, 0, sizeof(ev7));
		ev7.size = sizeof(ev7);
		ev7.vcpu = 0;
		ev7.event = KD_V7_EVENT_UNHOOK;
		h.id = KD_V7_EVENT_MSG;
		h.size = sizeof(ev7);
		iov[1].iov_base = &ev7;
		iov[1].iov_len = sizeof(ev7);
	}
	return kd_write_msg(vm, iov, 2);
}

/* ---- message handling ------------------------------------------------------------ */

static int kd_cmd_allowed(struct kd_vm *vm, unsigned id)
{
	int r;
	if (id >= (unsigned)kd_num_commands(vm->gen))
		return 0;
	pthread_mutex_lock(&vm->lock);
	r = (vm->cmd_allow >> id) & 1;
	pthread_mutex_unlock(&vm->lock);
	return r;
}

static int kd_ev_allowed(struct kd_vm *vm, unsigned id)
{
	int r;
	if (id >= (unsigned)kd_num_events(vm->gen))
		return 0;
	pthread_mutex_lock(&vm->lock);
	r = (vm->ev_allow >> id) & 1;
	pthread_mutex_unlock(&vm->lock);
	return r;
}

static void kd_set_vm_event(struct kd_vm *vm, unsigned id, int enable)
{
	pthread_mutex_lock(&vm->lock);
	if (enable)
		vm->vm_ev_enabled |= 1ULL << id;
	else
		vm->vm_ev_enabled &= ~(1ULL << id);
	pthread_mutex_unlock(&vm->lock);
}

static int kd_handle_get_version(struct kd_vm *vm, const struct kd_msg_hdr *h)
{
	if (vm->gen == KD_GEN_V12) {
		struct kd_v12_get_version_reply r;
		memset(&r, 0, sizeof(r));
		r.version = KD_KVMI_VERSION;
		r.max_msg_size = KD_MAX_MSG_SIZE;
		return kd_reply(vm, h, 0, &r, sizeof(r));
	} else {
		struct kd_v7_get_version_reply r;
		memset(&r, 0, sizeof(r));
		r.version = KD_KVMI_VERSION;
		return kd_reply(vm, h, 0, &r, sizeof(r));
	}
}

static int kd_handle_check_command(struct kd_vm *vm, const struct kd_msg_hdr *h, const void *body)
{
	struct kd_check_id req;
	int ec = 0;

	memcpy(&req, body, sizeof(req));
	if (req.padding1 || req.padding2)
		ec = -KD_KVM_EINVAL;
	else if (vm->gen == KD_GEN_V12 &&
		 !(kd_v12_is_vm_cmd(req.id) || (kd_v12_is_vcpu_msg(req.id) && req.id != KD_V12_VCPU_EVENT)))
		ec = -KD_KVM_ENOENT;
	else if (vm->gen == KD_GEN_V7 && req.id >= KD_V7_NUM_COMMANDS)
		ec = -KD_KVM_EINVAL;
	else if (!kd_cmd_allowed(vm, req.id))
		ec = -KD_KVM_EPERM;
	return kd_reply(vm, h, ec, NULL, 0);
}

static int kd_handle_check_event(struct kd_vm *vm, const struct kd_msg_hdr *h, const void *body)
{
	struct kd_check_id req;
	int ec = 0;

	memcpy(&req, body, sizeof(req));
	if (req.padding1 || req.padding2)
		ec = -KD_KVM_EINVAL;
	else if (vm->gen == KD_GEN_V12 && !kd_v12_is_known_event(req.id))
		ec = -KD_KVM_ENOENT;
	else if (vm->gen == KD_GEN_V7 && req.id >= KD_V7_NUM_EVENTS)
		ec = -KD_KVM_EINVAL;
	else if (!kd_ev_allowed(vm, req.id))
		ec = -KD_KVM_EPERM;
	return kd_reply(vm, h, ec, NULL, 0);
}

static int kd_handle_control_vm_events(struct kd_vm *vm, const struct kd_msg_hdr *h, const void *body)
{
	struct kd_control_vm_events req;
	int ec = 0;

	memcpy(&req, body, sizeof(req));
	if (vm->gen == KD_GEN_V12) {
		if (req.padding1 || req.padding2 || req.enable > 1)
			ec = -KD_KVM_EINVAL;
		else if (req.event_id != KD_V12_EVENT_UNHOOK)   /* the only known VM event */
			ec = -KD_KVM_EINVAL;
		else if (!kd_ev_allowed(vm, req.event_id))
			ec = -KD_KVM_EPERM;
	} else {
		if (req.padding1 || req.padding2)
			ec = -KD_KVM_EINVAL;
		else if (req.event_id >= KD_V7_NUM_EVENTS)
			ec = -KD_KVM_EINVAL;
		else if (req.event_id != KD_V7_EVENT_UNHOOK && req.event_id != KD_V7_EVENT_CREATE_VCPU &&
			 req.event_id != KD_V7_EVENT_CMD_ERROR)
			ec = -KD_KVM_EINVAL;
		else if (!kd_ev_allowed(vm, req.event_id))
			ec = -KD_KVM_EPERM;
	}
	if (ec == 0)
		kd_set_vm_event(vm, req.event_id, req.enable != 0);
	return kd_reply(vm, h, ec, NULL, 0);
}

/* Returns 0 to continue serving, -1 to end the session (protocol or socket error). */
static int kd_process(struct kd_vm *vm, const struct kd_msg_hdr *h, const void *body)
{
	unsigned id = h->id;

	if (vm->gen == KD_GEN_V12) {
		if (kd_v12_is_vm_cmd(id)) {
			if (!kd_cmd_allowed(vm, id))
				return kd_reply(vm, h, -KD_KVM_EPERM, NULL, 0);
			switch (id) {
			case KD_V12_GET_VERSION: return kd_handle_get_version(vm, h);
			case KD_V12_VM_CHECK_COMMAND: return kd_handle_check_command(vm, h, body);
			case KD_V12_VM_CHECK_EVENT: return kd_handle_check_event(vm, h, body);
			case KD_V12_VM_CONTROL_EVENTS: return kd_handle_control_vm_events(vm, h, body);
			default: return kd_reply(vm, h, -KD_KVM_EOPNOTSUPP, NULL, 0);
			}
		}
		if (kd_v12_is_vcpu_msg(id)) {
			if (id != KD_V12_VCPU_EVENT && !kd_cmd_allowed(vm, id))
				return kd_reply(vm, h, -KD_KVM_EPERM, NULL, 0);
			if (id == KD_V12_VCPU_EVENT) {
				/* an event reply, but the double never sends vCPU events */
				kd_log("unexpected event reply (id %u seq %u): closing", id, h->seq);
				return -1;
			}
			return kd_reply(vm, h, -KD_KVM_EOPNOTSUPP, NULL, 0);
		}
		return kd_reply(vm, h, -KD_KVM_ENOSYS, NULL, 0);
	}

	/* v7 production */
	if (!kd_v7_is_vm_msg(id) && !kd_v7_is_vcpu_msg(id))
		return kd_reply(vm, h, -KD_KVM_ENOSYS, NULL, 0);
	if (id != KD_V7_EVENT_REPLY && !kd_cmd_allowed(vm, id))
		return kd_reply(vm, h, -KD_KVM_EPERM, NULL, 0);
	switch (id) {
	case KD_V7_GET_VERSION: return kd_handle_get_version(vm, h);
	case KD_V7_VM_CHECK_COMMAND: return kd_handle_check_command(vm, h, body);
	case KD_V7_VM_CHECK_EVENT: return kd_handle_check_event(vm, h, body);
	case KD_V7_VM_CONTROL_EVENTS: return kd_handle_control_vm_events(vm, h, body);
	case KD_V7_EVENT_REPLY:
		kd_log("unexpected event reply (id %u seq %u): closing", id, h->seq);
		return -1;
	default: return kd_reply(vm, h, -KD_KVM_EOPNOTSUPP, NULL, 0);
	}
}

/* The serving thread: the double's "kvmi-recv". */
static void *kd_recv_thread(void *arg)
{
	struct kd_vm *vm = arg;
	/* zero-filled like the kernel's message buffer, so short bodies read as zeros */
	uint8_t *body = calloc(1, KD_MAX_MSG_SIZE + 16);

	while (body) {
		struct kd_msg_hdr h;

		if (kd_read_full(vm->sock, &h, sizeof(h)) < 0)
			break;
		if (h.size > KD_MAX_MSG_SIZE) {
			kd_log("message id %u size %u above %u: closing", h.id, h.size, KD_MAX_MSG_SIZE);
			break;
		}
		memset(body, 0, KD_MAX_MSG_SIZE + 16);
		if (h.size && kd_read_full(vm->sock, body, h.size) < 0)
			break;
		if (kd_process(vm, &h, body) < 0)
			break;
	}
	free(body);

	/* Signal userspace (POLLHUP) and stop further events; the state stays until UNHOOK. */
	shutdown(vm->sock, SHUT_RDWR);
	pthread_mutex_lock(&vm->lock);
	vm->dead = 1;
	pthread_mutex_unlock(&vm->lock);
	kd_log("vm fd %d: introspection socket closed; state kept until UNHOOK", vm->vm_fd);
	return NULL;
}

/* ---- ioctl side ------------------------------------------------------------------ */

static int kd_is_vm_fd(int fd)
{
	char path[64], target[64];
	ssize_t n;

	if (fd < 0)
		return 0;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, target, sizeof(target) - 1);
	if (n < 0)
		return 0;
	target[n] = 0;
	return strcmp(target, "anon_inode:kvm-vm") == 0;
}

static int kd_classify(unsigned long req, enum kd_gen *gen, enum kd_op *op)
{
	switch (req) {
	case KD_V7_HOOK: *gen = KD_GEN_V7; *op = KD_OP_HOOK; return 1;
	case KD_V7_UNHOOK: *gen = KD_GEN_V7; *op = KD_OP_UNHOOK; return 1;
	case KD_V7_COMMAND: *gen = KD_GEN_V7; *op = KD_OP_COMMAND; return 1;
	case KD_V7_EVENT: *gen = KD_GEN_V7; *op = KD_OP_EVENT; return 1;
	case KD_V7_PREUNHOOK: *gen = KD_GEN_V7; *op = KD_OP_PREUNHOOK; return 1;
	case KD_V12_HOOK: *gen = KD_GEN_V12; *op = KD_OP_HOOK; return 1;
	case KD_V12_UNHOOK: *gen = KD_GEN_V12; *op = KD_OP_UNHOOK; return 1;
	case KD_V12_COMMAND: *gen = KD_GEN_V12; *op = KD_OP_COMMAND; return 1;
	case KD_V12_EVENT: *gen = KD_GEN_V12; *op = KD_OP_EVENT; return 1;
	case KD_V12_PREUNHOOK: *gen = KD_GEN_V12; *op = KD_OP_PREUNHOOK; return 1;
	default: return 0;
	}
}

/* Which generations the double speaks (KVMI_KERNEL_DOUBLE_ABI). */
static int kd_gen_enabled(enum kd_gen g)
{
	const char *v = getenv("KVMI_KERNEL_DOUBLE_ABI");
	if (!v || !*v || strcmp(v, "both") == 0)
		return 1;
	if (strcmp(v, "v7") == 0)
		return g == KD_GEN_V7;
	if (strcmp(v, "v12") == 0)
		return g == KD_GEN_V12;
	return 1;
}

static int kd_param_off(void)
{
	const char *v = getenv("KVMI_KERNEL_DOUBLE_INTROSPECTION");
	return v && (strcmp(v, "0") == 0 || strcmp(v, "off") == 0);
}

static struct kd_vm *kd_find(int vm_fd)
{
	for (struct kd_vm *vm = kd_vms; vm; vm = vm->next)
		if (vm->vm_fd == vm_fd)
			return vm;
	return NULL;
}

static void kd_unlink(struct kd_vm *vm)
{
	struct kd_vm **p = &kd_vms;
	while (*p && *p != vm)
		p = &(*p)->next;
	if (*p) {
		*p = vm->next;
		__atomic_store_n(&kd_nr_vms, kd_nr_vms - 1, __ATOMIC_RELEASE);
	}
}

static int kd_hook(int vm_fd, enum kd_gen gen, const struct kd_introspection_hook *arg)
{
	struct kd_introspection_hook hk;
	struct stat st;
	struct kd_vm *vm;
	sigset_t all, old;
	int rc;

	if (!arg)
		return -EFAULT;
	memcpy(&hk, arg, sizeof(hk));
	if (hk.padding)
		return -EINVAL;
	if (kd_find(vm_fd))
		return -EEXIST;
	if (hk.fd < 0 || fstat(hk.fd, &st) < 0 || !S_ISSOCK(st.st_mode))
		return -EINVAL;

	vm = calloc(1, sizeof(*vm));
	if (!vm)
		return -ENOMEM;
	/* the double's own reference; the caller's fd stays independent, as with the kernel */
	vm->sock = fcntl(hk.fd, F_DUPFD_CLOEXEC, 0);
	if (vm->sock < 0) {
		free(vm);
		return -ENOMEM;
	}
	vm->vm_fd = vm_fd;
	vm->gen = gen;
	vm->cmd_allow = kd_always_allowed(gen);
	vm->ev_allow = 0;
	memcpy(vm->uuid, hk.uuid, sizeof(vm->uuid));
	pthread_mutex_init(&vm->lock, NULL);
	pthread_mutex_init(&vm->wlock, NULL);

	/* the serving thread takes no signals meant for the host process */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&vm->thread, NULL, kd_recv_thread, vm);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0) {
		kd_close_own(vm->sock);
		pthread_mutex_destroy(&vm->lock);
		pthread_mutex_destroy(&vm->wlock);
		free(vm);
		return -ENOMEM;
	}
	vm->pid = getpid();
	__atomic_store_n(&kd_hook_pid, vm->pid, __ATOMIC_RELEASE);
	vm->next = kd_vms;
	kd_vms = vm;
	__atomic_store_n(&kd_nr_vms, kd_nr_vms + 1, __ATOMIC_RELEASE);
	/* the UUID as the kernel logs it: tests compare it with the domain's */
	kd_log("vm fd %d: HOOK (%s) uuid %02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x on socket fd %d: hooked",
	       vm_fd, gen == KD_GEN_V7 ? "v7" : "v12",
	       hk.uuid[0], hk.uuid[1], hk.uuid[2], hk.uuid[3], hk.uuid[4], hk.uuid[5], hk.uuid[6], hk.uuid[7],
	       hk.uuid[8], hk.uuid[9], hk.uuid[10], hk.uuid[11], hk.uuid[12], hk.uuid[13], hk.uuid[14], hk.uuid[15], hk.fd);
	return 0;
}

static int kd_unhook(int vm_fd)
{
	struct kd_vm *vm = kd_find(vm_fd);

	if (!vm)
		return 0;
	if (vm->pid != getpid()) {
		/* a forked child: the serving thread and the kernel state belong to the parent */
		return 0;
	}
	kd_unlink(vm);
	shutdown(vm->sock, SHUT_RDWR);
	pthread_join(vm->thread, NULL);
	kd_close_own(vm->sock);
	pthread_mutex_destroy(&vm->lock);
	pthread_mutex_destroy(&vm->wlock);
	free(vm);
	kd_log("vm fd %d: UNHOOK: unhooked", vm_fd);
	return 0;
}

static int kd_feature(int vm_fd, enum kd_gen gen, enum kd_op op,
		      const struct kd_introspection_feature *arg)
{
	struct kd_introspection_feature f;
	int nbits = op == KD_OP_COMMAND ? kd_num_commands(gen) : kd_num_events(gen);
	struct kd_vm *vm;
	int rc = 0;

	if (!arg)
		return -EFAULT;
	memcpy(&f, arg, sizeof(f));
	if (f.id < -1)
		return -EINVAL;
	if (f.id > 0 && f.id >= nbits)
		return -EINVAL;
	if (f.allow > 1)
		return -EINVAL;

	vm = kd_find(vm_fd);
	if (!vm)
		return -EFAULT;

	pthread_mutex_lock(&vm->lock);
	if (op == KD_OP_COMMAND) {
		uint64_t always = kd_always_allowed(gen);
		if (f.allow)
			vm->cmd_allow |= f.id == -1 ? kd_all_bits(nbits) : 1ULL << f.id;
		else if (f.id == -1)
			vm->cmd_allow = always;
		else if ((always >> f.id) & 1)
			rc = -EPERM;
		else
			vm->cmd_allow &= ~(1ULL << f.id);
	} else {
		if (f.allow)
			vm->ev_allow |= f.id == -1 ? kd_all_bits(nbits) : 1ULL << f.id;
		else if (f.id == -1)
			vm->ev_allow = 0;
		else
			vm->ev_allow &= ~(1ULL << f.id);
	}
	pthread_mutex_unlock(&vm->lock);
	return rc;
}

static int kd_preunhook(int vm_fd)
{
	struct kd_vm *vm = kd_find(vm_fd);
	unsigned unhook_id;
	int enabled, dead;

	if (!vm)
		return -EFAULT;
	unhook_id = vm->gen == KD_GEN_V7 ? KD_V7_EVENT_UNHOOK : KD_V12_EVENT_UNHOOK;
	pthread_mutex_lock(&vm->lock);
	enabled = (vm->vm_ev_enabled >> unhook_id) & 1;
	dead = vm->dead;
	pthread_mutex_unlock(&vm->lock);
	if (!enabled || dead)
		return -ENOENT;
	if (kd_send_unhook_event(vm) < 0)
		return -ENOENT;
	kd_log("vm fd %d: PREUNHOOK: unhook event sent", vm_fd);
	return 0;
}

/* Runs one intercepted ioctl. Returns 1 if handled (result in *res), 0 to pass through. */
static int kd_intercept(int fd, unsigned long req, void *arg, int *res)
{
	enum kd_gen gen;
	enum kd_op op;
	struct kd_vm *vm;
	int r;

	if (!kd_classify(req, &gen, &op))
		return 0;
	if (!kd_gen_enabled(gen))
		return 0;
	if (!kd_is_vm_fd(fd))
		return 0;

	if (kd_param_off()) {
		*res = -EPERM;
		return 1;
	}

	pthread_mutex_lock(&kd_lock);
	vm = kd_find(fd);
	if (vm && vm->gen != gen) {
		/* a kernel of the hooked generation does not know this number */
		pthread_mutex_unlock(&kd_lock);
		*res = -ENOTTY;
		return 1;
	}
	switch (op) {
	case KD_OP_HOOK: r = kd_hook(fd, gen, arg); break;
	case KD_OP_UNHOOK: r = kd_unhook(fd); break;
	case KD_OP_COMMAND:
	case KD_OP_EVENT: r = kd_feature(fd, gen, op, arg); break;
	case KD_OP_PREUNHOOK: r = kd_preunhook(fd); break;
	default: r = -ENOTTY; break;
	}
	pthread_mutex_unlock(&kd_lock);
	*res = r;
	return 1;
}

/*
 * Closing the hooked VM fd destroys the VM in the real kernel, which unhooks. The
 * double does the same when the fd number it keys the state on is closed, so a new
 * VM that gets the same fd number starts unhooked. Only in the process that hooked.
 */
KD_EXPORT int close(int fd)
{
	pthread_once(&kd_once, kd_resolve);
	/* no lock in a forked child: the lock may have been held at fork time */
	if (__atomic_load_n(&kd_nr_vms, __ATOMIC_ACQUIRE) > 0 &&
	    __atomic_load_n(&kd_hook_pid, __ATOMIC_ACQUIRE) == getpid()) {
		pthread_mutex_lock(&kd_lock);
		struct kd_vm *vm = kd_find(fd);
		if (vm && vm->pid == getpid()) {
			kd_log("vm fd %d closed: unhooking, as VM destruction does", fd);
			kd_unhook(fd);
		}
		pthread_mutex_unlock(&kd_lock);
	}
	if (!kd_real_close) {
		errno = ENOSYS;
		return -1;
	}
	return kd_real_close(fd);
}

KD_EXPORT int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	void *arg;
	int res;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);

	if (kd_intercept(fd, request, arg, &res)) {
		if (res < 0) {
			errno = -res;
			return -1;
		}
		return res;
	}

	pthread_once(&kd_once, kd_resolve);
	if (!kd_real_ioctl) {
		errno = ENOSYS;
		return -1;
	}
	return kd_real_ioctl(fd, request, arg);
}
