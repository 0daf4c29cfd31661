// SPDX-License-Identifier: GPL-2.0
/*
 * toa.bpf.c - TCP Option Address without a kernel module.
 *
 * The same rules as toa.ko (toa/module/toa.c), as three cgroup programs that
 * one object carries to every kernel from 5.10 on:
 *
 *   toa_sockops  (sockops)              BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: the
 *                                       ACK that completes a passive handshake is
 *                                       handed to the program with its TCP header
 *                                       (skb_data..skb_data_end, 5.10+). Its
 *                                       option list is parsed; a usable address
 *                                       is kept in the child's socket storage,
 *                                       freed with the socket. BPF_SOCK_OPS_STATE_CB
 *                                       counts the entry out when it closes.
 *   toa_peer4/6  (cgroup/getpeername4/6) getpeername() and accept() (5.8+): the
 *                                       stored address replaces the peer's.
 *
 * Only UAPI context fields and helpers are used (no BTF of the running kernel,
 * no CO-RE relocations). The verifier of 5.10 is the one to satisfy: the
 * options are copied from the packet with constant offsets only, into five
 * 64-bit words held on the stack at constant offsets, and every byte of them
 * is read by shifting a word chosen with constant comparisons; no pointer
 * ever carries a variable offset (5.10 refuses variable stack offsets, and a
 * variable packet offset makes the walk too costly to verify).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "toa_maps.h"

#define AF_INET 2
#define AF_INET6 10

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TOA_V4_OPTION_LEN 8	/* kind, len, be16 port, be32 address */
#define TOA_V6_OPTION_LEN 20	/* kind, len, be16 port, 16-byte address */
#define TCP_HEADER_LEN 20
#define TCP_OPTIONS_MAX 40
#define TCP_FLAG_SYN 0x02

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct toa_config);
} toa_config SEC(".maps");

/* Twice the list's limit: a run-time change adds the new entries before it removes the old. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 2 * TOA_MAX_TRUSTED);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct toa_lpm4);
	__type(value, __u32);
} toa_trusted4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 2 * TOA_MAX_TRUSTED);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct toa_lpm6);
	__type(value, __u32);
} toa_trusted6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TOA_COUNTER_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} toa_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct toa_sk);
} toa_sk SEC(".maps");

static __always_inline void toa_add(__u32 counter, __s64 delta)
{
	__u64 *value = bpf_map_lookup_elem(&toa_counters, &counter);

	/* Atomic: a softirq may interrupt a program run in process context on this CPU. */
	if (value)
		__sync_fetch_and_add(value, delta);
}

/* ---------- the option list, as five words ---------- */

struct toa_words {
	__u64 w0, w1, w2, w3, w4;
	__u32 len;	/* bytes of options: 0..40, a multiple of 4 */
};

/* Keep a value in a register, opaque to the compiler (it emits no instruction). */
#define TOA_KEEP(var) asm volatile("" : "+r"(var))

/*
 * Branch-free arithmetic for the walk over the options: 0 or 1 from each
 * comparison, and a pick between two values. A walk with branches makes the
 * verifier follow every path through 40 steps; this one is a single path, so
 * proving it safe costs the same few thousand instructions on every kernel.
 * The opaque steps keep the compiler from turning them back into branches.
 */
static __always_inline __u64 toa_eq(__u64 a, __u64 b)	/* a == b */
{
	__u64 d = a ^ b, neg = -d, r;

	TOA_KEEP(neg);
	r = ((d | neg) >> 63) ^ 1;
	TOA_KEEP(r);
	return r;
}

static __always_inline __u64 toa_lt(__u64 a, __u64 b)	/* a < b, both below 2^63 */
{
	__u64 d = a - b, r;

	TOA_KEEP(d);
	r = d >> 63;
	TOA_KEEP(r);
	return r;
}

static __always_inline __u64 toa_pick(__u64 c, __u64 a, __u64 b)	/* c (0 or 1) ? a : b */
{
	__u64 mask = -c;

	TOA_KEEP(mask);
	return b ^ ((a ^ b) & mask);
}

/* Byte i of the options (0..39); 0 past them. */
static __always_inline __u64 toa_byte(const struct toa_words *o, __u64 i)
{
	__u64 k = i >> 3;
	__u64 w = (o->w0 & -toa_eq(k, 0)) | (o->w1 & -toa_eq(k, 1)) | (o->w2 & -toa_eq(k, 2)) |
		  (o->w3 & -toa_eq(k, 3)) | (o->w4 & -toa_eq(k, 4));

	return (w >> ((i & 7) * 8)) & 0xff;
}

struct toa_kinds {
	__u64 k0, k1, k2, k3;
};

static __always_inline __u64 toa_kind_accepted(const struct toa_kinds *k, __u64 kind)
{
	__u64 q = (kind >> 6) & 3;
	__u64 w = (k->k0 & -toa_eq(q, 0)) | (k->k1 & -toa_eq(q, 1)) | (k->k2 & -toa_eq(q, 2)) |
		  (k->k3 & -toa_eq(q, 3));

	return (w >> (kind & 63)) & 1;
}

/*
 * The TCP header's options, copied four bytes at a time at constant offsets:
 * [skb_data, skb_data_end) is the header (doff * 4 bytes). Returns -1 when the
 * header cannot be read or the segment is not a plain ACK (a TCP Fast Open
 * child is established from the SYN, which is never read).
 *
 * No check here ends the copy early or pins the length to one value: every
 * header length then reaches the walk in one state the verifier proves once.
 * Words past the options are masked to zero without a branch.
 */
static __always_inline int toa_copy_options(struct bpf_sock_ops *skops, struct toa_words *o)
{
	__u8 *data = (__u8 *)(long)skops->skb_data;
	__u8 *end = (__u8 *)(long)skops->skb_data_end;
	__u64 half[TCP_OPTIONS_MAX / 4] = {}, words;
	__u32 doff;

	if (data + TCP_HEADER_LEN > end)
		return -1;
	if (data[13] & TCP_FLAG_SYN)
		return -1;
	doff = data[12] >> 4;
	if (doff < 5)
		return -1;
	words = doff - 5;
	o->len = words * 4;
	/* Option word K (four bytes, in wire order from the low byte up), if the packet has it. */
#define TOA_COPY_WORD(K)									\
	do {											\
		__u8 *p = data + TCP_HEADER_LEN + 4 * (K);					\
		if (p + 4 <= end)								\
			half[K] = (__u64)p[0] | (__u64)p[1] << 8 | (__u64)p[2] << 16 |		\
				  (__u64)p[3] << 24;						\
	} while (0)
	TOA_COPY_WORD(0);
	TOA_COPY_WORD(1);
	TOA_COPY_WORD(2);
	TOA_COPY_WORD(3);
	TOA_COPY_WORD(4);
	TOA_COPY_WORD(5);
	TOA_COPY_WORD(6);
	TOA_COPY_WORD(7);
	TOA_COPY_WORD(8);
	TOA_COPY_WORD(9);
#undef TOA_COPY_WORD
	/* Only the doff * 4 - 20 bytes of options, whatever lies past them. */
#define TOA_HALF(K) (half[K] & -toa_lt(K, words))
	o->w0 = TOA_HALF(0) | TOA_HALF(1) << 32;
	o->w1 = TOA_HALF(2) | TOA_HALF(3) << 32;
	o->w2 = TOA_HALF(4) | TOA_HALF(5) << 32;
	o->w3 = TOA_HALF(6) | TOA_HALF(7) << 32;
	o->w4 = TOA_HALF(8) | TOA_HALF(9) << 32;
#undef TOA_HALF
	return 0;
}

enum toa_verdict { TOA_ABSENT, TOA_FOUND, TOA_MALFORMED };

/*
 * Walk the options as toa.ko does: EOL ends the list, NOP is one byte, every
 * other option has a length of at least 2 that fits in what is left; one
 * option of an accepted kind, of length 8 or 20; anything else is malformed.
 *
 * Written position by position (0..39, each a constant), without branches:
 * `next` is where the next option starts, and a position does something only
 * if it is that one while the walk is still live (no EOL, nothing broken yet,
 * inside the options).
 */
struct toa_walk {
	__u64 next, live, bad, found, at, optlen;
};

/*
 * One position P of the walk. A function of its own (a BPF-to-BPF call), so
 * that the compiler keeps each position's values to itself instead of
 * computing all forty at once beyond the 512-byte stack.
 */
static __attribute__((noinline)) int toa_step(struct toa_walk *w, const struct toa_words *o,
					      const struct toa_kinds *kinds, __u64 p)
{
	__u64 len = o->len;
	__u64 kind = toa_byte(o, p), olen = toa_byte(o, p + 1);
	__u64 start = toa_eq(w->next, p) & w->live & toa_lt(p, len);
	__u64 nop = start & toa_eq(kind, TCPOPT_NOP);
	__u64 opt = start & (toa_eq(kind, TCPOPT_EOL) ^ 1) & (nop ^ 1);
	/* no length byte, a length below 2, or one past the end of the options */
	__u64 broken = opt & ((toa_lt(p + 1, len) ^ 1) | toa_lt(olen, 2) | toa_lt(len - p, olen));
	__u64 good = opt & (broken ^ 1);
	__u64 accepted = good & toa_kind_accepted(kinds, kind);
	__u64 sized = toa_eq(olen, TOA_V4_OPTION_LEN) | toa_eq(olen, TOA_V6_OPTION_LEN);
	__u64 take = accepted & (w->found ^ 1) & sized;

	/* A second accepted option is ambiguous; one of another length is malformed. */
	w->bad |= broken | (accepted & (w->found | (sized ^ 1)));
	/* EOL (a start that is neither NOP nor an option) ends the walk, as does anything broken. */
	w->live &= ((start & (nop ^ 1) & (opt ^ 1)) | w->bad) ^ 1;
	w->at = toa_pick(take, p, w->at);
	w->optlen = toa_pick(take, olen, w->optlen);
	w->found |= take;
	w->next = toa_pick(nop, p + 1, toa_pick(good, p + olen, w->next));
	return 0;
}

static __always_inline int toa_walk(const struct toa_words *o, const struct toa_kinds *kinds, __u32 *at,
				    __u32 *optlen_out)
{
	struct toa_walk w = { .live = 1 };
	__u64 p;

#pragma clang loop unroll(disable)
	for (p = 0; p < TCP_OPTIONS_MAX; p++)
		toa_step(&w, o, kinds, p);
	if (w.bad)
		return TOA_MALFORMED;
	if (!w.found)
		return TOA_ABSENT;
	*at = w.at;
	*optlen_out = w.optlen;
	return TOA_FOUND;
}

/* Four option bytes from `at`, kept in network order (a call of its own, for the stack's sake). */
static __attribute__((noinline)) __u32 toa_be32_at(const struct toa_words *o, __u64 at)
{
	return bpf_htonl(toa_byte(o, at) << 24 | toa_byte(o, at + 1) << 16 | toa_byte(o, at + 2) << 8 |
			 toa_byte(o, at + 3));
}

/*
 * No balancer sends these as a client: port 0, unspecified, loopback (127/8,
 * ::1, ::ffff:127.0.0.0/104), multicast (224/4, ff00::/8), 255.255.255.255.
 * Branch-free as the walk, for the same reason: one path for the verifier.
 */
static __always_inline __u64 toa_usable(const struct toa_sk *a)
{
	__u64 v4 = bpf_ntohl(a->addr[0]), last = bpf_ntohl(a->addr[3]);
	__u64 ok4 = (toa_eq(v4, 0) | toa_eq(v4 >> 24, 127) | toa_eq(v4 >> 28, 0xe) | toa_eq(v4, 0xffffffff)) ^ 1;
	__u64 high_zero = toa_eq(a->addr[0], 0) & toa_eq(a->addr[1], 0);
	__u64 mapped_loopback = high_zero & toa_eq(bpf_ntohl(a->addr[2]), 0xffff) & toa_eq(last >> 24, 127);
	__u64 any_or_loopback = high_zero & toa_eq(a->addr[2], 0) & (toa_eq(last, 0) | toa_eq(last, 1));
	__u64 ok6 = (mapped_loopback | any_or_loopback | toa_eq(v4 >> 24, 0xff)) ^ 1;

	return (toa_eq(a->port, 0) ^ 1) & toa_pick(toa_eq(a->family, AF_INET), ok4, ok6);
}

/* Is the ACK's IP source (the child's remote address) in the trusted list? */
static __always_inline int toa_source_trusted(struct bpf_sock_ops *skops, const struct toa_config *cfg)
{
	__u32 family = skops->family, ip4 = skops->remote_ip4;
	__u32 ip6[4] = { skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2], skops->remote_ip6[3] };

	/* Read here, each at its own offset: no context field through a pointer the compiler computed. */
	TOA_KEEP(ip4);
	TOA_KEEP(ip6[3]);
	if (cfg->trust_any)
		return 1;
	/* An IPv4 ACK, v4-mapped children of IPv6 listeners included, matches IPv4 entries only. */
	if (family == AF_INET || (!ip6[0] && !ip6[1] && ip6[2] == bpf_htonl(0xffff))) {
		struct toa_lpm4 key = { .prefixlen = 32 };
		__u32 v4 = family == AF_INET ? ip4 : ip6[3];

		__builtin_memcpy(key.addr, &v4, 4);
		return bpf_map_lookup_elem(&toa_trusted4, &key) != NULL;
	} else {
		struct toa_lpm6 key = { .prefixlen = 128 };

		__builtin_memcpy(key.addr, ip6, 16);
		return bpf_map_lookup_elem(&toa_trusted6, &key) != NULL;
	}
}

/* The handshake's final ACK reached the child: read it once, as toa.ko's syn_recv hook does. */
static __always_inline void toa_passive_established(struct bpf_sock_ops *skops)
{
	struct toa_words o;
	struct toa_kinds kinds;
	struct toa_sk addr = {}, *stored;
	struct toa_config *cfg;
	struct bpf_sock *sk;
	__u32 zero = 0, at = 0, optlen = 0;
	int verdict;

	cfg = bpf_map_lookup_elem(&toa_config, &zero);
	if (!cfg)
		return;
	if (toa_copy_options(skops, &o) < 0 || !o.len)
		return;
	kinds.k0 = cfg->kinds[0];
	kinds.k1 = cfg->kinds[1];
	kinds.k2 = cfg->kinds[2];
	kinds.k3 = cfg->kinds[3];
	verdict = toa_walk(&o, &kinds, &at, &optlen);
	if (verdict == TOA_ABSENT)
		return;
	/* Not from the balancer: nothing in the list is believed, broken or not. */
	if (!toa_source_trusted(skops, cfg)) {
		toa_add(TOA_UNTRUSTED_IGNORED, 1);
		return;
	}
	if (verdict == TOA_FOUND) {
		addr.port = bpf_htons(toa_byte(&o, at + 2) << 8 | toa_byte(&o, at + 3));
		addr.addr[0] = toa_be32_at(&o, at + 4);
		if (optlen == TOA_V6_OPTION_LEN) {
			addr.family = AF_INET6;
			addr.addr[1] = toa_be32_at(&o, at + 8);
			addr.addr[2] = toa_be32_at(&o, at + 12);
			addr.addr[3] = toa_be32_at(&o, at + 16);
		} else {
			addr.family = AF_INET;
		}
		if (!toa_usable(&addr))
			verdict = TOA_MALFORMED;
	}
	if (verdict == TOA_MALFORMED) {
		toa_add(TOA_MALFORMED_IGNORED, 1);
		return;
	}
	toa_add(addr.family == AF_INET ? TOA_V4_OPTIONS_SEEN : TOA_V6_OPTIONS_SEEN, 1);
	if (addr.family == AF_INET6 && skops->family == AF_INET) {
		toa_add(TOA_V6_ON_V4_IGNORED, 1);
		return;
	}
	sk = skops->sk;
	if (!sk)
		return;
	stored = bpf_sk_storage_get(&toa_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!stored) {
		/* Under memory pressure the connection keeps the balancer's address, counted. */
		toa_add(TOA_ALLOC_FAILED, 1);
		return;
	}
	stored->addr[0] = addr.addr[0];
	stored->addr[1] = addr.addr[1];
	stored->addr[2] = addr.addr[2];
	stored->addr[3] = addr.addr[3];
	stored->port = addr.port;
	stored->family = addr.family;
	if (!stored->live) {
		stored->live = 1;
		toa_add(TOA_ENTRIES_LIVE, 1);
	}
	/* Tell us when it closes, to count it out of entries_live. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void toa_state_change(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct toa_sk *stored;

	if (skops->args[1] != BPF_TCP_CLOSE || !sk)
		return;
	stored = bpf_sk_storage_get(&toa_sk, sk, 0, 0);
	if (stored && stored->live) {
		stored->live = 0;
		toa_add(TOA_ENTRIES_LIVE, -1);
	}
}

SEC("sockops")
int toa_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		toa_passive_established(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		toa_state_change(skops);
		break;
	}
	return 1;
}

SEC("cgroup/getpeername4")
int toa_peer4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct toa_sk *stored;

	if (!sk)
		return 1;
	stored = bpf_sk_storage_get(&toa_sk, sk, 0, 0);
	/* An IPv6 address on an IPv4 socket was never stored (v6_on_v4_ignored). */
	if (!stored || stored->family != AF_INET)
		return 1;
	ctx->user_ip4 = stored->addr[0];
	ctx->user_port = stored->port;
	toa_add(TOA_ADDRESSES_RETURNED, 1);
	return 1;
}

SEC("cgroup/getpeername6")
int toa_peer6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct toa_sk *stored;

	if (!sk)
		return 1;
	stored = bpf_sk_storage_get(&toa_sk, sk, 0, 0);
	if (!stored || !stored->family)
		return 1;
	if (stored->family == AF_INET) {
		/* An IPv4 client of an IPv6 socket: ::ffff:a.b.c.d */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = stored->addr[0];
	} else {
		ctx->user_ip6[0] = stored->addr[0];
		ctx->user_ip6[1] = stored->addr[1];
		ctx->user_ip6[2] = stored->addr[2];
		ctx->user_ip6[3] = stored->addr[3];
	}
	ctx->user_port = stored->port;
	toa_add(TOA_ADDRESSES_RETURNED, 1);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
