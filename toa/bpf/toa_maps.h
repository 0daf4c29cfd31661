/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What toa.bpf.c's programs and the toa-bpf loader share: the maps' keys and
 * values. Plain UAPI types only, so that both the BPF target and the host's
 * C compiler read the same layout.
 */
#ifndef TOA_MAPS_H
#define TOA_MAPS_H

#include <linux/types.h>

/* The counters of /proc/net/toa_stats, in its order (probe_missed is the module's own). */
enum toa_counter {
	TOA_V4_OPTIONS_SEEN,
	TOA_V6_OPTIONS_SEEN,
	TOA_ADDRESSES_RETURNED,
	TOA_MALFORMED_IGNORED,
	TOA_V6_ON_V4_IGNORED,
	TOA_UNTRUSTED_IGNORED,
	TOA_ENTRIES_LIVE,
	TOA_ALLOC_FAILED,
	TOA_COUNTER_COUNT
};

#define TOA_MAX_KINDS 4
#define TOA_MAX_TRUSTED 16

/* One trusted entry as given, for reading back (the programs match with the tries). */
struct toa_cidr {
	__u8 family;		/* AF_INET or AF_INET6 */
	__u8 prefix;
	__u8 pad[2];
	__u8 addr[16];		/* network order; IPv4 in the first four bytes */
};

/* Key 0 of the config map; written by the loader only (toa-bpf attach, toa-bpf set). */
struct toa_config {
	__u64 kinds[4];		/* bitmap of the accepted option kinds */
	__u32 trust_any;	/* 1: trusted is empty, every source is believed */
	__u32 nr_kinds;
	__u8 kind_list[TOA_MAX_KINDS];	/* as given, for reading back */
	__u32 nr_trusted;
	struct toa_cidr trusted[TOA_MAX_TRUSTED];	/* as given, for reading back */
};

/* Keys of the trusted tries (BPF_MAP_TYPE_LPM_TRIE): prefix length, then the address. */
struct toa_lpm4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct toa_lpm6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* What a child socket remembers: the client address of its handshake's TOA option. */
struct toa_sk {
	__u32 addr[4];		/* network order; IPv4 in addr[0] */
	__u16 port;		/* network order */
	__u8 family;		/* AF_INET or AF_INET6 */
	__u8 live;		/* counted in entries_live until the connection closes */
};

#endif /* TOA_MAPS_H */
