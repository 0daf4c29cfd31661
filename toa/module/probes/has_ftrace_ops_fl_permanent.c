// SPDX-License-Identifier: GPL-2.0
/* Compiles where FTRACE_OPS_FL_PERMANENT exists (ftrace_enabled cannot be turned off under it): 5.5 and later. */
#include <linux/ftrace.h>

int toa_probe(void);
int toa_probe(void)
{
	return FTRACE_OPS_FL_PERMANENT;
}
