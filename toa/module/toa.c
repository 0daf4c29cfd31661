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
 * Written against the newest kernel API; toa_compat.h adapts older kernels.
 */
#define pr_fmt(fmt) "TOA: " fmt

#include <linux/hash.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/init.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/percpu.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <net/ipv6.h>
#include <net/net_namespace.h>
#include <net/sock.h>
#include <net/tcp.h>

#include "toa_compat.h"

#define TOA_MAX_KINDS 4
#define TOA_V4_OPTION_LEN 8	/* kind, len, be16 port, be32 address */
#define TOA_V6_OPTION_LEN 20	/* kind, len, be16 port, 16-byte address */
#define TOA_HASH_BITS 12
/* getname can sleep in lock_sock; every sleeper holds one instance. */
#define TOA_MIN_MAXACTIVE 256

static int kinds[TOA_MAX_KINDS] = { 254, 253 };
static unsigned int nr_kinds = 2;
module_param_array(kinds, int, &nr_kinds, 0444);
MODULE_PARM_DESC(kinds, "TCP option kinds that carry the client address (2..255, at most 4; default 254,253)");

static DECLARE_BITMAP(accepted_kinds, 256);

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

struct toa_bucket {
	spinlock_t lock;	/* writers; readers use RCU */
	struct hlist_head head;
};

static struct toa_bucket toa_table[1 << TOA_HASH_BITS];

enum toa_counter {
	TOA_V4_OPTIONS_SEEN,
	TOA_V6_OPTIONS_SEEN,
	TOA_ADDRESSES_RETURNED,
	TOA_MALFORMED_IGNORED,
	TOA_V6_ON_V4_IGNORED,
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
	[TOA_ENTRIES_LIVE] = "entries_live",
	[TOA_ALLOC_FAILED] = "alloc_failed",
};

struct toa_counters {
	unsigned long value[TOA_COUNTER_COUNT];
};

static struct toa_counters __percpu *toa_counters;

static void toa_count(enum toa_counter counter)
{
	this_cpu_inc(toa_counters->value[counter]);
}

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

	/*
	 * Only the handshake's final ACK carries the balancer's option: with TCP
	 * Fast Open the child is created from the client's SYN, which is never read.
	 */
	if (th->syn)
		return false;
	/* tcp_v{4,6}_rcv pulled doff * 4 bytes: the options are linear. */
	if (th->doff * 4 <= sizeof(*th))
		return false;
	switch (toa_parse_options((const u8 *)(th + 1), th->doff * 4 - sizeof(*th), addr)) {
	case TOA_ABSENT:
		return false;
	case TOA_MALFORMED:
		toa_count(TOA_MALFORMED_IGNORED);
		return false;
	case TOA_FOUND:
		break;
	}
	toa_count(addr->family == AF_INET ? TOA_V4_OPTIONS_SEEN : TOA_V6_OPTIONS_SEEN);
	if (addr->family == AF_INET6 && listener->sk_family == AF_INET) {
		toa_count(TOA_V6_ON_V4_IGNORED);
		return false;
	}
	return true;
}

static struct toa_bucket *toa_bucket_of(const struct sock *sk)
{
	return &toa_table[hash_ptr(sk, TOA_HASH_BITS)];
}

static void toa_unlink_locked(struct toa_bucket *bucket, const struct sock *sk)
{
	struct toa_entry *entry;
	struct hlist_node *next;

	hlist_for_each_entry_safe(entry, next, &bucket->head, node) {
		if (sk && entry->sk != sk)
			continue;
		hlist_del_rcu(&entry->node);
		kfree_rcu(entry, rcu);
		this_cpu_dec(toa_counters->value[TOA_ENTRIES_LIVE]);
	}
}

static void toa_remember(const struct sock *sk, const struct toa_addr *addr)
{
	struct toa_bucket *bucket = toa_bucket_of(sk);
	struct toa_entry *entry;
	unsigned long flags;

	entry = kmalloc(sizeof(*entry), GFP_ATOMIC);
	if (!entry) {
		toa_count(TOA_ALLOC_FAILED);
		return;
	}
	entry->sk = sk;
	entry->addrpair = sk->sk_addrpair;
	entry->portpair = sk->sk_portpair;
	entry->addr = *addr;

	spin_lock_irqsave(&bucket->lock, flags);
	toa_unlink_locked(bucket, sk);	/* a missed destructor must not leave two */
	hlist_add_head_rcu(&entry->node, &bucket->head);
	spin_unlock_irqrestore(&bucket->lock, flags);
	toa_count(TOA_ENTRIES_LIVE);
}

static void toa_forget(const struct sock *sk)
{
	struct toa_bucket *bucket = toa_bucket_of(sk);
	unsigned long flags;

	if (hlist_empty(&bucket->head))
		return;
	spin_lock_irqsave(&bucket->lock, flags);
	toa_unlink_locked(bucket, sk);
	spin_unlock_irqrestore(&bucket->lock, flags);
}

static bool toa_lookup(const struct sock *sk, struct toa_addr *addr)
{
	struct toa_bucket *bucket = toa_bucket_of(sk);
	struct toa_entry *entry;
	bool found = false;

	rcu_read_lock();
	hlist_for_each_entry_rcu(entry, &bucket->head, node) {
		if (entry->sk == sk && entry->addrpair == sk->sk_addrpair &&
		    entry->portpair == sk->sk_portpair) {
			*addr = entry->addr;
			found = true;
			break;
		}
	}
	rcu_read_unlock();
	return found;
}

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
	toa_count(TOA_ADDRESSES_RETURNED);
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
	unsigned long total[TOA_COUNTER_COUNT] = { 0 };
	unsigned int i;
	int cpu;

	for_each_possible_cpu(cpu) {
		const struct toa_counters *counters = per_cpu_ptr(toa_counters, cpu);

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
	return proc_create_single("toa_stats", 0444, net->proc_net, toa_stats_show) ? 0 : -ENOMEM;
}

static void __net_exit toa_net_exit(struct net *net)
{
	remove_proc_entry("toa_stats", net->proc_net);
}

static struct pernet_operations toa_net_ops = {
	.init = toa_net_init,
	.exit = toa_net_exit,
};

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

static void toa_flush_table(void)
{
	unsigned long flags;
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(toa_table); i++) {
		spin_lock_irqsave(&toa_table[i].lock, flags);
		toa_unlink_locked(&toa_table[i], NULL);
		spin_unlock_irqrestore(&toa_table[i].lock, flags);
	}
}

static int __init toa_init(void)
{
	unsigned int i;
	int err;

	err = toa_setup_kinds();
	if (err)
		return err;
	for (i = 0; i < ARRAY_SIZE(toa_table); i++) {
		spin_lock_init(&toa_table[i].lock);
		INIT_HLIST_HEAD(&toa_table[i].head);
	}
	toa_counters = alloc_percpu(struct toa_counters);
	if (!toa_counters)
		return -ENOMEM;
	err = register_pernet_subsys(&toa_net_ops);
	if (err)
		goto free_counters;
	err = toa_register_hooks();
	if (err)
		goto unregister_pernet;
	pr_info("toa loaded\n");
	return 0;

unregister_pernet:
	unregister_pernet_subsys(&toa_net_ops);
free_counters:
	free_percpu(toa_counters);
	return err;
}

static void __exit toa_exit(void)
{
	/* Once the hooks are gone nothing adds or reads entries: drop them all. */
	toa_unregister_hooks();
	unregister_pernet_subsys(&toa_net_ops);
	toa_flush_table();
	rcu_barrier();
	free_percpu(toa_counters);
	pr_info("toa unloaded\n");
}

module_init(toa_init);
module_exit(toa_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("TCP Option Address: getpeername()/accept() return the client address a load balancer put in the handshake");
MODULE_VERSION("0.1.0");
