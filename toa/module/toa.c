// SPDX-License-Identifier: GPL-2.0
/*
 * toa.ko - TCP Option Address.
 *
 * A layer-4 load balancer puts the real client address in a TCP option of the
 * handshake's final ACK. This module reads that option from the skb handed to
 * tcp_v{4,6}_syn_recv_sock, remembers it for the child socket in an RCU hash
 * table keyed by the socket pointer, writes it into the result of
 * inet{,6}_getname when the peer address is asked for (getpeername, accept),
 * and forgets it in inet_sock_destruct, the final destructor of every inet
 * socket. The hooks are ftrace callbacks that redirect a call to a wrapper of
 * ours, as livepatch does, where the kernel allows it, and kprobes and
 * kretprobes elsewhere (see "how: ftrace or kretprobes"). Only the kernel's
 * own patching (ftrace, kprobes) touches its text; no read-only table is
 * written.
 *
 * The option is believed only from an IP source in the `trusted` list (the
 * balancer's addresses; empty: from anyone). Counters are kept per network
 * namespace.
 *
 * Written against the newest kernel API; toa_compat.h adapts older kernels.
 */
#define pr_fmt(fmt) "TOA: " fmt

#include <linux/hash.h>
#include <linux/ctype.h>
#include <linux/delay.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/inet.h>
#include <linux/init.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/kprobes.h>
#include <linux/log2.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/proc_fs.h>
#include <linux/rcupdate.h>
#include <linux/seq_file.h>
#include <linux/seq_file_net.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/vmalloc.h>
#include <net/inet_common.h>
#include <net/ipv6.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>
#include <net/sock.h>
#include <net/tcp.h>

#include "toa_compat.h"

#define TOA_MAX_KINDS 4
#define TOA_V4_OPTION_LEN 8	/* kind, len, be16 port, be32 address */
#define TOA_V6_OPTION_LEN 20	/* kind, len, be16 port, 16-byte address */

static int kinds[TOA_MAX_KINDS] = { 254, 253 };
static unsigned int nr_kinds = 2;
module_param_array(kinds, int, &nr_kinds, 0444);
MODULE_PARM_DESC(kinds, "TCP option kinds that carry the client address (2..255, at most 4; default 254,253)");

static DECLARE_BITMAP(accepted_kinds, 256);

/* ---------- the address table ---------- */

/*
 * One bucket per 128 KiB of memory, as the kernel sizes its own table of TCP
 * connections (every entry belongs to one), within 2^10..2^20 buckets; or
 * table_bits at load. A bucket is 16 bytes: 16 MiB at most.
 */
#define TOA_TABLE_BITS_MIN 8
#define TOA_TABLE_BITS_AUTO_MIN 10
#define TOA_TABLE_BITS_MAX 20
#define TOA_TABLE_BYTES_PER_BUCKET (128 * 1024)

static unsigned int table_bits;
module_param(table_bits, uint, 0444);
MODULE_PARM_DESC(table_bits, "log2 of the address table's buckets (8..20; default 0: one bucket per 128 KiB of memory, 10..20); reads back the size in use");

/* The client address of one TOA option, network byte order. */
struct toa_addr {
	sa_family_t family;	/* AF_INET or AF_INET6 */
	__be16 port;
	union {
		__be32 v4;
		struct in6_addr v6;
	};
};

struct toa_entry {
	struct hlist_node node;
	const struct sock *sk;
	/* The connection the entry was made for, checked on lookup so that a
	 * stale entry never reaches a new socket allocated at the same address. */
	__addrpair addrpair;
	__portpair portpair;
	struct toa_addr addr;
	/* The counters of the socket's namespace, for getname's count without a net_generic() lookup. */
	struct toa_counters __percpu *counters;
	struct rcu_head rcu;
};

/*
 * Readers (lookup, and the search on teardown) walk a chain under RCU with no
 * lock. The lock covers linking or unlinking one entry already found and
 * recomputing the bucket's signature from its chain (short: about one entry per
 * bucket at most). It is taken with interrupts off because the hooks can run
 * where softirqs cannot be re-enabled: a kprobe handler entered through a
 * breakpoint (int3 on x86 without ftrace, BRK on arm64) runs as an NMI-like
 * exception with interrupts disabled, and some kernels' ftrace kprobe handler
 * disables interrupts too, so spin_lock_bh()'s local_bh_enable() would run
 * softirqs (or warn) there.
 *
 * The signature is the OR of one bit per socket in the chain (toa_slot_of), so
 * a socket that never had an address is told apart without a walk or a lock:
 * its bit is clear, unless another socket in its bucket shares it (1 in 32).
 * It fits beside the lock: a bucket stays 16 bytes.
 */
struct toa_bucket {
	spinlock_t lock;
	u32 sig;
	struct hlist_head head;
};

#define TOA_SIG_SHIFT 5	/* a signature has 1 << TOA_SIG_SHIFT bits */

static struct toa_bucket *toa_table;

/* ---------- per-namespace counters ---------- */

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

static const char *const toa_counter_names[TOA_COUNTER_COUNT] = {
	[TOA_V4_OPTIONS_SEEN] = "v4_options_seen",
	[TOA_V6_OPTIONS_SEEN] = "v6_options_seen",
	[TOA_ADDRESSES_RETURNED] = "addresses_returned",
	[TOA_MALFORMED_IGNORED] = "malformed_ignored",
	[TOA_V6_ON_V4_IGNORED] = "v6_on_v4_ignored",
	[TOA_UNTRUSTED_IGNORED] = "untrusted_ignored",
	[TOA_ENTRIES_LIVE] = "entries_live",
	[TOA_ALLOC_FAILED] = "alloc_failed",
};

struct toa_counters {
	unsigned long value[TOA_COUNTER_COUNT];
};

/*
 * Counters live per network namespace and count in the namespace of the
 * listener (the child's own): /proc/net/toa_stats in a container shows that
 * container's connections and nothing of the host's or its neighbours'.
 */
struct toa_net {
	struct toa_counters __percpu *counters;
};

static unsigned int toa_net_id __read_mostly;

/*
 * A namespace that is being dismantled frees its counters in toa_net_exit,
 * and other subsystems' exit methods that run later may still destroy
 * sockets in it. Counting stops once the namespace is dead: check_net() turns
 * false before cleanup_net() starts, and cleanup_net() waits for RCU readers
 * (preempt-disabled ones too: toa_rcu_read_lock) before any exit method, so a
 * reader that saw it alive finishes first.
 */
static struct toa_counters __percpu *toa_counters_of(const struct net *net)
{
	const struct toa_net *tn;

	if (!check_net(net))
		return NULL;
	tn = net_generic(net, toa_net_id);
	return tn->counters;
}

static void toa_count(const struct net *net, enum toa_counter counter)
{
	struct toa_counters __percpu *counters;

	toa_rcu_read_lock();
	counters = toa_counters_of(net);
	if (counters)
		this_cpu_inc(counters->value[counter]);
	toa_rcu_read_unlock();
}

static void toa_uncount(const struct net *net, enum toa_counter counter)
{
	struct toa_counters __percpu *counters;

	toa_rcu_read_lock();
	counters = toa_counters_of(net);
	if (counters)
		this_cpu_dec(counters->value[counter]);
	toa_rcu_read_unlock();
}

/* ---------- trusted sources ---------- */

#define TOA_MAX_TRUSTED 16
/* The longest entry: a full IPv6 address with its prefix. */
#define TOA_CIDR_TEXT_MAX (INET6_ADDRSTRLEN + 4)

struct toa_cidr {
	sa_family_t family;	/* AF_INET or AF_INET6 */
	u8 prefix;
	union {
		struct {
			__be32 net;
			__be32 mask;
		} v4;
		struct in6_addr v6;
	};
};

struct toa_trusted {
	struct rcu_head rcu;
	unsigned int count;	/* 0: every source is trusted */
	struct toa_cidr cidr[TOA_MAX_TRUSTED];
};

/*
 * Replaced whole, never changed in place: a reader sees the old list or the
 * new one. NULL (nothing set) is the empty list.
 */
static struct toa_trusted __rcu *toa_trusted;
static DEFINE_MUTEX(toa_trusted_mutex);
/* Set when toa_init succeeds (under toa_trusted_mutex, as the list's writers). */
static bool toa_running;

static void toa_warn_untrusted(void)
{
	pr_warn("trusted is empty: a TOA option is believed from any source, so any client that reaches this host directly can claim any address; set trusted= to the balancer's address range\n");
}

/* One entry: ADDRESS or ADDRESS/PREFIX, IPv4 or IPv6, with no bit set past the prefix. */
static int toa_parse_cidr(const char *text, size_t len, struct toa_cidr *cidr)
{
	char buf[TOA_CIDR_TEXT_MAX + 1];
	const char *why, *end;
	unsigned int max, prefix;
	char *slash;

	if (!len) {
		why = "an empty entry";
		goto bad;
	}
	if (len > TOA_CIDR_TEXT_MAX) {
		why = "too long for an address and prefix";
		goto bad;
	}
	memcpy(buf, text, len);
	buf[len] = '\0';
	slash = strchr(buf, '/');
	if (slash)
		*slash = '\0';
	memset(cidr, 0, sizeof(*cidr));
	if (strchr(buf, ':')) {
		cidr->family = AF_INET6;
		max = 128;
		if (!in6_pton(buf, -1, cidr->v6.s6_addr, -1, &end) || *end) {
			why = "not an IPv6 address";
			goto bad;
		}
	} else {
		const char *c;

		cidr->family = AF_INET;
		max = 32;
		if (!in4_pton(buf, -1, (u8 *)&cidr->v4.net, -1, &end) || *end) {
			why = "not an IPv4 address (a.b.c.d)";
			goto bad;
		}
		/* 010 is 8 to some parsers and 10 to others: refuse the doubt. */
		for (c = buf; *c; c++) {
			if (*c == '0' && (c == buf || c[-1] == '.') && isdigit(c[1])) {
				why = "an IPv4 octet with a leading zero";
				goto bad;
			}
		}
	}
	prefix = max;
	if (slash) {
		const char *digits = slash + 1;
		size_t ndigits = strlen(digits);

		if (!ndigits || ndigits > 3 || strspn(digits, "0123456789") != ndigits ||
		    kstrtouint(digits, 10, &prefix) || prefix > max) {
			why = max == 32 ? "the prefix length is not 0..32" : "the prefix length is not 0..128";
			goto bad;
		}
	}
	cidr->prefix = prefix;
	if (cidr->family == AF_INET) {
		cidr->v4.mask = prefix ? htonl(~0U << (32 - prefix)) : 0;
		if (cidr->v4.net & ~cidr->v4.mask) {
			why = "address bits are set past the prefix length";
			goto bad;
		}
	} else {
		struct in6_addr masked;

		/* A v4-mapped entry would never match: IPv4 ACKs match IPv4 entries. */
		if (prefix >= 96 && ipv6_addr_v4mapped(&cidr->v6)) {
			why = "a v4-mapped IPv6 address (write the IPv4 form)";
			goto bad;
		}
		ipv6_addr_prefix(&masked, &cidr->v6, prefix);
		if (!ipv6_addr_equal(&masked, &cidr->v6)) {
			why = "address bits are set past the prefix length";
			goto bad;
		}
	}
	return 0;

bad:
	pr_err("trusted: bad entry \"%.*s\": %s\n", (int)min_t(size_t, len, 64), text, why);
	return -EINVAL;
}

/* A comma-separated list of at most TOA_MAX_TRUSTED entries; empty clears it. */
static int toa_parse_trusted(const char *val, struct toa_trusted *list)
{
	size_t len = strlen(val);
	const char *end;

	if (len && val[len - 1] == '\n')	/* as echo writes it */
		len--;
	end = val + len;
	list->count = 0;
	while (len) {
		const char *comma = memchr(val, ',', end - val);
		size_t entry_len = (comma ? comma : end) - val;
		int err;

		if (list->count == TOA_MAX_TRUSTED) {
			pr_err("trusted: more than %d entries, from \"%.*s\"\n", TOA_MAX_TRUSTED,
			       (int)min_t(size_t, end - val, 64), val);
			return -EINVAL;
		}
		err = toa_parse_cidr(val, entry_len, &list->cidr[list->count]);
		if (err)
			return err;
		list->count++;
		if (!comma)
			break;
		val = comma + 1;
		if (val == end) {	/* a trailing comma: an empty last entry */
			pr_err("trusted: bad entry \"\": an empty entry\n");
			return -EINVAL;
		}
	}
	return 0;
}

static int toa_trusted_set(const char *val, const struct kernel_param *kp)
{
	struct toa_trusted *fresh, *old;
	int err;

	fresh = kzalloc(sizeof(*fresh), GFP_KERNEL);
	if (!fresh)
		return -ENOMEM;
	err = toa_parse_trusted(val, fresh);
	if (err) {
		kfree(fresh);	/* the list in use stays */
		return err;
	}
	mutex_lock(&toa_trusted_mutex);
	old = rcu_dereference_protected(toa_trusted, lockdep_is_held(&toa_trusted_mutex));
	rcu_assign_pointer(toa_trusted, fresh);
	if (!fresh->count && toa_running)
		toa_warn_untrusted();
	mutex_unlock(&toa_trusted_mutex);
	if (old)
		kfree_rcu(old, rcu);
	return 0;
}

/* The list in canonical form: network/prefix, comma-separated, in the order given. */
static int toa_trusted_get(char *buffer, const struct kernel_param *kp)
{
	const struct toa_trusted *list;
	unsigned int i;
	int len = 0;

	rcu_read_lock();
	list = rcu_dereference(toa_trusted);
	for (i = 0; list && i < list->count; i++) {
		const struct toa_cidr *cidr = &list->cidr[i];

		if (cidr->family == AF_INET)
			len += scnprintf(buffer + len, PAGE_SIZE - len, "%s%pI4/%u", i ? "," : "",
					 &cidr->v4.net, cidr->prefix);
		else
			len += scnprintf(buffer + len, PAGE_SIZE - len, "%s%pI6c/%u", i ? "," : "",
					 &cidr->v6, cidr->prefix);
	}
	rcu_read_unlock();
	return len + scnprintf(buffer + len, PAGE_SIZE - len, "\n");
}

/* Called when the module is freed, also after a failed load: nothing reads the list then. */
static void toa_trusted_free(void *arg)
{
	kfree(rcu_dereference_protected(toa_trusted, 1));
	RCU_INIT_POINTER(toa_trusted, NULL);
}

static const struct kernel_param_ops toa_trusted_ops = {
	.set = toa_trusted_set,
	.get = toa_trusted_get,
	.free = toa_trusted_free,
};
module_param_cb(trusted, &toa_trusted_ops, NULL, 0644);
MODULE_PARM_DESC(trusted, "sources (the balancer) whose TOA options are believed: up to 16 IPv4/IPv6 addresses or CIDRs, comma-separated (default empty: any source, with a warning); writable at run time");

/* From here on a list emptied at run time warns as the load did. */
static void toa_trusted_start(void)
{
	const struct toa_trusted *list;

	mutex_lock(&toa_trusted_mutex);
	toa_running = true;
	list = rcu_dereference_protected(toa_trusted, lockdep_is_held(&toa_trusted_mutex));
	if (!list || !list->count)
		toa_warn_untrusted();
	mutex_unlock(&toa_trusted_mutex);
}

/* Is the IP source of @skb (the balancer's side of the handshake) in the list? */
static bool toa_source_trusted(const struct sk_buff *skb)
{
	bool v4 = skb->protocol == htons(ETH_P_IP);
	const struct toa_trusted *list;
	bool trusted = false;
	unsigned int i;

	rcu_read_lock();
	list = rcu_dereference(toa_trusted);
	if (!list || !list->count) {
		trusted = true;
		goto out;
	}
	/* An IPv4 ACK (v4-mapped children included) matches IPv4 entries only; IPv6 likewise. */
	for (i = 0; i < list->count && !trusted; i++) {
		const struct toa_cidr *cidr = &list->cidr[i];

		if (v4 && cidr->family == AF_INET)
			trusted = !((ip_hdr(skb)->saddr ^ cidr->v4.net) & cidr->v4.mask);
		else if (!v4 && cidr->family == AF_INET6)
			trusted = ipv6_prefix_equal(&ipv6_hdr(skb)->saddr, &cidr->v6, cidr->prefix);
	}
out:
	rcu_read_unlock();
	return trusted;
}

/* ---------- reading the option ---------- */

enum toa_verdict { TOA_ABSENT, TOA_FOUND, TOA_MALFORMED };

/*
 * Whether a balancer could have sent this client address: never port 0, the
 * unspecified address, loopback (127/8, ::1, ::ffff:127.0.0.0/104),
 * multicast or the broadcast address. A claim of one of those is a forgery
 * aimed at services that trust local or special sources.
 */
static bool toa_addr_usable(const struct toa_addr *addr)
{
	if (!addr->port)
		return false;
	if (addr->family == AF_INET)
		return addr->v4 && !ipv4_is_loopback(addr->v4) && !ipv4_is_multicast(addr->v4) &&
		       !ipv4_is_lbcast(addr->v4);
	if (ipv6_addr_v4mapped(&addr->v6) && ipv4_is_loopback(addr->v6.s6_addr32[3]))
		return false;
	return !ipv6_addr_any(&addr->v6) && !ipv6_addr_loopback(&addr->v6) && addr->v6.s6_addr[0] != 0xff;
}

/* Walk a TCP options area and extract the one accepted TOA option in it. */
static enum toa_verdict toa_parse_options(const u8 *opt, unsigned int len, struct toa_addr *addr)
{
	unsigned int found = 0;

	while (len) {
		u8 kind = opt[0], optlen;

		if (kind == TCPOPT_EOL)
			break;
		if (kind == TCPOPT_NOP) {
			opt++;
			len--;
			continue;
		}
		if (len < 2)
			return TOA_MALFORMED;
		optlen = opt[1];
		if (optlen < 2 || optlen > len)
			return TOA_MALFORMED;
		if (test_bit(kind, accepted_kinds)) {
			if (++found > 1)
				return TOA_MALFORMED;	/* ambiguous */
			/* The length decides what is read: nothing past the option. */
			if (optlen == TOA_V4_OPTION_LEN) {
				addr->family = AF_INET;
				memcpy(&addr->v4, opt + 4, sizeof(addr->v4));
			} else if (optlen == TOA_V6_OPTION_LEN) {
				addr->family = AF_INET6;
				memcpy(&addr->v6, opt + 4, sizeof(addr->v6));
			} else {
				return TOA_MALFORMED;
			}
			memcpy(&addr->port, opt + 2, sizeof(addr->port));
		}
		opt += optlen;
		len -= optlen;
	}
	if (!found)
		return TOA_ABSENT;
	return toa_addr_usable(addr) ? TOA_FOUND : TOA_MALFORMED;
}

/* The handshake ACK that creates a child of @listener: does it carry a usable TOA? */
static bool toa_read_ack(const struct sock *listener, const struct sk_buff *skb, struct toa_addr *addr)
{
	const struct tcphdr *th = tcp_hdr(skb);
	const struct net *net = sock_net(listener);
	enum toa_verdict verdict;

	/*
	 * Only the handshake's final ACK carries the balancer's option: with TCP
	 * Fast Open the child is created from the client's SYN, which is never read.
	 */
	if (th->syn)
		return false;
	/* tcp_v{4,6}_rcv pulled doff * 4 bytes: the options are linear. */
	if (th->doff * 4 <= sizeof(*th))
		return false;
	verdict = toa_parse_options((const u8 *)(th + 1), th->doff * 4 - sizeof(*th), addr);
	if (verdict == TOA_ABSENT)
		return false;
	/* Not from the balancer: nothing in the list is believed, broken or not. */
	if (!toa_source_trusted(skb)) {
		toa_count(net, TOA_UNTRUSTED_IGNORED);
		return false;
	}
	if (verdict == TOA_MALFORMED) {
		toa_count(net, TOA_MALFORMED_IGNORED);
		return false;
	}
	toa_count(net, addr->family == AF_INET ? TOA_V4_OPTIONS_SEEN : TOA_V6_OPTIONS_SEEN);
	if (addr->family == AF_INET6 && listener->sk_family == AF_INET) {
		toa_count(net, TOA_V6_ON_V4_IGNORED);
		return false;
	}
	return true;
}

/* ---------- remembering and forgetting ---------- */

/*
 * Where @sk's entry would be: its bucket, and its bit in the bucket's
 * signature. Both come from one multiplicative hash of the pointer: the bucket
 * from its top table_bits bits, the bit from the TOA_SIG_SHIFT bits below.
 */
struct toa_slot {
	struct toa_bucket *bucket;
	u32 bit;
};

static __always_inline struct toa_slot toa_slot_of(const struct sock *sk)
{
	u32 hash = hash_ptr(sk, table_bits + TOA_SIG_SHIFT);

	return (struct toa_slot){
		.bucket = &toa_table[hash >> TOA_SIG_SHIFT],
		.bit = 1U << (hash & ((1U << TOA_SIG_SHIFT) - 1)),
	};
}

/* False: @sk has no entry, told without a walk or a lock. */
static __always_inline bool toa_may_have_entry(struct toa_slot slot)
{
	return READ_ONCE(slot.bucket->sig) & slot.bit;
}

/* The entry of @sk; the caller holds rcu_read_lock() or toa_rcu_read_lock(). */
static __always_inline struct toa_entry *toa_find(struct toa_slot slot, const struct sock *sk)
{
	struct toa_entry *entry;

	if (!toa_may_have_entry(slot))
		return NULL;
	hlist_for_each_entry_rcu(entry, &slot.bucket->head, node) {
		if (entry->sk == sk)
			return entry;
	}
	return NULL;
}

/* The bucket's signature from the chain it holds; under the bucket's lock. */
static void toa_resign(struct toa_bucket *bucket)
{
	struct toa_entry *entry;
	u32 sig = 0;

	hlist_for_each_entry(entry, &bucket->head, node)
		sig |= toa_slot_of(entry->sk).bit;
	WRITE_ONCE(bucket->sig, sig);
}

/* Unlink an entry found under RCU (still held); true if this call removed it. */
static bool toa_unlink(struct toa_slot slot, struct toa_entry *entry)
{
	unsigned long flags;
	bool unlinked = false;

	spin_lock_irqsave(&slot.bucket->lock, flags);
	if (!hlist_unhashed(&entry->node)) {
		hlist_del_init_rcu(&entry->node);
		toa_resign(slot.bucket);
		unlinked = true;
	}
	spin_unlock_irqrestore(&slot.bucket->lock, flags);
	if (unlinked)
		kfree_rcu(entry, rcu);
	return unlinked;
}

static void toa_remember(const struct sock *sk, const struct toa_addr *addr)
{
	struct toa_slot slot = toa_slot_of(sk);
	struct toa_entry *entry, *stale;
	unsigned long flags;

	/* Under memory pressure the connection keeps the balancer's address, counted, not logged. */
	entry = kmalloc(sizeof(*entry), GFP_ATOMIC | __GFP_NOWARN);
	if (!entry) {
		toa_count(sock_net(sk), TOA_ALLOC_FAILED);
		return;
	}
	entry->sk = sk;
	entry->addrpair = sk->sk_addrpair;
	entry->portpair = sk->sk_portpair;
	entry->addr = *addr;

	rcu_read_lock();
	entry->counters = toa_counters_of(sock_net(sk));
	/*
	 * A socket that died while its destructor hook missed (probe_missed) left
	 * an entry that must not stay beside the new one. Its namespace's
	 * entries_live is left as it was: that namespace may be gone.
	 */
	stale = toa_find(slot, sk);
	if (stale)
		toa_unlink(slot, stale);
	spin_lock_irqsave(&slot.bucket->lock, flags);
	hlist_add_head_rcu(&entry->node, &slot.bucket->head);
	/*
	 * Published before the child is: nobody can ask about @sk or free it
	 * until syn_recv_sock has returned it and the handshake has queued it.
	 */
	WRITE_ONCE(slot.bucket->sig, slot.bucket->sig | slot.bit);
	spin_unlock_irqrestore(&slot.bucket->lock, flags);
	rcu_read_unlock();
	toa_count(sock_net(sk), TOA_ENTRIES_LIVE);
}

/* Every TCP socket's teardown: without its signature bit, no walk and no lock. */
static void toa_forget(const struct sock *sk)
{
	struct toa_slot slot = toa_slot_of(sk);
	struct toa_entry *entry;

	if (!toa_may_have_entry(slot))
		return;
	rcu_read_lock();
	entry = toa_find(slot, sk);
	if (entry && toa_unlink(slot, entry))
		toa_uncount(sock_net(sk), TOA_ENTRIES_LIVE);
	rcu_read_unlock();
}

/* ---------- what the hooks do, whichever mechanism calls them ---------- */

/*
 * Around tcp_v{4,6}_syn_recv_sock(listener, skb, ...): before it, toa_read_ack()
 * reads the ACK; after it, the address is remembered for the child it made.
 */
static void toa_syn_recv_done(struct sock *child, const struct toa_addr *addr)
{
	if (child)
		toa_remember(child, addr);
}

static __always_inline void toa_write_sockaddr(struct sockaddr *uaddr, const struct toa_addr *addr)
{
	if (uaddr->sa_family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)uaddr;

		sin->sin_port = addr->port;
		sin->sin_addr.s_addr = addr->v4;
	} else {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)uaddr;

		sin6->sin6_port = addr->port;
		if (addr->family == AF_INET)
			ipv6_addr_set_v4mapped(addr->v4, &sin6->sin6_addr);
		else
			sin6->sin6_addr = addr->v6;
		/* Flow label and scope belonged to the balancer's address. */
		sin6->sin6_flowinfo = 0;
		sin6->sin6_scope_id = 0;
	}
}

/*
 * getname (peer) of @sk has filled @uaddr; @slot is @sk's and its signature
 * bit is set. The entry's address is written straight from the table, under
 * the inline RCU reader, if it is still @sk's connection (the four-tuple
 * recorded at the handshake) and fits @uaddr's family. addresses_returned is
 * counted through the entry's own pointer: the namespace's counters are there
 * as long as it is alive (see toa_counters_of).
 */
static __always_inline void toa_rewrite_peer(const struct sock *sk, struct sockaddr *uaddr, struct toa_slot slot)
{
	const struct toa_entry *entry;

	toa_rcu_read_lock();
	hlist_for_each_entry_rcu(entry, &slot.bucket->head, node) {
		if (entry->sk != sk)
			continue;
		if (entry->addrpair == sk->sk_addrpair && entry->portpair == sk->sk_portpair &&
		    (uaddr->sa_family != AF_INET || entry->addr.family == AF_INET)) {
			toa_write_sockaddr(uaddr, &entry->addr);
			if (entry->counters && check_net(sock_net(sk)))
				this_cpu_inc(entry->counters->value[TOA_ADDRESSES_RETURNED]);
		}
		break;
	}
	toa_rcu_read_unlock();
}

/* After inet_getname / inet6_getname(sock, uaddr, peer != 0) returned @ret. */
static __always_inline void toa_getname_done(struct socket *sock, struct sockaddr *uaddr, int ret)
{
	const struct sock *sk = sock->sk;
	struct toa_slot slot;

	if (ret < 0 || !sk)
		return;
	slot = toa_slot_of(sk);
	if (toa_may_have_entry(slot))
		toa_rewrite_peer(sk, uaddr, slot);
}

/* inet_sock_destruct(sk), the last destructor of every inet socket: one compare for UDP. */
static __always_inline bool toa_destruct_wanted(const struct sock *sk)
{
	return sk->sk_protocol == IPPROTO_TCP && toa_may_have_entry(toa_slot_of(sk));
}

/* ---------- how: ftrace or kretprobes, chosen at load ---------- */

enum toa_hooks { TOA_HOOKS_AUTO, TOA_HOOKS_FTRACE, TOA_HOOKS_KRETPROBE };
static const char *const toa_hooks_names[] = { "auto", "ftrace", "kretprobe" };
/* What hooks= asked for, then (once loaded) what is in use: ftrace or kretprobe. */
static int toa_hooks = TOA_HOOKS_AUTO;

static int toa_hooks_set(const char *val, const struct kernel_param *kp)
{
	int i;

	for (i = 0; i < ARRAY_SIZE(toa_hooks_names); i++) {
		if (sysfs_streq(val, toa_hooks_names[i])) {
			toa_hooks = i;
			return 0;
		}
	}
	pr_err("hooks: \"%.*s\" is not auto, ftrace or kretprobe\n", 32, val);
	return -EINVAL;
}

static int toa_hooks_get(char *buffer, const struct kernel_param *kp)
{
	return scnprintf(buffer, PAGE_SIZE, "%s\n", toa_hooks_names[toa_hooks]);
}

static const struct kernel_param_ops toa_hooks_ops = {
	.set = toa_hooks_set,
	.get = toa_hooks_get,
};
module_param_cb(hooks, &toa_hooks_ops, NULL, 0444);
MODULE_PARM_DESC(hooks, "how toa hooks the kernel: auto (default: ftrace where the kernel allows it, else kretprobes), ftrace, kretprobe; reads back the one in use");

/* ---------- kretprobe hooks: the fallback ---------- */

/* tcp_v4_syn_recv_sock(listener, skb, ...): also runs for v4-mapped children of v6 listeners. */
static int toa_v4_syn_recv_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	const struct sock *listener = (const struct sock *)regs_get_kernel_argument(regs, 0);
	const struct sk_buff *skb = (const struct sk_buff *)regs_get_kernel_argument(regs, 1);

	/* Nonzero: no TOA, skip the return handler. */
	return !toa_read_ack(listener, skb, (struct toa_addr *)ri->data);
}

static int toa_v6_syn_recv_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	const struct sk_buff *skb = (const struct sk_buff *)regs_get_kernel_argument(regs, 1);

	/* A v4-mapped ACK goes on to tcp_v4_syn_recv_sock, whose hook takes it. */
	if (skb->protocol == htons(ETH_P_IP))
		return 1;
	return toa_v4_syn_recv_entry(ri, regs);
}

static int toa_syn_recv_return(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	toa_syn_recv_done((struct sock *)regs_return_value(regs), (const struct toa_addr *)ri->data);
	return 0;
}

/* inet_getname / inet6_getname(sock, uaddr, peer): the call being watched. */
struct toa_getname_call {
	struct socket *sock;
	struct sockaddr *uaddr;
};

static int toa_getname_entry(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	struct toa_getname_call *call = (struct toa_getname_call *)ri->data;

	if (!(int)regs_get_kernel_argument(regs, TOA_GETNAME_PEER_ARG))
		return 1;	/* getsockname: nothing to rewrite */
	call->sock = (struct socket *)regs_get_kernel_argument(regs, 0);
	call->uaddr = (struct sockaddr *)regs_get_kernel_argument(regs, 1);
	return 0;
}

static int toa_getname_return(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	const struct toa_getname_call *call = (const struct toa_getname_call *)ri->data;

	toa_getname_done(call->sock, call->uaddr, (int)regs_return_value(regs));
	return 0;
}

static int toa_destruct_pre(struct kprobe *kp, struct pt_regs *regs)
{
	const struct sock *sk = (const struct sock *)regs_get_kernel_argument(regs, 0);

	if (toa_destruct_wanted(sk))
		toa_forget(sk);
	return 0;
}

static struct kprobe toa_destruct_probe = {
	.symbol_name = "inet_sock_destruct",
	.pre_handler = toa_destruct_pre,
};

static struct kretprobe toa_v4_syn_recv_probe = {
	.kp.symbol_name = "tcp_v4_syn_recv_sock",
	.entry_handler = toa_v4_syn_recv_entry,
	.handler = toa_syn_recv_return,
	.data_size = sizeof(struct toa_addr),
};

static struct kretprobe toa_v6_syn_recv_probe = {
	.kp.symbol_name = "tcp_v6_syn_recv_sock",
	.entry_handler = toa_v6_syn_recv_entry,
	.handler = toa_syn_recv_return,
	.data_size = sizeof(struct toa_addr),
};

static struct kretprobe toa_getname_probe = {
	.kp.symbol_name = "inet_getname",
	.entry_handler = toa_getname_entry,
	.handler = toa_getname_return,
	.data_size = sizeof(struct toa_getname_call),
};

static struct kretprobe toa_getname6_probe = {
	.kp.symbol_name = "inet6_getname",
	.entry_handler = toa_getname_entry,
	.handler = toa_getname_return,
	.data_size = sizeof(struct toa_getname_call),
};

/* Readers first, so that an address is never remembered without a way out. */
static struct toa_return_hook {
	struct kretprobe *probe;
	bool optional;	/* IPv6 may be a module that is not loaded */
} toa_return_hooks[] = {
	{ &toa_getname_probe, false },
	{ &toa_getname6_probe, true },
	{ &toa_v4_syn_recv_probe, false },
	{ &toa_v6_syn_recv_probe, true },
};

static struct kretprobe *toa_registered[ARRAY_SIZE(toa_return_hooks)];
static unsigned int toa_nr_registered;

/*
 * A kretprobe takes an instance from a pool allocated at registration for
 * every call in flight, and skips the return handler of a call that finds the
 * pool empty (counted in probe_missed, the caller keeps the balancer's address).
 * Each call in flight is a task inside the function: getname sleeps in
 * lock_sock(), and a listener's backlog runs syn_recv_sock in process context,
 * where it can be preempted. So the pool holds one instance per task the kernel
 * admits by default, threads-max's boot value (RAM / (8 * THREAD_SIZE), as
 * kernel/fork.c sets it; 8192 per GiB with 16 KiB stacks), at least 8 per CPU
 * and at most TOA_KRETPROBE_POOL_MAX (the default of an 8 GiB machine): the pool
 * is allocated whole, with 8 bytes more per instance and CPU on kernels whose
 * kretprobes use rethook's object pool. Only threads-max raised past that, with
 * every thread in getname at once, could still empty it.
 */
#define TOA_KRETPROBE_POOL_MIN 256
#define TOA_KRETPROBE_POOL_MAX 65536

static int toa_kretprobe_pool(void)
{
	unsigned long tasks = totalram_pages() / (8 * (THREAD_SIZE / PAGE_SIZE));

	tasks = max_t(unsigned long, tasks, 8UL * num_possible_cpus());
	return clamp_t(unsigned long, tasks, TOA_KRETPROBE_POOL_MIN, TOA_KRETPROBE_POOL_MAX);
}

static void toa_kretprobe_unregister(void)
{
	/* The destructor hook goes last: until then every entry still has a way out. */
	unregister_kretprobes(toa_registered, toa_nr_registered);
	toa_nr_registered = 0;
	unregister_kprobe(&toa_destruct_probe);
}

static int toa_kretprobe_register(void)
{
	int pool = toa_kretprobe_pool();
	unsigned int i;
	int err;

	err = register_kprobe(&toa_destruct_probe);
	if (err) {
		pr_err("cannot hook %s: %d\n", toa_destruct_probe.symbol_name, err);
		return err;
	}
	for (i = 0; i < ARRAY_SIZE(toa_return_hooks); i++) {
		struct kretprobe *probe = toa_return_hooks[i].probe;

		probe->maxactive = pool;
		err = register_kretprobe(probe);
		if (!err) {
			toa_registered[toa_nr_registered++] = probe;
			continue;
		}
		if (toa_return_hooks[i].optional) {
			pr_warn("%s not hooked (%d): IPv6 connections keep the balancer's address\n",
				probe->kp.symbol_name, err);
			continue;
		}
		pr_err("cannot hook %s: %d\n", probe->kp.symbol_name, err);
		toa_kretprobe_unregister();
		return err;
	}
	pr_info("hooks: kretprobe (pool of %d calls in flight per function)\n", pool);
	return 0;
}

static unsigned long toa_kretprobe_missed(void)
{
	unsigned long missed = toa_destruct_probe.nmissed;
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(toa_return_hooks); i++)
		missed += toa_return_hooks[i].probe->nmissed + toa_return_hooks[i].probe->kp.nmissed;
	return missed;
}

#ifdef TOA_HAVE_FTRACE_HOOKS
/* ---------- ftrace hooks ---------- */

/*
 * As livepatch redirects a function: an ftrace_ops with IPMODIFY, filtered by
 * name, whose callback (run at the function's fentry call) sets the instruction
 * pointer to a wrapper of ours. The wrapper has the function's own signature,
 * calls the original, and does toa's work before and after it with every bit
 * of state on its own stack: no pool, nothing shared to run out of, however
 * many callers sleep inside. Where the wrapper's call to the original passes
 * the fentry call again (through its entry, below), the callback sees its
 * return address in this module and lets it through. The destructor needs no
 * wrapper: a plain callback.
 *
 * Unload: unregister_ftrace_function() returns once no callback runs and none
 * will, so no call is sent to a wrapper any more. A wrapper may still be
 * inside the original (getname asleep in lock_sock) and will come back to
 * module text; the callback counts every call it sends (toa_wrappers_running,
 * per CPU: one can start on one CPU and end on another, only the sum means
 * anything), and the wrapper uncounts as its last act. toa_exit waits for the
 * sum to reach 0, then for the few instructions a wrapper runs after its
 * uncount: synchronize_rcu_tasks() returns once every task has passed a
 * voluntary context switch, and none happens in a wrapper's tail (without
 * PREEMPTION, where there are no tasks-RCU, a tail cannot be preempted and
 * synchronize_rcu() waits for every CPU to leave it). Only then is the module
 * freed.
 *
 * Recursion: the redirecting callbacks are notrace and call nothing (a few
 * loads, an inline option walk, a per-CPU increment), so they cannot come back
 * to themselves and need no guard; ftrace's own would cost each call more than
 * the callback does. The destructor's callback takes locks and frees memory:
 * it runs under ftrace_test_recursion_trylock() (5.11 and later; before, ftrace
 * guards it itself), and a refusal counts in probe_missed.
 *
 * How a wrapper reaches the original (toa_ftrace_call_target): where the CPU
 * enforces IBT, through the function's ENDBR at its start, which passes the
 * fentry call again (the callback lets its own module through); elsewhere just
 * past the fentry call, so the call is not traced twice. call_via_entry=1
 * takes the first way everywhere (the lab proves it on CPUs without CET).
 */

enum toa_ftrace_hook_id {
	TOA_FH_DESTRUCT,
	TOA_FH_GETNAME,
	TOA_FH_GETNAME6,
	TOA_FH_SYN_RECV4,
	TOA_FH_SYN_RECV6,
	TOA_NR_FTRACE_HOOKS
};

struct toa_ftrace_hook {
	struct ftrace_ops ops;
	const char *symbol;
	bool optional;		/* IPv6 may be a module that is not loaded */
	bool registered;
	unsigned long wrapper;	/* 0: a plain callback */
	unsigned long fentry;	/* the hooked call site, taken by the first call */
	unsigned long original;	/* where the wrapper calls the hooked function (toa_ftrace_call_target) */
	unsigned long function;	/* getname: its address, for a direct call (0: none) */
	unsigned long stub;	/* getname: the stub its fentry call is sent to */
	struct ftrace_ops direct_ops;	/* 6.5 and later: the ops a direct call is registered with */
	bool direct;		/* registered as a direct call (else through ops) */
};

static bool call_via_entry;
module_param(call_via_entry, bool, 0444);
MODULE_PARM_DESC(call_via_entry, "ftrace hooks: wrappers call the original through its entry, passing ftrace again (always where the CPU enforces IBT; default elsewhere: just past its fentry call); reads back the way in use");

static bool direct_calls = true;
module_param(direct_calls, bool, 0444);
MODULE_PARM_DESC(direct_calls, "ftrace hooks: exported functions through ftrace direct calls where the kernel has them (default), else through ftrace_ops callbacks like tcp_v6_syn_recv_sock; reads back the way in use");

/* Set at registration, before any callback runs: call_via_entry, or forced by IBT. */
static bool toa_via_entry;

static DEFINE_PER_CPU(long, toa_wrappers_running);
static DEFINE_PER_CPU(unsigned long, toa_ftrace_missed);

/* The types the kernel calls them through, which the wrappers must have (checked in toa_ftrace_register). */
typedef typeof(((struct proto_ops *)NULL)->getname) toa_getname_fn;
typedef typeof(((struct inet_connection_sock_af_ops *)NULL)->syn_recv_sock) toa_syn_recv_fn;
typedef typeof(((struct sock *)NULL)->sk_destruct) toa_destruct_fn;

static void toa_destruct_call(unsigned long ip, unsigned long parent_ip, struct ftrace_ops *op,
			      toa_fregs_t *fregs);
static void toa_getname_redirect(unsigned long ip, unsigned long parent_ip, struct ftrace_ops *op,
				 toa_fregs_t *fregs);
static void toa_syn_recv_redirect(unsigned long ip, unsigned long parent_ip, struct ftrace_ops *op,
				  toa_fregs_t *fregs);
static int toa_inet_getname(struct socket *sock, struct sockaddr *uaddr, int peer);
static int toa_inet6_getname(struct socket *sock, struct sockaddr *uaddr, int peer);
static struct sock *toa_tcp_v4_syn_recv_sock(TOA_SYN_RECV_PARAMS);
static struct sock *toa_tcp_v6_syn_recv_sock(TOA_SYN_RECV_PARAMS);

#ifdef TOA_HAVE_DIRECT_CALLS
/*
 * Direct calls. Where the kernel has ftrace direct calls, the fentry call of
 * a hooked function that the kernel exports (inet_getname, inet6_getname,
 * tcp_v4_syn_recv_sock, inet_sock_destruct) goes straight to a stub of ours:
 * no ftrace_ops callback, no saved registers. The stub drops the return
 * address into the function (its body is not run from there) and jumps to a
 * wrapper with the function's own type, which now stands where the function
 * was called; the wrapper does toa's work and calls the original past its
 * fentry call through a static call (a direct call the kernel patches at
 * load: no retpoline, and no ENDBR needed under IBT). An exported function's
 * address comes from the linker, no symbol lookup. tcp_v6_syn_recv_sock is
 * static: an ftrace_ops hook always. Every call into a wrapper is counted
 * until its last act, as with the ops hooks; a task between the stub and the
 * count has passed no voluntary context switch, so unload waits for tasks-RCU
 * before reading the count as well as after.
 */
#define TOA_DIRECT_STUB(stub, wrapper)							\
	void stub(void);								\
	asm(".pushsection .text, \"ax\", @progbits\n"					\
	    /* aligned: from 6.19 an odd direct-call address means "jmp" to ftrace */	\
	    ".p2align 4\n"								\
	    ".type " #stub ", @function\n"						\
	    #stub ":\n\t"								\
	    TOA_ASM_ENDBR								\
	    "addq $8, %rsp\n\t"								\
	    TOA_ASM_UNWIND_HINT_FUNC "\n\t"						\
	    "jmp " #wrapper "\n\t"							\
	    ".size " #stub ", . - " #stub "\n\t"					\
	    ".popsection\n")

/* One hooked function reached by a direct call: its static call, wrapper and stub. */
#define TOA_DIRECT_HOOK(fn, wrapper, stub)						\
	DEFINE_STATIC_CALL(fn##_original, fn);						\
	TOA_DIRECT_STUB(stub, wrapper)

/* The hook table's fields for a function reached by a direct call. */
#define TOA_DIRECT(fn) .function = (unsigned long)fn, .stub = (unsigned long)toa_##fn##_stub,

#ifdef TOA_DIRECT_INET_GETNAME
int toa_inet_getname_direct(struct socket *sock, struct sockaddr *uaddr, int peer);
TOA_DIRECT_HOOK(inet_getname, toa_inet_getname_direct, toa_inet_getname_stub);
#define TOA_DIRECT_FIELDS_GETNAME TOA_DIRECT(inet_getname)
#endif
#ifdef TOA_DIRECT_INET6_GETNAME
int toa_inet6_getname_direct(struct socket *sock, struct sockaddr *uaddr, int peer);
TOA_DIRECT_HOOK(inet6_getname, toa_inet6_getname_direct, toa_inet6_getname_stub);
#define TOA_DIRECT_FIELDS_GETNAME6 TOA_DIRECT(inet6_getname)
#endif
#ifdef TOA_DIRECT_TCP_V4_SYN_RECV_SOCK
struct sock *toa_tcp_v4_syn_recv_sock_direct(TOA_SYN_RECV_PARAMS);
TOA_DIRECT_HOOK(tcp_v4_syn_recv_sock, toa_tcp_v4_syn_recv_sock_direct, toa_tcp_v4_syn_recv_sock_stub);
#define TOA_DIRECT_FIELDS_SYN_RECV4 TOA_DIRECT(tcp_v4_syn_recv_sock)
#endif
#ifdef TOA_DIRECT_INET_SOCK_DESTRUCT
void toa_inet_sock_destruct_direct(struct sock *sk);
TOA_DIRECT_HOOK(inet_sock_destruct, toa_inet_sock_destruct_direct, toa_inet_sock_destruct_stub);
#define TOA_DIRECT_FIELDS_DESTRUCT TOA_DIRECT(inet_sock_destruct)
#endif
#endif /* TOA_HAVE_DIRECT_CALLS */
#ifndef TOA_DIRECT_FIELDS_GETNAME
#define TOA_DIRECT_FIELDS_GETNAME
#endif
#ifndef TOA_DIRECT_FIELDS_GETNAME6
#define TOA_DIRECT_FIELDS_GETNAME6
#endif
#ifndef TOA_DIRECT_FIELDS_SYN_RECV4
#define TOA_DIRECT_FIELDS_SYN_RECV4
#endif
#ifndef TOA_DIRECT_FIELDS_DESTRUCT
#define TOA_DIRECT_FIELDS_DESTRUCT
#endif

#define TOA_REDIRECT_FLAGS (TOA_FTRACE_SAVE_FLAGS | FTRACE_OPS_FL_IPMODIFY | TOA_FTRACE_PERMANENT | \
			    TOA_FTRACE_UNGUARDED)
#define TOA_CALLBACK_FLAGS (TOA_FTRACE_SAVE_FLAGS | TOA_FTRACE_PERMANENT)

/* In registration order: readers first, so that an address is never remembered without a way out. */
static struct toa_ftrace_hook toa_ftrace_hooks[TOA_NR_FTRACE_HOOKS] = {
	[TOA_FH_DESTRUCT] = {
		.ops = { .func = toa_destruct_call, .flags = TOA_CALLBACK_FLAGS },
		.symbol = "inet_sock_destruct",
		TOA_DIRECT_FIELDS_DESTRUCT
	},
	[TOA_FH_GETNAME] = {
		.ops = { .func = toa_getname_redirect, .flags = TOA_REDIRECT_FLAGS },
		.symbol = "inet_getname",
		.wrapper = (unsigned long)toa_inet_getname,
		TOA_DIRECT_FIELDS_GETNAME
	},
	[TOA_FH_GETNAME6] = {
		.ops = { .func = toa_getname_redirect, .flags = TOA_REDIRECT_FLAGS },
		.symbol = "inet6_getname",
		.optional = true,
		.wrapper = (unsigned long)toa_inet6_getname,
		TOA_DIRECT_FIELDS_GETNAME6
	},
	[TOA_FH_SYN_RECV4] = {
		.ops = { .func = toa_syn_recv_redirect, .flags = TOA_REDIRECT_FLAGS },
		.symbol = "tcp_v4_syn_recv_sock",
		.wrapper = (unsigned long)toa_tcp_v4_syn_recv_sock,
		TOA_DIRECT_FIELDS_SYN_RECV4
	},
	[TOA_FH_SYN_RECV6] = {
		.ops = { .func = toa_syn_recv_redirect, .flags = TOA_REDIRECT_FLAGS },
		.symbol = "tcp_v6_syn_recv_sock",
		.optional = true,
		.wrapper = (unsigned long)toa_tcp_v6_syn_recv_sock,
	},
};

/*
 * Is this call the function @hook wraps? A name could match more than one
 * function (static functions of other files or modules): the first call names
 * the one that is wrapped, and calls of any other are left alone (counted).
 */
static __always_inline bool toa_hook_owns(struct toa_ftrace_hook *hook, unsigned long ip)
{
	unsigned long fentry = READ_ONCE(hook->fentry);

	if (likely(fentry == ip))
		return true;
	if (!fentry && !cmpxchg(&hook->fentry, 0UL, ip))
		return true;
	if (READ_ONCE(hook->fentry) == ip)
		return true;
	this_cpu_inc(toa_ftrace_missed);
	return false;
}

/* Send this call to the hook's wrapper, counted until the wrapper returns. */
static __always_inline void toa_redirect(struct toa_ftrace_hook *hook, unsigned long ip, toa_fregs_t *fregs)
{
	/* Every caller that gets here computes the same target: the first write is as good as any. */
	if (unlikely(!READ_ONCE(hook->original)))
		WRITE_ONCE(hook->original, toa_ftrace_call_target(ip, toa_via_entry));
	this_cpu_inc(toa_wrappers_running);
	toa_fregs_set_ip(fregs, hook->wrapper);
}

/* The last act of every wrapper; no tail call may follow the original's (see toa_getname_redirect). */
static __always_inline void toa_wrapper_done(void)
{
	this_cpu_dec(toa_wrappers_running);
}

static void notrace toa_destruct_call(unsigned long ip, unsigned long parent_ip, struct ftrace_ops *op,
				      toa_fregs_t *fregs)
{
	struct toa_ftrace_hook *hook = container_of(op, struct toa_ftrace_hook, ops);
	const struct sock *sk;
	int bit;

	if (!toa_hook_owns(hook, ip))
		return;
	sk = (const struct sock *)toa_fregs_arg(fregs, 0);
	if (!toa_destruct_wanted(sk))
		return;
	bit = toa_ftrace_trylock(ip, parent_ip);
	if (bit < 0) {
		this_cpu_inc(toa_ftrace_missed);
		return;
	}
	toa_forget(sk);
	toa_ftrace_unlock(bit);
}

/*
 * inet_getname / inet6_getname(sock, uaddr, peer). getsockname (peer 0) and a
 * socket without an address (its signature bit clear) go on untouched: the
 * callback is all they cost. Our wrapper's own call to the original is told by
 * its return address, which is in this module; that is why the wrappers must
 * never tail-call the original (they do work after it, so they cannot).
 */
static void notrace toa_getname_redirect(unsigned long ip, unsigned long parent_ip, struct ftrace_ops *op,
					 toa_fregs_t *fregs)
{
	struct toa_ftrace_hook *hook = container_of(op, struct toa_ftrace_hook, ops);
	const struct socket *sock;
	const struct sock *sk;

	if (!(int)toa_fregs_arg(fregs, TOA_GETNAME_PEER_ARG))
		return;
	sock = (const struct socket *)toa_fregs_arg(fregs, 0);
	sk = sock->sk;
	if (!sk || !toa_may_have_entry(toa_slot_of(sk)))
		return;
	if (!within_module(parent_ip, THIS_MODULE) && toa_hook_owns(hook, ip))
		toa_redirect(hook, ip, fregs);
}

/* Would toa_read_ack() have anything to say about this ACK? No counting here: the wrapper reads it again. */
static bool toa_ack_has_option(const struct sk_buff *skb)
{
	const struct tcphdr *th = tcp_hdr(skb);
	struct toa_addr scratch;

	if (th->syn || th->doff * 4 <= sizeof(*th))
		return false;
	return toa_parse_options((const u8 *)(th + 1), th->doff * 4 - sizeof(*th), &scratch) != TOA_ABSENT;
}

/*
 * tcp_v{4,6}_syn_recv_sock(listener, skb, ...): only an ACK with an accepted
 * kind in its options goes to the wrapper; every other handshake costs the
 * callback alone. A v4-mapped ACK reaching tcp_v6_syn_recv_sock goes on to
 * tcp_v4_syn_recv_sock, whose hook takes it.
 */
static void notrace toa_syn_recv_redirect(unsigned long ip, unsigned long parent_ip, struct ftrace_ops *op,
					  toa_fregs_t *fregs)
{
	struct toa_ftrace_hook *hook = container_of(op, struct toa_ftrace_hook, ops);
	const struct sk_buff *skb;

	if (within_module(parent_ip, THIS_MODULE) || !toa_hook_owns(hook, ip))
		return;
	skb = (const struct sk_buff *)toa_fregs_arg(fregs, 1);
	if (hook == &toa_ftrace_hooks[TOA_FH_SYN_RECV6] && skb->protocol == htons(ETH_P_IP))
		return;
	if (toa_ack_has_option(skb))
		toa_redirect(hook, ip, fregs);
}

static __always_inline toa_getname_fn toa_getname_original(enum toa_ftrace_hook_id id)
{
	return (toa_getname_fn)READ_ONCE(toa_ftrace_hooks[id].original);
}

static int toa_inet_getname(struct socket *sock, struct sockaddr *uaddr, int peer)
{
	int ret = toa_getname_original(TOA_FH_GETNAME)(sock, uaddr, peer);

	toa_getname_done(sock, uaddr, ret);
	toa_wrapper_done();
	return ret;
}

static int toa_inet6_getname(struct socket *sock, struct sockaddr *uaddr, int peer)
{
	int ret = toa_getname_original(TOA_FH_GETNAME6)(sock, uaddr, peer);

	toa_getname_done(sock, uaddr, ret);
	toa_wrapper_done();
	return ret;
}

#ifdef TOA_HAVE_DIRECT_CALLS
/*
 * The direct wrappers: every call of the function comes here (getsockname(),
 * sockets without an address, handshakes without an option too), counted,
 * since the original returns here.
 */
#ifdef TOA_DIRECT_INET_GETNAME
int notrace toa_inet_getname_direct(struct socket *sock, struct sockaddr *uaddr, int peer)
{
	int ret;

	this_cpu_inc(toa_wrappers_running);
	ret = static_call(inet_getname_original)(sock, uaddr, peer);
	if (peer)
		toa_getname_done(sock, uaddr, ret);
	toa_wrapper_done();
	return ret;
}
#endif

#ifdef TOA_DIRECT_INET6_GETNAME
int notrace toa_inet6_getname_direct(struct socket *sock, struct sockaddr *uaddr, int peer)
{
	int ret;

	this_cpu_inc(toa_wrappers_running);
	ret = static_call(inet6_getname_original)(sock, uaddr, peer);
	if (peer)
		toa_getname_done(sock, uaddr, ret);
	toa_wrapper_done();
	return ret;
}
#endif

#ifdef TOA_DIRECT_TCP_V4_SYN_RECV_SOCK
struct sock * notrace toa_tcp_v4_syn_recv_sock_direct(TOA_SYN_RECV_PARAMS)
{
	struct toa_addr addr;
	bool found;
	struct sock *child;

	this_cpu_inc(toa_wrappers_running);
	found = toa_read_ack(sk, skb, &addr);
	child = static_call(tcp_v4_syn_recv_sock_original)(TOA_SYN_RECV_ARGS);
	if (found)
		toa_syn_recv_done(child, &addr);
	toa_wrapper_done();
	return child;
}
#endif

#ifdef TOA_DIRECT_INET_SOCK_DESTRUCT
void notrace toa_inet_sock_destruct_direct(struct sock *sk)
{
	this_cpu_inc(toa_wrappers_running);
	if (toa_destruct_wanted(sk))
		toa_forget(sk);
	static_call(inet_sock_destruct_original)(sk);
	toa_wrapper_done();
}
#endif

/* Point a wrapper's static call past the fentry call, before any call can reach the wrapper. */
static void toa_direct_set_original(struct toa_ftrace_hook *hook, unsigned long original)
{
	switch (hook - toa_ftrace_hooks) {
#ifdef TOA_DIRECT_INET_GETNAME
	case TOA_FH_GETNAME:
		static_call_update(inet_getname_original, (toa_getname_fn)original);
		break;
#endif
#ifdef TOA_DIRECT_INET6_GETNAME
	case TOA_FH_GETNAME6:
		static_call_update(inet6_getname_original, (toa_getname_fn)original);
		break;
#endif
#ifdef TOA_DIRECT_TCP_V4_SYN_RECV_SOCK
	case TOA_FH_SYN_RECV4:
		static_call_update(tcp_v4_syn_recv_sock_original, (toa_syn_recv_fn)original);
		break;
#endif
#ifdef TOA_DIRECT_INET_SOCK_DESTRUCT
	case TOA_FH_DESTRUCT:
		static_call_update(inet_sock_destruct_original, (toa_destruct_fn)original);
		break;
#endif
	}
}

static int toa_direct_hook(struct toa_ftrace_hook *hook)
{
	unsigned long ip = toa_fentry_of(hook->function);
	int err;

	toa_direct_set_original(hook, ip + MCOUNT_INSN_SIZE);
	err = toa_direct_register(&hook->direct_ops, ip, hook->stub);
	if (err)
		return err;
	hook->fentry = ip;
	hook->direct = true;
	hook->registered = true;
	return 0;
}
#endif

static __always_inline toa_syn_recv_fn toa_syn_recv_original(enum toa_ftrace_hook_id id)
{
	return (toa_syn_recv_fn)READ_ONCE(toa_ftrace_hooks[id].original);
}

static struct sock *toa_tcp_v4_syn_recv_sock(TOA_SYN_RECV_PARAMS)
{
	struct toa_addr addr;
	bool found = toa_read_ack(sk, skb, &addr);
	struct sock *child = toa_syn_recv_original(TOA_FH_SYN_RECV4)(TOA_SYN_RECV_ARGS);

	if (found)
		toa_syn_recv_done(child, &addr);
	toa_wrapper_done();
	return child;
}

static struct sock *toa_tcp_v6_syn_recv_sock(TOA_SYN_RECV_PARAMS)
{
	struct toa_addr addr;
	bool found = skb->protocol != htons(ETH_P_IP) && toa_read_ack(sk, skb, &addr);
	struct sock *child = toa_syn_recv_original(TOA_FH_SYN_RECV6)(TOA_SYN_RECV_ARGS);

	if (found)
		toa_syn_recv_done(child, &addr);
	toa_wrapper_done();
	return child;
}

static void toa_ftrace_unhook(struct toa_ftrace_hook *hook)
{
	if (!hook->registered)
		return;
#ifdef TOA_HAVE_DIRECT_CALLS
	if (hook->direct) {
		toa_direct_unregister(&hook->direct_ops, hook->fentry, hook->stub);
		hook->registered = false;
		return;
	}
#endif
	/* Returns once no callback of this ops runs, on any CPU, and none will. */
	unregister_ftrace_function(&hook->ops);
	/* Frees the filter (ftrace_free_filter() is not exported before 6.1). */
	ftrace_set_filter(&hook->ops, NULL, 0, 1);
	hook->registered = false;
}

/* Every call a callback sent to a wrapper has come back out of this module's text. */
static void toa_ftrace_wait_wrappers(void)
{
	unsigned int waited = 0;

#ifdef TOA_HAVE_DIRECT_CALLS
	/* A task between a stub and its wrapper's count (see "Direct getname") passes no voluntary switch. */
	synchronize_rcu_tasks();
#endif
	for (;;) {
		long running = 0;
		int cpu;

		/* Callbacks are over (unregistered): every increment is seen, a missed decrement only overcounts. */
		smp_mb();
		for_each_possible_cpu(cpu)
			running += READ_ONCE(*per_cpu_ptr(&toa_wrappers_running, cpu));
		if (running <= 0)
			break;
		if (++waited == 1000)
			pr_info("unload waits for %ld hooked calls to return\n", running);
		msleep(1);
	}
	/* Past its uncount a wrapper still runs a few instructions: wait for every task to leave them. */
	synchronize_rcu_tasks();
}

static void toa_ftrace_unregister(void)
{
	int i;

	/* Reverse order: the destructor hook goes last, so every entry keeps a way out. */
	for (i = TOA_NR_FTRACE_HOOKS - 1; i >= 0; i--)
		toa_ftrace_unhook(&toa_ftrace_hooks[i]);
	toa_ftrace_wait_wrappers();
}

static int toa_ftrace_hook(struct toa_ftrace_hook *hook)
{
	/* ftrace_set_filter() takes a writable buffer. */
	char name[64];
	int err;

	hook->fentry = 0;
	hook->original = 0;
#ifdef TOA_HAVE_DIRECT_CALLS
	if (hook->function && direct_calls) {
		err = toa_direct_hook(hook);
		if (!err)
			return 0;
		/* For example a BPF trampoline already on it: one direct call per function. */
		pr_info("%s: no direct call (%d): through ftrace_ops\n", hook->symbol, err);
	}
#endif
	strscpy(name, hook->symbol, sizeof(name));
	err = ftrace_set_filter(&hook->ops, (unsigned char *)name, strlen(name), 1);
	if (!err) {
		err = register_ftrace_function(&hook->ops);
		if (err)
			ftrace_set_filter(&hook->ops, NULL, 0, 1);
	}
	hook->registered = !err;
	return err;
}

static int toa_ftrace_register(void)
{
	char direct_names[128];
	int i, err;

	/* The wrappers stand in for the kernel's functions: their types must be the same. */
	BUILD_BUG_ON(!__same_type(&toa_inet_getname, toa_getname_fn));
	BUILD_BUG_ON(!__same_type(&toa_inet6_getname, toa_getname_fn));
	BUILD_BUG_ON(!__same_type(&toa_tcp_v4_syn_recv_sock, toa_syn_recv_fn));
	BUILD_BUG_ON(!__same_type(&toa_tcp_v6_syn_recv_sock, toa_syn_recv_fn));
#ifdef TOA_HAVE_DIRECT_CALLS
#ifdef TOA_DIRECT_INET_GETNAME
	BUILD_BUG_ON(!__same_type(&toa_inet_getname_direct, toa_getname_fn));
#endif
#ifdef TOA_DIRECT_TCP_V4_SYN_RECV_SOCK
	BUILD_BUG_ON(!__same_type(&toa_tcp_v4_syn_recv_sock_direct, toa_syn_recv_fn));
#endif
#ifdef TOA_DIRECT_INET_SOCK_DESTRUCT
	BUILD_BUG_ON(!__same_type(&toa_inet_sock_destruct_direct, toa_destruct_fn));
#endif
#endif

	toa_via_entry = call_via_entry || toa_ibt_enforced();
	call_via_entry = toa_via_entry;
	for (i = 0; i < TOA_NR_FTRACE_HOOKS; i++) {
		struct toa_ftrace_hook *hook = &toa_ftrace_hooks[i];

		err = toa_ftrace_hook(hook);
		if (!err)
			continue;
		if (hook->optional) {
			pr_warn("%s not hooked (%d): IPv6 connections keep the balancer's address\n",
				hook->symbol, err);
			continue;
		}
		pr_err("cannot hook %s through ftrace: %d\n", hook->symbol, err);
		toa_ftrace_unregister();
		return err;
	}
	direct_calls = false;
	direct_names[0] = '\0';
	for (i = 0; i < TOA_NR_FTRACE_HOOKS; i++) {
		if (!toa_ftrace_hooks[i].direct)
			continue;
		direct_calls = true;
		strlcat(direct_names, " ", sizeof(direct_names));
		strlcat(direct_names, toa_ftrace_hooks[i].symbol, sizeof(direct_names));
	}
	pr_info("hooks: ftrace (%s, calls %s; direct calls:%s)\n", TOA_FTRACE_MODE,
		toa_via_entry ? "through the entry" : "past the fentry call",
		direct_calls ? direct_names : " none");
	return 0;
}

static unsigned long toa_ftrace_missed_total(void)
{
	unsigned long missed = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		missed += READ_ONCE(*per_cpu_ptr(&toa_ftrace_missed, cpu));
	return missed;
}
#endif /* TOA_HAVE_FTRACE_HOOKS */

/* ---------- registering the hooks ---------- */

static int toa_register_hooks(void)
{
	int err;

#ifdef TOA_HAVE_FTRACE_HOOKS
	if (toa_hooks != TOA_HOOKS_KRETPROBE) {
		err = toa_ftrace_register();
		if (!err) {
			toa_hooks = TOA_HOOKS_FTRACE;
			return 0;
		}
		if (toa_hooks == TOA_HOOKS_FTRACE)
			return err;
		pr_warn("ftrace hooks failed (%d): using kretprobes\n", err);
	}
#else
	if (toa_hooks == TOA_HOOKS_FTRACE) {
		pr_err("hooks=ftrace: this kernel cannot redirect a call through ftrace (see toa_compat.h); use hooks=auto or hooks=kretprobe\n");
		return -EOPNOTSUPP;
	}
#endif
#ifdef TOA_HAVE_FTRACE_HOOKS
	direct_calls = false;
#endif
	err = toa_kretprobe_register();
	if (!err)
		toa_hooks = TOA_HOOKS_KRETPROBE;
	return err;
}

static void toa_unregister_hooks(void)
{
#ifdef TOA_HAVE_FTRACE_HOOKS
	if (toa_hooks == TOA_HOOKS_FTRACE) {
		toa_ftrace_unregister();
		return;
	}
#endif
	toa_kretprobe_unregister();
}

/* Misses of the hooks themselves: the module's, shown alike in every namespace. */
static unsigned long toa_probe_missed(void)
{
#ifdef TOA_HAVE_FTRACE_HOOKS
	if (toa_hooks == TOA_HOOKS_FTRACE)
		return toa_ftrace_missed_total();
#endif
	return toa_kretprobe_missed();
}

/* ---------- /proc/net/toa_stats ---------- */

static int toa_stats_show(struct seq_file *seq, void *v)
{
	const struct toa_net *tn = net_generic(seq_file_single_net(seq), toa_net_id);
	unsigned long total[TOA_COUNTER_COUNT] = { 0 };
	unsigned int i;
	int cpu;

	for_each_possible_cpu(cpu) {
		const struct toa_counters *counters = per_cpu_ptr(tn->counters, cpu);

		for (i = 0; i < TOA_COUNTER_COUNT; i++)
			total[i] += counters->value[i];
	}
	for (i = 0; i < TOA_COUNTER_COUNT; i++)
		seq_printf(seq, "%s %lu\n", toa_counter_names[i], total[i]);
	seq_printf(seq, "probe_missed %lu\n", toa_probe_missed());
	return 0;
}

static int __net_init toa_net_init(struct net *net)
{
	struct toa_net *tn = net_generic(net, toa_net_id);

	tn->counters = alloc_percpu(struct toa_counters);
	if (!tn->counters)
		return -ENOMEM;
	if (!proc_create_net_single("toa_stats", 0444, net->proc_net, toa_stats_show, NULL)) {
		free_percpu(tn->counters);
		return -ENOMEM;
	}
	return 0;
}

static void __net_exit toa_net_exit(struct net *net)
{
	struct toa_net *tn = net_generic(net, toa_net_id);

	remove_proc_entry("toa_stats", net->proc_net);
	free_percpu(tn->counters);
}

static struct pernet_operations toa_net_ops = {
	.init = toa_net_init,
	.exit = toa_net_exit,
	.id = &toa_net_id,
	.size = sizeof(struct toa_net),
};

/* ---------- load and unload ---------- */

static int __init toa_setup_kinds(void)
{
	unsigned int i;

	if (!nr_kinds) {
		pr_err("kinds: at least one option kind is needed\n");
		return -EINVAL;
	}
	for (i = 0; i < nr_kinds; i++) {
		if (kinds[i] < 2 || kinds[i] > 255) {
			pr_err("kinds: %d is not a TCP option kind that carries data (2..255)\n", kinds[i]);
			return -EINVAL;
		}
		__set_bit(kinds[i], accepted_kinds);
	}
	return 0;
}

static int __init toa_setup_table(void)
{
	unsigned int i;

	if (!table_bits) {
		unsigned long buckets = totalram_pages() / (TOA_TABLE_BYTES_PER_BUCKET / PAGE_SIZE);

		table_bits = clamp_t(unsigned int, order_base_2(buckets), TOA_TABLE_BITS_AUTO_MIN,
				     TOA_TABLE_BITS_MAX);
	} else if (table_bits < TOA_TABLE_BITS_MIN || table_bits > TOA_TABLE_BITS_MAX) {
		pr_err("table_bits: %u is not %d..%d (or 0 to size the table from memory)\n", table_bits,
		       TOA_TABLE_BITS_MIN, TOA_TABLE_BITS_MAX);
		return -EINVAL;
	}
	toa_table = kvcalloc(1U << table_bits, sizeof(*toa_table), GFP_KERNEL);
	if (!toa_table)
		return -ENOMEM;
	for (i = 0; i < 1U << table_bits; i++) {
		spin_lock_init(&toa_table[i].lock);
		INIT_HLIST_HEAD(&toa_table[i].head);
	}
	return 0;
}

/* Once the hooks are gone nothing adds or reads entries: drop them all. */
static void toa_free_table(void)
{
	unsigned int i;

	for (i = 0; i < 1U << table_bits; i++) {
		struct toa_entry *entry;
		struct hlist_node *next;

		hlist_for_each_entry_safe(entry, next, &toa_table[i].head, node) {
			hlist_del_rcu(&entry->node);
			kfree_rcu(entry, rcu);
		}
	}
	rcu_barrier();
	kvfree(toa_table);
	toa_table = NULL;
}

static int __init toa_init(void)
{
	int err;

	err = toa_setup_kinds();
	if (err)
		return err;
	err = toa_setup_table();
	if (err)
		return err;
	err = register_pernet_subsys(&toa_net_ops);
	if (err)
		goto free_table;
	err = toa_register_hooks();
	if (err)
		goto unregister_pernet;
	toa_trusted_start();
	pr_info("toa loaded\n");
	return 0;

unregister_pernet:
	unregister_pernet_subsys(&toa_net_ops);
free_table:
	toa_free_table();
	return err;
}

static void __exit toa_exit(void)
{
	toa_unregister_hooks();
	unregister_pernet_subsys(&toa_net_ops);
	toa_free_table();
	/* The trusted list is freed with the module's parameters (toa_trusted_free). */
	pr_info("toa unloaded\n");
}

module_init(toa_init);
module_exit(toa_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("TCP Option Address: getpeername()/accept() return the client address a load balancer put in the handshake");
MODULE_VERSION("0.1.0");
