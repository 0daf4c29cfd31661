// SPDX-License-Identifier: GPL-2.0
/* Compiles where syn_recv_sock is (sk, skb, req, dst, req_unhash, own_req): 4.4 up to opt_child_init. */
#include <net/inet_connection_sock.h>
#include <net/tcp.h>

static struct sock *toa_probe_syn_recv(const struct sock *sk, struct sk_buff *skb, struct request_sock *req,
				       struct dst_entry *dst, struct request_sock *req_unhash, bool *own_req)
{
	return NULL;
}

const struct inet_connection_sock_af_ops toa_probe_ops;
const struct inet_connection_sock_af_ops toa_probe_ops = { .syn_recv_sock = toa_probe_syn_recv };
