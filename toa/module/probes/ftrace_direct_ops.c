// SPDX-License-Identifier: GPL-2.0
/* Compiles where register_ftrace_direct() takes an ftrace_ops filtered to the call site (6.5 and later). */
#include <linux/ftrace.h>

int toa_probe(struct ftrace_ops *ops, unsigned long addr);
int toa_probe(struct ftrace_ops *ops, unsigned long addr)
{
	return register_ftrace_direct(ops, addr) + unregister_ftrace_direct(ops, addr, true);
}
