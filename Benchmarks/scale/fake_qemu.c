/*
 * fake_qemu.c - QEMU's side of the broker <-> QEMU channel, version 1
 * (Documentation/channel-protocol.md; the broker speaks 2 and still accepts 1,
 * and a guest that never says "hooked" in HELLO needs nothing of version 2),
 * one process per guest as QEMU is, for
 * the boot-storm benchmark (kvmi-bench scale). TEST EQUIPMENT: there is no VM
 * here and no KVM. After HOOK it keeps the introspector's descriptor and
 * answers the VM-level KVMI messages a tool sends first, the way the kernel
 * double does (Tests/KernelDouble), so a libkvmi-style tool can sit behind it.
 *
 * Launcher (what kvmi-bench runs):
 *
 *   fake_qemu --launch N --channel PATH [--record-fd 3] [--stop-fd 4] [--go-fd 5]
 *
 * forks N guests (each execs this program as below, so /proc/PID/exe is this
 * binary and /proc/PID/cmdline carries -uuid), reports FQ_LAUNCHED, then reaps
 * every guest and reports FQ_REAPED before it exits.
 *
 * Guest:
 *
 *   fake_qemu -uuid UUID -name guest=NAME --channel PATH --index I
 *             --record-fd FD --stop-fd FD --go-fd FD
 *
 * reports FQ_READY, blocks until the go pipe reaches end of file (the parent
 * closes its write end: every guest is released at once), connects, sends
 * HELLO, waits for WELCOME (REFUSE: FQ_REFUSED, exit 3), answers HOOK (exactly
 * one descriptor as SCM_RIGHTS) with RESULT and reports FQ_HOOKED with its
 * timestamps, then stays alive, holding the channel and the tool's descriptor,
 * until the stop pipe reaches end of file or SIGTERM. Every report is one
 * fixed-size record (struct fq_record, less than PIPE_BUF, so each write(2) is
 * atomic) on the record pipe. Times are CLOCK_MONOTONIC nanoseconds.
 *
 * Exit status of a guest: 0 hooked, 3 refused, 4 the channel was lost,
 * 5 never hooked (stopped first), 6 usage or set-up error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- the record pipe (read by Sources/kvmi-bench/ScaleBench.swift) ----------- */

#define FQ_MAGIC 0x52514B46u /* "FKQR" */

enum fq_kind {
	FQ_READY = 1,       /* started, waiting on the go pipe */
	FQ_HOOKED = 2,      /* HOOK received, RESULT sent (t_hook, t_result) */
	FQ_REFUSED = 3,     /* REFUSE received; value = its reason (errno) */
	FQ_CLOSED = 4,      /* the broker closed the channel; value = 1 if hooked then */
	FQ_FAILED = 5,      /* connect or protocol failure; value = errno */
	FQ_KVMI = 6,        /* first KVMI_GET_VERSION answered on the tool's descriptor */
	FQ_TOOL_HANGUP = 7, /* the tool's descriptor hung up */
	FQ_LAUNCHED = 16,   /* launcher: value = guests forked */
	FQ_REAPED = 17,     /* launcher: value = guests reaped; index = how many exited non-zero */
};

struct fq_record {
	uint32_t magic;
	uint32_t kind;
	uint32_t index;
	int32_t pid;
	int32_t value;
	uint32_t reserved;
	uint64_t t_go;      /* the go pipe reached end of file */
	uint64_t t_connect; /* connect() returned */
	uint64_t t_hello;   /* HELLO sent */
	uint64_t t_welcome; /* WELCOME (or REFUSE) received */
	uint64_t t_hook;    /* HOOK received */
	uint64_t t_result;  /* RESULT for HOOK sent */
	uint64_t t_event;   /* when this record's event happened */
};
_Static_assert(sizeof(struct fq_record) == 80, "record layout");
_Static_assert(sizeof(struct fq_record) < PIPE_BUF, "records must be written atomically");

static int record_fd = -1;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void emit(struct fq_record *r, uint32_t kind, int32_t value)
{
	r->magic = FQ_MAGIC;
	r->kind = kind;
	r->value = value;
	r->t_event = now_ns();
	for (;;) {
		ssize_t n = write(record_fd, r, sizeof(*r));
		if (n >= 0 || errno != EINTR)
			return;
	}
}

/* ---- the channel, version 1 (Documentation/channel-protocol.md) ----------------- */

#define CH_MAGIC 0x494D564Bu
#define CH_HEADER 16
#define CH_MAX_PAYLOAD 4096

enum {
	CH_HELLO = 0x0001,
	CH_WELCOME = 0x0002,
	CH_REFUSE = 0x0003,
	CH_HOOK = 0x0010,
	CH_SET_ALLOWED = 0x0011,
	CH_PREUNHOOK = 0x0012,
	CH_UNHOOK = 0x0013,
	CH_RELEASE = 0x0014,
	CH_EVENT = 0x0040,
	CH_RESULT = 0x0080,
};

enum { STEP_NONE = 0, STEP_PREUNHOOK = 4, STEP_FD = 6, STEP_STATE = 7, STEP_REQUEST = 8 };

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)v); put16(p + 2, (uint16_t)(v >> 16)); }
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)v); put32(p + 4, (uint32_t)(v >> 32)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }

/* Waits for `events` on fd (the tool's descriptor may be non-blocking: its flags are shared). */
static int wait_fd(int fd, short events)
{
	struct pollfd p = { .fd = fd, .events = events };

	for (;;) {
		int r = poll(&p, 1, -1);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return -1;
	}
}

static int send_all(int fd, const void *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = send(fd, (const char *)buf + done, len - done, MSG_NOSIGNAL);
		if (n > 0) {
			done += (size_t)n;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (wait_fd(fd, POLLOUT) < 0)
				return -1;
		} else {
			return -1;
		}
	}
	return 0;
}

/* Reads exactly len bytes; descriptors that come with them are appended to fds (closed beyond max). */
static int recv_exact(int fd, void *buf, size_t len, int *fds, int *nfds, int max)
{
	size_t done = 0;

	while (done < len) {
		union {
			char buf[CMSG_SPACE(sizeof(int) * 8)];
			struct cmsghdr align;
		} control;
		struct iovec iov = { .iov_base = (char *)buf + done, .iov_len = len - done };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
				    .msg_controllen = sizeof(control.buf) };
		ssize_t n = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (wait_fd(fd, POLLIN) < 0)
				return -1;
			continue;
		}
		if (n <= 0)
			return -1;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
			if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
				continue;
			int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			int got[8];
			memcpy(got, CMSG_DATA(c), sizeof(int) * (size_t)count);
			for (int i = 0; i < count; i++) {
				if (fds && *nfds < max)
					fds[(*nfds)++] = got[i];
				else
					close(got[i]);
			}
		}
		done += (size_t)n;
	}
	return 0;
}

static int send_frame(int fd, uint16_t type, uint32_t seq, const uint8_t *payload, uint32_t size)
{
	uint8_t frame[CH_HEADER + CH_MAX_PAYLOAD];

	put32(frame, CH_MAGIC);
	put16(frame + 4, type);
	put16(frame + 6, 0);
	put32(frame + 8, seq);
	put32(frame + 12, size);
	if (size)
		memcpy(frame + CH_HEADER, payload, size);
	return send_all(fd, frame, CH_HEADER + size);
}

static int send_result(int fd, uint16_t request, uint32_t seq, uint8_t step, int hooked, int32_t error)
{
	uint8_t p[16] = { 0 };

	put16(p, request);
	p[2] = step;
	p[3] = hooked ? 1 : 0;
	put32(p + 4, (uint32_t)error);
	put32(p + 8, (uint32_t)-1); /* failed_id: -1 when no ioctl failed, as the QEMU patch sends */
	return send_frame(fd, CH_RESULT, seq, p, sizeof(p));
}

/* ---- KVMI, VM level, as the kernel double answers it ------------------------------
 * Layouts and rules copied from Tests/KernelDouble/kernel_double_abi.h and
 * kernel_double.c (kd_process, kd_handle_*, kd_feature): struct kvmi_msg_hdr
 * {u16 id; u16 size; u32 seq}, replies carry struct kvmi_error_code {s32 err;
 * u32 padding} then the reply body; errors are negated KVM_E* values.
 */
#define KVMI_MAX_MSG 8184
#define KVM_EPERM 1
#define KVM_ENOENT 2
#define KVM_EINVAL 22
#define KVM_EOPNOTSUPP 95
#define KVM_ENOSYS 1000

#define V12_VCPU_EVENT 1
#define V12_GET_VERSION 2
#define V12_VM_CHECK_COMMAND 4
#define V12_VM_CHECK_EVENT 6
#define V12_VM_CONTROL_EVENTS 10
#define V12_NUM_COMMANDS 30
#define V12_NUM_EVENTS 20

#define V7_GET_VERSION 2
#define V7_VM_CHECK_COMMAND 3
#define V7_VM_CHECK_EVENT 4
#define V7_VM_CONTROL_EVENTS 8
#define V7_NUM_COMMANDS 64
#define V7_NUM_EVENTS 14

struct guest {
	uint32_t index;
	uint8_t uuid[16];
	char name[64];
	int chan;
	int tool;      /* the hooked descriptor, or -1 */
	int abi;       /* 7 or 12 while hooked */
	uint64_t cmd_allow, ev_allow, vm_ev_enabled;
	uint32_t ev_seq;
	int kvmi_reported;
	int64_t start_time;
	struct fq_record rec;
};

static int num_commands(int abi) { return abi == 7 ? V7_NUM_COMMANDS : V12_NUM_COMMANDS; }
static int num_events(int abi) { return abi == 7 ? V7_NUM_EVENTS : V12_NUM_EVENTS; }
static uint64_t all_bits(int n) { return n >= 64 ? ~0ull : (1ull << n) - 1; }

static uint64_t always_allowed(int abi)
{
	if (abi == 7)
		return 1ull << V7_GET_VERSION | 1ull << V7_VM_CHECK_COMMAND | 1ull << V7_VM_CHECK_EVENT;
	return 1ull << V12_GET_VERSION | 1ull << V12_VM_CHECK_COMMAND | 1ull << V12_VM_CHECK_EVENT;
}

/* Applies one allow-lists payload (section 3.3) as QEMU's ioctls would: {1, id} per id, {1, -1} for [-1]. */
static int apply_lists(struct guest *g, const uint8_t *p, uint32_t size, int reset)
{
	if (size < 8 || (p[0] != 7 && p[0] != 12))
		return -1;
	int abi = p[0];
	uint32_t nc = get16(p + 2), ne = get16(p + 4);
	if (nc > 64 || ne > 64 || size < 8 + 4 * (nc + ne))
		return -1;
	if (reset) {
		g->cmd_allow = always_allowed(abi);
		g->ev_allow = 0;
	}
	for (uint32_t i = 0; i < nc + ne; i++) {
		int32_t id = (int32_t)get32(p + 8 + 4 * i);
		int n = i < nc ? num_commands(abi) : num_events(abi);
		uint64_t *set = i < nc ? &g->cmd_allow : &g->ev_allow;
		if (id == -1)
			*set |= all_bits(n);
		else if (id >= 0 && id < n)
			*set |= 1ull << id;
	}
	g->abi = abi;
	return 0;
}

static int kvmi_reply(struct guest *g, uint16_t id, uint32_t seq, int32_t err, const void *body, uint16_t len)
{
	uint8_t msg[8 + 8 + 16] = { 0 };

	if (err)
		len = 0;
	memcpy(msg, &id, 2);
	uint16_t size = (uint16_t)(8 + len);
	memcpy(msg + 2, &size, 2);
	memcpy(msg + 4, &seq, 4);
	memcpy(msg + 8, &err, 4);
	if (len)
		memcpy(msg + 16, body, len);
	return send_all(g->tool, msg, 16u + len);
}

static int cmd_allowed(struct guest *g, unsigned id)
{
	return id < (unsigned)num_commands(g->abi) && (g->cmd_allow >> id & 1);
}

static int ev_allowed(struct guest *g, unsigned id)
{
	return id < (unsigned)num_events(g->abi) && (g->ev_allow >> id & 1);
}

/* One message from the tool; -1 ends the session (the kernel would close the socket). */
static int kvmi_serve(struct guest *g)
{
	uint8_t hdr[8], body[KVMI_MAX_MSG + 16];
	uint16_t id, size, check_id;
	uint32_t seq;

	if (recv_exact(g->tool, hdr, sizeof(hdr), NULL, NULL, 0) < 0)
		return -1;
	memcpy(&id, hdr, 2);
	memcpy(&size, hdr + 2, 2);
	memcpy(&seq, hdr + 4, 4);
	if (size > KVMI_MAX_MSG)
		return -1;
	memset(body, 0, sizeof(body));
	if (size && recv_exact(g->tool, body, size, NULL, NULL, 0) < 0)
		return -1;
	memcpy(&check_id, body, 2);
	int padded = body[2] || body[3] || body[4] || body[5] || body[6] || body[7];
	int is12 = g->abi == 12;
	int get_version = is12 ? V12_GET_VERSION : V7_GET_VERSION;
	int check_command = is12 ? V12_VM_CHECK_COMMAND : V7_VM_CHECK_COMMAND;
	int check_event = is12 ? V12_VM_CHECK_EVENT : V7_VM_CHECK_EVENT;
	int control_events = is12 ? V12_VM_CONTROL_EVENTS : V7_VM_CONTROL_EVENTS;

	if (is12 && id == V12_VCPU_EVENT)
		return -1; /* an event reply, but no vCPU events are ever sent */
	if (is12 && !((id >= 2 && id <= 20 && !(id & 1)) || (id <= 29 && (id & 1))))
		return kvmi_reply(g, id, seq, -KVM_ENOSYS, NULL, 0); /* neither a VM command nor a vCPU message */
	if (!is12 && id >= V7_NUM_COMMANDS)
		return kvmi_reply(g, id, seq, -KVM_ENOSYS, NULL, 0);
	if (!cmd_allowed(g, id))
		return kvmi_reply(g, id, seq, -KVM_EPERM, NULL, 0);
	if (id == get_version) {
		/* v12: {u32 version; u32 max_msg_size; u8 features[8]}; v7: {u32 version; u32 padding; u8 features[8]} */
		uint32_t reply[4] = { 1, is12 ? KVMI_MAX_MSG : 0, 0, 0 };
		int rc = kvmi_reply(g, id, seq, 0, reply, sizeof(reply));
		if (rc == 0 && !g->kvmi_reported) {
			g->kvmi_reported = 1;
			emit(&g->rec, FQ_KVMI, 0);
		}
		return rc;
	}
	if (id == check_command) {
		int32_t ec = 0;
		if (padded)
			ec = -KVM_EINVAL;
		else if (is12 && !((check_id >= 2 && check_id <= 20 && !(check_id & 1)) ||
				   (check_id >= 3 && check_id <= 29 && (check_id & 1))))
			ec = -KVM_ENOENT;
		else if (!is12 && check_id >= V7_NUM_COMMANDS)
			ec = -KVM_EINVAL;
		else if (!cmd_allowed(g, check_id))
			ec = -KVM_EPERM;
		return kvmi_reply(g, id, seq, ec, NULL, 0);
	}
	if (id == check_event) {
		int32_t ec = 0;
		if (padded)
			ec = -KVM_EINVAL;
		else if (is12 && !(check_id == 0 || (check_id <= 19 && (check_id & 1))))
			ec = -KVM_ENOENT;
		else if (!is12 && check_id >= V7_NUM_EVENTS)
			ec = -KVM_EINVAL;
		else if (!ev_allowed(g, check_id))
			ec = -KVM_EPERM;
		return kvmi_reply(g, id, seq, ec, NULL, 0);
	}
	if (id == control_events) {
		/* {u16 event_id; u8 enable; u8 padding1; u32 padding2} */
		int32_t ec = 0;
		int other = body[3] || body[4] || body[5] || body[6] || body[7];
		if (other || body[2] > 1)
			ec = -KVM_EINVAL;
		else if (is12 && check_id != 0)
			ec = -KVM_EINVAL; /* v12's only VM event is KVMI_VM_EVENT_UNHOOK */
		else if (!is12 && check_id != 0 && check_id != 9 && check_id != 12)
			ec = -KVM_EINVAL;
		else if (!ev_allowed(g, check_id))
			ec = -KVM_EPERM;
		if (ec == 0) {
			if (body[2])
				g->vm_ev_enabled |= 1ull << check_id;
			else
				g->vm_ev_enabled &= ~(1ull << check_id);
		}
		return kvmi_reply(g, id, seq, ec, NULL, 0);
	}
	return kvmi_reply(g, id, seq, -KVM_EOPNOTSUPP, NULL, 0);
}

/* v12 KVMI_VM_EVENT_UNHOOK: {hdr id 0 (VM event), size 8, seq} + struct kvmi_event_hdr {u16 event = 0; u16 pad[3]}. */
static int send_unhook_event(struct guest *g)
{
	uint8_t msg[16] = { 0 };
	uint16_t size = 8;
	uint32_t seq = ++g->ev_seq;

	if (g->abi != 12 || !(g->vm_ev_enabled & 1))
		return -1;
	memcpy(msg + 2, &size, 2);
	memcpy(msg + 4, &seq, 4);
	return send_all(g->tool, msg, sizeof(msg));
}

static void drop_tool(struct guest *g)
{
	if (g->tool >= 0)
		close(g->tool);
	g->tool = -1;
	g->vm_ev_enabled = 0;
}

static void send_event(struct guest *g, uint16_t kind)
{
	uint8_t p[24] = { 0 };
	static uint32_t seq;

	put16(p, kind);
	put64(p + 8, (uint64_t)g->start_time);
	p[16] = g->tool >= 0;
	p[17] = 1; /* running */
	send_frame(g->chan, CH_EVENT, ++seq, p, sizeof(p));
}

/* One frame from the broker; -1 closes the channel. */
static int channel_serve(struct guest *g, int *welcomed)
{
	uint8_t hdr[CH_HEADER], payload[CH_MAX_PAYLOAD];
	int fds[8], nfds = 0, rc = 0;

	if (recv_exact(g->chan, hdr, sizeof(hdr), fds, &nfds, 8) < 0) {
		emit(&g->rec, FQ_CLOSED, g->tool >= 0);
		return -1;
	}
	uint16_t type = get16(hdr + 4);
	uint32_t seq = get32(hdr + 8), size = get32(hdr + 12);
	if (get32(hdr) != CH_MAGIC || size > CH_MAX_PAYLOAD) {
		emit(&g->rec, FQ_FAILED, EPROTO);
		rc = -1;
		goto out;
	}
	if (size && recv_exact(g->chan, payload, size, fds, &nfds, 8) < 0) {
		emit(&g->rec, FQ_CLOSED, g->tool >= 0);
		rc = -1;
		goto out;
	}
	if (type != CH_HOOK && nfds > 0) {
		emit(&g->rec, FQ_FAILED, EPROTO); /* descriptors only come with HOOK */
		rc = -1;
		goto out;
	}
	if (!*welcomed) {
		g->rec.t_welcome = now_ns();
		if (type == CH_REFUSE && size >= 4) {
			emit(&g->rec, FQ_REFUSED, (int32_t)get32(payload));
			exit(3);
		}
		if (type != CH_WELCOME || size < 8 || get16(payload) != 1) {
			emit(&g->rec, FQ_FAILED, EPROTO);
			rc = -1;
			goto out;
		}
		*welcomed = 1;
		return 0;
	}
	switch (type) {
	case CH_HOOK:
		g->rec.t_hook = now_ns();
		if (nfds != 1) {
			rc = send_result(g->chan, type, seq, STEP_FD, g->tool >= 0, EBADF);
		} else if (g->tool >= 0) {
			rc = send_result(g->chan, type, seq, STEP_STATE, 1, EEXIST);
		} else if (apply_lists(g, payload, size, 1) < 0) {
			rc = send_result(g->chan, type, seq, STEP_REQUEST, 0, EINVAL);
		} else {
			g->tool = fds[0];
			nfds = 0;
			rc = send_result(g->chan, type, seq, STEP_NONE, 1, 0);
			g->rec.t_result = now_ns();
			if (rc == 0)
				emit(&g->rec, FQ_HOOKED, 0);
		}
		break;
	case CH_SET_ALLOWED:
		if (size < 8 || (payload[0] != 7 && payload[0] != 12))
			rc = send_result(g->chan, type, seq, STEP_REQUEST, g->tool >= 0, EINVAL);
		else if (g->tool < 0)
			rc = send_result(g->chan, type, seq, STEP_STATE, 0, ENOTCONN);
		else if (payload[0] != g->abi || apply_lists(g, payload, size, 1) < 0)
			rc = send_result(g->chan, type, seq, STEP_REQUEST, 1, EINVAL);
		else
			rc = send_result(g->chan, type, seq, STEP_NONE, 1, 0);
		break;
	case CH_PREUNHOOK:
		if (g->tool < 0)
			rc = send_result(g->chan, type, seq, STEP_STATE, 0, ENOTCONN);
		else if (send_unhook_event(g) < 0)
			rc = send_result(g->chan, type, seq, STEP_PREUNHOOK, 1, ENOENT);
		else
			rc = send_result(g->chan, type, seq, STEP_NONE, 1, 0);
		break;
	case CH_UNHOOK:
		drop_tool(g);
		rc = send_result(g->chan, type, seq, STEP_NONE, 0, 0);
		break;
	case CH_RELEASE:
		/* nothing held here: a no-op that succeeds (section 3.4) */
		rc = send_result(g->chan, type, seq, STEP_NONE, g->tool >= 0, 0);
		break;
	case CH_WELCOME:
	case CH_REFUSE:
		emit(&g->rec, FQ_FAILED, EPROTO); /* a second WELCOME or REFUSE is a protocol error */
		rc = -1;
		break;
	default:
		rc = send_result(g->chan, type, seq, STEP_REQUEST, g->tool >= 0, ENOSYS);
		break;
	}
out:
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	return rc;
}

static int parse_uuid(const char *text, uint8_t out[16])
{
	int n = 0;

	for (const char *p = text; *p; p++) {
		if (*p == '-')
			continue;
		unsigned v;
		if (n >= 32 || sscanf(p, "%1x", &v) != 1)
			return -1;
		out[n / 2] = (uint8_t)(n % 2 ? out[n / 2] | v : v << 4);
		n++;
	}
	return n == 32 ? 0 : -1;
}

static int guest_main(const char *uuid, const char *name, const char *channel, uint32_t index, int stop_fd, int go_fd)
{
	struct guest g = { .index = index, .chan = -1, .tool = -1 };
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int welcomed = 0, lost = 0;

	signal(SIGPIPE, SIG_IGN);
	g.rec.index = index;
	g.rec.pid = getpid();
	if (parse_uuid(uuid, g.uuid) < 0 || strlen(channel) >= sizeof(addr.sun_path)) {
		emit(&g.rec, FQ_FAILED, EINVAL);
		return 6;
	}
	snprintf(g.name, sizeof(g.name), "%s", strncmp(name, "guest=", 6) == 0 ? name + 6 : name);
	memcpy(addr.sun_path, channel, strlen(channel));
	emit(&g.rec, FQ_READY, 0);

	/* Released with every other guest when the go pipe reaches end of file; a stop first aborts. */
	for (;;) {
		struct pollfd p[2] = { { .fd = go_fd, .events = POLLIN }, { .fd = stop_fd, .events = POLLIN } };
		char c;
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 6;
		}
		if (p[1].revents)
			return 5;
		if (p[0].revents) {
			ssize_t n = read(go_fd, &c, 1);
			if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN))
				break;
		}
	}
	close(go_fd);
	g.rec.t_go = now_ns();
	g.start_time = (int64_t)time(NULL);

	/* A blocking connect, as QEMU's chardev does it (in its connect thread); retried like reconnect-ms=1000. */
	for (;;) {
		g.chan = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (g.chan >= 0 && connect(g.chan, (struct sockaddr *)&addr, sizeof(addr)) == 0)
			break;
		emit(&g.rec, FQ_FAILED, errno);
		if (g.chan >= 0)
			close(g.chan);
		struct pollfd p = { .fd = stop_fd, .events = POLLIN };
		if (poll(&p, 1, 1000) > 0)
			return 5;
	}
	g.rec.t_connect = now_ns();

	uint8_t hello[120] = { 0 };
	put16(hello, 1);
	put16(hello + 2, 1u << 3); /* RUNNING */
	put32(hello + 4, (uint32_t)getpid());
	memcpy(hello + 8, g.uuid, 16);
	put64(hello + 24, (uint64_t)g.start_time);
	put64(hello + 32, 1ull << 31);            /* max_gpa: 2 GiB of RAM */
	put32(hello + 44, (uint32_t)-ENOTTY);     /* cap_v12: this kernel has no KVMI */
	put32(hello + 48, (uint32_t)-ENOTTY);     /* cap_v7 */
	put32(hello + 52, (uint32_t)-1);          /* introspection parameter: absent */
	memcpy(hello + 56, g.name, strnlen(g.name, 63));
	if (send_frame(g.chan, CH_HELLO, 1, hello, sizeof(hello)) < 0) {
		emit(&g.rec, FQ_CLOSED, 0);
		lost = 1;
		close(g.chan);
		g.chan = -1;
	}
	g.rec.t_hello = now_ns();

	for (;;) {
		struct pollfd p[3] = { { .fd = stop_fd, .events = POLLIN }, { .fd = g.chan, .events = POLLIN },
				       { .fd = g.tool, .events = POLLIN } };
		if (poll(p, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[0].revents)
			break;
		if (g.chan >= 0 && p[1].revents && channel_serve(&g, &welcomed) < 0) {
			close(g.chan);
			g.chan = -1;
			lost = 1;
		}
		if (g.tool >= 0 && p[2].revents && kvmi_serve(&g) < 0) {
			/* QEMU sees the hang-up, UNHOOKs and tells the broker (EVENT TOOL_HANGUP) */
			emit(&g.rec, FQ_TOOL_HANGUP, 0);
			drop_tool(&g);
			if (g.chan >= 0)
				send_event(&g, 1);
		}
	}
	if (lost)
		return 4;
	return g.rec.t_result ? 0 : 5;
}

/* ---- the launcher ----------------------------------------------------------------- */

static int launch(int count, const char *channel, int stop_fd, int go_fd, const char *self)
{
	struct fq_record rec = { .index = (uint32_t)count, .pid = getpid() };
	pid_t launcher = getpid();
	int forked = 0, reaped = 0, failed = 0;
	char uuid[40], name[32], index[16], fdtext[3][16];

	signal(SIGPIPE, SIG_IGN);
	snprintf(fdtext[0], sizeof(fdtext[0]), "%d", record_fd);
	snprintf(fdtext[1], sizeof(fdtext[1]), "%d", stop_fd);
	snprintf(fdtext[2], sizeof(fdtext[2]), "%d", go_fd);
	for (int i = 0; i < count; i++) {
		/* a UUID unique to this launcher and guest */
		snprintf(uuid, sizeof(uuid), "%08x-5ca1-4e00-8000-%012x", (unsigned)launcher, (unsigned)i);
		snprintf(name, sizeof(name), "guest=scale-%05d", i);
		snprintf(index, sizeof(index), "%d", i);
		pid_t pid = fork();
		if (pid < 0) {
			fprintf(stderr, "fake_qemu: fork after %d guests: %s\n", forked, strerror(errno));
			break;
		}
		if (pid == 0) {
			/* a guest must not outlive its launcher */
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() != launcher)
				_exit(6);
			char *argv[] = { (char *)self, "-uuid", uuid, "-name", name, "--channel", (char *)channel,
					 "--index", index, "--record-fd", fdtext[0], "--stop-fd", fdtext[1],
					 "--go-fd", fdtext[2], NULL };
			execv(self, argv);
			_exit(6);
		}
		forked++;
	}
	close(go_fd);
	emit(&rec, FQ_LAUNCHED, forked);
	while (reaped < forked) {
		int status;
		pid_t pid = waitpid(-1, &status, 0);
		if (pid < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		reaped++;
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
			failed++;
	}
	rec.index = (uint32_t)failed;
	emit(&rec, FQ_REAPED, reaped);
	return reaped == forked ? 0 : 1;
}

int main(int argc, char **argv)
{
	const char *uuid = NULL, *name = "", *channel = NULL;
	int count = -1, stop_fd = 4, go_fd = 5;
	uint32_t index = 0;

	record_fd = 3;
	for (int i = 1; i + 1 < argc; i += 2) {
		const char *k = argv[i], *v = argv[i + 1];
		if (!strcmp(k, "-uuid"))
			uuid = v;
		else if (!strcmp(k, "-name"))
			name = v;
		else if (!strcmp(k, "--channel"))
			channel = v;
		else if (!strcmp(k, "--launch"))
			count = atoi(v);
		else if (!strcmp(k, "--index"))
			index = (uint32_t)strtoul(v, NULL, 10);
		else if (!strcmp(k, "--record-fd"))
			record_fd = atoi(v);
		else if (!strcmp(k, "--stop-fd"))
			stop_fd = atoi(v);
		else if (!strcmp(k, "--go-fd"))
			go_fd = atoi(v);
		else {
			fprintf(stderr, "fake_qemu: unknown argument %s\n", k);
			return 6;
		}
	}
	if (!channel || (count < 0 && !uuid)) {
		fprintf(stderr, "usage: fake_qemu --launch N --channel PATH [--record-fd 3 --stop-fd 4 --go-fd 5]\n"
				"       fake_qemu -uuid UUID -name guest=NAME --channel PATH --index I "
				"--record-fd FD --stop-fd FD --go-fd FD\n");
		return 6;
	}
	if (count >= 0) {
		char self[4096];
		ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
		if (n <= 0)
			return 6;
		self[n] = 0;
		return launch(count, channel, stop_fd, go_fd, self);
	}
	return guest_main(uuid, name, channel, index, stop_fd, go_fd);
}
