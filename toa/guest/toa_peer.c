/*
 * toa_peer: the test peer that runs inside the lab guest.
 *
 * It creates a TUN device, listens on the TUN's addresses and plays the
 * client itself by writing raw IPv4/IPv6 TCP segments to the TUN: SYN, read
 * the SYN-ACK, then the final ACK carrying chosen TCP options.  The server
 * side accept()s and calls getpeername(), and the result is compared with
 * what the TOA rules say it must be.  Every check prints one line:
 *
 *     CASE <name> PASS|FAIL key=value ...
 *
 * Modes:
 *     toa_peer basic                  named scenarios + /proc/net/toa_stats deltas
 *     toa_peer plain LABEL            no module loaded: TOA options must be ignored
 *     toa_peer refusal                print from which offset the kernel itself drops a
 *                                     broken option list (0: never; 18 on 6.7+ without TCP-AO)
 *     toa_peer fuzz SEED COUNT KINDS REFUSED_FROM
 *                                     random options, expected result known by construction
 *     toa_peer hold READY GO          keep a TOA connection open across an rmmod
 *     toa_peer cycles COUNT KO        insmod/rmmod COUNT times, a handshake checked in between
 *     toa_peer cases SEED COUNT KINDS REFUSED_FROM
 *                                     print the cases fuzz would drive (no network)
 *     toa_peer bench SIDE ROUND HANDSHAKES CALLS
 *                                     time handshakes and getpeername() calls for the
 *                                     benchmark (SIDE: baseline = no engine, toa = the
 *                                     module loaded, bpf = the eBPF engine attached)
 *     toa_peer crowd COUNT [LABEL]    COUNT threads in accept(), then all in getpeername()
 *     toa_peer crowd-unload COUNT [LABEL]  the same, and rmmod while they are all inside getname
 *                                     on one TOA connection at once (its lock held)
 *
 * The engine under test is toa.ko unless TOA_ENGINE_CTL names the control
 * program of another engine (the eBPF engine's toa-bpf): then the counters
 * come from `CTL stats`, trusted= is read with `CTL get trusted` and written
 * with `CTL set trusted=VALUE` (exit status 2: refused, as EINVAL from sysfs),
 * and cycles attach and detach with `CTL attach PARAMS` and `CTL detach`.
 * Every expected verdict stays the same.
 *
 * Built static (gcc -static) so it runs on any guest kernel with a bare initramfs.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STATS_PATH "/proc/net/toa_stats"
#define MAX_OPTS 40
#define WAIT_MS 3000
/* A refused ACK is refused inside write() to the TUN: a short wait is enough to be sure. */
#define REFUSED_WAIT_MS 300

/* ---------- small helpers ---------- */

/* splitmix64: tiny, seedable, good enough to spread test cases. */
static uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/*
 * Two streams: test cases come from the seeded one alone, so a seed names
 * the same cases whether they are driven or only listed; sequence numbers
 * and IP ids come from the other.
 */
static uint64_t rng_state, wire_state;

static uint64_t rng_next(void)
{
	return splitmix64(&rng_state);
}

static uint32_t wire_random(void)
{
	return (uint32_t)splitmix64(&wire_state);
}

/* Uniform-enough integer in [lo, hi]. */
static int rng_range(int lo, int hi)
{
	return lo + (int)(rng_next() % (uint64_t)(hi - lo + 1));
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ssize_t len = (ssize_t)strlen(text);
	int ok;

	if (fd < 0)
		return -1;
	ok = write(fd, text, (size_t)len) == len;
	close(fd);
	return ok ? 0 : -1;
}

/* The control program of the engine under test (TOA_ENGINE_CTL), or NULL for toa.ko. */
static const char *engine_ctl;

/*
 * Run `engine_ctl ARGS...` (at most 4), its standard output into OUT (NUL-terminated);
 * with QUIET its standard error goes to /dev/null. Returns its exit status, -1 if it did not exit.
 */
static int run_ctl(const char *a1, const char *a2, char *out, size_t outlen, int quiet)
{
	char *argv[] = { (char *)engine_ctl, (char *)a1, (char *)a2, NULL };
	size_t got = 0;
	int pipefd[2], status;
	pid_t pid;

	if (pipe2(pipefd, O_CLOEXEC) < 0)
		return -1;
	pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		dup2(pipefd[1], 1);
		if (quiet) {
			int null = open("/dev/null", O_WRONLY);

			if (null >= 0)
				dup2(null, 2);
		}
		execv(engine_ctl, argv);
		_exit(127);
	}
	close(pipefd[1]);
	for (;;) {
		ssize_t n = read(pipefd[0], out + got, outlen - 1 - got);

		if (n > 0 && got + (size_t)n < outlen - 1) {
			got += (size_t)n;
			continue;
		}
		if (n > 0)
			got += (size_t)n;
		if (n < 0 && errno == EINTR)
			continue;
		break;
	}
	out[got] = '\0';
	close(pipefd[0]);
	if (waitpid(pid, &status, 0) < 0)
		return -1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void report(const char *name, int passed, const char *fmt, ...)
{
	va_list ap;

	printf("CASE %s %s ", name, passed ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static void hex(const uint8_t *b, int len, char *out)
{
	int i;

	if (len == 0) {
		strcpy(out, "-");
		return;
	}
	for (i = 0; i < len; i++)
		sprintf(out + 2 * i, "%02x", b[i]);
}

/* ---------- addresses ---------- */

enum listener { L4, L6, LMAPPED };
static const char *const listener_names[] = { "v4", "v6", "mapped" };

static void fmt_addr(const struct sockaddr_storage *ss, char *out, size_t len)
{
	char ip[INET6_ADDRSTRLEN];

	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *sin = (const void *)ss;

		inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
		snprintf(out, len, "%s:%u", ip, ntohs(sin->sin_port));
	} else if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 = (const void *)ss;

		inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip));
		snprintf(out, len, "[%s]:%u", ip, ntohs(sin6->sin6_port));
	} else {
		snprintf(out, len, "family-%d", ss->ss_family);
	}
}

static int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family)
		return 0;
	if (a->ss_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;

		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	if (a->ss_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;

		return x->sin6_port == y->sin6_port &&
		       !memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr));
	}
	return 0;
}

static void make_v4(struct sockaddr_storage *ss, const uint8_t addr[4], uint16_t port)
{
	struct sockaddr_in *sin = (void *)ss;

	memset(ss, 0, sizeof(*ss));
	sin->sin_family = AF_INET;
	sin->sin_port = htons(port);
	memcpy(&sin->sin_addr, addr, 4);
}

static void make_v6(struct sockaddr_storage *ss, const uint8_t addr[16], uint16_t port)
{
	struct sockaddr_in6 *sin6 = (void *)ss;

	memset(ss, 0, sizeof(*ss));
	sin6->sin6_family = AF_INET6;
	sin6->sin6_port = htons(port);
	memcpy(&sin6->sin6_addr, addr, 16);
}

/* An IPv4 address as an AF_INET6 socket reports it: ::ffff:a.b.c.d. */
static void make_mapped(struct sockaddr_storage *ss, const uint8_t addr[4], uint16_t port)
{
	uint8_t mapped[16] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

	memcpy(mapped + 12, addr, 4);
	make_v6(ss, mapped, port);
}

/* ---------- what a handshake must report ---------- */

enum outcome { REAL_PEER, TOA_V4, TOA_V6 };

struct expectation {
	enum outcome outcome;
	uint16_t port;
	uint8_t addr[16];
};

/* A TCP options area as sent on the wire (a whole number of 32-bit words). */
struct optbuf {
	uint8_t b[MAX_OPTS];
	int len;
};

/* ---------- the TUN network ---------- */

struct lab_net {
	int tun;
	char ifname[IFNAMSIZ];
	uint8_t local4[4], peer4[4];
	uint8_t local6[16], peer6[16];
	int listen_fd[3];
	uint16_t listen_port[3];
	uint16_t next_port;
};

/* The IPv6 address fd00:<subnet>::<host>. */
static void lab_v6(uint8_t out[16], int subnet, int host)
{
	memset(out, 0, 16);
	out[0] = 0xfd;
	out[3] = (uint8_t)subnet;
	out[15] = (uint8_t)host;
}

static int set_if_addr4(int sock, const char *ifname, unsigned long req, const uint8_t addr[4])
{
	struct ifreq ifr;
	struct sockaddr_in sin = { .sin_family = AF_INET };

	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	memcpy(&sin.sin_addr, addr, 4);
	memcpy(&ifr.ifr_addr, &sin, sizeof(sin));
	return ioctl(sock, req, &ifr);
}

/* Layout of the kernel's struct in6_ifreq (linux/ipv6.h clashes with glibc headers). */
struct in6_ifreq_abi {
	struct in6_addr addr;
	uint32_t prefixlen;
	int ifindex;
};

static int open_listener(int family, const void *addr, socklen_t addrlen, int v6only)
{
	int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;

	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
	if (bind(fd, addr, addrlen) < 0 || listen(fd, 64) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/*
 * Create and address the TUN device toa<N> (subnet N: 10.0.N.1/24 and
 * fd00:N::1/64 for the guest, .2/::2 for the hand-written client) and open
 * the three listeners.  Returns 0, or -1 after printing why.
 */
static int net_up(struct lab_net *n, int subnet)
{
	struct ifreq ifr;
	struct in6_ifreq_abi ifr6;
	struct sockaddr_in sin;
	struct sockaddr_in6 sin6;
	char path[128];
	int s4, s6, i;

	memset(n, 0, sizeof(*n));
	n->tun = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	if (n->tun < 0) {
		report("tun-device", 0, "error=open-/dev/net/tun:%s", strerror(errno));
		return -1;
	}
	memset(&ifr, 0, sizeof(ifr));
	ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
	snprintf(ifr.ifr_name, IFNAMSIZ, "toa%d", subnet);
	if (ioctl(n->tun, TUNSETIFF, &ifr) < 0) {
		report("tun-device", 0, "error=TUNSETIFF:%s", strerror(errno));
		return -1;
	}
	memcpy(n->ifname, ifr.ifr_name, IFNAMSIZ);
	fcntl(n->tun, F_SETFL, O_NONBLOCK);

	/* A TUN address would otherwise stay tentative (unbindable) during DAD. */
	snprintf(path, sizeof(path), "/proc/sys/net/ipv6/conf/%s/accept_dad", n->ifname);
	write_file(path, "0");

	n->local4[0] = 10, n->local4[2] = (uint8_t)subnet, n->local4[3] = 1;
	memcpy(n->peer4, n->local4, 4);
	n->peer4[3] = 2;
	lab_v6(n->local6, subnet, 1);
	lab_v6(n->peer6, subnet, 2);

	s4 = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	s6 = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	{
		const uint8_t mask[4] = { 255, 255, 255, 0 };

		if (set_if_addr4(s4, n->ifname, SIOCSIFADDR, n->local4) < 0 ||
		    set_if_addr4(s4, n->ifname, SIOCSIFNETMASK, mask) < 0) {
			report("tun-device", 0, "error=ipv4-address:%s", strerror(errno));
			return -1;
		}
	}
	memset(&ifr, 0, sizeof(ifr));
	memcpy(ifr.ifr_name, n->ifname, IFNAMSIZ);
	if (ioctl(s4, SIOCGIFFLAGS, &ifr) < 0) {
		report("tun-device", 0, "error=SIOCGIFFLAGS:%s", strerror(errno));
		return -1;
	}
	ifr.ifr_flags |= IFF_UP;
	if (ioctl(s4, SIOCSIFFLAGS, &ifr) < 0 || ioctl(s4, SIOCGIFINDEX, &ifr) < 0) {
		report("tun-device", 0, "error=link-up:%s", strerror(errno));
		return -1;
	}
	memset(&ifr6, 0, sizeof(ifr6));
	memcpy(&ifr6.addr, n->local6, 16);
	ifr6.prefixlen = 64;
	ifr6.ifindex = ifr.ifr_ifindex;
	if (ioctl(s6, SIOCSIFADDR, &ifr6) < 0) {
		report("tun-device", 0, "error=ipv6-address:%s", strerror(errno));
		return -1;
	}
	close(s4);
	close(s6);

	n->listen_port[L4] = 8004;
	n->listen_port[L6] = 8006;
	n->listen_port[LMAPPED] = 8046;
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons(n->listen_port[L4]);
	memcpy(&sin.sin_addr, n->local4, 4);
	n->listen_fd[L4] = open_listener(AF_INET, &sin, sizeof(sin), 0);
	memset(&sin6, 0, sizeof(sin6));
	sin6.sin6_family = AF_INET6;
	sin6.sin6_port = htons(n->listen_port[L6]);
	memcpy(&sin6.sin6_addr, n->local6, 16);
	/* The new IPv6 address leaves its tentative state asynchronously, even without DAD. */
	for (i = 0; i < 100; i++) {
		n->listen_fd[L6] = open_listener(AF_INET6, &sin6, sizeof(sin6), 1);
		if (n->listen_fd[L6] >= 0 || errno != EADDRNOTAVAIL)
			break;
		sleep_ms(20);
	}
	/* Dual-stack listener: IPv4 clients arrive as v4-mapped connections. */
	sin6.sin6_port = htons(n->listen_port[LMAPPED]);
	sin6.sin6_addr = in6addr_any;
	n->listen_fd[LMAPPED] = open_listener(AF_INET6, &sin6, sizeof(sin6), 0);
	for (i = 0; i < 3; i++) {
		if (n->listen_fd[i] < 0) {
			report("tun-device", 0, "error=listen-%s:%s", listener_names[i],
			       strerror(errno));
			return -1;
		}
	}
	n->next_port = (uint16_t)(20000 + (getpid() % 1000) * 37);
	return 0;
}

/* ---------- raw TCP segments ---------- */

static uint32_t sum16(uint32_t sum, const uint8_t *p, size_t len)
{
	while (len > 1) {
		sum += (uint32_t)(p[0] << 8 | p[1]);
		p += 2;
		len -= 2;
	}
	if (len)
		sum += (uint32_t)(p[0] << 8);
	return sum;
}

static uint16_t fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)(v >> 16));
	put16(p + 2, (uint16_t)v);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* Most payload a segment carries here (a TCP Fast Open SYN's data). */
#define MAX_PAYLOAD 64

/*
 * Write one client->server TCP segment to the TUN.  IPv4 when the listener
 * takes IPv4 clients (L4, LMAPPED), IPv6 otherwise.  opt_len must be a
 * multiple of 4 (the header length is counted in words).
 */
static int send_segment_data(struct lab_net *n, enum listener lk, uint16_t sport, uint32_t seq,
			     uint32_t ack, uint8_t flags, const uint8_t *opts, int opt_len,
			     const uint8_t *data, int data_len)
{
	uint8_t pkt[40 + 20 + MAX_OPTS + MAX_PAYLOAD], pseudo[40];
	int ip_len = lk == L6 ? 40 : 20;
	int tcp_len = 20 + opt_len + data_len;
	uint8_t *tcp = pkt + ip_len;
	uint32_t sum;

	memset(pkt, 0, sizeof(pkt));
	if (lk == L6) {
		pkt[0] = 0x60;
		put16(pkt + 4, (uint16_t)tcp_len);
		pkt[6] = IPPROTO_TCP;
		pkt[7] = 64;
		memcpy(pkt + 8, n->peer6, 16);
		memcpy(pkt + 24, n->local6, 16);
		memcpy(pseudo, n->peer6, 16);
		memcpy(pseudo + 16, n->local6, 16);
		put32(pseudo + 32, (uint32_t)tcp_len);
		memset(pseudo + 36, 0, 3);
		pseudo[39] = IPPROTO_TCP;
		sum = sum16(0, pseudo, 40);
	} else {
		pkt[0] = 0x45;
		put16(pkt + 2, (uint16_t)(ip_len + tcp_len));
		put16(pkt + 4, (uint16_t)wire_random());
		put16(pkt + 6, 0x4000); /* DF */
		pkt[8] = 64;
		pkt[9] = IPPROTO_TCP;
		memcpy(pkt + 12, n->peer4, 4);
		memcpy(pkt + 16, n->local4, 4);
		put16(pkt + 10, fold(sum16(0, pkt, 20)));
		memcpy(pseudo, n->peer4, 4);
		memcpy(pseudo + 4, n->local4, 4);
		pseudo[8] = 0;
		pseudo[9] = IPPROTO_TCP;
		put16(pseudo + 10, (uint16_t)tcp_len);
		sum = sum16(0, pseudo, 12);
	}
	put16(tcp, sport);
	put16(tcp + 2, n->listen_port[lk]);
	put32(tcp + 4, seq);
	put32(tcp + 8, ack);
	tcp[12] = (uint8_t)(((20 + opt_len) / 4) << 4);
	tcp[13] = flags;
	put16(tcp + 14, 64240);
	if (opt_len)
		memcpy(tcp + 20, opts, (size_t)opt_len);
	if (data_len)
		memcpy(tcp + 20 + opt_len, data, (size_t)data_len);
	put16(tcp + 16, fold(sum16(sum, tcp, (size_t)tcp_len)));
	return write(n->tun, pkt, (size_t)(ip_len + tcp_len)) == ip_len + tcp_len ? 0 : -1;
}

static int send_segment(struct lab_net *n, enum listener lk, uint16_t sport, uint32_t seq,
			uint32_t ack, uint8_t flags, const uint8_t *opts, int opt_len)
{
	return send_segment_data(n, lk, sport, seq, ack, flags, opts, opt_len, NULL, 0);
}

/*
 * Read from the TUN until the server's SYN-ACK for (sport, isn) shows up;
 * everything else (router solicitations, earlier RSTs, ...) is skipped.
 */
static int wait_synack_acking(struct lab_net *n, enum listener lk, uint16_t sport, uint32_t isn,
			      uint32_t *server_isn, uint32_t *acked)
{
	long deadline = now_ms() + WAIT_MS;
	uint8_t pkt[2048];

	while (now_ms() < deadline) {
		struct pollfd pfd = { n->tun, POLLIN, 0 };
		const uint8_t *tcp;
		ssize_t len;

		if (poll(&pfd, 1, (int)(deadline - now_ms())) <= 0)
			continue;
		len = read(n->tun, pkt, sizeof(pkt));
		if (len <= 0)
			continue;
		if (lk == L6) {
			if (len < 60 || pkt[0] >> 4 != 6 || pkt[6] != IPPROTO_TCP ||
			    memcmp(pkt + 8, n->local6, 16) || memcmp(pkt + 24, n->peer6, 16))
				continue;
			tcp = pkt + 40;
		} else {
			int ihl = (pkt[0] & 15) * 4;

			if (len < 40 || pkt[0] >> 4 != 4 || pkt[9] != IPPROTO_TCP ||
			    memcmp(pkt + 12, n->local4, 4) || memcmp(pkt + 16, n->peer4, 4) ||
			    len < ihl + 20)
				continue;
			tcp = pkt + ihl;
		}
		if ((tcp[0] << 8 | tcp[1]) != n->listen_port[lk] || (tcp[2] << 8 | tcp[3]) != sport)
			continue;
		if ((tcp[13] & (TCP_SYN | TCP_ACK)) != (TCP_SYN | TCP_ACK) || get32(tcp + 8) - isn - 1 > MAX_PAYLOAD)
			continue;
		*server_isn = get32(tcp + 4);
		*acked = get32(tcp + 8) - isn - 1;
		return 0;
	}
	return -1;
}

/* The SYN-ACK of a SYN that carried no data. */
static int wait_synack(struct lab_net *n, enum listener lk, uint16_t sport, uint32_t isn,
		       uint32_t *server_isn)
{
	uint32_t acked;

	if (wait_synack_acking(n, lk, sport, isn, server_isn, &acked) < 0)
		return -1;
	return acked == 0 ? 0 : -1;
}

/*
 * One real handshake: SYN, SYN-ACK, ACK with `opts`, then accept() on the
 * listener.  Returns the accepted fd (the address accept() reported in
 * *accepted) or -1 with *why set.
 */
static int handshake(struct lab_net *n, enum listener lk, const struct optbuf *syn,
		     const struct optbuf *ack, int wait_ms, uint16_t *sport_out,
		     struct sockaddr_storage *accepted, const char **why)
{
	uint16_t sport = n->next_port;
	uint32_t isn = wire_random(), server_isn;
	struct pollfd pfd = { n->listen_fd[lk], POLLIN, 0 };
	socklen_t alen = sizeof(*accepted);
	int fd;

	n->next_port = (uint16_t)(n->next_port >= 60000 ? 20000 : n->next_port + 1);
	*sport_out = sport;
	if (send_segment(n, lk, sport, isn, 0, TCP_SYN, syn->b, syn->len) < 0) {
		*why = "tun-write-failed";
		return -1;
	}
	if (wait_synack(n, lk, sport, isn, &server_isn) < 0) {
		*why = "no-syn-ack";
		return -1;
	}
	if (send_segment(n, lk, sport, isn + 1, server_isn + 1, TCP_ACK, ack->b, ack->len) < 0) {
		*why = "tun-write-failed";
		return -1;
	}
	if (poll(&pfd, 1, wait_ms) <= 0) {
		/* Reset the half-open connection so it does not fill the SYN queue. */
		send_segment(n, lk, sport, isn + 1, 0, TCP_RST, NULL, 0);
		*why = "ack-not-accepted";
		return -1;
	}
	memset(accepted, 0, sizeof(*accepted));
	fd = accept4(n->listen_fd[lk], (struct sockaddr *)accepted, &alen, SOCK_CLOEXEC);
	if (fd < 0)
		*why = "accept-failed";
	return fd;
}

/* Close without FIN/TIME_WAIT so a thousand handshakes leave nothing behind. */
static void close_abort(int fd)
{
	struct linger lg = { 1, 0 };

	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(fd);
}

/* ---------- building option lists ---------- */

static void put_bytes(struct optbuf *o, const uint8_t *p, int len)
{
	memcpy(o->b + o->len, p, (size_t)len);
	o->len += len;
}

static void put_toa4(struct optbuf *o, uint8_t kind, uint16_t port, const uint8_t addr[4])
{
	uint8_t opt[8] = { kind, 8 };

	put16(opt + 2, port);
	memcpy(opt + 4, addr, 4);
	put_bytes(o, opt, 8);
}

static void put_toa6(struct optbuf *o, uint8_t kind, uint16_t port, const uint8_t addr[16])
{
	uint8_t opt[20] = { kind, 20 };

	put16(opt + 2, port);
	memcpy(opt + 4, addr, 16);
	put_bytes(o, opt, 20);
}

/* Pad to a whole number of words with NOPs (the list means the same). */
static void pad_nop(struct optbuf *o)
{
	while (o->len % 4)
		o->b[o->len++] = 1;
}

static const struct optbuf mss_only = { { 2, 4, 0x05, 0xb4 }, 4 }; /* MSS 1460 */

/* ---------- one checked handshake ---------- */

/* A handshake to drive and what accept()/getpeername() must then report. */
struct probe {
	enum listener lk;
	const struct optbuf *syn; /* NULL: MSS only */
	struct optbuf ack;
	struct expectation want;
	int malformed; /* the ACK's list breaks a rule: malformed_ignored must count it */
	int bad_rem;   /* bytes left from the first option the walk rejects (0: none) */
	int untrusted; /* comes from outside trusted= with what would count: untrusted_ignored must */
};

/*
 * Since 6.7 the kernel itself drops a segment whose option list is broken
 * (tcp_inbound_hash), but only if the broken option starts at least this many
 * bytes before the header's end (18, or 5 with TCP-AO). Measured once per
 * boot before the module is loaded; 0 means the kernel never drops.
 */
static int kernel_refuses_from;

static int kernel_refuses(const struct probe *p)
{
	return kernel_refuses_from && p->bad_rem >= kernel_refuses_from;
}

static void expected_addr(const struct lab_net *n, const struct probe *p, uint16_t sport,
			  struct sockaddr_storage *out)
{
	const struct expectation *e = &p->want;

	if (e->outcome == TOA_V4 && p->lk == L4)
		make_v4(out, e->addr, e->port);
	else if (e->outcome == TOA_V4)
		make_mapped(out, e->addr, e->port);
	else if (e->outcome == TOA_V6 && p->lk != L4)
		make_v6(out, e->addr, e->port);
	else if (p->lk == L4)
		make_v4(out, n->peer4, sport); /* also an IPv6 TOA on an IPv4 socket */
	else if (p->lk == L6)
		make_v6(out, n->peer6, sport);
	else
		make_mapped(out, n->peer4, sport);
}

/*
 * Drive the handshake; accept() and getpeername() must both report exactly
 * the expected address.  Returns 1 on match and fills `detail` for the CASE
 * line.  With keep_fd the accepted socket stays open and is handed back.
 */
static int check_probe(struct lab_net *n, const struct probe *p, char *detail, size_t dlen,
		       int *keep_fd, uint16_t *sport_out)
{
	struct sockaddr_storage accepted, peer, want;
	socklen_t plen = sizeof(peer);
	char want_s[80], acc_s[80], peer_s[80], opt_s[2 * MAX_OPTS + 1];
	const char *why = NULL;
	uint16_t sport;
	int fd, ok;

	hex(p->ack.b, p->ack.len, opt_s);
	fd = handshake(n, p->lk, p->syn ? p->syn : &mss_only, &p->ack,
		       kernel_refuses(p) ? REFUSED_WAIT_MS : WAIT_MS, &sport, &accepted, &why);
	if (sport_out)
		*sport_out = sport;
	expected_addr(n, p, sport, &want);
	fmt_addr(&want, want_s, sizeof(want_s));
	if (kernel_refuses(p)) {
		snprintf(detail, dlen, "listener=%s expected=refused-by-kernel got=%s opts=%s",
			 listener_names[p->lk], fd < 0 ? "refused" : "accepted", opt_s);
		if (fd >= 0)
			close_abort(fd);
		return fd < 0;
	}
	if (fd < 0) {
		snprintf(detail, dlen, "listener=%s expected=%s got=none error=%s opts=%s",
			 listener_names[p->lk], want_s, why, opt_s);
		return 0;
	}
	memset(&peer, 0, sizeof(peer));
	if (getpeername(fd, (struct sockaddr *)&peer, &plen) < 0)
		peer.ss_family = AF_UNSPEC;
	fmt_addr(&accepted, acc_s, sizeof(acc_s));
	fmt_addr(&peer, peer_s, sizeof(peer_s));
	ok = same_addr(&accepted, &want) && same_addr(&peer, &want);
	snprintf(detail, dlen, "listener=%s expected=%s got=%s accept=%s opts=%s",
		 listener_names[p->lk], want_s, peer_s, acc_s, opt_s);
	if (keep_fd)
		*keep_fd = fd;
	else
		close_abort(fd);
	return ok;
}

/* ---------- /proc/net/toa_stats ---------- */

static const char *const stat_names[] = {
	"v4_options_seen", "v6_options_seen", "addresses_returned", "malformed_ignored",
	"v6_on_v4_ignored", "untrusted_ignored", "entries_live",   "alloc_failed",
	"probe_missed",
};
#define N_STATS (int)(sizeof(stat_names) / sizeof(stat_names[0]))

struct stats {
	long long value[N_STATS];
	char problem[96];
};

/* Parse the counters: one `name value` per line, every required name exactly once. */
static int read_stats(struct stats *st)
{
	static char out[4096];
	FILE *f;
	char line[256];
	int seen[N_STATS] = { 0 }, i, rc;

	memset(st, 0, sizeof(*st));
	if (engine_ctl) {
		rc = run_ctl("stats", NULL, out, sizeof(out), 0);
		if (rc != 0) {
			snprintf(st->problem, sizeof(st->problem), "ctl-stats-exit:%d", rc);
			return -1;
		}
		f = fmemopen(out, strlen(out), "r");
	} else {
		f = fopen(STATS_PATH, "r");
	}
	if (!f) {
		snprintf(st->problem, sizeof(st->problem), "open:%s", strerror(errno));
		return -1;
	}
	while (fgets(line, sizeof(line), f)) {
		char name[64], extra[8];
		long long v;

		if (sscanf(line, "%63s %lld %7s", name, &v, extra) != 2) {
			snprintf(st->problem, sizeof(st->problem), "bad-line");
			continue;
		}
		for (i = 0; i < N_STATS; i++) {
			if (!strcmp(name, stat_names[i])) {
				st->value[i] = v;
				seen[i]++;
			}
		}
	}
	fclose(f);
	for (i = 0; i < N_STATS; i++)
		if (seen[i] != 1)
			snprintf(st->problem, sizeof(st->problem), "missing-or-repeated:%s",
				 stat_names[i]);
	return st->problem[0] ? -1 : 0;
}

static long long stat_value(const struct stats *st, const char *name)
{
	int i;

	for (i = 0; i < N_STATS; i++)
		if (!strcmp(stat_names[i], name))
			return st->value[i];
	return -1;
}

/* The module may free per-socket entries a moment after close(): wait briefly for 0. */
static long long wait_entries_drained(void)
{
	struct stats st;
	int i;

	for (i = 0; i < 40; i++) {
		if (read_stats(&st) == 0 && stat_value(&st, "entries_live") == 0)
			return 0;
		sleep_ms(50);
	}
	return read_stats(&st) == 0 ? stat_value(&st, "entries_live") : -1;
}

/* What a batch of handshakes must have done to the counters. */
struct tally {
	int cases, rewritten_v4, rewritten_v6, malformed, v6_on_v4, untrusted, mismatches, refused;
	int untrusted_source; /* the batch came from outside trusted=: nothing may be read */
};

static void tally_add(struct tally *t, const struct probe *p, int ok)
{
	t->cases++;
	t->mismatches += !ok;
	if (kernel_refuses(p)) {
		t->refused++;
		return; /* the module never saw it */
	}
	t->malformed += p->malformed;
	t->untrusted += p->untrusted;
	if (p->want.outcome == TOA_V6 && p->lk == L4)
		t->v6_on_v4++;
	else if (p->want.outcome == TOA_V4)
		t->rewritten_v4++;
	else if (p->want.outcome == TOA_V6)
		t->rewritten_v6++;
}

static void report_counter(const char *prefix, const char *what, int ok, const char *fmt, ...)
{
	char name[80], detail[128];
	va_list ap;

	snprintf(name, sizeof(name), "%s-%s", prefix, what);
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	report(name, ok, "%s", detail);
}

/*
 * Compare the counters with the batch: malformed and v6-on-v4 lists are
 * counted once per connection; every rewritten connection was seen and
 * returned at least once (accept and getpeername may each count).
 */
static void check_counters(const char *prefix, const struct stats *before, const struct tally *t)
{
	struct stats after;
	long long d;
	int rewritten = t->rewritten_v4 + t->rewritten_v6;

	if (read_stats(&after) < 0) {
		report_counter(prefix, "stats-format", 0, "problem=%s", after.problem);
		return;
	}
	report_counter(prefix, "stats-format", 1, "names=%d", N_STATS);
#define DELTA(name) (stat_value(&after, name) - stat_value(before, name))
	d = DELTA("addresses_returned");
	report_counter(prefix, "addresses-returned", d >= rewritten, "expected>=%d got=%lld",
		       rewritten, d);
	d = DELTA("v4_options_seen");
	report_counter(prefix, "v4-options-seen", d >= t->rewritten_v4, "expected>=%d got=%lld",
		       t->rewritten_v4, d);
	d = DELTA("v6_options_seen");
	report_counter(prefix, "v6-options-seen", d >= t->rewritten_v6, "expected>=%d got=%lld",
		       t->rewritten_v6, d);
	d = DELTA("malformed_ignored");
	report_counter(prefix, "malformed-ignored", d == t->malformed, "expected=%d got=%lld",
		       t->malformed, d);
	d = DELTA("v6_on_v4_ignored");
	report_counter(prefix, "v6-on-v4-ignored", d == t->v6_on_v4, "expected=%d got=%lld",
		       t->v6_on_v4, d);
	d = DELTA("untrusted_ignored");
	report_counter(prefix, "untrusted-ignored", d == t->untrusted, "expected=%d got=%lld",
		       t->untrusted, d);
	if (t->untrusted_source) {
		long long read = DELTA("v4_options_seen") + DELTA("v6_options_seen") +
				 DELTA("addresses_returned") + DELTA("malformed_ignored") +
				 DELTA("v6_on_v4_ignored");

		report_counter(prefix, "nothing-read", read == 0,
			       "expected=0 got=%lld (seen, returned, malformed, v6-on-v4)", read);
	}
#undef DELTA
	d = stat_value(&after, "alloc_failed");
	report_counter(prefix, "alloc-failed", d == 0, "expected=0 got=%lld", d);
	d = stat_value(&after, "probe_missed");
	report_counter(prefix, "probe-missed", d == 0, "expected=0 got=%lld", d);
	d = wait_entries_drained();
	report_counter(prefix, "entries-drained", d == 0, "expected=0 got=%lld", d);
}

/* ---------- mode: basic ---------- */

static const uint8_t client4[4] = { 203, 0, 113, 7 };
static const uint8_t client6[16] = { 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7 };
#define CLIENT_PORT 40001

struct named_probe {
	const char *name;
	struct probe p;
};

/* Start a named case on `lk` expecting `outcome` for the fixed client address. */
static struct optbuf *add_case(struct named_probe *cases, int *count, const char *name,
			       enum listener lk, enum outcome outcome, int malformed)
{
	struct named_probe *c = &cases[(*count)++];

	memset(c, 0, sizeof(*c));
	c->name = name;
	c->p.lk = lk;
	c->p.malformed = malformed;
	c->p.want.outcome = outcome;
	c->p.want.port = CLIENT_PORT;
	memcpy(c->p.want.addr, outcome == TOA_V6 ? client6 : client4, outcome == TOA_V6 ? 16 : 4);
	return &c->p.ack;
}

#define BYTES(...) (const uint8_t[]){ __VA_ARGS__ }, (int)sizeof((const uint8_t[]){ __VA_ARGS__ })

/*
 * The named scenarios. LABEL (optional) prefixes every case name; "untrusted"
 * means the module's trusted= leaves out the peer's source, so nothing may be
 * rewritten and every ACK that would have counted counts in untrusted_ignored.
 */
static int mode_basic(const char *label)
{
	static const uint8_t zero4[4];
	static const uint8_t loopback4[4] = { 127, 0, 0, 1 }, multicast4[4] = { 224, 0, 0, 251 },
			     broadcast4[4] = { 255, 255, 255, 255 };
	static const uint8_t loopback6[16] = { [15] = 1 }, multicast6[16] = { 0xff, 0x02, [15] = 1 },
			     mapped_loopback6[16] = { [10] = 0xff, [11] = 0xff, [12] = 127, [15] = 1 };
	static struct optbuf syn_with_toa;
	struct named_probe cases[40];
	struct lab_net n;
	struct stats before;
	struct tally t = { 0 };
	struct optbuf *o;
	char detail[512], name[96], batch[64];
	int nc = 0, i, ok, untrusted = label && !strcmp(label, "untrusted");

	snprintf(batch, sizeof(batch), "%s%sbasic", label ? label : "", label ? "-" : "");
	if (net_up(&n, 0) < 0)
		return 1;
	if (read_stats(&before) < 0) {
		report_counter(batch, "stats-readable", 0, "problem=%s", before.problem);
		return 1;
	}

	o = add_case(cases, &nc, "v4", L4, TOA_V4, 0);
	put_toa4(o, 254, CLIENT_PORT, client4);

	o = add_case(cases, &nc, "v4-among-options", L4, TOA_V4, 0);
	put_bytes(o, BYTES(1, 3, 3, 7, 2, 4, 5, 0xb4, 4, 2));
	put_toa4(o, 254, CLIENT_PORT, client4);
	pad_nop(o);

	o = add_case(cases, &nc, "v4-then-eol-garbage", L4, TOA_V4, 0);
	put_toa4(o, 254, CLIENT_PORT, client4);
	put_bytes(o, BYTES(0, 0xee, 0x01, 0x99));

	o = add_case(cases, &nc, "v6-kind253", L6, TOA_V6, 0);
	put_toa6(o, 253, CLIENT_PORT, client6);

	o = add_case(cases, &nc, "v6-kind254", L6, TOA_V6, 0);
	put_toa6(o, 254, CLIENT_PORT, client6);

	o = add_case(cases, &nc, "v4-mapped", LMAPPED, TOA_V4, 0);
	put_toa4(o, 254, CLIENT_PORT, client4);

	o = add_case(cases, &nc, "v4-toa-on-v6-socket", L6, TOA_V4, 0);
	put_toa4(o, 254, CLIENT_PORT, client4);

	o = add_case(cases, &nc, "v6-toa-on-v4-socket", L4, TOA_V6, 0);
	put_toa6(o, 253, CLIENT_PORT, client6);

	add_case(cases, &nc, "no-option-v4", L4, REAL_PEER, 0);
	add_case(cases, &nc, "no-option-v6", L6, REAL_PEER, 0);
	add_case(cases, &nc, "no-option-mapped", LMAPPED, REAL_PEER, 0);

	o = add_case(cases, &nc, "only-other-options", L4, REAL_PEER, 0);
	put_bytes(o, BYTES(1, 1, 1, 3, 3, 7, 2, 4, 5, 0xb4, 200, 2));

	/* Rule 1: a TOA on the SYN is not looked at, only the final ACK. */
	add_case(cases, &nc, "toa-on-syn-only", L4, REAL_PEER, 0);
	put_bytes(&syn_with_toa, mss_only.b, mss_only.len);
	put_toa4(&syn_with_toa, 254, CLIENT_PORT, client4);
	cases[nc - 1].p.syn = &syn_with_toa;

	o = add_case(cases, &nc, "wrong-length-10", L4, REAL_PEER, 1);
	put_bytes(o, BYTES(254, 10, 0x9c, 0x41, 203, 0, 113, 7, 0, 0, 1, 1));

	o = add_case(cases, &nc, "wrong-length-6", L6, REAL_PEER, 1);
	put_bytes(o, BYTES(253, 6, 0x9c, 0x41, 203, 0, 1, 1));

	o = add_case(cases, &nc, "truncated-length", L4, REAL_PEER, 1);
	put_bytes(o, BYTES(1, 1, 1, 1, 1, 1, 254, 8)); /* claims 8, 2 left */

	o = add_case(cases, &nc, "truncated-no-length-byte", L4, REAL_PEER, 1);
	put_bytes(o, BYTES(1, 1, 1, 254));

	o = add_case(cases, &nc, "repeated-v4", L4, REAL_PEER, 1);
	put_toa4(o, 254, CLIENT_PORT, client4);
	put_toa4(o, 254, CLIENT_PORT + 1, client4);

	o = add_case(cases, &nc, "repeated-mixed-kinds", L6, REAL_PEER, 1);
	put_toa4(o, 254, CLIENT_PORT, client4);
	put_toa6(o, 253, CLIENT_PORT, client6);

	o = add_case(cases, &nc, "zero-port", L4, REAL_PEER, 1);
	put_toa4(o, 254, 0, client4);

	o = add_case(cases, &nc, "zero-address", L4, REAL_PEER, 1);
	put_toa4(o, 254, CLIENT_PORT, zero4);

	/* Rule 5: addresses no balancer sends are claims, not clients. */
	o = add_case(cases, &nc, "loopback-v4", L4, REAL_PEER, 1);
	put_toa4(o, 254, CLIENT_PORT, loopback4);
	o = add_case(cases, &nc, "multicast-v4", L6, REAL_PEER, 1);
	put_toa4(o, 254, CLIENT_PORT, multicast4);
	o = add_case(cases, &nc, "broadcast-v4", L4, REAL_PEER, 1);
	put_toa4(o, 254, CLIENT_PORT, broadcast4);
	o = add_case(cases, &nc, "loopback-v6", L6, REAL_PEER, 1);
	put_toa6(o, 253, CLIENT_PORT, loopback6);
	o = add_case(cases, &nc, "multicast-v6", L6, REAL_PEER, 1);
	put_toa6(o, 254, CLIENT_PORT, multicast6);
	o = add_case(cases, &nc, "mapped-loopback-v6", L6, REAL_PEER, 1);
	put_toa6(o, 253, CLIENT_PORT, mapped_loopback6);

	/* A length of 2 at the very end: nothing after the length byte may be read. */
	o = add_case(cases, &nc, "wrong-length-2-at-end", L4, REAL_PEER, 1);
	put_bytes(o, BYTES(1, 1, 254, 2));

	o = add_case(cases, &nc, "bad-other-option-after-toa", L4, REAL_PEER, 1);
	put_toa4(o, 254, CLIENT_PORT, client4);
	put_bytes(o, BYTES(2, 1, 1, 1)); /* length 1: the list is malformed */

	o = add_case(cases, &nc, "kind200-not-accepted", L4, REAL_PEER, 0);
	put_toa4(o, 200, CLIENT_PORT, client4);

	o = add_case(cases, &nc, "toa-after-eol", L4, REAL_PEER, 0);
	put_bytes(o, BYTES(1, 1, 1, 0));
	put_toa4(o, 254, CLIENT_PORT, client4);

	t.untrusted_source = untrusted;
	for (i = 0; i < nc; i++) {
		struct probe *p = &cases[i].p;

		if (untrusted) {
			/* What would have been read or counted is now only counted as untrusted. */
			p->untrusted = p->malformed || p->want.outcome != REAL_PEER;
			p->malformed = 0;
			p->want.outcome = REAL_PEER;
		}
		ok = check_probe(&n, p, detail, sizeof(detail), NULL, NULL);
		snprintf(name, sizeof(name), "%s%s%s", label ? label : "", label ? "-" : "", cases[i].name);
		report(name, ok, "%s", detail);
		tally_add(&t, p, ok);
	}
	check_counters(batch, &before, &t);
	report(batch, t.mismatches == 0, "cases=%d mismatches=%d untrusted=%d", t.cases, t.mismatches,
	       t.untrusted);
	return t.mismatches != 0;
}

/* ---------- mode: plain (module not loaded) ---------- */

static int mode_plain(const char *label)
{
	struct probe p4 = { .lk = L4 }, p6 = { .lk = L6 };
	struct lab_net n;
	char name[64], detail[512];
	int ok4, ok6;

	if (net_up(&n, 0) < 0)
		return 1;
	put_toa4(&p4.ack, 254, CLIENT_PORT, client4);
	put_toa6(&p6.ack, 253, CLIENT_PORT, client6);
	ok4 = check_probe(&n, &p4, detail, sizeof(detail), NULL, NULL);
	snprintf(name, sizeof(name), "%s-v4-untouched", label);
	report(name, ok4, "%s", detail);
	ok6 = check_probe(&n, &p6, detail, sizeof(detail), NULL, NULL);
	snprintf(name, sizeof(name), "%s-v6-untouched", label);
	report(name, ok6, "%s", detail);
	return !(ok4 && ok6);
}

/* ---------- mode: refusal (module not loaded) ---------- */

/* Does the kernel take an ACK whose broken option starts `rem` bytes before the header end? */
static int kernel_takes_broken_at(struct lab_net *n, int rem)
{
	struct optbuf ack;
	struct sockaddr_storage accepted;
	const char *why;
	uint16_t sport;
	int fd;

	memset(ack.b, 1, MAX_OPTS); /* NOPs, then the broken option */
	ack.len = MAX_OPTS;
	ack.b[MAX_OPTS - rem] = 76;
	if (rem > 1)
		ack.b[MAX_OPTS - rem + 1] = 0xff; /* claims more than is left */
	fd = handshake(n, L4, &mss_only, &ack, 1000, &sport, &accepted, &why);
	if (fd < 0)
		return 0;
	close_abort(fd);
	return 1;
}

/* Print from how many remaining bytes on the kernel refuses a broken option list (0: never). */
static int mode_refusal(void)
{
	struct lab_net n;
	int lo = 2, hi = MAX_OPTS;

	if (net_up(&n, 0) < 0)
		return 1;
	if (kernel_takes_broken_at(&n, MAX_OPTS)) {
		printf("0\n");
		return 0;
	}
	while (lo < hi) {
		int mid = (lo + hi) / 2;

		if (kernel_takes_broken_at(&n, mid))
			lo = mid + 1;
		else
			hi = mid;
	}
	printf("%d\n", lo);
	return 0;
}

/* ---------- mode: fuzz ---------- */

static int usage(void);

enum category {
	CAT_VALID_V4,
	CAT_VALID_V6,
	CAT_WRONG_LENGTH,
	CAT_TRUNCATED,
	CAT_REPEATED,
	CAT_ZERO,
	CAT_NOT_ACCEPTED,
	CAT_AFTER_EOL,
	CAT_BAD_OTHER,
	CAT_NO_TOA,
	CAT_UNROUTABLE,
	N_CATEGORIES
};
static const char *const category_names[] = {
	"valid_v4",	"valid_v6",  "wrong_length", "truncated", "repeated",
	"zero",		"not_accepted", "after_eol", "bad_other", "no_toa", "unroutable",
};

struct kindset {
	uint8_t kind[4];
	int count;
};

static int is_accepted(const struct kindset *ks, int kind)
{
	int i;

	for (i = 0; i < ks->count; i++)
		if (ks->kind[i] == kind)
			return 1;
	return 0;
}

static uint8_t random_accepted(const struct kindset *ks)
{
	return ks->kind[rng_range(0, ks->count - 1)];
}

/* A kind the module must ignore: 200 when not accepted, or other unassigned kinds. */
static uint8_t random_other_kind(const struct kindset *ks)
{
	static const uint8_t pool[] = { 200, 200, 252, 76, 99, 9, 14, 201, 253, 254 };
	uint8_t k;

	do
		k = pool[rng_range(0, (int)sizeof(pool) - 1)];
	while (is_accepted(ks, k));
	return k;
}

/*
 * Append exactly `room` bytes of well-formed non-TOA options.  Kinds the
 * kernel acts on in a final ACK (timestamps, MD5, AO, MPTCP) are left out
 * so the handshake itself is never refused.
 */
static void put_filler(struct optbuf *o, int room, const struct kindset *ks)
{
	while (room > 0) {
		int pick = rng_range(0, 5), len, i;

		if (pick == 0 || room < 2) {
			o->b[o->len++] = 1; /* NOP */
			room--;
		} else if (pick == 1 && room >= 4) {
			put_bytes(o, BYTES(2, 4, 5, 0xb4)); /* MSS */
			room -= 4;
		} else if (pick == 2 && room >= 3) {
			put_bytes(o, BYTES(3, 3, 7)); /* window scale */
			room -= 3;
		} else if (pick == 3) {
			put_bytes(o, BYTES(4, 2)); /* SACK permitted */
			room -= 2;
		} else {
			len = rng_range(2, room < 22 ? room : 22);
			o->b[o->len] = random_other_kind(ks);
			o->b[o->len + 1] = (uint8_t)len;
			for (i = 2; i < len; i++)
				o->b[o->len + i] = (uint8_t)rng_next();
			o->len += len;
			room -= len;
		}
	}
}

/* Pad to a word: NOPs, or EOL followed by zeros or garbage (nothing after EOL is read). */
static void pad_random(struct optbuf *o)
{
	int style = rng_range(0, 2);

	if (o->len % 4 == 0)
		return;
	if (style == 0) {
		pad_nop(o);
		return;
	}
	o->b[o->len++] = 0;
	while (o->len % 4)
		o->b[o->len++] = style == 1 ? 0 : (uint8_t)rng_next();
}

/* Addresses no balancer sends (rule 5): 0.0.0.0, 127/8, 224/4 multicast, 255.255.255.255. */
static int v4_unusable(const uint8_t addr[4])
{
	uint32_t a = get32(addr);

	return a == 0 || addr[0] == 127 || (addr[0] & 0xf0) == 0xe0 || a == 0xffffffffu;
}

static void random_v4(uint8_t addr[4])
{
	do
		put32(addr, (uint32_t)rng_next());
	while (v4_unusable(addr));
}

static void random_v6(uint8_t addr[16])
{
	int i;

	for (i = 0; i < 16; i++)
		addr[i] = (uint8_t)rng_next();
	addr[0] |= 0x20; /* never ::, ::1 or ::ffff:0:0/96 */
	if (addr[0] == 0xff)
		addr[0] = 0x2f; /* never multicast */
}

static uint16_t random_port(void)
{
	return (uint16_t)rng_range(1, 65535);
}

/*
 * Place one option (`len` bytes) among random well-formed neighbours within
 * the 40-byte area.  A quarter of the time it ends exactly where the header ends.
 */
static int surround(struct optbuf *o, const uint8_t *opt, int len, const struct kindset *ks)
{
	int room = MAX_OPTS - len, before = rng_range(0, room);

	if (rng_range(0, 3) == 0) {
		before -= (before + len) % 4; /* 40 is a multiple of 4: stays within room */
		if (before < 0)
			before += 4;
		put_filler(o, before, ks);
		put_bytes(o, opt, len);
		return before;
	}
	put_filler(o, before, ks);
	put_bytes(o, opt, len);
	put_filler(o, rng_range(0, room - before), ks);
	pad_random(o);
	return before;
}

static void put_random_toa(struct optbuf *o, uint8_t kind, int v6)
{
	uint8_t addr[16];

	if (v6) {
		random_v6(addr);
		put_toa6(o, kind, random_port(), addr);
	} else {
		random_v4(addr);
		put_toa4(o, kind, random_port(), addr);
	}
}

/*
 * Build one random handshake of category `cat` on listener p->lk; the
 * expected outcome follows from how the case was built, not from parsing it.
 */
static void make_case(enum category cat, const struct kindset *ks, struct probe *p)
{
	struct optbuf opt = { { 0 }, 0 }, *o = &p->ack;
	int len, i;

	memset(o, 0, sizeof(*o));
	memset(&p->want, 0, sizeof(p->want));
	p->want.outcome = REAL_PEER;
	p->malformed = 0;
	p->bad_rem = 0;
	switch (cat) {
	case CAT_VALID_V4:
		p->want.outcome = TOA_V4;
		p->want.port = random_port();
		random_v4(p->want.addr);
		put_toa4(&opt, random_accepted(ks), p->want.port, p->want.addr);
		surround(o, opt.b, opt.len, ks);
		break;
	case CAT_VALID_V6:
		p->want.outcome = TOA_V6;
		p->want.port = random_port();
		random_v6(p->want.addr);
		put_toa6(&opt, random_accepted(ks), p->want.port, p->want.addr);
		surround(o, opt.b, opt.len, ks);
		break;
	case CAT_WRONG_LENGTH:
		/* Accepted kind, length 0..40 but neither 8 nor 20 (0 and 1 break rule 2 too). */
		p->malformed = 1;
		do
			len = rng_range(0, MAX_OPTS);
		while (len == 8 || len == 20);
		opt.b[0] = random_accepted(ks);
		opt.b[1] = (uint8_t)len;
		opt.len = len < 2 ? 2 : len;
		for (i = 2; i < opt.len; i++)
			opt.b[i] = (uint8_t)rng_range(1, 255);
		i = surround(o, opt.b, opt.len, ks);
		if (len < 2)
			p->bad_rem = o->len - i;
		break;
	case CAT_TRUNCATED: {
		/* An accepted kind whose length byte is missing or runs past the header end. */
		int total = 4 * rng_range(1, MAX_OPTS / 4), pos = rng_range(0, total - 1);

		p->malformed = 1;
		p->bad_rem = total - pos;
		put_filler(o, pos, ks);
		o->b[o->len++] = random_accepted(ks);
		if (o->len < total) {
			int remaining = total - pos, claimed = rng_range(0, 1) ? 8 : 20;

			if (claimed <= remaining)
				claimed = rng_range(remaining + 1, 255);
			o->b[o->len++] = (uint8_t)claimed;
			while (o->len < total)
				o->b[o->len++] = (uint8_t)rng_next();
		}
		break;
	}
	case CAT_REPEATED: {
		/* Two accepted-kind options: ambiguous even when both are valid. */
		int first_v6 = rng_range(0, 1), second_v6 = rng_range(0, 1);
		int spare = MAX_OPTS - (first_v6 ? 20 : 8) - (second_v6 ? 20 : 8);
		int gap1 = rng_range(0, spare), gap2 = rng_range(0, spare - gap1);

		p->malformed = 1;
		put_filler(o, gap1, ks);
		put_random_toa(o, random_accepted(ks), first_v6);
		put_filler(o, gap2, ks);
		put_random_toa(o, random_accepted(ks), second_v6);
		pad_nop(o);
		break;
	}
	case CAT_ZERO: {
		/* Port 0, address 0 or both.  IPv4 form on an IPv4 socket (rule 5 before rule 6). */
		int which = rng_range(0, 2), v6 = p->lk != L4 && rng_range(0, 1);
		uint16_t port = which == 1 ? random_port() : 0;
		uint8_t addr[16] = { 0 };

		p->malformed = 1;
		if (which == 0)
			random_v6(addr);
		if (v6)
			put_toa6(&opt, random_accepted(ks), port, addr);
		else
			put_toa4(&opt, random_accepted(ks), port, addr);
		surround(o, opt.b, opt.len, ks);
		break;
	}
	case CAT_UNROUTABLE: {
		/* Loopback, multicast, broadcast or v4-mapped loopback with a good port: never a client. */
		static const uint8_t v4[][4] = { { 127, 0, 0, 1 }, { 127, 9, 8, 7 }, { 224, 0, 0, 1 },
						 { 239, 255, 255, 250 }, { 255, 255, 255, 255 } };
		static const uint8_t v6[][16] = {
			{ 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 },
			{ 0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 },
			{ 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1 },
		};
		int v6_form = p->lk != L4 && rng_range(0, 1); /* rule 5 before rule 6, as for zero */

		p->malformed = 1;
		if (v6_form)
			put_toa6(&opt, random_accepted(ks), random_port(), v6[rng_range(0, 2)]);
		else
			put_toa4(&opt, random_accepted(ks), random_port(), v4[rng_range(0, 4)]);
		surround(o, opt.b, opt.len, ks);
		break;
	}
	case CAT_NOT_ACCEPTED:
		put_random_toa(&opt, random_other_kind(ks), rng_range(0, 1));
		surround(o, opt.b, opt.len, ks);
		break;
	case CAT_AFTER_EOL:
		/* Nothing after EOL is read: not a perfect TOA, not garbage. */
		put_filler(o, rng_range(0, 8), ks);
		o->b[o->len++] = 0;
		if (rng_range(0, 1))
			put_random_toa(o, random_accepted(ks), 0);
		while (o->len % 4 || (o->len < MAX_OPTS && rng_range(0, 2) == 0))
			o->b[o->len++] = (uint8_t)rng_next();
		break;
	case CAT_BAD_OTHER: {
		/* Another option is broken, so the whole list is malformed even with a valid TOA. */
		int toa_first = rng_range(0, 1), kind_pos;

		p->malformed = 1;
		put_random_toa(&opt, random_accepted(ks), 0);
		if (toa_first)
			put_bytes(o, opt.b, opt.len);
		put_filler(o, rng_range(0, 8), ks);
		kind_pos = o->len;
		o->b[o->len++] = random_other_kind(ks);
		if (rng_range(0, 1)) {
			o->b[o->len++] = (uint8_t)rng_range(0, 1); /* length 0 or 1 */
			if (!toa_first)
				put_bytes(o, opt.b, opt.len);
			pad_nop(o);
		} else {
			int total = (o->len + 1 + 3) & ~3;

			/* The claimed length runs past the end of the header. */
			o->b[o->len++] = (uint8_t)(total - kind_pos + rng_range(1, 30));
			while (o->len < total)
				o->b[o->len++] = 1;
		}
		p->bad_rem = o->len - kind_pos;
		break;
	}
	case CAT_NO_TOA:
	default:
		if (rng_range(0, 3))
			put_filler(o, 4 * rng_range(0, MAX_OPTS / 4), ks);
		break;
	}
}

static int parse_kinds(const char *text, struct kindset *ks)
{
	const char *p = text;
	char *end;

	ks->count = 0;
	while (*p) {
		long k = strtol(p, &end, 10);

		if (end == p || k < 2 || k > 255 || ks->count == 4 || (*end && *end != ','))
			return -1;
		ks->kind[ks->count++] = (uint8_t)k;
		p = *end ? end + 1 : end;
	}
	return ks->count ? 0 : -1;
}

/* The next random case of a fuzz run: its category, listener, options and expectation. */
static enum category next_case(const struct kindset *ks, struct probe *p)
{
	enum category cat = (enum category)rng_range(0, N_CATEGORIES - 1);

	memset(p, 0, sizeof(*p));
	p->lk = (enum listener)rng_range(0, 2);
	/* An IPv6 TOA on a v4-mapped connection has no rule of its own: not generated. */
	if (p->lk == LMAPPED && cat == CAT_VALID_V6)
		p->lk = rng_range(0, 1) ? L4 : L6;
	make_case(cat, ks, p);
	return cat;
}

/*
 * Print the cases a fuzz run with this seed would drive, without driving
 * them: lets the generator's claims be checked offline.
 */
static int mode_cases(uint64_t seed, int count, const char *kinds_text, int refuses_from)
{
	static const char *const outcome_names[] = { "real", "toa_v4", "toa_v6" };
	char opt_s[2 * MAX_OPTS + 1];
	struct kindset ks;
	int i;

	if (parse_kinds(kinds_text, &ks) < 0)
		return usage();
	kernel_refuses_from = refuses_from;
	rng_state = seed;
	for (i = 0; i < count; i++) {
		struct probe p;
		enum category cat = next_case(&ks, &p);
		char want[INET6_ADDRSTRLEN] = "-";

		if (p.want.outcome != REAL_PEER)
			inet_ntop(p.want.outcome == TOA_V4 ? AF_INET : AF_INET6, p.want.addr, want,
				  sizeof(want));
		hex(p.ack.b, p.ack.len, opt_s);
		printf("%s %s %s %s %u %d %d %d %s\n", category_names[cat], listener_names[p.lk],
		       outcome_names[p.want.outcome], want, p.want.port, p.malformed, p.bad_rem,
		       kernel_refuses(&p), opt_s);
	}
	return 0;
}

static int mode_fuzz(uint64_t seed, int count, const char *kinds_text, int refuses_from)
{
	int per_cat[N_CATEGORIES] = { 0 }, shown = 0, i;
	struct kindset ks;
	struct lab_net n;
	struct stats before;
	struct tally t = { 0 };
	char detail[512], label[32], cats[256] = "";
	long started = now_ms();
	/*
	 * FNV-1a over each case's verdict (the address from its option, the real
	 * peer, refused by the kernel, or x for a mismatch): two engines given the
	 * same seed on the same kernel print the same digest or differ somewhere.
	 */
	uint64_t verdicts = 0xcbf29ce484222325ULL;

	if (parse_kinds(kinds_text, &ks) < 0) {
		report("fuzz-args", 0, "kinds=%s", kinds_text);
		return 1;
	}
	if (net_up(&n, 0) < 0)
		return 1;
	kernel_refuses_from = refuses_from;
	rng_state = seed;
	snprintf(label, sizeof(label), "fuzz-kinds%d", ks.count);
	if (read_stats(&before) < 0) {
		report_counter(label, "stats-readable", 0, "problem=%s", before.problem);
		return 1;
	}
	for (i = 0; i < count; i++) {
		struct probe p;
		enum category cat = next_case(&ks, &p);
		int ok = check_probe(&n, &p, detail, sizeof(detail), NULL, NULL);

		per_cat[cat]++;
		tally_add(&t, &p, ok);
		verdicts = (verdicts ^ (uint64_t)(!ok ? 'x' : kernel_refuses(&p) ? 'k' : "rab"[p.want.outcome])) *
			   0x100000001b3ULL;
		if (!ok && shown++ < 20) {
			char name[48];

			snprintf(name, sizeof(name), "%s-case-%d", label, i);
			report(name, 0, "category=%s %s", category_names[cat], detail);
		}
	}
	for (i = 0; i < N_CATEGORIES; i++)
		snprintf(cats + strlen(cats), sizeof(cats) - strlen(cats), "%s%s:%d", i ? "," : "",
			 category_names[i], per_cat[i]);
	check_counters(label, &before, &t);
	report(label, t.mismatches == 0,
	       "seed=%" PRIu64 " kinds=%s cases=%d mismatches=%d refused_by_kernel=%d verdicts=%016" PRIx64
	       " seconds=%.1f categories=%s",
	       seed, kinds_text, t.cases, t.mismatches, t.refused, verdicts,
	       (double)(now_ms() - started) / 1000.0, cats);
	return t.mismatches != 0;
}

/* ---------- mode: hold ---------- */

static int wait_for_file(const char *path, int timeout_ms)
{
	struct stat st;
	long deadline = now_ms() + timeout_ms;

	while (now_ms() < deadline) {
		if (stat(path, &st) == 0)
			return 0;
		sleep_ms(20);
	}
	return -1;
}

/*
 * Open a TOA connection and keep it open; create READY, wait for GO (the
 * caller unloads the module in between), then the same socket must report
 * its real peer and close cleanly.
 */
static int mode_hold(const char *ready, const char *go)
{
	struct probe p = { .lk = L4, .want = { TOA_V4, CLIENT_PORT, { 0 } } };
	struct sockaddr_storage peer, want;
	socklen_t plen = sizeof(peer);
	struct lab_net n;
	struct stats st;
	char detail[512], want_s[80], peer_s[80];
	uint16_t sport;
	int fd = -1, ok;

	if (net_up(&n, 1) < 0)
		return 1;
	memcpy(p.want.addr, client4, 4);
	put_toa4(&p.ack, 254, CLIENT_PORT, client4);
	ok = check_probe(&n, &p, detail, sizeof(detail), &fd, &sport);
	report("hold-open", ok, "%s", detail);
	if (fd < 0)
		return 1;
	ok = read_stats(&st) == 0 && stat_value(&st, "entries_live") >= 1;
	report("hold-entries-live", ok, "expected>=1 got=%lld", stat_value(&st, "entries_live"));
	write_file(ready, "ready\n");
	if (wait_for_file(go, 120000) < 0) {
		report("hold-after-unload", 0, "error=timeout-waiting-for-%s", go);
		return 1;
	}
	make_v4(&want, n.peer4, sport);
	memset(&peer, 0, sizeof(peer));
	if (getpeername(fd, (struct sockaddr *)&peer, &plen) < 0)
		peer.ss_family = AF_UNSPEC;
	fmt_addr(&want, want_s, sizeof(want_s));
	fmt_addr(&peer, peer_s, sizeof(peer_s));
	ok = same_addr(&peer, &want);
	report("hold-after-unload", ok, "expected=%s got=%s", want_s, peer_s);
	errno = 0;
	report("hold-close", close(fd) == 0, "errno=%d", errno);
	return !ok;
}

/* ---------- mode: cycles ---------- */

static int load_module(const char *ko, const char *params)
{
	char out[512];
	int fd, rc;

	if (engine_ctl) {
		rc = run_ctl("attach", params[0] ? params : NULL, out, sizeof(out), 0);
		errno = rc == 0 ? 0 : EINVAL;
		return rc == 0 ? 0 : -1;
	}
	fd = open(ko, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	rc = (int)syscall(SYS_finit_module, fd, params, 0);
	close(fd);
	return rc;
}

/* rmmod's own call; a socket still being freed may hold the module for a moment. */
static int unload_module(int *retries)
{
	char out[512];

	*retries = 0;
	if (engine_ctl) {
		int rc = run_ctl("detach", NULL, out, sizeof(out), 0);

		errno = rc == 0 ? 0 : EINVAL;
		return rc == 0 ? 0 : -1;
	}
	for (*retries = 0; *retries < 100; (*retries)++) {
		if (syscall(SYS_delete_module, "toa", O_NONBLOCK) == 0)
			return 0;
		if (errno != EAGAIN && errno != EBUSY)
			return -1;
		sleep_ms(20);
	}
	return -1;
}

static int mode_cycles(int count, const char *ko, const char *params)
{
	struct probe with = { .lk = L4, .want = { TOA_V4, CLIENT_PORT, { 0 } } };
	struct probe without = { .lk = L4 };
	struct lab_net n;
	char detail[512], label[32];
	int failures = 0, max_retries = 0, retries, i;
	long started = now_ms();

	if (net_up(&n, 0) < 0)
		return 1;
	memcpy(with.want.addr, client4, 4);
	put_toa4(&with.ack, 254, CLIENT_PORT, client4);
	without.ack = with.ack;
	for (i = 0; i < count && failures < 5; i++) {
		snprintf(label, sizeof(label), "cycle-%d", i);
		if (load_module(ko, params) < 0) {
			report(label, 0, "step=insmod error=%s", strerror(errno));
			failures++;
			continue;
		}
		if (!check_probe(&n, &with, detail, sizeof(detail), NULL, NULL)) {
			report(label, 0, "step=loaded %s", detail);
			failures++;
		}
		if (unload_module(&retries) < 0) {
			report(label, 0, "step=rmmod error=%s", strerror(errno));
			failures++;
			break;
		}
		if (retries > max_retries)
			max_retries = retries;
		if (!check_probe(&n, &without, detail, sizeof(detail), NULL, NULL)) {
			report(label, 0, "step=unloaded %s", detail);
			failures++;
		}
	}
	report("cycles", failures == 0 && i == count,
	       "cycles=%d failures=%d max_unload_retries=%d seconds=%.1f", i, failures,
	       max_retries, (double)(now_ms() - started) / 1000.0);
	return failures != 0;
}

/* ---------- trusted sources (the module's trusted= parameter) ---------- */

#define TRUSTED_PATH "/sys/module/toa/parameters/trusted"

/* The parameter as the module prints it, without the final newline; -1 if unreadable. */
static int read_trusted(char *buf, size_t len)
{
	ssize_t got;
	int fd;

	if (engine_ctl) {
		if (run_ctl("get", "trusted", buf, len, 0) != 0)
			return -1;
		got = (ssize_t)strlen(buf);
	} else {
		fd = open(TRUSTED_PATH, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			return -1;
		got = read(fd, buf, len - 1);
		close(fd);
	}
	if (got < 1 || buf[got - 1] != '\n')
		return -1; /* exactly one line: the list, then a newline */
	buf[got - 1] = '\0';
	return strchr(buf, '\n') ? -1 : 0;
}

/* Write the parameter as `echo VALUE >` does; 0, or the errno the write failed with. */
static int write_trusted(const char *value)
{
	char line[1024], out[256];
	int fd, err = 0, rc;
	ssize_t len;

	if (engine_ctl) {
		snprintf(line, sizeof(line), "trusted=%s", value);
		rc = run_ctl("set", line, out, sizeof(out), 1);
		return rc == 0 ? 0 : rc == 2 ? EINVAL : EIO;
	}
	fd = open(TRUSTED_PATH, O_WRONLY | O_CLOEXEC);
	len = snprintf(line, sizeof(line), "%s\n", value);
	if (fd < 0)
		return errno;
	if (write(fd, line, (size_t)len) != len)
		err = errno ? errno : EIO;
	close(fd);
	return err;
}

/* A TOA probe of the fixed client address on one listener, expecting OUTCOME or the real peer. */
static void toa_probe_on(struct probe *p, enum listener lk, int rewritten)
{
	memset(p, 0, sizeof(*p));
	p->lk = lk;
	if (lk == L6)
		put_toa6(&p->ack, 253, CLIENT_PORT, client6);
	else
		put_toa4(&p->ack, 254, CLIENT_PORT, client4);
	p->untrusted = !rewritten;
	if (rewritten) {
		p->want.outcome = lk == L6 ? TOA_V6 : TOA_V4;
		p->want.port = CLIENT_PORT;
		memcpy(p->want.addr, lk == L6 ? client6 : client4, lk == L6 ? 16 : 4);
	}
}

struct flip_step {
	const char *label, *value, *canonical;
	int v4, v6; /* rewritten: an IPv4 ACK (L4 and v4-mapped alike), an IPv6 ACK */
};

/*
 * Rewrite trusted= at run time and check after each write what it reads back
 * and that the next handshakes follow it: IPv4 ACKs (v4-mapped included) only
 * by IPv4 entries, IPv6 ACKs only by IPv6 entries.
 */
static int mode_trust_flip(const char *peer_range, const char *other_range)
{
	const struct flip_step steps[] = {
		{ "other", other_range, other_range, 0, 0 },
		{ "v4-only", "10.0.0.0/16", "10.0.0.0/16", 1, 0 },
		{ "v6-only", "fd00::/16", "fd00::/16", 0, 1 },
		{ "bare", "10.0.0.2,FD00:0::2", "10.0.0.2/32,fd00::2/128", 1, 1 },
		{ "neighbours", "10.0.0.3,10.0.0.0/31,fd00::3/128", "10.0.0.3/32,10.0.0.0/31,fd00::3/128", 0, 0 },
		{ "any", "0.0.0.0/00,::/0", "0.0.0.0/0,::/0", 1, 1 },
		{ "empty", "", "", 1, 1 },
		{ "peer", peer_range, peer_range, 1, 1 },
	};
	const enum listener order[] = { L4, LMAPPED, L6 };
	char original[1024], now[1024], detail[512], name[64], got[3][160];
	struct lab_net n;
	int failures = 0, i, j, err;

	if (read_trusted(original, sizeof(original)) < 0) {
		report("trusted-flip", 0, "error=cannot-read-%s", TRUSTED_PATH);
		return 1;
	}
	if (net_up(&n, 0) < 0)
		return 1;
	for (i = 0; i < (int)(sizeof(steps) / sizeof(steps[0])); i++) {
		const struct flip_step *step = &steps[i];
		struct stats before;
		struct tally t = { 0 };
		int ok;

		snprintf(name, sizeof(name), "trusted-flip-%s", step->label);
		err = write_trusted(step->value);
		if (read_trusted(now, sizeof(now)) < 0)
			strcpy(now, "unreadable");
		if (err || strcmp(now, step->canonical)) {
			report(name, 0, "wrote=%s write_errno=%d reads=%s expected=%s", step->value, err, now,
			       step->canonical);
			failures++;
			continue;
		}
		read_stats(&before);
		for (j = 0; j < 3; j++) {
			struct probe p;
			int pass;

			toa_probe_on(&p, order[j], order[j] == L6 ? step->v6 : step->v4);
			pass = check_probe(&n, &p, detail, sizeof(detail), NULL, NULL);
			tally_add(&t, &p, pass);
			snprintf(got[j], sizeof(got[j]), "%s:%s", pass ? "ok" : "WRONG", strstr(detail, "got="));
		}
		{
			struct stats after;
			long long d = -1;

			if (read_stats(&after) == 0)
				d = stat_value(&after, "untrusted_ignored") - stat_value(&before, "untrusted_ignored");
			ok = t.mismatches == 0 && d == t.untrusted;
			report(name, ok, "trusted=%s untrusted_ignored=%lld/%d v4[%s] mapped[%s] v6[%s]", now, d,
			       t.untrusted, got[0], got[1], got[2]);
		}
		failures += !ok;
	}
	err = write_trusted(original);
	report("trusted-flip-restored", err == 0, "trusted=%s errno=%d", original, err);
	return failures != 0 || err;
}

/* Values the module must refuse at run time, keeping the list it had. */
static int mode_trust_bad(void)
{
	static const struct {
		const char *label, *value;
	} bad[] = {
		{ "prefix-33", "10.0.0.0/33" },
		{ "prefix-129", "fd00::/129" },
		{ "host-bits", "10.0.0.1/8" },
		{ "host-bits-v6", "fd00::1/16" },
		{ "octet-256", "10.0.0.256" },
		{ "octet-leading-zero", "010.0.0.0/8" },
		{ "three-octets", "10.0.0/24" },
		{ "empty-prefix", "10.0.0.0/" },
		{ "plus-prefix", "10.0.0.0/+8" },
		{ "empty-entry", "10.0.0.0/16,,fd00::/16" },
		{ "leading-comma", ",10.0.0.0/16" },
		{ "trailing-comma", "10.0.0.0/16," },
		{ "space", "10.0.0.0/16, fd00::/16" },
		{ "name", "balancer.example" },
		{ "v6-triple-colon", "fd00:::1" },
		{ "v4-mapped", "::ffff:10.0.0.0/104" },
		{ "port", "10.0.0.1:80" },
		{ "too-long", "fd00:0000:0000:0000:0000:0000:0000:0001/128/128/128" },
		{ "seventeen", "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8,"
			       "10.0.0.9,10.0.0.10,10.0.0.11,10.0.0.12,10.0.0.13,10.0.0.14,10.0.0.15,"
			       "10.0.0.16,10.0.0.17" },
	};
	char before[1024], after[1024], name[64];
	int failures = 0, i, err;

	if (read_trusted(before, sizeof(before)) < 0) {
		report("trusted-bad", 0, "error=cannot-read-%s", TRUSTED_PATH);
		return 1;
	}
	for (i = 0; i < (int)(sizeof(bad) / sizeof(bad[0])); i++) {
		int ok;

		err = write_trusted(bad[i].value);
		if (read_trusted(after, sizeof(after)) < 0)
			strcpy(after, "unreadable");
		ok = err == EINVAL && !strcmp(after, before);
		snprintf(name, sizeof(name), "trusted-bad-%s", bad[i].label);
		report(name, ok, "wrote=%s errno=%d(%s) expected=EINVAL kept=%s reads=%s", bad[i].value, err,
		       err ? strerror(err) : "none", before, after);
		failures += !ok;
	}
	/* Sixteen is the limit, not over it. */
	{
		const char *sixteen = "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6,10.0.0.7,"
				      "10.0.0.8,10.0.0.9,10.0.0.10,10.0.0.11,10.0.0.12,10.0.0.13,10.0.0.14,"
				      "10.0.0.15,fd00::/16";
		int ok;

		err = write_trusted(sixteen);
		if (read_trusted(after, sizeof(after)) < 0)
			strcpy(after, "unreadable");
		ok = err == 0 && !strncmp(after, "10.0.0.1/32,10.0.0.2/32,", 24) && strstr(after, ",fd00::/16");
		report("trusted-sixteen-entries", ok, "errno=%d reads=%s", err, after);
		failures += !ok;
		err = write_trusted(before);
		failures += err != 0;
	}
	return failures != 0;
}

/* Shared between the race's handshakes and the process that keeps rewriting trusted=. */
struct race_writer {
	volatile int stop;
	volatile long writes, failures;
};

/*
 * While another process rewrites trusted= between TRUSTED_VALUE (the peer's
 * range) and OTHER_VALUE as fast as it can, COUNT TOA handshakes each report
 * either the option's address (read while trusted) or the real peer, never
 * anything else; and the counters agree connection by connection.
 */
static int mode_trust_race(int count, const char *trusted_value, const char *other_value)
{
	const enum listener order[] = { L4, LMAPPED, L6 };
	struct race_writer *w;
	struct stats before, after;
	struct lab_net n;
	char detail[512];
	int rewritten = 0, real = 0, wrong = 0, failed = 0, i, status = 0, ok, err;
	long long untrusted_delta = -1, seen_delta = -1;
	long started = now_ms();
	pid_t writer;

	if (count < 1 || net_up(&n, 0) < 0)
		return 1;
	w = mmap(NULL, sizeof(*w), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (w == MAP_FAILED) {
		report("trusted-race", 0, "error=mmap:%s", strerror(errno));
		return 1;
	}
	memset(w, 0, sizeof(*w));
	read_stats(&before);
	writer = fork();
	if (writer == 0) {
		while (!w->stop) {
			w->failures += write_trusted(trusted_value) != 0;
			w->failures += write_trusted(other_value) != 0;
			w->writes += 2;
		}
		_exit(0);
	}
	/*
	 * The race starts once the writer has written: a slow writer (the BPF
	 * engine's, one loader run per write) would otherwise lose it on one CPU.
	 */
	for (i = 0; i < 1000 && writer > 0 && w->writes < 2; i++)
		sleep_ms(10);
	for (i = 0; i < count && writer > 0; i++) {
		struct probe as_trusted, as_untrusted;

		if (i % 8 == 0)
			sched_yield(); /* and the writer keeps its share of the CPU */
		struct sockaddr_storage accepted, peer, want_toa, want_real;
		socklen_t plen = sizeof(peer);
		const char *why = NULL;
		uint16_t sport;
		int fd;

		toa_probe_on(&as_trusted, order[i % 3], 1);
		toa_probe_on(&as_untrusted, order[i % 3], 0);
		fd = handshake(&n, as_trusted.lk, &mss_only, &as_trusted.ack, WAIT_MS, &sport, &accepted, &why);
		if (fd < 0) {
			if (failed++ < 5)
				report("trusted-race-handshake", 0, "n=%d error=%s", i, why);
			continue;
		}
		expected_addr(&n, &as_trusted, sport, &want_toa);
		expected_addr(&n, &as_untrusted, sport, &want_real);
		memset(&peer, 0, sizeof(peer));
		if (getpeername(fd, (struct sockaddr *)&peer, &plen) < 0)
			peer.ss_family = AF_UNSPEC;
		if (same_addr(&accepted, &want_toa) && same_addr(&peer, &want_toa)) {
			rewritten++;
		} else if (same_addr(&accepted, &want_real) && same_addr(&peer, &want_real)) {
			real++;
		} else {
			char acc_s[80], peer_s[80];

			fmt_addr(&accepted, acc_s, sizeof(acc_s));
			fmt_addr(&peer, peer_s, sizeof(peer_s));
			snprintf(detail, sizeof(detail), "n=%d listener=%s accept=%s getpeername=%s", i,
				 listener_names[as_trusted.lk], acc_s, peer_s);
			if (wrong++ < 5)
				report("trusted-race-connection", 0, "%s", detail);
		}
		close_abort(fd);
	}
	w->stop = 1;
	if (writer > 0)
		waitpid(writer, &status, 0);
	err = write_trusted(trusted_value);
	if (read_stats(&after) == 0) {
		untrusted_delta = stat_value(&after, "untrusted_ignored") - stat_value(&before, "untrusted_ignored");
		seen_delta = stat_value(&after, "v4_options_seen") - stat_value(&before, "v4_options_seen") +
			     stat_value(&after, "v6_options_seen") - stat_value(&before, "v6_options_seen");
	}
	/* Both outcomes must have happened, or the writes never raced the handshakes. */
	ok = writer > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0 && w->failures == 0 && !err &&
	     wrong == 0 && failed == 0 && rewritten > 0 && real > 0 && untrusted_delta == real &&
	     seen_delta == rewritten;
	report("trusted-race", ok,
	       "handshakes=%d rewritten=%d real=%d wrong=%d failed=%d writes=%ld write_failures=%ld"
	       " untrusted_ignored=%lld seen=%lld seconds=%.1f",
	       count, rewritten, real, wrong, failed, w->writes, w->failures, untrusted_delta, seen_delta,
	       (double)(now_ms() - started) / 1000.0);
	munmap(w, sizeof(*w));
	return !ok;
}

/* ---------- mode: tfo (TCP Fast Open) ---------- */

#ifndef TCP_FASTOPEN
#define TCP_FASTOPEN 23
#endif
#define TFO_SYSCTL "/proc/sys/net/ipv4/tcp_fastopen"
/* TFO_SERVER_ENABLE | TFO_SERVER_COOKIE_NOT_REQD: a listener with TCP_FASTOPEN takes data on any SYN. */
#define TFO_SERVER_NO_COOKIE "514"

static const uint8_t tfo_payload[] = "toa-tfo!"; /* 8 bytes and the NUL, which is not sent */
#define TFO_PAYLOAD_LEN 8

/*
 * A SYN that carries data and a TOA option: the kernel makes the child from
 * the SYN itself (accept() returns it before the handshake's ACK is sent), and
 * it must keep its real peer address: the SYN is never read. The final ACK
 * then carries another TOA option, which no listener reads either.
 */
static int tfo_case(struct lab_net *n, enum listener lk, const char *name)
{
	static const uint8_t other4[4] = { 203, 0, 113, 8 };
	struct optbuf syn = mss_only, ack = { { 0 }, 0 };
	struct sockaddr_storage accepted, peer, after, want;
	struct pollfd pfd = { n->listen_fd[lk], POLLIN, 0 };
	socklen_t alen = sizeof(accepted), plen;
	char want_s[80], acc_s[80], peer_s[80], after_s[80], data[16];
	uint16_t sport = n->next_port;
	uint32_t isn = wire_random(), server_isn, acked = 0;
	int fd = -1, got = -1, ok;
	const char *why = "none";

	n->next_port++;
	if (lk == L6)
		put_toa6(&syn, 253, CLIENT_PORT, client6);
	else
		put_toa4(&syn, 254, CLIENT_PORT, client4);
	put_toa4(&ack, 254, CLIENT_PORT + 1, other4);
	make_v4(&want, n->peer4, sport);
	if (lk == L6)
		make_v6(&want, n->peer6, sport);
	memset(&accepted, 0, sizeof(accepted));
	memset(&peer, 0, sizeof(peer));
	memset(&after, 0, sizeof(after));
	if (send_segment_data(n, lk, sport, isn, 0, TCP_SYN, syn.b, syn.len, tfo_payload,
			      TFO_PAYLOAD_LEN) < 0) {
		why = "tun-write-failed";
	} else if (wait_synack_acking(n, lk, sport, isn, &server_isn, &acked) < 0) {
		why = "no-syn-ack";
	} else if (acked != TFO_PAYLOAD_LEN) {
		why = "syn-data-not-acked:fast-open-not-used";
	} else if (poll(&pfd, 1, WAIT_MS) <= 0) {
		why = "no-child-before-the-ack:fast-open-not-used";
	} else if ((fd = accept4(n->listen_fd[lk], (struct sockaddr *)&accepted, &alen, SOCK_CLOEXEC)) < 0) {
		why = "accept-failed";
	} else {
		plen = sizeof(peer);
		if (getpeername(fd, (struct sockaddr *)&peer, &plen) < 0)
			peer.ss_family = AF_UNSPEC;
		got = (int)recv(fd, data, sizeof(data), MSG_DONTWAIT);
		send_segment(n, lk, sport, isn + 1 + TFO_PAYLOAD_LEN, server_isn + 1, TCP_ACK, ack.b,
			     ack.len);
		sleep_ms(50);
		plen = sizeof(after);
		if (getpeername(fd, (struct sockaddr *)&after, &plen) < 0)
			after.ss_family = AF_UNSPEC;
	}
	fmt_addr(&want, want_s, sizeof(want_s));
	fmt_addr(&accepted, acc_s, sizeof(acc_s));
	fmt_addr(&peer, peer_s, sizeof(peer_s));
	fmt_addr(&after, after_s, sizeof(after_s));
	ok = fd >= 0 && got == TFO_PAYLOAD_LEN && !memcmp(data, tfo_payload, TFO_PAYLOAD_LEN) &&
	     same_addr(&accepted, &want) && same_addr(&peer, &want) && same_addr(&after, &want);
	report(name, ok, "listener=%s expected=%s accept=%s got=%s after_ack=%s syn_data_read=%d error=%s",
	       listener_names[lk], want_s, acc_s, peer_s, after_s, got, why);
	if (fd >= 0)
		close_abort(fd);
	return ok;
}

static int mode_tfo(void)
{
	char saved[32] = "1";
	struct lab_net n;
	int qlen = 16, fd, ok;
	ssize_t len;

	fd = open(TFO_SYSCTL, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		len = read(fd, saved, sizeof(saved) - 1);
		saved[len > 0 ? len : 0] = '\0';
		close(fd);
	}
	if (write_file(TFO_SYSCTL, TFO_SERVER_NO_COOKIE) < 0) {
		report("tfo-sysctl", 0, "error=write-%s:%s", TFO_SYSCTL, strerror(errno));
		return 1;
	}
	if (net_up(&n, 0) < 0)
		return 1;
	if (setsockopt(n.listen_fd[L4], IPPROTO_TCP, TCP_FASTOPEN, &qlen, sizeof(qlen)) < 0 ||
	    setsockopt(n.listen_fd[L6], IPPROTO_TCP, TCP_FASTOPEN, &qlen, sizeof(qlen)) < 0) {
		report("tfo-listener", 0, "error=TCP_FASTOPEN:%s", strerror(errno));
		return 1;
	}
	ok = tfo_case(&n, L4, "tfo-v4");
	ok &= tfo_case(&n, L6, "tfo-v6");
	write_file(TFO_SYSCTL, saved);
	return !ok;
}

/* ---------- mode: netns (counters per network namespace) ---------- */

static const char *const connection_stats[] = { "v4_options_seen", "v6_options_seen", "addresses_returned",
						"malformed_ignored", "v6_on_v4_ignored", "untrusted_ignored",
						"entries_live", "alloc_failed" };
#define N_CONNECTION_STATS (int)(sizeof(connection_stats) / sizeof(connection_stats[0]))

/* In a new network namespace: its own file starts at zero and counts its own connections. */
static int netns_child(void)
{
	static const uint8_t zero_port_client[4] = { 203, 0, 113, 9 };
	struct probe probes[4];
	struct stats fresh, after;
	struct tally t = { 0 };
	struct lab_net n;
	char detail[512], nonzero[128] = "";
	int i, ok;

	if (unshare(CLONE_NEWNET) < 0) {
		report("netns-unshare", 0, "error=%s", strerror(errno));
		return 1;
	}
	if (read_stats(&fresh) < 0) {
		report("netns-stats-fresh", 0, "problem=%s", fresh.problem);
		return 1;
	}
	for (i = 0; i < N_CONNECTION_STATS; i++)
		if (stat_value(&fresh, connection_stats[i]))
			snprintf(nonzero + strlen(nonzero), sizeof(nonzero) - strlen(nonzero), "%s=%lld,",
				 connection_stats[i], stat_value(&fresh, connection_stats[i]));
	report("netns-stats-fresh", !nonzero[0], "nonzero=%s", nonzero[0] ? nonzero : "none");
	if (net_up(&n, 0) < 0)
		return 1;
	toa_probe_on(&probes[0], L4, 1);
	toa_probe_on(&probes[1], LMAPPED, 1);
	toa_probe_on(&probes[2], L6, 1);
	toa_probe_on(&probes[3], L4, 0);
	memset(&probes[3].ack, 0, sizeof(probes[3].ack));
	put_toa4(&probes[3].ack, 254, 0, zero_port_client); /* port 0: malformed */
	probes[3].untrusted = 0;
	probes[3].malformed = 1;
	for (i = 0; i < 4; i++) {
		int pass = check_probe(&n, &probes[i], detail, sizeof(detail), NULL, NULL);

		if (!pass)
			report("netns-probe", 0, "%s", detail);
		tally_add(&t, &probes[i], pass);
	}
	check_counters("netns", &fresh, &t);
	if (read_stats(&after) < 0)
		return 1;
	/* Nothing else ran in this namespace: the counts are exact. */
	ok = t.mismatches == 0 && stat_value(&after, "v4_options_seen") == t.rewritten_v4 &&
	     stat_value(&after, "v6_options_seen") == t.rewritten_v6 &&
	     stat_value(&after, "malformed_ignored") == t.malformed &&
	     stat_value(&after, "addresses_returned") >= t.rewritten_v4 + t.rewritten_v6;
	report("netns-stats-own", ok,
	       "v4_options_seen=%lld/%d v6_options_seen=%lld/%d malformed_ignored=%lld/%d addresses_returned=%lld>=%d mismatches=%d",
	       stat_value(&after, "v4_options_seen"), t.rewritten_v4, stat_value(&after, "v6_options_seen"),
	       t.rewritten_v6, stat_value(&after, "malformed_ignored"), t.malformed,
	       stat_value(&after, "addresses_returned"), t.rewritten_v4 + t.rewritten_v6, t.mismatches);
	return !ok;
}

/* The namespace the peer started in sees nothing of the other namespace's connections. */
static int mode_netns(void)
{
	struct stats before, after;
	char moved[256] = "";
	int status = 0, i, ok;
	pid_t child;

	if (read_stats(&before) < 0) {
		report("netns-init-untouched", 0, "problem=%s", before.problem);
		return 1;
	}
	child = fork();
	if (child == 0)
		_exit(netns_child());
	if (child < 0 || waitpid(child, &status, 0) < 0) {
		report("netns-child", 0, "error=%s", strerror(errno));
		return 1;
	}
	if (read_stats(&after) < 0) {
		report("netns-init-untouched", 0, "problem=%s", after.problem);
		return 1;
	}
	for (i = 0; i < N_CONNECTION_STATS; i++) {
		long long d = stat_value(&after, connection_stats[i]) - stat_value(&before, connection_stats[i]);

		if (d)
			snprintf(moved + strlen(moved), sizeof(moved) - strlen(moved), "%s+%lld,",
				 connection_stats[i], d);
	}
	ok = !moved[0];
	report("netns-init-untouched", ok, "moved=%s child_exit=%d", moved[0] ? moved : "none",
	       WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	return !ok || !WIFEXITED(status) || WEXITSTATUS(status);
}

/* ---------- mode: many (the address table under load) ---------- */

/*
 * COUNT TOA connections open at once, each with its own client address: every
 * one reports its own, entries_live counts them all, and closing them drains
 * the table. Loaded with a small table_bits, chains are many entries long.
 */
static int mode_many(int count)
{
	struct sockaddr_storage peer, want;
	struct stats before, during;
	struct lab_net n;
	char detail[512], want_s[80], peer_s[80];
	int *fds, i, opened = 0, mismatches = 0, ok;
	long long live = -1, drained;
	long started = now_ms();

	if (count < 1 || count > 1000 || net_up(&n, 0) < 0)
		return 1;
	fds = calloc((size_t)count, sizeof(*fds));
	if (!fds || read_stats(&before) < 0)
		return 1;
	for (i = 0; i < count; i++) {
		struct probe p = { .lk = L4, .want = { TOA_V4, (uint16_t)(1000 + i), { 198, 18, (uint8_t)(i >> 8), (uint8_t)i } } };

		fds[i] = -1;
		put_toa4(&p.ack, 254, p.want.port, p.want.addr);
		if (!check_probe(&n, &p, detail, sizeof(detail), &fds[i], NULL)) {
			if (mismatches++ < 5)
				report("table-many-connection", 0, "n=%d %s", i, detail);
			continue;
		}
		opened++;
	}
	if (read_stats(&during) == 0)
		live = stat_value(&during, "entries_live") - stat_value(&before, "entries_live");
	/* With all of them in the table, each still reports its own address. */
	for (i = 0; i < count; i++) {
		socklen_t plen = sizeof(peer);
		uint8_t addr[4] = { 198, 18, (uint8_t)(i >> 8), (uint8_t)i };

		if (fds[i] < 0)
			continue;
		make_v4(&want, addr, (uint16_t)(1000 + i));
		if (getpeername(fds[i], (struct sockaddr *)&peer, &plen) < 0 || !same_addr(&peer, &want)) {
			fmt_addr(&want, want_s, sizeof(want_s));
			fmt_addr(&peer, peer_s, sizeof(peer_s));
			if (mismatches++ < 5)
				report("table-many-recheck", 0, "n=%d expected=%s got=%s", i, want_s, peer_s);
		}
	}
	for (i = 0; i < count; i++)
		if (fds[i] >= 0)
			close_abort(fds[i]);
	free(fds);
	drained = wait_entries_drained();
	ok = mismatches == 0 && opened == count && live == count && drained == 0;
	report("table-many-open", ok, "connections=%d opened=%d mismatches=%d entries_live=%lld drained_to=%lld seconds=%.1f",
	       count, opened, mismatches, live, drained, (double)(now_ms() - started) / 1000.0);
	return !ok;
}

/* ---------- mode: bench ---------- */

/* Untimed operations before each timed batch: the first ones pay for cold caches. */
#define BENCH_WARMUP 20

static double now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One invocation measures one side (module loaded or not) of one round. */
struct bench_run {
	const char *side;
	int toa_loaded;
	int round;
};

static void bench_result(const struct bench_run *run, const char *name, int ops, double seconds)
{
	printf("BENCH name=%s side=%s round=%d ops=%d seconds=%.6f rate=%.1f\n", name, run->side,
	       run->round, ops, seconds, seconds > 0 ? ops / seconds : 0.0);
}

static int bench_error(const struct bench_run *run, const char *name, const char *fmt, ...)
{
	va_list ap;

	printf("BENCH-ERROR name=%s side=%s round=%d ", name, run->side, run->round);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	return -1;
}

/* A probe on the IPv4 listener; with a TOA option the loaded module must rewrite the peer. */
static void bench_probe(const struct bench_run *run, int with_option, struct probe *p)
{
	memset(p, 0, sizeof(*p));
	p->lk = L4;
	if (!with_option)
		return;
	put_toa4(&p->ack, 254, CLIENT_PORT, client4);
	if (run->toa_loaded) {
		p->want.outcome = TOA_V4;
		p->want.port = CLIENT_PORT;
		memcpy(p->want.addr, client4, 4);
	}
}

/*
 * One connection: handshake, accept() reporting the expected peer (into *want), then an
 * abortive close, or with keep_fd the accepted socket handed back open.
 */
static int bench_connection(struct lab_net *n, const struct probe *p, int *keep_fd,
			    struct sockaddr_storage *want, const char **why)
{
	struct sockaddr_storage accepted;
	uint16_t sport;
	int fd = handshake(n, p->lk, &mss_only, &p->ack, WAIT_MS, &sport, &accepted, why);

	if (fd < 0)
		return -1;
	expected_addr(n, p, sport, want);
	if (!same_addr(&accepted, want)) {
		*why = "accept-reported-wrong-peer";
		close_abort(fd);
		return -1;
	}
	if (keep_fd)
		*keep_fd = fd;
	else
		close_abort(fd);
	return 0;
}

static int bench_handshakes(struct lab_net *n, const struct bench_run *run, const char *name,
			    int with_option, int count)
{
	struct sockaddr_storage want;
	struct probe p;
	const char *why = NULL;
	double started = 0;
	int i;

	bench_probe(run, with_option, &p);
	for (i = -BENCH_WARMUP; i < count; i++) {
		if (i == 0)
			started = now_seconds();
		if (bench_connection(n, &p, NULL, &want, &why) < 0)
			return bench_error(run, name, "op=%d error=%s", i, why);
	}
	bench_result(run, name, count, now_seconds() - started);
	return 0;
}

/* getpeername() on one accepted socket, every answer checked. */
static int bench_getpeername(struct lab_net *n, const struct bench_run *run, const char *name,
			     int with_option, int count)
{
	struct sockaddr_storage peer, want;
	struct probe p;
	const char *why = NULL;
	double started = 0;
	int fd = -1, i;

	bench_probe(run, with_option, &p);
	if (bench_connection(n, &p, &fd, &want, &why) < 0)
		return bench_error(run, name, "op=connect error=%s", why);
	for (i = -BENCH_WARMUP; i < count; i++) {
		socklen_t plen = sizeof(peer);

		if (i == 0)
			started = now_seconds();
		if (getpeername(fd, (struct sockaddr *)&peer, &plen) < 0 || !same_addr(&peer, &want)) {
			close_abort(fd);
			return bench_error(run, name, "op=%d error=getpeername-wrong-or-failed", i);
		}
	}
	bench_result(run, name, count, now_seconds() - started);
	close_abort(fd);
	return 0;
}

static int bench_accept_getpeername(struct lab_net *n, const struct bench_run *run, const char *name,
				    int count);
static int mode_crowd(int count, const char *label, int unload);

static int mode_bench(const char *side, int round, int handshakes, int calls)
{
	/* toa: the module loaded; bpf: the eBPF engine attached. Both must rewrite alike. */
	struct bench_run run = { side, !strcmp(side, "toa") || !strcmp(side, "bpf"), round };
	struct lab_net n;
	int failed = 0;

	if ((strcmp(side, "baseline") && !run.toa_loaded) || round < 1 || handshakes < 1 ||
	    calls < 1)
		return usage();
	if (net_up(&n, 0) < 0)
		return 1;
	failed |= bench_handshakes(&n, &run, "handshake-plain", 0, handshakes) < 0;
	failed |= bench_handshakes(&n, &run, "handshake-toa", 1, handshakes) < 0;
	failed |= bench_getpeername(&n, &run, "getpeername-plain", 0, calls) < 0;
	failed |= bench_getpeername(&n, &run, "getpeername-toa", 1, calls) < 0;
	failed |= bench_accept_getpeername(&n, &run, "accept-getpeername", handshakes) < 0;
	return failed;
}

/* ---------- main ---------- */

static int usage(void)
{
	fprintf(stderr, "usage: toa_peer basic [trusted|untrusted] | plain LABEL | refusal |"
			" fuzz SEED COUNT KINDS REFUSED_FROM | hold READY GO | cycles COUNT KO [PARAMS] |"
			" cases SEED COUNT KINDS REFUSED_FROM | bench SIDE ROUND HANDSHAKES CALLS |"
			" tfo | netns | trust-flip PEER_RANGE OTHER_RANGE | trust-bad |"
			" trust-race COUNT PEER_RANGE OTHER_RANGE | many COUNT | crowd[-unload] COUNT [LABEL]\n");
	return 2;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	engine_ctl = getenv("TOA_ENGINE_CTL");
	if (engine_ctl && !*engine_ctl)
		engine_ctl = NULL;
	wire_state = (uint64_t)getpid() * 0x2545f4914f6cdd1dULL ^ (uint64_t)now_ms();
	rng_state = wire_state ^ 0x5851f42d4c957f2dULL;
	if ((argc == 2 || argc == 3) && !strcmp(argv[1], "basic"))
		return mode_basic(argc == 3 ? argv[2] : NULL);
	if (argc == 3 && !strcmp(argv[1], "plain"))
		return mode_plain(argv[2]);
	if (argc == 6 && !strcmp(argv[1], "fuzz"))
		return mode_fuzz(strtoull(argv[2], NULL, 10), atoi(argv[3]), argv[4], atoi(argv[5]));
	if (argc == 2 && !strcmp(argv[1], "refusal"))
		return mode_refusal();
	if (argc == 6 && !strcmp(argv[1], "cases"))
		return mode_cases(strtoull(argv[2], NULL, 10), atoi(argv[3]), argv[4], atoi(argv[5]));
	if (argc == 4 && !strcmp(argv[1], "hold"))
		return mode_hold(argv[2], argv[3]);
	if (argc == 4 && !strcmp(argv[1], "cycles"))
		return mode_cycles(atoi(argv[2]), argv[3], "");
	if (argc == 5 && !strcmp(argv[1], "cycles"))
		return mode_cycles(atoi(argv[2]), argv[3], argv[4]);
	if (argc == 6 && !strcmp(argv[1], "bench"))
		return mode_bench(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
	if (argc == 2 && !strcmp(argv[1], "tfo"))
		return mode_tfo();
	if (argc == 2 && !strcmp(argv[1], "netns"))
		return mode_netns();
	if (argc == 4 && !strcmp(argv[1], "trust-flip"))
		return mode_trust_flip(argv[2], argv[3]);
	if (argc == 2 && !strcmp(argv[1], "trust-bad"))
		return mode_trust_bad();
	if (argc == 5 && !strcmp(argv[1], "trust-race"))
		return mode_trust_race(atoi(argv[2]), argv[3], argv[4]);
	if (argc == 3 && !strcmp(argv[1], "many"))
		return mode_many(atoi(argv[2]));
	if ((argc == 3 || argc == 4) && !strcmp(argv[1], "crowd"))
		return mode_crowd(atoi(argv[2]), argc == 4 ? argv[3] : NULL, 0);
	if ((argc == 3 || argc == 4) && !strcmp(argv[1], "crowd-unload"))
		return mode_crowd(atoi(argv[2]), argc == 4 ? argv[3] : NULL, 1);
	return usage();
}

/* ---------- bench: accept() + getpeername() ---------- */

/*
 * What a server behind a balancer does per connection, measured as one loop:
 * a handshake with a TOA option, accept() (which asks for the peer too), one
 * getpeername() on the accepted socket, both answers checked, abortive close.
 */
static int bench_accept_getpeername(struct lab_net *n, const struct bench_run *run, const char *name,
				    int count)
{
	struct sockaddr_storage peer, want;
	struct probe p;
	const char *why = NULL;
	double started = 0;
	int i;

	bench_probe(run, 1, &p);
	for (i = -BENCH_WARMUP; i < count; i++) {
		socklen_t plen = sizeof(peer);
		int fd = -1, ok;

		if (i == 0)
			started = now_seconds();
		if (bench_connection(n, &p, &fd, &want, &why) < 0)
			return bench_error(run, name, "op=%d error=%s", i, why);
		ok = getpeername(fd, (struct sockaddr *)&peer, &plen) == 0 && same_addr(&peer, &want);
		close_abort(fd);
		if (!ok)
			return bench_error(run, name, "op=%d error=getpeername-wrong-or-failed", i);
	}
	bench_result(run, name, count, now_seconds() - started);
	return 0;
}

/* ---------- mode: crowd (thousands of callers inside getname at once) ---------- */

/*
 * COUNT threads block in accept() on one listener; COUNT handshakes with a TOA
 * option each (client 198.18.i/256.i%256, port 1000+i) wake them one by one,
 * and accept() must report each thread its connection's TOA address. Then all
 * of them call getpeername() on one more TOA connection whose socket lock is
 * held: a sender is stopped inside send() on that socket, holding the lock,
 * by a userfaultfd page it is copying from. inet_getname() takes the socket
 * lock (since 5.x always, before only around a cgroup getpeername program,
 * which is attached for the purpose), so every thread sleeps inside getname at
 * once; the lab counts how many were seen asleep there together. The page
 * is filled, the sender finishes, the lock passes from thread to thread, and
 * every getpeername() must return the TOA address. probe_missed must stay 0: a
 * hook with a fixed pool of calls in flight (a kretprobe's maxactive) skips
 * the callers it has no room for, and they get the balancer's address.
 */
#include <linux/bpf.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sys/mount.h>
#include <sys/resource.h>

#define CROWD_MAX 10000
#define CROWD_STACK (64 * 1024)
#define CROWD_WAIT_MS 20000

struct crowd_thread {
	pthread_t thread;
	int tid;
	int fd;
	struct sockaddr_storage accepted, own, held;
	int own_ok, held_ok;
};

static struct {
	int listen_fd, held_fd, count;
	struct crowd_thread *threads;
	int accepted, started, entering, returned; /* __atomic */
	int go; /* under crowd_go_lock */
} crowd;

static pthread_mutex_t crowd_go_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t crowd_go_cond = PTHREAD_COND_INITIALIZER;
static const uint8_t crowd_held_addr[4] = { 198, 19, 0, 1 };
#define CROWD_HELD_PORT 999

static void crowd_addr(int i, struct sockaddr_storage *out)
{
	const uint8_t addr[4] = { 198, 18, (uint8_t)(i >> 8), (uint8_t)i };

	make_v4(out, addr, (uint16_t)(1000 + i));
}

/* Which connection an address names (-1: none of the crowd's). */
static int crowd_index(const struct sockaddr_storage *ss)
{
	const struct sockaddr_in *sin = (const void *)ss;
	const uint8_t *a = (const uint8_t *)&sin->sin_addr;
	int i;

	if (ss->ss_family != AF_INET || a[0] != 198 || a[1] != 18)
		return -1;
	i = a[2] << 8 | a[3];
	if (i >= crowd.count || ntohs(sin->sin_port) != 1000 + i)
		return -1;
	return i;
}

static void *crowd_main(void *arg)
{
	struct crowd_thread *t = arg;
	struct sockaddr_storage want;
	socklen_t len;

	t->tid = (int)syscall(SYS_gettid);
	__atomic_add_fetch(&crowd.started, 1, __ATOMIC_SEQ_CST);
	len = sizeof(t->accepted);
	t->fd = accept4(crowd.listen_fd, (struct sockaddr *)&t->accepted, &len, SOCK_CLOEXEC);
	__atomic_add_fetch(&crowd.accepted, 1, __ATOMIC_SEQ_CST);
	pthread_mutex_lock(&crowd_go_lock);
	while (!crowd.go)
		pthread_cond_wait(&crowd_go_cond, &crowd_go_lock);
	pthread_mutex_unlock(&crowd_go_lock);
	if (t->fd >= 0) {
		len = sizeof(t->own);
		t->own_ok = getpeername(t->fd, (struct sockaddr *)&t->own, &len) == 0 &&
			    crowd_index(&t->own) >= 0 && same_addr(&t->own, &t->accepted);
	}
	__atomic_add_fetch(&crowd.entering, 1, __ATOMIC_SEQ_CST);
	len = sizeof(t->held);
	make_v4(&want, crowd_held_addr, CROWD_HELD_PORT);
	t->held_ok = getpeername(crowd.held_fd, (struct sockaddr *)&t->held, &len) == 0 &&
		     same_addr(&t->held, &want);
	__atomic_add_fetch(&crowd.returned, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

/* How many crowd threads are asleep in the kernel (state D: lock_sock() waits uninterruptibly). */
static int crowd_asleep(void)
{
	char path[64], buf[256], *state;
	int i, asleep = 0;

	for (i = 0; i < crowd.count; i++) {
		int fd, len;

		snprintf(path, sizeof(path), "/proc/self/task/%d/stat", crowd.threads[i].tid);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		len = (int)read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (len <= 0)
			continue;
		buf[len] = '\0';
		state = strrchr(buf, ')');
		if (state && state[1] == ' ' && state[2] == 'D')
			asleep++;
	}
	return asleep;
}

struct crowd_sender {
	int fd;
	void *page;
	ssize_t sent;
	int error;
};

static void *crowd_send(void *arg)
{
	struct crowd_sender *s = arg;

	s->sent = send(s->fd, s->page, 4096, MSG_NOSIGNAL);
	s->error = s->sent < 0 ? errno : 0;
	return NULL;
}

/*
 * Before 5.x's lock_sock() in inet_getname() (5.10 takes none), getname takes
 * the socket lock only around a cgroup program for getpeername: attach one
 * that allows everything, so that the crowd sleeps inside getname there too.
 * Returns the program's fd (0: none could be attached), detached by crowd_unlock().
 */
#define CROWD_CGROUP "/tmp/crowd-cgroup"

static int crowd_bpf(int cmd, union bpf_attr *attr)
{
	return (int)syscall(SYS_bpf, cmd, attr, sizeof(*attr));
}

static int crowd_cgroup_fd = -1;

static int crowd_lock_getname(void)
{
	static const struct bpf_insn allow[] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = 1 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	union bpf_attr attr;
	int prog;

	mkdir(CROWD_CGROUP, 0755);
	if (mount("none", CROWD_CGROUP, "cgroup2", 0, NULL) < 0 && errno != EBUSY)
		return 0;
	crowd_cgroup_fd = open(CROWD_CGROUP, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	memset(&attr, 0, sizeof(attr));
	attr.prog_type = BPF_PROG_TYPE_CGROUP_SOCK_ADDR;
	attr.expected_attach_type = BPF_CGROUP_INET4_GETPEERNAME;
	attr.insns = (uintptr_t)allow;
	attr.insn_cnt = 2;
	attr.license = (uintptr_t)"GPL";
	prog = crowd_bpf(BPF_PROG_LOAD, &attr);
	if (crowd_cgroup_fd < 0 || prog < 0)
		return 0;
	memset(&attr, 0, sizeof(attr));
	attr.target_fd = (uint32_t)crowd_cgroup_fd;
	attr.attach_bpf_fd = (uint32_t)prog;
	attr.attach_type = BPF_CGROUP_INET4_GETPEERNAME;
	attr.attach_flags = BPF_F_ALLOW_MULTI;
	if (crowd_bpf(BPF_PROG_ATTACH, &attr) < 0) {
		close(prog);
		return 0;
	}
	return prog;
}

static void crowd_unlock_getname(int prog)
{
	union bpf_attr attr;

	if (prog > 0) {
		memset(&attr, 0, sizeof(attr));
		attr.target_fd = (uint32_t)crowd_cgroup_fd;
		attr.attach_bpf_fd = (uint32_t)prog;
		attr.attach_type = BPF_CGROUP_INET4_GETPEERNAME;
		crowd_bpf(BPF_PROG_DETACH, &attr);
		close(prog);
	}
	if (crowd_cgroup_fd >= 0)
		close(crowd_cgroup_fd);
	umount2(CROWD_CGROUP, MNT_DETACH);
	rmdir(CROWD_CGROUP);
}

/* Drive one handshake with connection i's TOA option and wait until a crowd thread accepted it. */
static const char *crowd_connect(struct lab_net *n, int i)
{
	struct sockaddr_storage want;
	struct optbuf ack = { .len = 0 };
	const struct sockaddr_in *sin = (const void *)&want;
	uint16_t sport = n->next_port;
	uint32_t isn = wire_random(), server_isn;
	long deadline;

	crowd_addr(i, &want);
	put_toa4(&ack, 254, (uint16_t)(1000 + i), (const uint8_t *)&sin->sin_addr);
	n->next_port = (uint16_t)(n->next_port >= 60000 ? 20000 : n->next_port + 1);
	if (send_segment(n, L4, sport, isn, 0, TCP_SYN, mss_only.b, mss_only.len) < 0)
		return "tun-write-failed";
	if (wait_synack(n, L4, sport, isn, &server_isn) < 0)
		return "no-syn-ack";
	if (send_segment(n, L4, sport, isn + 1, server_isn + 1, TCP_ACK, ack.b, ack.len) < 0)
		return "tun-write-failed";
	deadline = now_ms() + WAIT_MS;
	while (__atomic_load_n(&crowd.accepted, __ATOMIC_SEQ_CST) <= i) {
		if (now_ms() > deadline)
			return "not-accepted";
		sched_yield();
	}
	return NULL;
}

/*
 * crowd-unload: rmmod runs while every caller is asleep inside getname. It
 * must wait for them (they come back to toa's code) and finish once they have
 * returned, each with its TOA address; a module freed under them would crash
 * the guest.
 */
static struct {
	int rc, error, done;
} crowd_unloading;

static void *crowd_unload_main(void *arg)
{
	(void)arg;
	crowd_unloading.rc = (int)syscall(SYS_delete_module, "toa", O_NONBLOCK);
	crowd_unloading.error = crowd_unloading.rc < 0 ? errno : 0;
	__atomic_store_n(&crowd_unloading.done, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

static int mode_crowd(int count, const char *label, int unload)
{
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;
	struct uffdio_zeropage zero;
	struct crowd_sender sender = { -1, NULL, 0, 0 };
	struct probe held = { .lk = L4, .want = { TOA_V4, CROWD_HELD_PORT, { 198, 19, 0, 1 } } };
	struct stats before, after;
	struct lab_net n;
	struct pollfd pfd;
	struct uffd_msg msg;
	pthread_attr_t attr;
	pthread_t sender_thread, unloader;
	struct rlimit nofile;
	char detail[512], addr_s[80], first_wrong[96] = "none";
	const char *why = NULL;
	int *seen, i, uffd = -1, stalled = 0, created = 0, asleep_max = 0, wrong_accept = 0;
	int wrong_own = 0, wrong_held = 0, cgroup_prog = 0, ok, unload_waited = 0;
	long started = now_ms(), deadline;
	long long missed_before = -1, missed = -1, drained;
	char name[64];

	snprintf(name, sizeof(name), "%s%scrowd%s", label ? label : "", label ? "-" : "", unload ? "-unload" : "");

	if (count < 1 || count > CROWD_MAX || net_up(&n, 0) < 0)
		return count < 1 || count > CROWD_MAX ? usage() : 1;
	if (read_stats(&before) < 0) {
		report(name, 0, "problem=stats:%s", before.problem);
		return 1;
	}
	missed_before = stat_value(&before, "probe_missed");
	/* A descriptor per connection, past the usual 1024. */
	nofile.rlim_cur = nofile.rlim_max = (rlim_t)count + 256;
	if (setrlimit(RLIMIT_NOFILE, &nofile) < 0) {
		report(name, 0, "problem=setrlimit-nofile:%s", strerror(errno));
		return 1;
	}
	put_toa4(&held.ack, 254, CROWD_HELD_PORT, crowd_held_addr);
	/* Room for every handshake still being accepted (the listener was made with 64). */
	listen(n.listen_fd[L4], 4096);
	memset(&crowd, 0, sizeof(crowd));
	crowd.listen_fd = n.listen_fd[L4];
	crowd.held_fd = -1;
	crowd.count = count;
	crowd.threads = calloc((size_t)count, sizeof(*crowd.threads));
	seen = calloc((size_t)count, sizeof(*seen));
	if (!crowd.threads || !seen) {
		report(name, 0, "problem=out-of-memory");
		return 1;
	}

	/* Every thread blocked in accept() first. */
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, CROWD_STACK);
	for (i = 0; i < count; i++) {
		crowd.threads[i].fd = -1;
		if (pthread_create(&crowd.threads[i].thread, &attr, crowd_main, &crowd.threads[i]) != 0)
			break;
		created++;
	}
	if (created < count) {
		report(name, 0, "problem=pthread_create:%s threads=%d/%d", strerror(errno), created, count);
		_exit(1); /* the threads blocked in accept() cannot be joined */
	}
	deadline = now_ms() + CROWD_WAIT_MS;
	while (__atomic_load_n(&crowd.started, __ATOMIC_SEQ_CST) < count && now_ms() < deadline)
		sleep_ms(10);
	sleep_ms(100); /* from "started" to asleep in accept() */
	printf("crowd: %d threads started in %.1fs\n", __atomic_load_n(&crowd.started, __ATOMIC_SEQ_CST), (double)(now_ms() - started) / 1000.0);

	/* The connections, each accepted by one of them. */
	for (i = 0; i < count && !why; i++)
		why = crowd_connect(&n, i);
	if (why) {
		report(name, 0, "problem=handshake-%d:%s accepted=%d started=%d", i - 1, why,
		       __atomic_load_n(&crowd.accepted, __ATOMIC_SEQ_CST), __atomic_load_n(&crowd.started, __ATOMIC_SEQ_CST));
		_exit(1);
	}

	/* One more TOA connection, its lock held by a sender stopped inside send(). */
	if (!check_probe(&n, &held, detail, sizeof(detail), &crowd.held_fd, NULL)) {
		report(name, 0, "problem=held-connection %s", detail);
		_exit(1);
	}
	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	sender.fd = crowd.held_fd;
	sender.page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	reg.range.start = (uintptr_t)sender.page;
	reg.range.len = 4096;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0 || sender.page == MAP_FAILED ||
	    ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
		report(name, 0, "problem=userfaultfd:%s", strerror(errno));
		_exit(1);
	}
	printf("crowd: %d connections accepted, held fd %d\n", count, crowd.held_fd);
	cgroup_prog = crowd_lock_getname();
	pthread_create(&sender_thread, NULL, crowd_send, &sender);
	pfd.fd = uffd;
	pfd.events = POLLIN;
	if (poll(&pfd, 1, WAIT_MS) == 1 && read(uffd, &msg, sizeof(msg)) == sizeof(msg) &&
	    msg.event == UFFD_EVENT_PAGEFAULT)
		stalled = 1;

	printf("crowd: sender stalled=%d\n", stalled);
	/* All at once: each checks its own connection, then asks about the held one. */
	pthread_mutex_lock(&crowd_go_lock);
	crowd.go = 1;
	pthread_cond_broadcast(&crowd_go_cond);
	pthread_mutex_unlock(&crowd_go_lock);
	deadline = now_ms() + CROWD_WAIT_MS;
	for (;;) {
		int entering = __atomic_load_n(&crowd.entering, __ATOMIC_SEQ_CST);
		int returned = __atomic_load_n(&crowd.returned, __ATOMIC_SEQ_CST);
		int asleep = entering == count ? crowd_asleep() : 0;

		if (asleep > asleep_max)
			asleep_max = asleep;
		if ((entering == count && asleep + returned >= count) || now_ms() > deadline)
			break;
		sleep_ms(entering == count ? 50 : 10);
	}
	if (unload) {
		pthread_create(&unloader, NULL, crowd_unload_main, NULL);
		sleep_ms(1000);
		/* Still inside rmmod: it waits for the callers asleep in the original. */
		unload_waited = !__atomic_load_n(&crowd_unloading.done, __ATOMIC_SEQ_CST);
	}
	/* Let the sender go: the lock passes to the sleepers one by one. */
	zero.range.start = (uintptr_t)sender.page;
	zero.range.len = 4096;
	zero.mode = 0;
	ioctl(uffd, UFFDIO_ZEROPAGE, &zero); /* also when no fault was seen: the sender must not hang */
	printf("crowd: released stalled=%d asleep_max=%d\n", stalled, asleep_max);
	pthread_join(sender_thread, NULL);
	for (i = 0; i < count; i++)
		pthread_join(crowd.threads[i].thread, NULL);
	crowd_unlock_getname(cgroup_prog);
	if (unload)
		pthread_join(unloader, NULL);

	for (i = 0; i < count; i++) {
		struct crowd_thread *t = &crowd.threads[i];
		int index = crowd_index(&t->accepted);
		const char *what = NULL;

		if (t->fd < 0 || index < 0 || seen[index]++) {
			wrong_accept++;
			what = "accept";
			fmt_addr(&t->accepted, addr_s, sizeof(addr_s));
		}
		if (!t->own_ok && wrong_own++ >= 0 && !what) {
			what = "own";
			fmt_addr(&t->own, addr_s, sizeof(addr_s));
		}
		if (!t->held_ok && wrong_held++ >= 0 && !what) {
			what = "held";
			fmt_addr(&t->held, addr_s, sizeof(addr_s));
		}
		if (what && !strcmp(first_wrong, "none"))
			snprintf(first_wrong, sizeof(first_wrong), "%s:%s", what, addr_s);
	}
	/* Unloaded: no counters to read, and the table went with the module. */
	if (!unload && read_stats(&after) == 0)
		missed = stat_value(&after, "probe_missed");
	for (i = 0; i < count; i++)
		if (crowd.threads[i].fd >= 0)
			close_abort(crowd.threads[i].fd);
	close_abort(crowd.held_fd);
	drained = unload ? 0 : wait_entries_drained();
	ok = stalled && sender.sent == 4096 && !wrong_accept && !wrong_own && !wrong_held &&
	     missed_before == 0 && (unload || missed == 0) && drained == 0 &&
	     (!unload || (unload_waited && crowd_unloading.rc == 0));
	report(name, ok,
	       "threads=%d asleep_in_getname_at_once=%d wrong_accept=%d wrong_own=%d wrong_held=%d first_wrong=%s probe_missed=%lld->%lld lock_held=%s cgroup_getpeername_prog=%s sent=%zd/%d drained_to=%lld unload=%s seconds=%.1f",
	       count, asleep_max, wrong_accept, wrong_own, wrong_held, first_wrong, missed_before, missed,
	       stalled ? "yes" : "no", cgroup_prog > 0 ? "attached" : "none", sender.sent, sender.error, drained,
	       !unload ? "no" : !unload_waited ? "did-not-wait" : crowd_unloading.rc ? strerror(crowd_unloading.error) : "waited,ok",
	       (double)(now_ms() - started) / 1000.0);
	return !ok;
}
