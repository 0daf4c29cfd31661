// SPDX-License-Identifier: GPL-2.0
/* Compiles where proto_ops->getname is (sock, uaddr, int *uaddr_len, peer): before 4.17. */
#include <linux/net.h>
#include <net/sock.h>
#include <net/inet_common.h>

int toa_probe(void);
int toa_probe(void)
{
	return inet_getname(NULL, NULL, NULL, 1);
}
