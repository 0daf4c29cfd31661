// SPDX-License-Identifier: GPL-2.0
/* Compiles where an ftrace callback gets a struct ftrace_regs *: 5.11 and later, and backports. */
#include <linux/ftrace.h>

static void toa_probe_callback(unsigned long ip, unsigned long parent_ip, struct ftrace_ops *op,
			       struct ftrace_regs *fregs)
{
}

int toa_probe(void);
int toa_probe(void)
{
	ftrace_func_t func = toa_probe_callback;

	return func != NULL;
}
