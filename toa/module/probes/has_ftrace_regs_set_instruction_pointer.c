// SPDX-License-Identifier: GPL-2.0
/* Compiles where ftrace_regs_set_instruction_pointer() exists: 6.7 and later (the newer name). */
#include <linux/ftrace.h>

void toa_probe(struct ftrace_regs *fregs);
void toa_probe(struct ftrace_regs *fregs)
{
	ftrace_regs_set_instruction_pointer(fregs, 0);
}
