// SPDX-License-Identifier: GPL-2.0
/* Compiles where ftrace_get_symaddr() maps a traced call site to its function's start: 6.14 and later. */
#include <linux/ftrace.h>

unsigned long toa_probe(unsigned long fentry_ip);
unsigned long toa_probe(unsigned long fentry_ip)
{
	return ftrace_get_symaddr(fentry_ip);
}
