// SPDX-License-Identifier: GPL-2.0
/* Compiles where the kernel has regs_get_kernel_argument(): 4.20 and later, and backports. */
#include <linux/ptrace.h>

unsigned long toa_probe(struct pt_regs *regs);
unsigned long toa_probe(struct pt_regs *regs)
{
	return regs_get_kernel_argument(regs, 1);
}
