// SPDX-License-Identifier: GPL-2.0
/* Compiles where totalram_pages() is a function: 5.0 and later, and backports. */
#include <linux/mm.h>

unsigned long toa_probe(void);
unsigned long toa_probe(void)
{
	return totalram_pages();
}
