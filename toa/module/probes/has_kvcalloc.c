// SPDX-License-Identifier: GPL-2.0
/* Compiles where the kernel has kvcalloc() and kvfree(): 4.18 and later, and backports. */
#include <linux/mm.h>
#include <linux/slab.h>

void toa_probe(void);
void toa_probe(void)
{
	kvfree(kvcalloc(4, 16, GFP_KERNEL));
}
