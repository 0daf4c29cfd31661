// SPDX-License-Identifier: GPL-2.0
/* Compiles where ftrace_regs_get_argument() exists: 6.7 and later (earlier, ftrace_regs wraps pt_regs on x86). */
#include <linux/ftrace.h>

unsigned long toa_probe(struct ftrace_regs *fregs);
unsigned long toa_probe(struct ftrace_regs *fregs)
{
	return ftrace_regs_get_argument(fregs, 0);
}
