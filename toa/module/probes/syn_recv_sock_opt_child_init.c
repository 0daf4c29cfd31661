// SPDX-License-Identifier: GPL-2.0
/*
 * Compiles where syn_recv_sock takes a seventh argument, opt_child_init: a
 * 6.1 stable update and later kernels. No version number tells.
 */
#include <net/inet_connection_sock.h>
#include <net/tcp.h>

static struct sock *toa_probe_syn_recv(const struct sock *sk, struct sk_buff *skb, struct request_sock *req,
				       struct dst_entry *dst, struct request_sock *req_unhash, bool *own_req,
				       void (*opt_child_init)(struct sock *newsk, const struct sock *sk))
{
	return NULL;
}

const struct inet_connection_sock_af_ops toa_probe_ops;
const struct inet_connection_sock_af_ops toa_probe_ops = { .syn_recv_sock = toa_probe_syn_recv };
