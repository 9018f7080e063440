/*
 * scale_floor.c - the floor for "N guests start at once, all hooked"
 * (kvmi-bench scale): one thread, one epoll loop, non-blocking sockets, doing
 * per guest the socket work kvmi-broker does, and nothing else:
 *
 *   accept on the channel socket; read HELLO (section 3.1 of
 *   Documentation/channel-protocol.md); a basic check of the peer, the
 *   issue's floor (SO_PEERCRED pid = HELLO's pid, /proc/PID/exe is the
 *   emulator, /proc/PID/cmdline's -uuid = HELLO's uuid); send WELCOME; connect
 *   (non-blocking) to the introspector's unix socket; send the 104-byte v12
 *   handshake (Documentation/handshake.md); read exactly the reply's
 *   struct_size bytes and compare its cookie hash with the secret's SHA-1; send
 *   HOOK with the tool's descriptor as SCM_RIGHTS (allow-lists: all commands,
 *   all events); close its copy; read RESULT. Connections stay open.
 *
 *   scale_floor CHANNEL_SOCKET TOOL_SOCKET SECRET_SHA1_HEX EMULATOR_PATH [--broker-identity]
 *
 * With --broker-identity the peer check is the broker's whole one, as its
 * PeerVerifier makes it today, not the path comparison above: the peer pinned
 * (SO_PEERPIDFD, else pidfd_open and /proc/PID/stat's start time), the
 * executable's device and inode from /proc/PID/exe compared with the
 * emulator's, read again after the command line and compared, the pin still
 * alive; and right before HOOK the re-check (the channel's SO_PEERPIDFD again,
 * /proc/PID/exe unchanged, alive). The same system calls in the same order as
 * the broker for a guest that passes, which is what a storm measures; where a
 * check fails it refuses without the broker's fallbacks (no unpinned pid on a
 * kernel without pidfd_open, no readlink when /proc/PID/exe cannot be
 * stat'ed). It measures what the broker's stronger identity check costs by
 * itself, apart from how the broker is built.
 *
 * A connect that finds the tool's listen backlog full (EAGAIN on a unix
 * socket) is retried 1 ms later, in order; with the descriptor limit near,
 * accepting pauses (a reserve is kept for tool connections). On SIGTERM or
 * SIGINT it prints its counters on stderr and exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define CH_MAGIC 0x494D564Bu
#define CH_HEADER 16
#define CH_MAX_PAYLOAD 4096
#define CH_HELLO 0x0001
#define CH_WELCOME 0x0002
#define CH_REFUSE 0x0003
#define CH_HOOK 0x0010
#define CH_RESULT 0x0080
#define HANDSHAKE_V12 104
#define REPLY_MAX (64 * 1024)
#define FD_RESERVE 16
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

enum state { S_HELLO, S_PEER_WAIT, S_CONNECT_WAIT, S_CONNECTING, S_REPLY, S_HOOK_SEND, S_RESULT, S_HOOKED, S_DEAD };

struct conn {
	int chan, tool;
	enum state state;
	uint8_t in[CH_HEADER + CH_MAX_PAYLOAD];
	size_t have;            /* bytes of the current frame (or reply) read */
	uint32_t reply_size;    /* the reply's struct_size, once read */
	uint8_t hello[120];
	/* --broker-identity: what the re-check before HOOK compares */
	int pid, pinned_by_socket;
	unsigned long long start_time;
	dev_t exe_dev;
	ino_t exe_ino;
	struct out {
		uint8_t bytes[HANDSHAKE_V12];
		size_t len, done;
		int fd;         /* the descriptor to attach to the first byte, or -1 */
		int armed;      /* EPOLLOUT is armed */
	} out[2];               /* [0] the channel, [1] the tool's socket (the handshake) */
};

static struct conn **conns;
static size_t nconns, cap_conns;
static int epfd, listener, open_fds, fd_limit, listening = 1;
static const char *tool_path, *emulator;
static int broker_identity;
static uint8_t cookie[20];
static size_t *waitq, waitq_head, waitq_len, waitq_cap;
static long hooked, refused, closed_chan, failed, eagain_retries, emfile_waits, cookie_bad;

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)v); put16(p + 2, (uint16_t)(v >> 16)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }

static void ep(int op, int fd, uint32_t events, uint64_t token)
{
	struct epoll_event ev = { .events = events, .data.u64 = token };
	if (epoll_ctl(epfd, op, fd, &ev) < 0 && op != EPOLL_CTL_DEL)
		die("epoll_ctl");
}

static uint64_t token(size_t index, int tool) { return (uint64_t)(index + 1) << 1 | (uint64_t)tool; }

static void close_fd(int *fd)
{
	if (*fd >= 0) {
		close(*fd); /* also leaves the epoll set */
		*fd = -1;
		open_fds--;
	}
}

static void kill_conn(struct conn *c, long *counter)
{
	close_fd(&c->tool);
	close_fd(&c->chan);
	c->out[0].fd = -1; /* the tool's descriptor, closed above */
	c->state = S_DEAD;
	if (counter)
		(*counter)++;
}

/* Sends what is pending for the channel (which 0) or the tool (1); 1 done, 0 would block (EPOLLOUT armed), -1 error. */
static int flush(struct conn *c, size_t index, int which)
{
	struct out *o = &c->out[which];
	int fd = which ? c->tool : c->chan;

	while (o->done < o->len) {
		struct iovec iov = { .iov_base = o->bytes + o->done, .iov_len = o->len - o->done };
		union {
			char buf[CMSG_SPACE(sizeof(int))];
			struct cmsghdr align;
		} control;
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
		if (o->fd >= 0) {
			memset(&control, 0, sizeof(control));
			m.msg_control = control.buf;
			m.msg_controllen = sizeof(control.buf);
			struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
			cm->cmsg_level = SOL_SOCKET;
			cm->cmsg_type = SCM_RIGHTS;
			cm->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(cm), &o->fd, sizeof(int));
		}
		ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (!o->armed)
				ep(EPOLL_CTL_MOD, fd, EPOLLIN | EPOLLOUT, token(index, which));
			o->armed = 1;
			return 0;
		}
		if (n <= 0)
			return -1;
		if (o->fd >= 0) {
			o->fd = -1; /* it went with the first byte: close our copy */
			close_fd(&c->tool);
		}
		o->done += (size_t)n;
	}
	if (o->armed)
		ep(EPOLL_CTL_MOD, fd, EPOLLIN, token(index, which));
	o->armed = 0;
	return 1;
}

static void queue_out(struct conn *c, int which, const uint8_t *bytes, size_t len, int fd)
{
	struct out *o = &c->out[which];

	memcpy(o->bytes, bytes, len);
	o->len = len;
	o->done = 0;
	o->fd = fd;
}

static void frame(uint8_t *out, uint16_t type, uint32_t seq, uint32_t size)
{
	put32(out, CH_MAGIC);
	put16(out + 4, type);
	put16(out + 6, 0);
	put32(out + 8, seq);
	put32(out + 12, size);
}

static const char *uuid_problem(int pid, const uint8_t *hello, int *retry);

/* The (basic) peer check. Sets *retry when no descriptor was free to read /proc. */
static const char *peer_problem(int chan, const uint8_t *hello, int *retry)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	char path[64], exe[4096];
	ssize_t n;

	if (getsockopt(chan, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return "no peer credentials";
	if ((uint32_t)cred.pid != get32(hello + 4))
		return "HELLO's pid is not the peer's";
	snprintf(path, sizeof(path), "/proc/%d/exe", cred.pid);
	n = readlink(path, exe, sizeof(exe) - 1);
	if (n <= 0)
		return "cannot read the peer's executable";
	exe[n] = 0;
	if (strcmp(exe, emulator) != 0)
		return "the peer is not the emulator";
	return uuid_problem(cred.pid, hello, retry);
}

/* /proc/PID/cmdline's -uuid is HELLO's uuid. Sets *retry when no descriptor was free. */
static const char *uuid_problem(int pid, const uint8_t *hello, int *retry)
{
	char path[64], cmdline[8192], uuid[37];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/cmdline", pid);
	if (open_fds + 1 >= fd_limit) {
		*retry = 1;
		return NULL;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 && (errno == EMFILE || errno == ENFILE)) {
		*retry = 1;
		return NULL;
	}
	if (fd < 0)
		return "cannot read the peer's command line";
	n = read(fd, cmdline, sizeof(cmdline) - 1);
	close(fd);
	if (n <= 0)
		return "cannot read the peer's command line";
	cmdline[n] = 0;
	const uint8_t *u = hello + 8;
	snprintf(uuid, sizeof(uuid), "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
		 u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
	for (char *arg = cmdline; arg < cmdline + n; arg += strlen(arg) + 1) {
		char *next = arg + strlen(arg) + 1;
		if ((!strcmp(arg, "-uuid") || !strcmp(arg, "--uuid")) && next < cmdline + n)
			return strcasecmp(next, uuid) == 0 ? NULL : "-uuid is not HELLO's uuid";
	}
	return "no -uuid argument";
}

/* Field 22 of /proc/PID/stat (after the parenthesised name); 0 (errno set) when it cannot be read. */
static unsigned long long start_time(int pid)
{
	char path[64], buf[4096];
	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	int error = errno;
	close(fd);
	errno = n < 0 ? error : EINVAL;
	if (n <= 0)
		return 0;
	buf[n] = 0;
	char *p = strrchr(buf, ')');
	for (int spaces = 0; p && *p && spaces < 20; p++)
		if (*p == ' ')
			spaces++;
	return p ? strtoull(p, NULL, 10) : 0;
}

static int exe_of(int pid, struct stat *st)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/exe", pid);
	return fstatat(AT_FDCWD, path, st, 0);
}

static int pidfd_alive(int pidfd)
{
	return syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0) == 0 || errno == EPERM;
}

/* The channel's SO_PEERPIDFD (kvmib_peer_pidfd): -1 (errno set) when there is none. */
static int peer_pidfd(int chan)
{
	int pidfd = -1;
	socklen_t len = sizeof(pidfd);
	return getsockopt(chan, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0 ? pidfd : -1;
}

/*
 * The pin, as ProcessPin.peer: SO_PEERPIDFD; pidfd_open only where the kernel
 * has no SO_PEERPIDFD (another error from it means the peer is gone, or no
 * descriptor was free). Sets *by_socket. -1 (errno set) when there is none.
 */
static int pin_peer(int chan, int pid, int *by_socket)
{
	int pidfd = peer_pidfd(chan);
	*by_socket = pidfd >= 0;
	if (*by_socket)
		return pidfd;
	if (errno != ENOPROTOOPT && errno != EOPNOTSUPP)
		return -1;
	return (int)syscall(SYS_pidfd_open, pid, 0);
}

/* The broker's PeerVerifier as it is today (--broker-identity); fills c's facts for the re-check. */
static const char *broker_peer_problem(struct conn *c, int *retry)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	struct stat before, after, emu;
	const char *problem;

	if (getsockopt(c->chan, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return "no peer credentials";
	if ((uint32_t)cred.pid != get32(c->hello + 4))
		return "HELLO's pid is not the peer's";
	if (open_fds + 2 >= fd_limit) {
		*retry = 1;
		return NULL;
	}
	int pidfd = pin_peer(c->chan, cred.pid, &c->pinned_by_socket);
	if (pidfd < 0 && (errno == EMFILE || errno == ENFILE || errno == ENOMEM)) {
		*retry = 1;
		return NULL;
	}
	if (pidfd < 0)
		return "cannot pin the peer";
	c->pid = cred.pid;
	c->start_time = c->pinned_by_socket ? 0 : start_time(cred.pid);
	if (!c->pinned_by_socket && c->start_time == 0) {
		if (errno == EMFILE || errno == ENFILE || errno == ENOMEM)
			*retry = 1;
		problem = *retry ? NULL : "cannot read the peer's start time";
		goto out;
	}
	if (exe_of(cred.pid, &before) < 0) {
		problem = "cannot stat the peer's executable";
		goto out;
	}
	if (stat(emulator, &emu) < 0 || emu.st_dev != before.st_dev || emu.st_ino != before.st_ino) {
		problem = "the peer is not the emulator";
		goto out;
	}
	problem = uuid_problem(cred.pid, c->hello, retry);
	if (problem || *retry)
		goto out;
	if (exe_of(cred.pid, &after) < 0 || after.st_dev != before.st_dev || after.st_ino != before.st_ino ||
	    !pidfd_alive(pidfd)) {
		problem = "the peer exited or exec'd while it was checked";
		goto out;
	}
	c->exe_dev = before.st_dev;
	c->exe_ino = before.st_ino;
out:
	close(pidfd);
	return problem;
}

/*
 * The broker's re-check right before HOOK (--broker-identity). Its pidfd
 * needs no reserve of its own: the tool's socket, still counted in open_fds,
 * is about to be handed over and closed.
 */
static const char *broker_recheck(struct conn *c)
{
	struct stat now;

	if (!c->pinned_by_socket) {
		unsigned long long start = start_time(c->pid);
		if (start == 0 || start != c->start_time || exe_of(c->pid, &now) < 0 || now.st_dev != c->exe_dev ||
		    now.st_ino != c->exe_ino)
			return "the peer changed before HOOK";
		return NULL;
	}
	int pidfd = peer_pidfd(c->chan);
	if (pidfd < 0)
		return "cannot pin the peer before HOOK";
	const char *problem = NULL;
	if (exe_of(c->pid, &now) < 0 || !pidfd_alive(pidfd) || now.st_dev != c->exe_dev || now.st_ino != c->exe_ino)
		problem = "the peer changed before HOOK";
	close(pidfd);
	return problem;
}

static void try_connect(struct conn *c, size_t index);
static void after_hello(struct conn *c, size_t index);

/* A guest whose next step needs a descriptor (or the tool's backlog) waits here, in order. */
static void enqueue_wait(size_t index, enum state state)
{
	if (waitq_len == waitq_cap) {
		size_t cap = waitq_cap ? waitq_cap * 2 : 1024;
		size_t *q = malloc(cap * sizeof(*q));
		if (!q)
			die("malloc");
		for (size_t i = 0; i < waitq_len; i++)
			q[i] = waitq[(waitq_head + i) % (waitq_cap ? waitq_cap : 1)];
		free(waitq);
		waitq = q;
		waitq_cap = cap;
		waitq_head = 0;
	}
	waitq[(waitq_head + waitq_len++) % waitq_cap] = index;
	conns[index]->state = state;
}

/* Connects to the tool; on success sends the handshake. */
static void try_connect(struct conn *c, size_t index)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	uint8_t hs[HANDSHAKE_V12] = { 0 };
	uint32_t size = HANDSHAKE_V12;

	if (open_fds + 1 >= fd_limit) {
		emfile_waits++;
		enqueue_wait(index, S_CONNECT_WAIT);
		return;
	}
	c->tool = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->tool < 0) {
		if (errno == EMFILE || errno == ENFILE) {
			emfile_waits++;
			enqueue_wait(index, S_CONNECT_WAIT);
			return;
		}
		kill_conn(c, &failed);
		return;
	}
	open_fds++;
	memcpy(addr.sun_path, tool_path, strlen(tool_path));
	if (connect(c->tool, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		if (errno == EAGAIN) {
			/* the tool's listen backlog is full: try again shortly, in order */
			close_fd(&c->tool);
			eagain_retries++;
			enqueue_wait(index, S_CONNECT_WAIT);
			return;
		}
		if (errno != EINPROGRESS) {
			kill_conn(c, &failed);
			return;
		}
	}
	ep(EPOLL_CTL_ADD, c->tool, EPOLLIN, token(index, 1));
	/* u32 struct_size; u8 uuid[16]; u32 padding; s64 start_time; char name[64]; u64 max_gpa (host order) */
	memcpy(hs, &size, 4);
	memcpy(hs + 4, c->hello + 8, 16);
	memcpy(hs + 24, c->hello + 24, 8);
	memcpy(hs + 32, c->hello + 56, 63);
	memcpy(hs + 96, c->hello + 32, 8);
	queue_out(c, 1, hs, sizeof(hs), -1);
	c->state = S_REPLY;
	c->have = 0;
	c->reply_size = 0;
	if (flush(c, index, 1) < 0)
		kill_conn(c, &failed);
}

static void drain_waitq(void)
{
	while (waitq_len > 0) {
		size_t index = waitq[waitq_head];
		struct conn *c = conns[index];
		waitq_head = (waitq_head + 1) % waitq_cap;
		waitq_len--;
		if (c->state != S_CONNECT_WAIT && c->state != S_PEER_WAIT)
			continue;
		size_t before = waitq_len;
		if (c->state == S_PEER_WAIT)
			after_hello(c, index);
		else
			try_connect(c, index);
		if (waitq_len > before)
			return; /* it went back to the end of the queue: retry later */
	}
}

static void on_accept(void)
{
	while (open_fds + FD_RESERVE < fd_limit) {
		int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE)
				break;
			return; /* EAGAIN, or an aborted connection */
		}
		open_fds++;
		struct conn *c = calloc(1, sizeof(*c));
		if (!c)
			die("calloc");
		c->chan = fd;
		c->tool = -1;
		c->out[0].fd = c->out[1].fd = -1;
		if (nconns == cap_conns) {
			cap_conns = cap_conns ? cap_conns * 2 : 1024;
			conns = realloc(conns, cap_conns * sizeof(*conns));
			if (!conns)
				die("realloc");
		}
		conns[nconns] = c;
		ep(EPOLL_CTL_ADD, fd, EPOLLIN, token(nconns, 0));
		nconns++;
	}
	/* near the descriptor limit: stop accepting until descriptors are closed */
	ep(EPOLL_CTL_DEL, listener, 0, 0);
	listening = 0;
}

static void maybe_resume_accepting(void)
{
	if (!listening && open_fds + FD_RESERVE < fd_limit) {
		ep(EPOLL_CTL_ADD, listener, EPOLLIN, 0);
		listening = 1;
	}
}

/* Reads into c->in up to `want` bytes; 1 when complete, 0 would block, -1 closed or error. */
static int fill(int fd, struct conn *c, size_t want)
{
	while (c->have < want) {
		ssize_t n = recv(fd, c->in + c->have, want - c->have, 0);
		if (n > 0) {
			c->have += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		return -1;
	}
	return 1;
}

/* One channel frame, header then payload; 1 complete, 0 would block, -1 closed or malformed. */
static int read_frame(struct conn *c)
{
	int r = fill(c->chan, c, CH_HEADER);
	if (r <= 0)
		return r;
	if (get32(c->in) != CH_MAGIC || get32(c->in + 12) > CH_MAX_PAYLOAD)
		return -1;
	return fill(c->chan, c, CH_HEADER + get32(c->in + 12));
}

/* HELLO is in c->hello: check the peer, WELCOME, connect to the tool. */
static void after_hello(struct conn *c, size_t index)
{
	int retry = 0;
	const char *problem = broker_identity ? broker_peer_problem(c, &retry) : peer_problem(c->chan, c->hello, &retry);
	uint8_t out[CH_HEADER + 128] = { 0 };

	if (retry) {
		emfile_waits++;
		enqueue_wait(index, S_PEER_WAIT);
		return;
	}
	if (problem) {
		size_t len = strlen(problem);
		frame(out, CH_REFUSE, 1, (uint32_t)(4 + len));
		put32(out + CH_HEADER, EPERM);
		memcpy(out + CH_HEADER + 4, problem, len);
		send(c->chan, out, CH_HEADER + 4 + len, MSG_NOSIGNAL | MSG_DONTWAIT);
		kill_conn(c, &refused);
		return;
	}
	frame(out, CH_WELCOME, 1, 8);
	put16(out + CH_HEADER, 1);
	queue_out(c, 0, out, CH_HEADER + 8, -1);
	if (flush(c, index, 0) < 0) {
		kill_conn(c, &closed_chan);
		return;
	}
	try_connect(c, index);
}

static void on_channel(struct conn *c, size_t index, uint32_t events)
{
	if (events & EPOLLOUT && c->out[0].done < c->out[0].len) {
		int r = flush(c, index, 0);
		if (r < 0) {
			kill_conn(c, &closed_chan);
			return;
		}
		if (r == 0)
			return;
		if (c->state == S_HOOK_SEND)
			c->state = S_RESULT;
	}
	if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		return;
	for (;;) {
		int r = read_frame(c);
		if (r == 0)
			return;
		if (r < 0) {
			kill_conn(c, &closed_chan);
			return;
		}
		uint16_t type = get16(c->in + 4);
		uint32_t size = get32(c->in + 12);
		c->have = 0;
		if (c->state == S_HELLO) {
			if (type != CH_HELLO || size < 120) {
				kill_conn(c, &failed);
				return;
			}
			memcpy(c->hello, c->in + CH_HEADER, 120);
			c->hello[56 + 63] = 0;
			after_hello(c, index);
			if (c->state == S_DEAD)
				return;
			continue;
		}
		if (c->state == S_RESULT && type == CH_RESULT && size >= 16 && get32(c->in + 8) == 1) {
			const uint8_t *p = c->in + CH_HEADER;
			if (get16(p) == CH_HOOK && p[2] == 0 && p[3] == 1) {
				c->state = S_HOOKED;
				hooked++;
			} else {
				kill_conn(c, &failed);
				return;
			}
		}
		/* anything else (EVENTs while hooked) is read and ignored */
	}
}

static void on_tool(struct conn *c, size_t index, uint32_t events)
{
	if (events & EPOLLOUT && c->out[1].done < c->out[1].len) {
		int r = flush(c, index, 1);
		if (r < 0) {
			kill_conn(c, &failed);
			return;
		}
		if (r == 0)
			return;
	}
	if (c->state != S_REPLY || !(events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		return;
	/* struct_size first, then exactly struct_size - 4 more bytes: what follows belongs to the kernel */
	if (c->reply_size == 0) {
		int r = fill(c->tool, c, 4);
		if (r < 0) {
			kill_conn(c, &failed);
			return;
		}
		if (r == 0)
			return;
		memcpy(&c->reply_size, c->in, 4);
		if (c->reply_size < 24 || c->reply_size > REPLY_MAX) {
			kill_conn(c, &failed);
			return;
		}
	}
	while (c->have < c->reply_size) {
		/* a longer reply's tail is consumed and ignored, 4 KiB at a time, the hash kept */
		size_t want = c->reply_size - c->have;
		size_t room = sizeof(c->in) - (c->have < 24 ? c->have : 24);
		if (want > room)
			want = room;
		ssize_t n = recv(c->tool, c->in + (c->have < 24 ? c->have : 24), want, 0);
		if (n > 0) {
			c->have += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		kill_conn(c, &failed);
		return;
	}
	if (memcmp(c->in + 4, cookie, 20) != 0) {
		kill_conn(c, &cookie_bad);
		return;
	}
	/* HOOK: allow-lists {u8 abi=12; u8 0; u16 n_commands=1; u16 n_events=1; u16 0; s32 -1; s32 -1} */
	uint8_t out[CH_HEADER + 16] = { 0 };
	frame(out, CH_HOOK, 1, 16);
	out[CH_HEADER] = 12;
	put16(out + CH_HEADER + 2, 1);
	put16(out + CH_HEADER + 4, 1);
	put32(out + CH_HEADER + 8, (uint32_t)-1);
	put32(out + CH_HEADER + 12, (uint32_t)-1);
	ep(EPOLL_CTL_DEL, c->tool, 0, 0);
	if (broker_identity && broker_recheck(c)) {
		kill_conn(c, &refused);
		return;
	}
	c->have = 0;
	c->state = S_HOOK_SEND;
	if (c->out[0].done < c->out[0].len) {
		kill_conn(c, &closed_chan); /* WELCOME (24 bytes) still unsent: the channel is stuck */
		return;
	}
	queue_out(c, 0, out, sizeof(out), c->tool);
	int r = flush(c, index, 0);
	if (r < 0) {
		kill_conn(c, &closed_chan);
		return;
	}
	if (r == 1)
		c->state = S_RESULT;
	maybe_resume_accepting();
}

static int hexval(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

int main(int argc, char **argv)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	struct rlimit rl;
	sigset_t mask;
	int sfd;

	broker_identity = argc == 6 && strcmp(argv[5], "--broker-identity") == 0;
	if ((argc != 5 && !broker_identity) || strlen(argv[1]) >= sizeof(addr.sun_path) || strlen(argv[2]) >= sizeof(addr.sun_path) ||
	    strlen(argv[3]) != 40) {
		fprintf(stderr, "usage: scale_floor CHANNEL_SOCKET TOOL_SOCKET SECRET_SHA1_HEX EMULATOR_PATH [--broker-identity]\n");
		return 2;
	}
	tool_path = argv[2];
	emulator = argv[4];
	for (int i = 0; i < 20; i++) {
		int hi = hexval(argv[3][2 * i]), lo = hexval(argv[3][2 * i + 1]);
		if (hi < 0 || lo < 0) {
			fprintf(stderr, "scale_floor: the hash is not hex\n");
			return 2;
		}
		cookie[i] = (uint8_t)(hi << 4 | lo);
	}
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		die("getrlimit");
	fd_limit = rl.rlim_cur > 1 << 20 ? 1 << 20 : (int)rl.rlim_cur;
	open_fds = 3; /* stdin, stdout, stderr */

	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	sfd = signalfd(-1, &mask, SFD_CLOEXEC);
	epfd = epoll_create1(EPOLL_CLOEXEC);
	listener = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (sfd < 0 || epfd < 0 || listener < 0)
		die("set-up");
	open_fds += 3;
	memcpy(addr.sun_path, argv[1], strlen(argv[1]));
	unlink(argv[1]);
	umask(0177);
	/* the broker's backlog (listenSocket's default) */
	if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(listener, 1024) < 0)
		die("bind/listen");
	ep(EPOLL_CTL_ADD, listener, EPOLLIN, 0);
	ep(EPOLL_CTL_ADD, sfd, EPOLLIN, UINT64_MAX);

	for (;;) {
		struct epoll_event events[256];
		int n = epoll_wait(epfd, events, 256, waitq_len ? 1 : -1);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int i = 0; i < n; i++) {
			uint64_t t = events[i].data.u64;
			if (t == UINT64_MAX) {
				fprintf(stderr,
					"scale_floor: %zu accepted, %ld hooked, %ld refused, %ld channels closed by the guest, %ld failed, "
					"%ld cookie mismatches, %ld connects retried after EAGAIN, %ld waits for a descriptor\n",
					nconns, hooked, refused, closed_chan, failed, cookie_bad, eagain_retries, emfile_waits);
				unlink(argv[1]);
				return 0;
			}
			if (t == 0) {
				on_accept();
				continue;
			}
			size_t index = (size_t)(t >> 1) - 1;
			struct conn *c = conns[index];
			if (c->state == S_DEAD)
				continue;
			if (t & 1)
				on_tool(c, index, events[i].events);
			else
				on_channel(c, index, events[i].events);
		}
		drain_waitq();
		maybe_resume_accepting();
	}
}
