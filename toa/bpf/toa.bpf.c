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

/* Byte i (0..39) of the options; 0 past them (the caller checks against len). */
static __always_inline __u32 toa_byte(const struct toa_words *o, __u32 i)
{
	__u64 w;

	if (i < 8)
		w = o->w0;
	else if (i < 16)
		w = o->w1;
	else if (i < 24)
		w = o->w2;
	else if (i < 32)
		w = o->w3;
	else if (i < 40)
		w = o->w4;
	else
		return 0;
	return (w >> ((i & 7) * 8)) & 0xff;
}

struct toa_kinds {
	__u64 k0, k1, k2, k3;
};

static __always_inline int toa_kind_accepted(const struct toa_kinds *k, __u32 kind)
{
	__u64 w;

	if (kind < 64)
		w = k->k0;
	else if (kind < 128)
		w = k->k1;
	else if (kind < 192)
		w = k->k2;
	else
		w = k->k3;
	return (w >> (kind & 63)) & 1;
}

/*
 * The TCP header's options, copied four bytes at a time at constant offsets:
 * [skb_data, skb_data_end) is exactly the header (doff * 4 bytes). Returns -1
 * when the header cannot be read or the segment is not a plain ACK (a TCP
 * Fast Open child is established from the SYN, which is never read).
 */
static __always_inline int toa_copy_options(struct bpf_sock_ops *skops, struct toa_words *o)
{
	__u8 *data = (__u8 *)(long)skops->skb_data;
	__u8 *end = (__u8 *)(long)skops->skb_data_end;
	__u32 doff, words;

	if (data + TCP_HEADER_LEN > end)
		return -1;
	if (data[13] & TCP_FLAG_SYN)
		return -1;
	doff = data[12] >> 4;
	if (doff < 5)
		return -1;
	o->len = (doff - 5) * 4;
	words = doff - 5;
	o->w0 = o->w1 = o->w2 = o->w3 = o->w4 = 0;
	/* Option word K (four bytes) into the low or high half of a 64-bit word, if the header has it. */
#define TOA_COPY_WORD(K, W, SHIFT)								\
	do {											\
		__u8 *p = data + TCP_HEADER_LEN + 4 * (K);					\
		if (words <= (K))								\
			return 0;								\
		if (p + 4 > end)								\
			return -1;								\
		o->W |= ((__u64)p[0] | (__u64)p[1] << 8 | (__u64)p[2] << 16 | (__u64)p[3] << 24) << (SHIFT); \
	} while (0)
	TOA_COPY_WORD(0, w0, 0);
	TOA_COPY_WORD(1, w0, 32);
	TOA_COPY_WORD(2, w1, 0);
	TOA_COPY_WORD(3, w1, 32);
	TOA_COPY_WORD(4, w2, 0);
	TOA_COPY_WORD(5, w2, 32);
	TOA_COPY_WORD(6, w3, 0);
	TOA_COPY_WORD(7, w3, 32);
	TOA_COPY_WORD(8, w4, 0);
	TOA_COPY_WORD(9, w4, 32);
#undef TOA_COPY_WORD
	return 0;
}

enum toa_verdict { TOA_ABSENT, TOA_FOUND, TOA_MALFORMED };

/*
 * Walk the options as toa.ko does: EOL ends the list, NOP is one byte, every
 * other option has a length of at least 2 that fits in what is left; one
 * option of an accepted kind, of length 8 or 20. Every step consumes at least
 * one byte, so 40 steps reach the end of any list.
 */
static __always_inline int toa_walk(const struct toa_words *o, const struct toa_kinds *kinds, __u32 *at,
				    __u32 *optlen_out)
{
	__u32 off = 0, found = 0, step;

	for (step = 0; step < TCP_OPTIONS_MAX; step++) {
		__u32 kind, optlen;

		if (off >= o->len)
			break;
		kind = toa_byte(o, off);
		if (kind == TCPOPT_EOL)
			break;
		if (kind == TCPOPT_NOP) {
			off++;
			continue;
		}
		if (off + 1 >= o->len)
			return TOA_MALFORMED;
		optlen = toa_byte(o, off + 1);
		if (optlen < 2 || optlen > o->len - off)
			return TOA_MALFORMED;
		if (toa_kind_accepted(kinds, kind)) {
			if (found)
				return TOA_MALFORMED;	/* ambiguous */
			if (optlen != TOA_V4_OPTION_LEN && optlen != TOA_V6_OPTION_LEN)
				return TOA_MALFORMED;
			found = 1;
			*at = off;
			*optlen_out = optlen;
		}
		off += optlen;
	}
	return found ? TOA_FOUND : TOA_ABSENT;
}

/* Four option bytes from `at`, kept in network order. */
static __always_inline __u32 toa_be32_at(const struct toa_words *o, __u32 at)
{
	return bpf_htonl(toa_byte(o, at) << 24 | toa_byte(o, at + 1) << 16 | toa_byte(o, at + 2) << 8 |
			 toa_byte(o, at + 3));
}

/* No balancer sends these as a client: port 0, unspecified, loopback, multicast, broadcast. */
static __always_inline int toa_usable(const struct toa_sk *a)
{
	if (!a->port)
		return 0;
	if (a->family == AF_INET) {
		__u32 v4 = bpf_ntohl(a->addr[0]);

		return v4 && (v4 >> 24) != 127 && (v4 >> 28) != 0xe && v4 != 0xffffffff;
	}
	/* ::ffff:127.0.0.0/104 */
	if (!a->addr[0] && !a->addr[1] && a->addr[2] == bpf_htonl(0xffff) && (bpf_ntohl(a->addr[3]) >> 24) == 127)
		return 0;
	/* :: and ::1 */
	if (!a->addr[0] && !a->addr[1] && !a->addr[2] && (!a->addr[3] || a->addr[3] == bpf_htonl(1)))
		return 0;
	return (bpf_ntohl(a->addr[0]) >> 24) != 0xff;
}

/* Is the ACK's IP source (the child's remote address) in the trusted list? */
static __always_inline int toa_source_trusted(struct bpf_sock_ops *skops, const struct toa_config *cfg)
{
	if (cfg->trust_any)
		return 1;
	/* An IPv4 ACK, v4-mapped children of IPv6 listeners included, matches IPv4 entries only. */
	if (skops->family == AF_INET || (skops->remote_ip6[0] == 0 && skops->remote_ip6[1] == 0 &&
					 skops->remote_ip6[2] == bpf_htonl(0xffff))) {
		struct toa_lpm4 key = { .prefixlen = 32 };
		__u32 v4 = skops->family == AF_INET ? skops->remote_ip4 : skops->remote_ip6[3];

		__builtin_memcpy(key.addr, &v4, 4);
		return bpf_map_lookup_elem(&toa_trusted4, &key) != NULL;
	} else {
		struct toa_lpm6 key = { .prefixlen = 128 };
		__u32 v6[4] = { skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
				skops->remote_ip6[3] };

		__builtin_memcpy(key.addr, v6, 16);
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
