// SPDX-License-Identifier: GPL-2.0
/* Compiles where the kernel has check_net(): 4.15 and later, stable backports, distro backports. */
#include <net/net_namespace.h>

int toa_probe(const struct net *net);
int toa_probe(const struct net *net)
{
	return check_net(net);
}
