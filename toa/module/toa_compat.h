/* SPDX-License-Identifier: GPL-2.0 */
/*
 * toa_compat.h - make older kernels look like the newest one.
 *
 * toa.c is written against the newest kernel API only. Every difference an
 * older kernel has lives here as a guarded shim that supplies the modern name.
 * Where a version number cannot tell (stable and distro kernels that changed a
 * signature without a version bump), a compile probe against the target's own
 * headers decides: Kbuild compiles each probes/<name>.c and defines
 * TOA_PROBE_<NAME> in the generated probes.h when it compiles.
 *
 * Compiled and loaded by this project: Debian 5.10 (bullseye), 6.1 (bookworm),
 * 6.12 (trixie), 7.x (trixie-backports).
 * Written but NOT compiled here (no such headers on the build hosts): 3.10
 * (CentOS 7 / RHEL 7), 4.4 (Ubuntu 16.04), 4.15 (Ubuntu 18.04), 4.18 (RHEL 8),
 * 5.4 (Ubuntu 20.04), 5.14 (RHEL 9). Treat those guards as unverified.
 */
#ifndef TOA_COMPAT_H
#define TOA_COMPAT_H

#include <linux/kconfig.h>
#include <linux/version.h>
#include <generated/utsrelease.h>

#include "probes.h"

/* Distro kernels, named once: backports make their version numbers lie. */
#ifdef RHEL_MAJOR
#if RHEL_MAJOR == 7
#define ISRHEL7
#elif RHEL_MAJOR == 8
#define ISRHEL8
#elif RHEL_MAJOR == 9
#define ISRHEL9
#endif
#endif
#ifdef UTS_UBUNTU_RELEASE_ABI
#if LINUX_VERSION_CODE >= KERNEL_VERSION(4, 4, 0) && LINUX_VERSION_CODE < KERNEL_VERSION(4, 5, 0)
#define ISUBUNTU1604
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(4, 15, 0) && LINUX_VERSION_CODE < KERNEL_VERSION(4, 16, 0)
#define ISUBUNTU1804
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(5, 4, 0) && LINUX_VERSION_CODE < KERNEL_VERSION(5, 5, 0)
#define ISUBUNTU2004
#endif
#endif
#ifdef CONFIG_SUSE_KERNEL
#define ISSUSE
#endif

/*
 * The fallback hooks are kprobes and kretprobes: every kernel toa supports has
 * them, and hooks=kretprobe selects them where ftrace hooks exist too.
 */
#if !IS_ENABLED(CONFIG_KPROBES) || !IS_ENABLED(CONFIG_KRETPROBES)
#error "toa needs a kernel built with CONFIG_KPROBES=y and CONFIG_KRETPROBES=y"
#endif

#if !defined(CONFIG_X86_64) && !defined(CONFIG_ARM64)
#error "toa reads function arguments from registers: only x86_64 and arm64 are supported"
#endif

/*
 * SUSE kernels built with CONFIG_SUSE_KERNEL_SUPPORTED refuse a module that has
 * no "supported" tag (unless allow_unsupported_modules is set). toa is a
 * third-party module: "external" in SUSE's terms, as a vendor's KMP is tagged.
 */
#ifdef CONFIG_SUSE_KERNEL_SUPPORTED
MODULE_INFO(supported, "external");
#endif

/*
 * regs_get_kernel_argument(): upstream since 4.20 (5.4 and 5.14, RHEL 9
 * included, have it). 3.10, 4.4, 4.15 lack it; RHEL 8 (4.18) got it in a minor
 * release, so the probe decides rather than the version.
 */
#ifndef TOA_PROBE_HAS_REGS_GET_KERNEL_ARGUMENT
static inline unsigned long __compat_regs_get_kernel_argument(struct pt_regs *regs, unsigned int n)
{
#if defined(CONFIG_X86_64)
	switch (n) {
	case 0: return regs->di;
	case 1: return regs->si;
	case 2: return regs->dx;
	case 3: return regs->cx;
	case 4: return regs->r8;
	case 5: return regs->r9;
	}
	return 0;
#else
	return n < 8 ? regs->regs[n] : 0;
#endif
}
#define regs_get_kernel_argument __compat_regs_get_kernel_argument
#endif

/*
 * proto_ops->getname lost its `int *uaddr_len` argument in 4.17 and returns
 * the address length instead of 0. 3.10 (RHEL 7), 4.4, 4.15 have the old
 * form; 4.18 (RHEL 8), 5.4, 5.14 and later the new one. Backports make the
 * version unreliable, so the probe decides which register holds `peer`.
 * Success is ret >= 0 in both forms.
 */
#if defined(TOA_PROBE_GETNAME_WITHOUT_UADDR_LEN)
#define TOA_GETNAME_PEER_ARG 2
#elif defined(TOA_PROBE_GETNAME_WITH_UADDR_LEN)
#define TOA_GETNAME_PEER_ARG 3
#else
#error "compile probes could not tell the form of inet_getname(): see probes/getname_*.c"
#endif

/*
 * proc_create_net_single() and seq_file_single_net(): upstream since 4.18
 * (RHEL 8, 5.4, 5.14 have them). 3.10 (RHEL 7), 4.4 and 4.15 lack them:
 * provide them on top of proc_create_data() + single_open_net(), which keeps
 * the namespace in seq->private as the newer helper does. The probe decides.
 */
#ifndef TOA_PROBE_HAS_PROC_CREATE_NET_SINGLE
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/seq_file_net.h>
static int __compat_single_open_net(struct inode *inode, struct file *file)
{
	return single_open_net(inode, file, PDE_DATA(inode));
}
static const struct file_operations __compat_single_net_fops = {
	.owner = THIS_MODULE,
	.open = __compat_single_open_net,
	.read = seq_read,
	.llseek = seq_lseek,
	.release = single_release_net,
};
static inline struct proc_dir_entry *__compat_proc_create_net_single(const char *name, umode_t mode,
								     struct proc_dir_entry *parent,
								     int (*show)(struct seq_file *, void *),
								     void *data)
{
	return proc_create_data(name, mode, parent, &__compat_single_net_fops, show);
}
#define proc_create_net_single __compat_proc_create_net_single
#define seq_file_single_net(seq) ((struct net *)(seq)->private)
#endif

/*
 * check_net(): upstream since 4.15 and backported to stable 4.4/4.9/4.14 and
 * to distro kernels, so the probe decides. Kernels without it still count
 * namespace references in an atomic_t.
 */
#ifndef TOA_PROBE_HAS_CHECK_NET
#include <net/net_namespace.h>
static inline int __compat_check_net(const struct net *net)
{
#ifdef CONFIG_NET_NS
	return atomic_read(&net->count) != 0;
#else
	return 1;
#endif
}
#define check_net __compat_check_net
#endif

/*
 * kvcalloc(): upstream since 4.18 (kvmalloc since 4.12, kvfree since 3.15).
 * Older kernels get the table from vzalloc() and free it with vfree(); the
 * address table is the only user. The probe decides.
 */
#ifndef TOA_PROBE_HAS_KVCALLOC
#include <linux/vmalloc.h>
static inline void *__compat_kvcalloc(size_t n, size_t size, gfp_t flags)
{
	if (size && n > SIZE_MAX / size)
		return NULL;
	return vzalloc(n * size);
}
#define kvcalloc __compat_kvcalloc
#define kvfree vfree
#endif

/*
 * totalram_pages() is a function since 5.0; before, a variable of that name.
 * Distro kernels backported the change, so the probe decides.
 */
#ifndef TOA_PROBE_HAS_TOTALRAM_PAGES_FUNCTION
#include <linux/mm.h>
static inline unsigned long __compat_totalram_pages(void)
{
	return totalram_pages;
}
#define totalram_pages() __compat_totalram_pages()
#endif

/* ---------- hooks: ftrace redirection where the kernel can, kretprobes elsewhere ---------- */

/*
 * syn_recv_sock's arguments, so that a wrapper can stand in for it: (sk, skb,
 * req, dst, req_unhash, own_req) from 4.4, and a seventh, opt_child_init, since
 * a 6.1 stable update (no version number tells, the probes do). toa.c checks
 * at build time that its wrappers have exactly the kernel's type.
 */
#if defined(TOA_PROBE_SYN_RECV_SOCK_OPT_CHILD_INIT)
#define TOA_SYN_RECV_PARAMS const struct sock *sk, struct sk_buff *skb, struct request_sock *req, \
	struct dst_entry *dst, struct request_sock *req_unhash, bool *own_req, \
	void (*opt_child_init)(struct sock *newsk, const struct sock *sk)
#define TOA_SYN_RECV_ARGS sk, skb, req, dst, req_unhash, own_req, opt_child_init
#elif defined(TOA_PROBE_SYN_RECV_SOCK_OWN_REQ)
#define TOA_SYN_RECV_PARAMS const struct sock *sk, struct sk_buff *skb, struct request_sock *req, \
	struct dst_entry *dst, struct request_sock *req_unhash, bool *own_req
#define TOA_SYN_RECV_ARGS sk, skb, req, dst, req_unhash, own_req
#endif

/*
 * ftrace hooks (toa.c, "ftrace hooks") need, on the target kernel:
 *   - dynamic ftrace that hands the callback the registers and lets it change
 *     the instruction pointer (DYNAMIC_FTRACE_WITH_REGS, or _WITH_ARGS from
 *     5.11), the way livepatch redirects a function;
 *   - x86_64: the wrappers call the original through its ENDBR (IBT), and
 *     arm64 could not modify the instruction pointer from ftrace for most of
 *     the kernels toa supports;
 *   - no clang kCFI: calls through a pointer are checked against type hashes
 *     this module was not built to match (untested, so not attempted);
 *   - a known getname and syn_recv_sock signature (probes), for the wrappers.
 * Elsewhere the kretprobe hooks are built alone (hooks=ftrace then fails to load).
 */
#if defined(CONFIG_X86_64) && defined(CONFIG_DYNAMIC_FTRACE) && \
	(defined(CONFIG_DYNAMIC_FTRACE_WITH_REGS) || defined(CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS)) && \
	!defined(CONFIG_CFI_CLANG) && defined(TOA_PROBE_GETNAME_WITHOUT_UADDR_LEN) && \
	defined(TOA_SYN_RECV_PARAMS)
#define TOA_HAVE_FTRACE_HOOKS 1
#endif

#ifdef TOA_HAVE_FTRACE_HOOKS
#include <linux/ftrace.h>
#include <linux/uaccess.h>
#include <asm/cpufeature.h>
#include <asm/ptrace.h>

/*
 * What an ftrace callback is handed: struct pt_regs before 5.11, struct
 * ftrace_regs since (the probe decides).
 */
#ifdef TOA_PROBE_FTRACE_REGS_CALLBACK
typedef struct ftrace_regs toa_fregs_t;
#else
typedef struct pt_regs toa_fregs_t;
#endif

/*
 * ARGS mode: since 5.11 x86 saves the argument registers for every callback
 * and lets it set the instruction pointer without a full pt_regs
 * (ftrace_instruction_pointer_set(), renamed ftrace_regs_set_instruction_pointer()
 * in 6.7): the cheaper trampoline. Without WITH_ARGS both names exist as
 * no-ops, so the config decides first. REGS mode elsewhere: SAVE_REGS, and the
 * callback writes pt_regs.
 */
#if defined(TOA_PROBE_FTRACE_REGS_CALLBACK) && defined(CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS) && \
	(defined(TOA_PROBE_HAS_FTRACE_REGS_SET_INSTRUCTION_POINTER) || \
	 defined(TOA_PROBE_HAS_FTRACE_INSTRUCTION_POINTER_SET))
#define TOA_FTRACE_SAVE_FLAGS 0
#define TOA_FTRACE_MODE "args"

static __always_inline void toa_fregs_set_ip(struct ftrace_regs *fregs, unsigned long ip)
{
#ifdef TOA_PROBE_HAS_FTRACE_REGS_SET_INSTRUCTION_POINTER
	ftrace_regs_set_instruction_pointer(fregs, ip);
#else
	ftrace_instruction_pointer_set(fregs, ip);
#endif
}

static __always_inline unsigned long toa_fregs_arg(struct ftrace_regs *fregs, unsigned int n)
{
#ifdef TOA_PROBE_HAS_FTRACE_REGS_GET_ARGUMENT
	return ftrace_regs_get_argument(fregs, n);
#else
	/* 5.11 to 6.6 on x86: struct ftrace_regs is a pt_regs with the argument registers filled. */
	return regs_get_kernel_argument(&fregs->regs, n);
#endif
}
#else
#define TOA_FTRACE_SAVE_FLAGS FTRACE_OPS_FL_SAVE_REGS
#define TOA_FTRACE_MODE "regs"

static __always_inline struct pt_regs *toa_fregs_regs(toa_fregs_t *fregs)
{
#ifdef TOA_PROBE_FTRACE_REGS_CALLBACK
	return ftrace_get_regs(fregs);	/* never NULL: the ops asks for SAVE_REGS */
#else
	return fregs;
#endif
}

static __always_inline void toa_fregs_set_ip(toa_fregs_t *fregs, unsigned long ip)
{
	instruction_pointer_set(toa_fregs_regs(fregs), ip);
}

static __always_inline unsigned long toa_fregs_arg(toa_fregs_t *fregs, unsigned int n)
{
	return regs_get_kernel_argument(toa_fregs_regs(fregs), n);
}
#endif

/*
 * Recursion. From 5.11 ftrace calls a callback straight from its trampoline
 * unless the ops sets FTRACE_OPS_FL_RECURSION, and a callback that needs a
 * guard takes ftrace_test_recursion_trylock() itself (toa's destructor does,
 * and counts a refusal in probe_missed). Before 5.11 it was the other way
 * round: ftrace guards every callback (through an extra function) unless the
 * ops sets FTRACE_OPS_FL_RECURSION_SAFE. toa's redirecting callbacks call
 * nothing and need no guard: TOA_FTRACE_UNGUARDED asks for none on both.
 */
#ifdef TOA_PROBE_HAS_FTRACE_OPS_FL_RECURSION
#include <linux/trace_recursion.h>
#define TOA_FTRACE_UNGUARDED 0
#define toa_ftrace_trylock(ip, parent_ip) ftrace_test_recursion_trylock(ip, parent_ip)
#define toa_ftrace_unlock(bit) ftrace_test_recursion_unlock(bit)
#else
#define TOA_FTRACE_UNGUARDED FTRACE_OPS_FL_RECURSION_SAFE
#define toa_ftrace_trylock(ip, parent_ip) 0
#define toa_ftrace_unlock(bit) do { } while (0)
#endif

/* ftrace_enabled cannot be turned off while a PERMANENT ops is registered (5.5 and later). */
#ifdef TOA_PROBE_HAS_FTRACE_OPS_FL_PERMANENT
#define TOA_FTRACE_PERMANENT FTRACE_OPS_FL_PERMANENT
#else
#define TOA_FTRACE_PERMANENT 0
#endif

/*
 * Where a wrapper calls the function whose fentry call site is fentry_ip.
 * Through its entry (via_entry): its start, so the call passes the fentry
 * site again and the callback lets the module's own call through; a must
 * where the CPU enforces IBT (toa_ibt_enforced), since a call through a
 * pointer must land on the ENDBR at the start. Elsewhere just past the fentry
 * call (MCOUNT_INSN_SIZE bytes, the function's next instruction): every
 * ftrace user of this call already ran at the first pass, so none sees it
 * twice, and the second trip through ftrace is saved.
 */
static __always_inline unsigned long toa_ftrace_func_start(unsigned long fentry_ip);

static __always_inline unsigned long toa_ftrace_call_target(unsigned long fentry_ip, bool via_entry)
{
	return via_entry ? toa_ftrace_func_start(fentry_ip) : fentry_ip + MCOUNT_INSN_SIZE;
}

/*
 * Does the CPU enforce IBT? The kernel keeps X86_FEATURE_IBT only when it
 * turned IBT on (a CET CPU, a kernel built with X86_KERNEL_IBT, no ibt=off).
 */
static __always_inline bool toa_ibt_enforced(void)
{
#ifdef CONFIG_X86_KERNEL_IBT
	return cpu_feature_enabled(X86_FEATURE_IBT);
#else
	return false;
#endif
}

/*
 * The start of the function whose call site is fentry_ip, for a wrapper to
 * call it through a pointer. With IBT (CONFIG_X86_KERNEL_IBT, Debian 6.2 and
 * later) a function called through a pointer begins with ENDBR64 and the
 * fentry call follows it: an indirect call must land on the ENDBR. The 4
 * bytes in front of the call site are compared with ENDBR64 (f3 0f 1e fa);
 * kernel text is only read. (6.14's ftrace_get_symaddr() does the same, but
 * through is_endbr(), which is not exported to modules.) Without IBT the call
 * site is the start.
 */
static __always_inline bool toa_is_endbr(unsigned long addr)
{
#ifdef CONFIG_X86_KERNEL_IBT
	u32 insn;

	return !get_kernel_nofault(insn, (const u32 *)addr) && insn == 0xfa1e0ff3;
#else
	return false;
#endif
}

static __always_inline unsigned long toa_ftrace_func_start(unsigned long fentry_ip)
{
	return toa_is_endbr(fentry_ip - 4) ? fentry_ip - 4 : fentry_ip;
}

/*
 * Direct calls (toa.c, "Direct calls"): the fentry call of an exported hooked
 * function calls a stub of ours straight, with no ftrace_ops callback and no
 * register save, and the wrapper reaches the original through a static call, a
 * direct call the kernel patches (no retpoline, nothing for IBT to check). Needs
 * ftrace direct calls (what BPF trampolines use: every Debian x86_64 kernel)
 * and static calls (5.10 and later). register_ftrace_direct() took the call
 * site until 6.4; since 6.5 it takes an ftrace_ops filtered to it (probe).
 */
#if defined(CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS) && defined(CONFIG_HAVE_STATIC_CALL)
#define TOA_HAVE_DIRECT_CALLS 1
#include <linux/objtool.h>
#include <linux/static_call.h>
#include <asm/orc_types.h>
#include <asm/unwind_hints.h>

static inline int toa_direct_register(struct ftrace_ops *ops, unsigned long ip, unsigned long stub)
{
#ifdef TOA_PROBE_FTRACE_DIRECT_OPS
	int err = ftrace_set_filter_ip(ops, ip, 0, 1);

	if (err)
		return err;
	err = register_ftrace_direct(ops, stub);
	if (err)
		ftrace_set_filter_ip(ops, ip, 1, 0);
	return err;
#else
	return register_ftrace_direct(ip, stub);
#endif
}

static inline void toa_direct_unregister(struct ftrace_ops *ops, unsigned long ip, unsigned long stub)
{
#ifdef TOA_PROBE_FTRACE_DIRECT_OPS
	unregister_ftrace_direct(ops, stub, true);
#else
	unregister_ftrace_direct(ip, stub);
#endif
}

/*
 * Which hooked functions take a direct call: those the kernel exports (their
 * address is linked; Kbuild reads Module.symvers). tcp_v4_syn_recv_sock was
 * exported until 6.x; tcp_v6_syn_recv_sock never is. inet6_getname only where
 * IPv6 is built in: a module referring to it would make toa need ipv6.ko.
 */
#ifdef TOA_EXPORTED_INET_GETNAME
#define TOA_DIRECT_INET_GETNAME 1
#endif
#if defined(TOA_EXPORTED_INET6_GETNAME) && IS_BUILTIN(CONFIG_IPV6)
#define TOA_DIRECT_INET6_GETNAME 1
#endif
#ifdef TOA_EXPORTED_TCP_V4_SYN_RECV_SOCK
#define TOA_DIRECT_TCP_V4_SYN_RECV_SOCK 1
#endif
#ifdef TOA_EXPORTED_INET_SOCK_DESTRUCT
#define TOA_DIRECT_INET_SOCK_DESTRUCT 1
#endif

/* The stub's annotations: ENDBR where IBT is built in (its address is taken), and for objtool's ORC. */
#ifdef CONFIG_X86_KERNEL_IBT
#define TOA_ASM_ENDBR "endbr64\n\t"
#else
#define TOA_ASM_ENDBR ""
#endif
#ifdef UNWIND_HINT_FUNC
#define TOA_ASM_UNWIND_HINT_FUNC UNWIND_HINT_FUNC
#else
/* 5.10: the hint exists for C only through UNWIND_HINT() itself. */
#define TOA_ASM_UNWIND_HINT_FUNC UNWIND_HINT(ORC_REG_SP, 8, UNWIND_HINT_TYPE_FUNC, 0)
#endif

/*
 * The fentry call site of a function from its address: past the ENDBR that
 * starts it where IBT is built in (see toa_ftrace_func_start).
 */
static __always_inline unsigned long toa_fentry_of(unsigned long func)
{
	return toa_is_endbr(func) ? func + 4 : func;
}
#endif
#endif /* TOA_HAVE_FTRACE_HOOKS */

/*
 * A cheap RCU reader for getname's path: preempt_disable(), inline, where
 * rcu_read_lock() is a call each way (PREEMPT_RCU). Since 4.20 (RCU flavours
 * consolidated) synchronize_rcu() and call_rcu() wait for preempt-disabled
 * readers too; without PREEMPT_RCU the two are the same. Older PREEMPT_RCU
 * kernels keep rcu_read_lock().
 */
#if !defined(CONFIG_PREEMPT_RCU) || LINUX_VERSION_CODE >= KERNEL_VERSION(4, 20, 0)
#define toa_rcu_read_lock() rcu_read_lock_sched()
#define toa_rcu_read_unlock() rcu_read_unlock_sched()
#else
#define toa_rcu_read_lock() rcu_read_lock()
#define toa_rcu_read_unlock() rcu_read_unlock()
#endif

/*
 * Identical on every kernel from 3.10, so no shim: in4_pton()/in6_pton(),
 * ipv6_prefix_equal(), ipv6_addr_prefix(), kernel_param_ops (set, get, free)
 * with module_param_cb(), kfree_rcu(), hlist_del_init_rcu(), net_generic().
 * pernet_operations.id was an `int *` before 4.9; kbuild builds with
 * -Wno-pointer-sign, so toa_net_id's `unsigned int` needs none either.
 * Before about 4.x the kernel itself appended a newline to a parameter's get()
 * output: reading trusted there shows an empty line after the list.
 */

#endif /* TOA_COMPAT_H */
