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
 * socket. Only kprobes and kretprobes are used: no kernel text or read-only
 * table is written.
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
#include <net/ipv6.h>
#include <net/net_namespace.h>
#include <net/netns/generic.h>
#include <net/sock.h>
#include <net/tcp.h>

#include "toa_compat.h"

#define TOA_MAX_KINDS 4
#define TOA_V4_OPTION_LEN 8	/* kind, len, be16 port, be32 address */
#define TOA_V6_OPTION_LEN 20	/* kind, len, be16 port, 16-byte address */
/* getname can sleep in lock_sock; every sleeper holds one instance. */
#define TOA_MIN_MAXACTIVE 256

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
	struct rcu_head rcu;
};

/*
 * Readers (lookup, and the search on teardown) walk a chain under RCU with no
 * lock. The lock covers only linking or unlinking one entry already found:
 * O(1), never a walk. It is taken with interrupts off because the hooks can run
 * where softirqs cannot be re-enabled: a kprobe handler entered through a
 * breakpoint (int3 on x86 without ftrace, BRK on arm64) runs as an NMI-like
 * exception with interrupts disabled, and some kernels' ftrace kprobe handler
 * disables interrupts too, so spin_lock_bh()'s local_bh_enable() would run
 * softirqs (or warn) there. A socket without an entry, the common teardown,
 * takes no lock at all.
 */
struct toa_bucket {
	spinlock_t lock;
	struct hlist_head head;
};

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
 * before any exit method, so a reader that saw it alive finishes first.
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

	rcu_read_lock();
	counters = toa_counters_of(net);
	if (counters)
		this_cpu_inc(counters->value[counter]);
	rcu_read_unlock();
}

static void toa_uncount(const struct net *net, enum toa_counter counter)
{
	struct toa_counters __percpu *counters;

	rcu_read_lock();
	counters = toa_counters_of(net);
	if (counters)
		this_cpu_dec(counters->value[counter]);
	rcu_read_unlock();
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

static struct toa_bucket *toa_bucket_of(const struct sock *sk)
{
	return &toa_table[hash_ptr(sk, table_bits)];
}

/* The entry of @sk in @bucket; the caller holds rcu_read_lock(). */
static struct toa_entry *toa_find(struct toa_bucket *bucket, const struct sock *sk)
{
	struct toa_entry *entry;

	hlist_for_each_entry_rcu(entry, &bucket->head, node) {
		if (entry->sk == sk)
			return entry;
	}
	return NULL;
}

/* Unlink an entry found under RCU (still held); true if this call removed it. */
static bool toa_unlink(struct toa_bucket *bucket, struct toa_entry *entry)
{
	unsigned long flags;
	bool unlinked = false;

	spin_lock_irqsave(&bucket->lock, flags);
	if (!hlist_unhashed(&entry->node)) {
		hlist_del_init_rcu(&entry->node);
		unlinked = true;
	}
	spin_unlock_irqrestore(&bucket->lock, flags);
	if (unlinked)
		kfree_rcu(entry, rcu);
	return unlinked;
}

static void toa_remember(const struct sock *sk, const struct toa_addr *addr)
{
	struct toa_bucket *bucket = toa_bucket_of(sk);
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
	/*
	 * A socket that died while its destructor hook missed (probe_missed) left
	 * an entry that must not stay beside the new one. Its namespace's
	 * entries_live is left as it was: that namespace may be gone.
	 */
	stale = toa_find(bucket, sk);
	if (stale)
		toa_unlink(bucket, stale);
	spin_lock_irqsave(&bucket->lock, flags);
	hlist_add_head_rcu(&entry->node, &bucket->head);
	spin_unlock_irqrestore(&bucket->lock, flags);
	rcu_read_unlock();
	toa_count(sock_net(sk), TOA_ENTRIES_LIVE);
}

/* Every TCP socket's teardown: an empty bucket or a chain without @sk takes no lock. */
static void toa_forget(const struct sock *sk)
{
	struct toa_bucket *bucket = toa_bucket_of(sk);
	struct toa_entry *entry;

	if (hlist_empty(&bucket->head))
		return;
	rcu_read_lock();
	entry = toa_find(bucket, sk);
	if (entry && toa_unlink(bucket, entry))
		toa_uncount(sock_net(sk), TOA_ENTRIES_LIVE);
	rcu_read_unlock();
}

static bool toa_lookup(const struct sock *sk, struct toa_addr *addr)
{
	struct toa_bucket *bucket = toa_bucket_of(sk);
	struct toa_entry *entry;
	bool found = false;

	rcu_read_lock();
	entry = toa_find(bucket, sk);
	if (entry && entry->addrpair == sk->sk_addrpair && entry->portpair == sk->sk_portpair) {
		*addr = entry->addr;
		found = true;
	}
	rcu_read_unlock();
	return found;
}

/* ---------- hooks ---------- */

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
	const struct sock *child = (const struct sock *)regs_return_value(regs);

	if (child)
		toa_remember(child, (const struct toa_addr *)ri->data);
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

static void toa_write_sockaddr(struct sockaddr *uaddr, const struct toa_addr *addr)
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

static int toa_getname_return(struct kretprobe_instance *ri, struct pt_regs *regs)
{
	const struct toa_getname_call *call = (const struct toa_getname_call *)ri->data;
	const struct sock *sk = call->sock->sk;
	struct toa_addr addr;

	if ((int)regs_return_value(regs) < 0 || !sk || !toa_lookup(sk, &addr))
		return 0;
	if (call->uaddr->sa_family == AF_INET && addr.family != AF_INET)
		return 0;
	toa_write_sockaddr(call->uaddr, &addr);
	toa_count(sock_net(sk), TOA_ADDRESSES_RETURNED);
	return 0;
}

static int toa_destruct_pre(struct kprobe *kp, struct pt_regs *regs)
{
	const struct sock *sk = (const struct sock *)regs_get_kernel_argument(regs, 0);

	if (sk->sk_protocol == IPPROTO_TCP)
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

static void toa_unregister_hooks(void)
{
	/* The destructor hook goes last: until then every entry still has a way out. */
	unregister_kretprobes(toa_registered, toa_nr_registered);
	toa_nr_registered = 0;
	unregister_kprobe(&toa_destruct_probe);
}

static int toa_register_hooks(void)
{
	int maxactive = max_t(int, TOA_MIN_MAXACTIVE, 8 * num_possible_cpus());
	unsigned int i;
	int err;

	err = register_kprobe(&toa_destruct_probe);
	if (err) {
		pr_err("cannot hook %s: %d\n", toa_destruct_probe.symbol_name, err);
		return err;
	}
	for (i = 0; i < ARRAY_SIZE(toa_return_hooks); i++) {
		struct kretprobe *probe = toa_return_hooks[i].probe;

		probe->maxactive = maxactive;
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
		toa_unregister_hooks();
		return err;
	}
	return 0;
}

/* ---------- /proc/net/toa_stats ---------- */

/* Misses of the hooks themselves: the module's, shown alike in every namespace. */
static unsigned long toa_probe_missed(void)
{
	unsigned long missed = toa_destruct_probe.nmissed;
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(toa_return_hooks); i++)
		missed += toa_return_hooks[i].probe->nmissed + toa_return_hooks[i].probe->kp.nmissed;
	return missed;
}

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
