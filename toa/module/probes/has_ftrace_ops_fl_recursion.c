// SPDX-License-Identifier: GPL-2.0
/*
 * Compiles where FTRACE_OPS_FL_RECURSION exists: 5.11 and later, where ftrace
 * guards only the callbacks that ask (before, RECURSION_SAFE opted out), and
 * ftrace_test_recursion_trylock() is there for callbacks that guard themselves.
 */
#include <linux/ftrace.h>
#include <linux/trace_recursion.h>

int toa_probe(unsigned long ip);
int toa_probe(unsigned long ip)
{
	int bit = ftrace_test_recursion_trylock(ip, ip);

	if (bit >= 0)
		ftrace_test_recursion_unlock(bit);
	return FTRACE_OPS_FL_RECURSION;
}
