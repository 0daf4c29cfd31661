// SPDX-License-Identifier: GPL-2.0
/* Compiles where ftrace_instruction_pointer_set() exists: 5.11 up to its rename (6.7). */
#include <linux/ftrace.h>

void toa_probe(struct ftrace_regs *fregs);
void toa_probe(struct ftrace_regs *fregs)
{
	ftrace_instruction_pointer_set(fregs, 0);
}
