// SPDX-License-Identifier: GPL-2.0
/* Compiles where the kernel has proc_create_net_single() and seq_file_single_net(): 4.18 and later, and backports. */
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/seq_file_net.h>
#include <net/net_namespace.h>

int toa_probe(struct net *net, int (*show)(struct seq_file *, void *), struct seq_file *seq);
int toa_probe(struct net *net, int (*show)(struct seq_file *, void *), struct seq_file *seq)
{
	return proc_create_net_single("toa_probe", 0444, net->proc_net, show, NULL) &&
	       seq_file_single_net(seq) == net;
}
