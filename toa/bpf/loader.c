// SPDX-License-Identifier: GPL-2.0
/*
 * toa-bpf: attach, change, read and detach the TOA eBPF engine (toa.bpf.c).
 *
 *     toa-bpf attach [kinds=K,...] [trusted=CIDR,...] [--object FILE]
 *     toa-bpf set kinds=K,... | trusted=CIDR,...     change a running engine
 *     toa-bpf get kinds|trusted                      the setting in canonical form
 *     toa-bpf stats                                  counters, `name value` lines
 *     toa-bpf status                                 attached or not, and what is loaded
 *     toa-bpf detach
 *     toa-bpf check [kinds=...] [trusted=...]        validate options, touch nothing
 *     toa-bpf object                                 write the embedded object to stdout
 *
 * The object is embedded at build time (TOA_BPF_OBJECT, its sha256 in
 * TOA_BPF_SHA256), and the binary is linked statically against libbpf: a host
 * needs nothing beyond its kernel. Programs are attached to the root of the
 * cgroup v2 hierarchy through BPF links pinned under /sys/fs/bpf/toa, beside
 * the maps the engine is configured and read through; the engine keeps
 * running after this program exits and stops when the pins are removed.
 *
 * Exit status: 0 done, 2 a value or request the user can fix (one line on
 * stderr), 1 the kernel refused (libbpf's own lines before ours).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/bpf.h>

#include "toa_maps.h"

#ifndef TOA_BPF_OBJECT
#error "TOA_BPF_OBJECT (the path of toa.bpf.o to embed) is not defined"
#endif
#ifndef TOA_BPF_SHA256
#error "TOA_BPF_SHA256 (the sha256 of the embedded object) is not defined"
#endif

__asm__(".section .rodata.toa_object,\"a\"\n"
	".balign 8\n"
	".globl toa_object_start\n"
	"toa_object_start:\n"
	".incbin \"" TOA_BPF_OBJECT "\"\n"
	".globl toa_object_end\n"
	"toa_object_end:\n"
	".previous\n");
extern const unsigned char toa_object_start[], toa_object_end[];

#define BPFFS "/sys/fs/bpf"
#define PIN_DIR BPFFS "/toa"
/* Where cgroup2 is mounted for the attach when the host has it nowhere; unmounted after. */
#define OWN_RUN_DIR "/run/toa-bpf"
#define OWN_CGROUP_DIR OWN_RUN_DIR "/cgroup2"
#ifndef BPF_FS_MAGIC
#define BPF_FS_MAGIC 0xcafe4a11
#endif
#ifndef CGROUP2_SUPER_MAGIC
#define CGROUP2_SUPER_MAGIC 0x63677270
#endif

#define EXIT_USER 2
#define EXIT_KERNEL 1

/* The CIDR text limit of toa.ko's trusted=: a full IPv6 address and its prefix. */
#define CIDR_TEXT_MAX (INET6_ADDRSTRLEN + 4)

static const char *const counter_names[TOA_COUNTER_COUNT] = {
	[TOA_V4_OPTIONS_SEEN] = "v4_options_seen",
	[TOA_V6_OPTIONS_SEEN] = "v6_options_seen",
	[TOA_ADDRESSES_RETURNED] = "addresses_returned",
	[TOA_MALFORMED_IGNORED] = "malformed_ignored",
	[TOA_V6_ON_V4_IGNORED] = "v6_on_v4_ignored",
	[TOA_UNTRUSTED_IGNORED] = "untrusted_ignored",
	[TOA_ENTRIES_LIVE] = "entries_live",
	[TOA_ALLOC_FAILED] = "alloc_failed",
};

/* The programs, their pinned links, and the maps that are pinned (toa_sk lives with the programs). */
static const struct {
	const char *prog, *pin;
} programs[] = {
	{ "toa_sockops", PIN_DIR "/link_sockops" },
	{ "toa_peer4", PIN_DIR "/link_peer4" },
	{ "toa_peer6", PIN_DIR "/link_peer6" },
};
#define NR_PROGRAMS (int)(sizeof(programs) / sizeof(programs[0]))

static const struct {
	const char *map, *pin;
} pinned_maps[] = {
	{ "toa_config", PIN_DIR "/config" },
	{ "toa_trusted4", PIN_DIR "/trusted4" },
	{ "toa_trusted6", PIN_DIR "/trusted6" },
	{ "toa_counters", PIN_DIR "/counters" },
};
#define NR_PINNED_MAPS (int)(sizeof(pinned_maps) / sizeof(pinned_maps[0]))
#define PIN_CONFIG pinned_maps[0].pin
#define PIN_TRUSTED4 pinned_maps[1].pin
#define PIN_TRUSTED6 pinned_maps[2].pin
#define PIN_COUNTERS pinned_maps[3].pin

static const char *const untrusted_warning =
	"trusted is empty: a TOA option is believed from any source, so any client that reaches this host "
	"directly can claim any address; set trusted= to the balancer's address range";

static void say(FILE *stream, const char *prefix, const char *fmt, va_list ap)
{
	fprintf(stream, "toa-bpf: %s", prefix);
	vfprintf(stream, fmt, ap);
	fputc('\n', stream);
}

static int fail(int status, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	say(stderr, "error: ", fmt, ap);
	va_end(ap);
	return status;
}

static void warn(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	say(stderr, "warning: ", fmt, ap);
	va_end(ap);
}

/* libbpf's warnings (the verifier's log on a refused program) go to stderr; its chatter does not. */
static int libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	if (level == LIBBPF_DEBUG || level == LIBBPF_INFO)
		return 0;
	return vfprintf(stderr, fmt, ap);
}

/* ---------- options: the module's kinds= and trusted=, with the same rules ---------- */

struct options {
	bool has_kinds, has_trusted;
	__u32 nr_kinds;
	__u8 kinds[TOA_MAX_KINDS];
	__u32 nr_trusted;
	struct toa_cidr trusted[TOA_MAX_TRUSTED];
	const char *object;
};

static int parse_kinds(const char *val, struct options *opt)
{
	const char *p = val;

	opt->nr_kinds = 0;
	if (!*val)
		return fail(EXIT_USER, "kinds: at least one option kind is needed");
	for (;;) {
		const char *comma = strchr(p, ',');
		size_t len = comma ? (size_t)(comma - p) : strlen(p);
		unsigned long kind = 0;
		size_t i;

		if (opt->nr_kinds == TOA_MAX_KINDS)
			return fail(EXIT_USER, "kinds: at most %d option kinds, not \"%s\"", TOA_MAX_KINDS, val);
		for (i = 0; i < len && isdigit((unsigned char)p[i]) && kind <= 255; i++)
			kind = kind * 10 + (unsigned long)(p[i] - '0');
		if (!len || i != len || len > 3 || kind < 2 || kind > 255)
			return fail(EXIT_USER, "kinds: %.*s is not a TCP option kind that carries data (2..255)",
				    (int)(len > 16 ? 16 : len), p);
		opt->kinds[opt->nr_kinds++] = (__u8)kind;
		if (!comma)
			return 0;
		p = comma + 1;
	}
}

/* a.b.c.d, decimal, each 0..255; 0 or -1. A leading zero is refused apart (octal to some parsers). */
static int parse_ipv4(const char *text, __u8 out[4], const char **why)
{
	const char *p = text;
	int part;

	*why = "not an IPv4 address (a.b.c.d)";
	for (part = 0; part < 4; part++) {
		unsigned int value = 0, digits = 0;

		while (isdigit((unsigned char)*p) && digits < 4) {
			value = value * 10 + (unsigned int)(*p++ - '0');
			digits++;
		}
		if (!digits || digits > 3 || value > 255)
			return -1;
		out[part] = (__u8)value;
		if (part < 3 && *p++ != '.')
			return -1;
	}
	if (*p)
		return -1;
	for (p = text; *p; p++) {
		if (*p == '0' && (p == text || p[-1] == '.') && isdigit((unsigned char)p[1])) {
			*why = "an IPv4 octet with a leading zero";
			return -1;
		}
	}
	return 0;
}

static bool v4mapped(const __u8 *a)
{
	static const __u8 prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

	return !memcmp(a, prefix, 12);
}

/* One entry: ADDRESS or ADDRESS/PREFIX with no bit set past the prefix; the message names it. */
static int parse_cidr(const char *text, size_t len, struct toa_cidr *cidr)
{
	char buf[CIDR_TEXT_MAX + 1];
	const char *why;
	unsigned int max, prefix, i;
	char *slash;

	if (!len) {
		why = "an empty entry";
		goto bad;
	}
	if (len > CIDR_TEXT_MAX) {
		why = "too long for an address and prefix";
		goto bad;
	}
	memcpy(buf, text, len);
	buf[len] = '\0';
	slash = strchr(buf, '/');
	if (slash)
		*slash = '\0';
	memset(cidr, 0, sizeof(*cidr));
	if (strchr(buf, ':')) {
		cidr->family = AF_INET6;
		max = 128;
		why = "not an IPv6 address";
		if (inet_pton(AF_INET6, buf, cidr->addr) != 1)
			goto bad;
	} else {
		cidr->family = AF_INET;
		max = 32;
		if (parse_ipv4(buf, cidr->addr, &why) < 0)
			goto bad;
	}
	prefix = max;
	if (slash) {
		const char *digits = slash + 1;
		size_t ndigits = strlen(digits);

		why = max == 32 ? "the prefix length is not 0..32" : "the prefix length is not 0..128";
		if (!ndigits || ndigits > 3 || strspn(digits, "0123456789") != ndigits)
			goto bad;
		prefix = (unsigned int)strtoul(digits, NULL, 10);
		if (prefix > max)
			goto bad;
	}
	cidr->prefix = (__u8)prefix;
	if (cidr->family == AF_INET6 && prefix >= 96 && v4mapped(cidr->addr)) {
		why = "a v4-mapped IPv6 address (write the IPv4 form)";
		goto bad;
	}
	for (i = prefix; i < max; i++) {
		if (cidr->addr[i / 8] & (0x80 >> (i % 8))) {
			why = "address bits are set past the prefix length";
			goto bad;
		}
	}
	return 0;
bad:
	return fail(EXIT_USER, "trusted: bad entry \"%.*s\": %s", (int)(len > 64 ? 64 : len), text, why);
}

/* Comma-separated, at most TOA_MAX_TRUSTED entries; empty clears the list. */
static int parse_trusted(const char *val, struct options *opt)
{
	const char *end = val + strlen(val);

	opt->nr_trusted = 0;
	while (val < end) {
		const char *comma = memchr(val, ',', (size_t)(end - val));
		size_t len = (size_t)((comma ? comma : end) - val);
		int err;

		if (opt->nr_trusted == TOA_MAX_TRUSTED)
			return fail(EXIT_USER, "trusted: more than %d entries, from \"%.*s\"", TOA_MAX_TRUSTED,
				    (int)(end - val > 64 ? 64 : end - val), val);
		err = parse_cidr(val, len, &opt->trusted[opt->nr_trusted]);
		if (err)
			return err;
		opt->nr_trusted++;
		if (!comma)
			break;
		val = comma + 1;
		if (val == end)
			return fail(EXIT_USER, "trusted: bad entry \"\": an empty entry");
	}
	return 0;
}

/* NAME=VALUE words (kinds=, trusted=) and --object FILE where allowed. */
static int parse_options(int argc, char **argv, struct options *opt, bool object_allowed)
{
	int i, err;

	memset(opt, 0, sizeof(*opt));
	for (i = 0; i < argc; i++) {
		if (object_allowed && !strcmp(argv[i], "--object") && i + 1 < argc) {
			opt->object = argv[++i];
		} else if (!strncmp(argv[i], "kinds=", 6)) {
			if (opt->has_kinds)
				return fail(EXIT_USER, "kinds= is given twice");
			opt->has_kinds = true;
			err = parse_kinds(argv[i] + 6, opt);
			if (err)
				return err;
		} else if (!strncmp(argv[i], "trusted=", 8)) {
			if (opt->has_trusted)
				return fail(EXIT_USER, "trusted= is given twice");
			opt->has_trusted = true;
			err = parse_trusted(argv[i] + 8, opt);
			if (err)
				return err;
		} else {
			return fail(EXIT_USER, "unknown option \"%.64s\": give kinds=K,... or trusted=CIDR,...%s",
				    argv[i], object_allowed ? " (or --object FILE)" : "");
		}
	}
	return 0;
}

/* ---------- reading back: the forms /sys/module/toa/parameters/ shows ---------- */

/* An IPv6 address as the kernel's %pI6c prints it (RFC 5952; IPv4 tail for v4-mapped and ISATAP). */
static void format_ipv6(const __u8 *a, char *out)
{
	static const __u8 isatap[4] = { 0, 0, 0x5e, 0xfe };
	bool ipv4_tail = v4mapped(a) || !memcmp(a + 8, isatap, 4) ||
			 (a[8] == 0x02 && a[9] == 0 && a[10] == 0x5e && a[11] == 0xfe);
	int words = ipv4_tail ? 6 : 8, longest = 1, colonpos = -1, i, j;
	bool needcolon = false;
	char *p = out;

	for (i = 0; i < words; i++) {
		for (j = i; j < words && !a[2 * j] && !a[2 * j + 1]; j++)
			;
		if (j - i > longest) {
			longest = j - i;
			colonpos = i;
		}
	}
	for (i = 0; i < words; i++) {
		if (i == colonpos) {
			if (needcolon || i == 0)
				*p++ = ':';
			*p++ = ':';
			needcolon = false;
			i += longest - 1;
			continue;
		}
		if (needcolon)
			*p++ = ':';
		p += sprintf(p, "%x", a[2 * i] << 8 | a[2 * i + 1]);
		needcolon = true;
	}
	if (ipv4_tail) {
		if (needcolon)
			*p++ = ':';
		p += sprintf(p, "%u.%u.%u.%u", a[12], a[13], a[14], a[15]);
	}
	*p = '\0';
}

static void print_trusted(FILE *out, const struct toa_config *cfg)
{
	__u32 i;

	for (i = 0; i < cfg->nr_trusted && i < TOA_MAX_TRUSTED; i++) {
		const struct toa_cidr *c = &cfg->trusted[i];
		char text[INET6_ADDRSTRLEN + 8];

		if (c->family == AF_INET)
			sprintf(text, "%u.%u.%u.%u", c->addr[0], c->addr[1], c->addr[2], c->addr[3]);
		else
			format_ipv6(c->addr, text);
		fprintf(out, "%s%s/%u", i ? "," : "", text, c->prefix);
	}
	fputc('\n', out);
}

static void print_kinds(FILE *out, const struct toa_config *cfg)
{
	__u32 i;

	for (i = 0; i < cfg->nr_kinds && i < TOA_MAX_KINDS; i++)
		fprintf(out, "%s%u", i ? "," : "", cfg->kind_list[i]);
	fputc('\n', out);
}

/* ---------- the configuration in the maps ---------- */

static void config_kinds(struct toa_config *cfg, const struct options *opt)
{
	__u32 i;

	memset(cfg->kinds, 0, sizeof(cfg->kinds));
	memset(cfg->kind_list, 0, sizeof(cfg->kind_list));
	for (i = 0; i < opt->nr_kinds; i++) {
		cfg->kinds[opt->kinds[i] / 64] |= 1ULL << (opt->kinds[i] % 64);
		cfg->kind_list[i] = opt->kinds[i];
	}
	cfg->nr_kinds = opt->nr_kinds;
}

static int trie_update(int fd4, int fd6, const struct toa_cidr *c, bool add)
{
	__u32 one = 1;
	int err;

	if (c->family == AF_INET) {
		struct toa_lpm4 key = { .prefixlen = c->prefix };

		memcpy(key.addr, c->addr, 4);
		err = add ? bpf_map_update_elem(fd4, &key, &one, BPF_ANY) : bpf_map_delete_elem(fd4, &key);
	} else {
		struct toa_lpm6 key = { .prefixlen = c->prefix };

		memcpy(key.addr, c->addr, 16);
		err = add ? bpf_map_update_elem(fd6, &key, &one, BPF_ANY) : bpf_map_delete_elem(fd6, &key);
	}
	if (err && !(err == -ENOENT && !add))
		return err;
	return 0;
}

static bool cidr_in(const struct toa_cidr *c, const struct toa_cidr *list, __u32 n)
{
	__u32 i;

	for (i = 0; i < n; i++)
		if (list[i].family == c->family && list[i].prefix == c->prefix &&
		    !memcmp(list[i].addr, c->addr, 16))
			return true;
	return false;
}

/*
 * Replace the configuration. A handshake racing the change sees, for each
 * accepted kind and each trusted entry, the old setting or the new one, never
 * a broken entry: the new entries go in before the list says so, the old ones
 * go after; an emptied list first says "any source", then drops its entries.
 */
static int write_config(int cfg_fd, int fd4, int fd6, const struct toa_config *old, const struct options *opt)
{
	struct toa_config cfg = *old;
	__u32 zero = 0, i;
	int err;

	if (opt->has_kinds)
		config_kinds(&cfg, opt);
	if (opt->has_trusted) {
		for (i = 0; i < opt->nr_trusted; i++) {
			err = trie_update(fd4, fd6, &opt->trusted[i], true);
			if (err)
				return fail(EXIT_KERNEL, "adding trusted entry %u to its map: %s", i, strerror(-err));
		}
		cfg.nr_trusted = opt->nr_trusted;
		memset(cfg.trusted, 0, sizeof(cfg.trusted));
		memcpy(cfg.trusted, opt->trusted, opt->nr_trusted * sizeof(opt->trusted[0]));
		cfg.trust_any = opt->nr_trusted == 0;
	}
	err = bpf_map_update_elem(cfg_fd, &zero, &cfg, BPF_ANY);
	if (err)
		return fail(EXIT_KERNEL, "writing the configuration map: %s", strerror(-err));
	if (opt->has_trusted) {
		for (i = 0; i < old->nr_trusted && i < TOA_MAX_TRUSTED; i++) {
			if (cidr_in(&old->trusted[i], opt->trusted, opt->nr_trusted))
				continue;
			err = trie_update(fd4, fd6, &old->trusted[i], false);
			if (err)
				return fail(EXIT_KERNEL, "removing an old trusted entry: %s", strerror(-err));
		}
		if (!opt->nr_trusted)
			warn("%s", untrusted_warning);
	}
	return 0;
}

static int read_config(int cfg_fd, struct toa_config *cfg)
{
	__u32 zero = 0;

	if (bpf_map_lookup_elem(cfg_fd, &zero, cfg))
		return fail(EXIT_KERNEL, "reading the configuration map: %s", strerror(errno));
	return 0;
}

/* ---------- where things live ---------- */

static bool is_attached(void)
{
	struct stat st;

	return stat(PIN_DIR, &st) == 0;
}

static int open_pin(const char *path)
{
	int fd = bpf_obj_get(path);

	if (fd < 0)
		fail(EXIT_KERNEL, "opening %s: %s", path, strerror(errno));
	return fd;
}

/* bpffs at /sys/fs/bpf, mounted when it is not: pins live as long as that mount. */
static int ensure_bpffs(void)
{
	struct statfs fs;

	if (statfs(BPFFS, &fs) == 0 && fs.f_type == BPF_FS_MAGIC)
		return 0;
	if (mount("bpf", BPFFS, "bpf", 0, "mode=0700"))
		return fail(EXIT_KERNEL, "mounting the BPF filesystem at %s: %s", BPFFS, strerror(errno));
	return 0;
}

/* Serialises attach, set and detach against each other (flock on the bpffs root). */
static int lock_bpffs(void)
{
	int fd = open(BPFFS, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd >= 0 && flock(fd, LOCK_EX))
		warn("cannot lock %s: %s", BPFFS, strerror(errno));
	return fd;
}

/* The mount point of the cgroup v2 hierarchy's root, from /proc/self/mountinfo; NULL if none. */
static char *find_cgroup2(void)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char line[4096], *found = NULL;

	if (!f)
		return NULL;
	while (!found && fgets(line, sizeof(line), f)) {
		char root[1024], point[1024], *dash = strstr(line, " - ");
		char fstype[64];

		if (!dash || sscanf(line, "%*s %*s %*s %1023s %1023s", root, point) != 2 ||
		    sscanf(dash + 3, "%63s", fstype) != 1)
			continue;
		if (!strcmp(fstype, "cgroup2") && !strcmp(root, "/"))
			found = strdup(point);
	}
	fclose(f);
	/* mountinfo escapes spaces and the like as \ooo: such a mount point is not used. */
	if (found && strchr(found, '\\')) {
		free(found);
		found = NULL;
	}
	return found;
}

/* ---------- commands ---------- */

static void unpin_all(void)
{
	int i;

	for (i = 0; i < NR_PROGRAMS; i++) {
		int fd = bpf_obj_get(programs[i].pin);

		if (fd >= 0) {
			bpf_link_detach(fd);
			close(fd);
		}
		unlink(programs[i].pin);
	}
	for (i = 0; i < NR_PINNED_MAPS; i++)
		unlink(pinned_maps[i].pin);
	rmdir(PIN_DIR);
}

/* The last line of a verifier log that says what the verification cost ("processed N insns ..."). */
static void print_verifier_stats(const char *name, const char *log)
{
	const char *line = log;
	int len;

	/* The line that starts with it: newer kernels also log "insns processed N" before. */
	while (line && strncmp(line, "processed ", 10)) {
		line = strchr(line, '\n');
		if (line)
			line++;
	}
	if (!line)
		return;
	len = (int)strcspn(line, "\n");
	printf("verifier: %s %.*s\n", name, len, line);
}

static char verifier_log[NR_PROGRAMS][4096];

static int cmd_attach(int argc, char **argv)
{
	struct bpf_link *links[NR_PROGRAMS] = { 0 };
	struct bpf_object *obj = NULL;
	struct toa_config empty = { 0 };
	struct options opt;
	bool own_mount = false;
	char *cgroup = NULL;
	int status = EXIT_KERNEL, cg_fd = -1, lock_fd, err, i;

	err = parse_options(argc, argv, &opt, true);
	if (err)
		return err;
	if (!opt.has_kinds) {
		opt.has_kinds = true;
		opt.nr_kinds = 2;
		opt.kinds[0] = 254;
		opt.kinds[1] = 253;
	}
	opt.has_trusted = true;	/* unset is the empty list */
	if (ensure_bpffs())
		return EXIT_KERNEL;
	lock_fd = lock_bpffs();
	if (is_attached()) {
		status = fail(EXIT_USER, "already attached (%s exists): change it with `toa-bpf set`, or detach first",
			      PIN_DIR);
		goto out;
	}
	if (opt.object) {
		obj = bpf_object__open_file(opt.object, NULL);
	} else {
		LIBBPF_OPTS(bpf_object_open_opts, open_opts, .object_name = "toa");

		obj = bpf_object__open_mem(toa_object_start, (size_t)(toa_object_end - toa_object_start),
					   &open_opts);
	}
	if (!obj) {
		fail(EXIT_KERNEL, "opening the BPF object %s: %s", opt.object ? opt.object : "(embedded)",
		     strerror(errno));
		goto out;
	}
	/* The verifier's statistics (BPF_LOG_STATS): what each program cost to prove safe on this kernel. */
	for (i = 0; i < NR_PROGRAMS; i++) {
		struct bpf_program *prog = bpf_object__find_program_by_name(obj, programs[i].prog);

		if (prog) {
			bpf_program__set_log_buf(prog, verifier_log[i], sizeof(verifier_log[i]));
			bpf_program__set_log_level(prog, 4);
		}
	}
	if (bpf_object__load(obj)) {
		for (i = 0; i < NR_PROGRAMS; i++)
			if (verifier_log[i][0])
				fprintf(stderr, "verifier log of %s:\n%s", programs[i].prog, verifier_log[i]);
		fail(EXIT_KERNEL, "the kernel refused the BPF object (%s): needs Linux 5.10 or later with "
				  "CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF", strerror(errno));
		goto out;
	}
	if (write_config(bpf_map__fd(bpf_object__find_map_by_name(obj, "toa_config")),
			 bpf_map__fd(bpf_object__find_map_by_name(obj, "toa_trusted4")),
			 bpf_map__fd(bpf_object__find_map_by_name(obj, "toa_trusted6")), &empty, &opt))
		goto out;
	cgroup = find_cgroup2();
	if (!cgroup) {
		/* No cgroup2 here: mount the hierarchy just for the attach (the links keep its root). */
		mkdir("/run", 0755);	/* a bare initramfs may have none */
		mkdir(OWN_RUN_DIR, 0700);
		mkdir(OWN_CGROUP_DIR, 0700);
		if (mount("cgroup2", OWN_CGROUP_DIR, "cgroup2", 0, NULL)) {
			fail(EXIT_KERNEL, "mounting cgroup2 at %s: %s (needs CONFIG_CGROUPS)", OWN_CGROUP_DIR,
			     strerror(errno));
			goto out;
		}
		own_mount = true;
		cgroup = strdup(OWN_CGROUP_DIR);
	}
	cg_fd = open(cgroup, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (cg_fd < 0) {
		fail(EXIT_KERNEL, "opening the cgroup2 root %s: %s", cgroup, strerror(errno));
		goto out;
	}
	for (i = 0; i < NR_PROGRAMS; i++) {
		struct bpf_program *prog = bpf_object__find_program_by_name(obj, programs[i].prog);

		links[i] = prog ? bpf_program__attach_cgroup(prog, cg_fd) : NULL;
		if (!links[i]) {
			fail(EXIT_KERNEL, "attaching %s to the cgroup2 root %s: %s (needs CONFIG_CGROUP_BPF)",
			     programs[i].prog, cgroup, strerror(errno));
			goto out;
		}
	}
	if (mkdir(PIN_DIR, 0700)) {
		fail(EXIT_KERNEL, "creating %s: %s", PIN_DIR, strerror(errno));
		goto out;
	}
	for (i = 0; i < NR_PINNED_MAPS; i++) {
		err = bpf_map__pin(bpf_object__find_map_by_name(obj, pinned_maps[i].map), pinned_maps[i].pin);
		if (err) {
			fail(EXIT_KERNEL, "pinning %s: %s", pinned_maps[i].pin, strerror(-err));
			goto unpin;
		}
	}
	for (i = 0; i < NR_PROGRAMS; i++) {
		err = bpf_link__pin(links[i], programs[i].pin);
		if (err) {
			fail(EXIT_KERNEL, "pinning %s: %s", programs[i].pin, strerror(-err));
			goto unpin;
		}
	}
	for (i = 0; i < NR_PROGRAMS; i++)
		print_verifier_stats(programs[i].prog, verifier_log[i]);
	printf("attached to the cgroup2 root%s%s, pinned in %s (object sha256 %s)\n",
	       own_mount ? " (mounted for the attach at " : " at ", own_mount ? OWN_CGROUP_DIR ")" : cgroup,
	       PIN_DIR, opt.object ? "of --object" : TOA_BPF_SHA256);
	status = 0;
	goto out;
unpin:
	unpin_all();
out:
	for (i = 0; i < NR_PROGRAMS; i++)
		bpf_link__destroy(links[i]);	/* a pinned link stays attached */
	bpf_object__close(obj);
	if (cg_fd >= 0)
		close(cg_fd);
	if (own_mount) {
		umount2(OWN_CGROUP_DIR, MNT_DETACH);
		rmdir(OWN_CGROUP_DIR);
		rmdir(OWN_RUN_DIR);
	}
	free(cgroup);
	if (lock_fd >= 0)
		close(lock_fd);
	return status;
}

static int cmd_detach(void)
{
	int lock_fd = lock_bpffs();

	if (!is_attached()) {
		printf("not attached: nothing to detach\n");
	} else {
		unpin_all();
		if (is_attached()) {
			if (lock_fd >= 0)
				close(lock_fd);
			return fail(EXIT_KERNEL, "%s is still there after the detach: remove what else it holds",
				    PIN_DIR);
		}
		printf("detached\n");
	}
	if (lock_fd >= 0)
		close(lock_fd);
	return 0;
}

static int cmd_set(int argc, char **argv)
{
	struct toa_config cfg;
	struct options opt;
	int err, cfg_fd = -1, fd4 = -1, fd6 = -1, lock_fd, status = EXIT_KERNEL;

	err = parse_options(argc, argv, &opt, false);
	if (err)
		return err;
	if (!opt.has_kinds && !opt.has_trusted)
		return fail(EXIT_USER, "set what? give kinds=K,... and/or trusted=CIDR,...");
	lock_fd = lock_bpffs();
	if (!is_attached()) {
		status = fail(EXIT_USER, "not attached: `toa-bpf attach` first");
		goto out;
	}
	cfg_fd = open_pin(PIN_CONFIG);
	fd4 = open_pin(PIN_TRUSTED4);
	fd6 = open_pin(PIN_TRUSTED6);
	if (cfg_fd < 0 || fd4 < 0 || fd6 < 0 || read_config(cfg_fd, &cfg))
		goto out;
	if (write_config(cfg_fd, fd4, fd6, &cfg, &opt))
		goto out;
	status = 0;
out:
	if (cfg_fd >= 0)
		close(cfg_fd);
	if (fd4 >= 0)
		close(fd4);
	if (fd6 >= 0)
		close(fd6);
	if (lock_fd >= 0)
		close(lock_fd);
	return status;
}

static int cmd_get(const char *what)
{
	struct toa_config cfg;
	int fd;

	if (strcmp(what, "kinds") && strcmp(what, "trusted"))
		return fail(EXIT_USER, "get what? kinds or trusted, not \"%.32s\"", what);
	if (!is_attached())
		return fail(EXIT_USER, "not attached");
	fd = open_pin(PIN_CONFIG);
	if (fd < 0 || read_config(fd, &cfg))
		return EXIT_KERNEL;
	close(fd);
	if (!strcmp(what, "kinds"))
		print_kinds(stdout, &cfg);
	else
		print_trusted(stdout, &cfg);
	return 0;
}

/* The counters summed over CPUs, in /proc/net/toa_stats's lines. */
static int cmd_stats(void)
{
	int ncpus = libbpf_num_possible_cpus(), fd, i, c;
	__u64 *values;

	if (!is_attached())
		return fail(EXIT_USER, "not attached: no counters");
	if (ncpus < 1)
		return fail(EXIT_KERNEL, "cannot count the possible CPUs: %s", strerror(-ncpus));
	values = calloc((size_t)ncpus, sizeof(*values));
	fd = open_pin(PIN_COUNTERS);
	if (!values || fd < 0)
		return EXIT_KERNEL;
	for (i = 0; i < TOA_COUNTER_COUNT; i++) {
		__u32 key = (__u32)i;
		__u64 total = 0;

		if (bpf_map_lookup_elem(fd, &key, values))
			return fail(EXIT_KERNEL, "reading the counters: %s", strerror(errno));
		for (c = 0; c < ncpus; c++)
			total += values[c];	/* entries_live moves up on one CPU and down on another */
		printf("%s %llu\n", counter_names[i], (unsigned long long)total);
	}
	/* The module's kprobe misses: no probe here can miss. */
	printf("probe_missed 0\n");
	close(fd);
	free(values);
	return 0;
}

/* BPF programs and maps loaded in the kernel whose names start with toa_ (ours, or left behind). */
static void count_loaded(int *progs, int *maps)
{
	__u32 id = 0;

	*progs = *maps = 0;
	while (!bpf_prog_get_next_id(id, &id)) {
		struct bpf_prog_info info = { 0 };
		__u32 len = sizeof(info);
		int fd = bpf_prog_get_fd_by_id(id);

		if (fd < 0)
			continue;
		if (!bpf_obj_get_info_by_fd(fd, &info, &len) && !strncmp(info.name, "toa_", 4))
			(*progs)++;
		close(fd);
	}
	id = 0;
	while (!bpf_map_get_next_id(id, &id)) {
		struct bpf_map_info info = { 0 };
		__u32 len = sizeof(info);
		int fd = bpf_map_get_fd_by_id(id);

		if (fd < 0)
			continue;
		if (!bpf_obj_get_info_by_fd(fd, &info, &len) && !strncmp(info.name, "toa_", 4))
			(*maps)++;
		close(fd);
	}
}

static int cmd_status(void)
{
	int progs, maps, i;

	printf("object_sha256 %s\n", TOA_BPF_SHA256);
	if (is_attached()) {
		struct toa_config cfg;
		int fd = open_pin(PIN_CONFIG);

		printf("attached yes\n");
		for (i = 0; i < NR_PROGRAMS; i++) {
			struct bpf_link_info info = { 0 };
			__u32 len = sizeof(info);
			int link = bpf_obj_get(programs[i].pin);

			if (link < 0 || bpf_obj_get_info_by_fd(link, &info, &len))
				printf("link %s missing\n", programs[i].prog);
			else
				printf("link %s prog_id=%u cgroup_id=%llu attach_type=%u\n", programs[i].prog,
				       info.prog_id, (unsigned long long)info.cgroup.cgroup_id,
				       info.cgroup.attach_type);
			if (link >= 0)
				close(link);
		}
		if (fd >= 0 && !read_config(fd, &cfg)) {
			printf("kinds ");
			print_kinds(stdout, &cfg);
			printf("trusted ");
			print_trusted(stdout, &cfg);
		}
		if (fd >= 0)
			close(fd);
	} else {
		printf("attached no\n");
	}
	count_loaded(&progs, &maps);
	printf("loaded_programs %d\nloaded_maps %d\n", progs, maps);
	return 0;
}

static int cmd_check(int argc, char **argv)
{
	struct toa_config cfg = { 0 };
	struct options opt;
	int err = parse_options(argc, argv, &opt, false);

	if (err)
		return err;
	if (opt.has_kinds) {
		config_kinds(&cfg, &opt);
		printf("kinds ");
		print_kinds(stdout, &cfg);
	}
	if (opt.has_trusted) {
		cfg.nr_trusted = opt.nr_trusted;
		memcpy(cfg.trusted, opt.trusted, opt.nr_trusted * sizeof(opt.trusted[0]));
		printf("trusted ");
		print_trusted(stdout, &cfg);
	}
	return 0;
}

static int cmd_object(void)
{
	size_t len = (size_t)(toa_object_end - toa_object_start);

	if (fwrite(toa_object_start, 1, len, stdout) != len || fflush(stdout))
		return fail(EXIT_KERNEL, "writing the object: %s", strerror(errno));
	return 0;
}

static int usage(void)
{
	fprintf(stderr,
		"usage: toa-bpf attach [kinds=K,...] [trusted=CIDR,...] [--object FILE]\n"
		"       toa-bpf set [kinds=K,...] [trusted=CIDR,...]\n"
		"       toa-bpf get kinds|trusted\n"
		"       toa-bpf stats | status | detach | object\n"
		"       toa-bpf check [kinds=K,...] [trusted=CIDR,...]\n");
	return EXIT_USER;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";

	libbpf_set_print(libbpf_print);
	if (!strcmp(cmd, "check"))
		return cmd_check(argc - 2, argv + 2);
	if (!strcmp(cmd, "object") && argc == 2)
		return cmd_object();
	if (!strcmp(cmd, "attach"))
		return cmd_attach(argc - 2, argv + 2);
	if (!strcmp(cmd, "set"))
		return cmd_set(argc - 2, argv + 2);
	if (!strcmp(cmd, "get") && argc == 3)
		return cmd_get(argv[2]);
	if (!strcmp(cmd, "stats") && argc == 2)
		return cmd_stats();
	if (!strcmp(cmd, "status") && argc == 2)
		return cmd_status();
	if (!strcmp(cmd, "detach") && argc == 2)
		return cmd_detach();
	return usage();
}
