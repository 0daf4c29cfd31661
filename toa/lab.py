"""The kernel lab: boot a real kernel under QEMU, load toa.ko in it and prove it works.

The guest is a busybox initramfs whose /init (guest/init.sh.j2) loads tun.ko and toa.ko and runs
the static test peer (guest/toa_peer.c). With engine="bpf" the same boot, peer and checks prove the
eBPF engine instead: /init (guest/init_bpf.sh.j2) attaches toa.bpf.o with its loader, toa-bpf. The peer drives real TCP handshakes through a TUN device
with chosen TCP options and checks what accept()/getpeername() return. Everything it checks comes
back as `CASE name PASS|FAIL detail` lines on the serial console; the host adds its own checks
(the guest booted and finished, the kernel log is clean, the kernel is not tainted by a fault).
"""

from __future__ import annotations

import functools
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import jinja2

from toa import qemu
from toa.errors import ToaError
from toa.kernel import validate_release
from toa.ko import modinfo, read_module
from toa.resources import GUEST_DIR

PEER_SOURCE = GUEST_DIR / "toa_peer.c"
INIT_TEMPLATE = "init.sh.j2"
BPF_INIT_TEMPLATE = "init_bpf.sh.j2"
ENGINES = ("module", "bpf")
SERIAL_TAIL_LINES = 20
# Fuzz cases run again with kind 200 accepted, at this fraction of the main fuzz count.
KINDS200_FRACTION = 4

CASE_RE = re.compile(r"CASE (\S+) (PASS|FAIL)(?: (.*))?$")
# What insmod prints when a kernel enforcing signatures refuses a module it cannot verify (EKEYREJECTED).
KEY_REJECTED = "Key was rejected by service"
# The kernel's own word on why: "Loading of unsigned module is rejected", "... module with unavailable key ...".
SIG_REFUSAL_RE = re.compile(r"Loading of .* is rejected")
SIG_ENFORCE_CMDLINE = "module.sig_enforce=1"
# With the eBPF engine the guest is locked down too: BPF programs still load where modules cannot.
LOCKDOWN_CMDLINE = "lockdown=integrity"
# Kernel log lines that mean the kernel hit a bug, whatever caused it.
KERNEL_FAULT_RE = re.compile(r"\bBUG\b|Oops|WARNING|Call Trace|general protection fault|Kernel panic")
# Taint flags a test module is expected to set: O (out-of-tree, 4096), E (unsigned, 8192).
EXPECTED_TAINT = 4096 | 8192


class Check(NamedTuple):
    name: str
    passed: bool
    detail: str


@dataclass
class LabReport:
    """The outcome of one lab boot."""

    release: str
    checks: list[Check]
    serial_log: Path
    duration: float
    seed: int
    timed_out: bool = False
    serial_tail: list[str] = field(default_factory=list)
    engine: str = "module"
    object_sha256: str | None = None  # the eBPF engine's object, the same for every kernel

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict:
        return {
            "release": self.release,
            "engine": self.engine,
            **({"object_sha256": self.object_sha256} if self.object_sha256 else {}),
            "ok": self.ok,
            "duration_seconds": round(self.duration, 1),
            "seed": self.seed,
            "timed_out": self.timed_out,
            "serial_log": str(self.serial_log),
            "checks": [check._asdict() for check in self.checks],
            "serial_tail": self.serial_tail,
        }


# ---------------------------------------------------------------- host tools


def build_peer(out_dir: Path) -> Path:
    """Compile the guest test peer as a static binary (it runs on any guest kernel)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ToaError("gcc not found: install gcc and libc6-dev to build the lab's guest test program")
    out = out_dir / "toa_peer"
    argv = [gcc, "-static", "-O2", "-Wall", "-Werror", "-o", str(out), str(PEER_SOURCE)]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["no output"])[0]
        raise ToaError(f"compiling {PEER_SOURCE.name} failed: {first} (static glibc comes with libc6-dev)")
    return out


def kernel_release(vmlinuz: Path) -> str:
    """The `uname -r` of an x86 bzImage, read from its setup header (any distro's kernel)."""
    with Path(vmlinuz).open("rb") as image:
        head = image.read(0x210)
        if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
            raise ToaError(f"{vmlinuz} is not an x86 bzImage kernel: pass the vmlinuz the machine boots")
        offset = int.from_bytes(head[0x20E:0x210], "little")
        image.seek(offset + 0x200)
        banner = image.read(256).split(b"\0", 1)[0].decode(errors="replace")
    release = banner.split(" ", 1)[0]
    try:
        return validate_release(release)
    except ToaError:
        raise ToaError(f"{vmlinuz} names no kernel release in its header (read {banner[:60]!r})")
    return release


# ---------------------------------------------------------------- kernel modules for the guest


# ---------------------------------------------------------------- initramfs


@functools.lru_cache(maxsize=8)
def _templates(directory: Path) -> jinja2.Environment:
    """One environment per template directory: it keeps each template compiled (a deploy renders the
    same few for every host)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )


def render_template(directory: Path, name: str, **values) -> str:
    """A guest /init (a shell script) from a jinja2 template."""
    return _templates(Path(directory)).get_template(name).render(**values)


def render_init(*, tun_modules: list[str], seed: int, fuzz: int, cycles: int) -> str:
    return render_template(
        GUEST_DIR, INIT_TEMPLATE, tun_modules=tun_modules, seed=seed, fuzz=fuzz,
        fuzz_kinds200=max(1, fuzz // KINDS200_FRACTION), cycles=cycles,
    )


def render_init_bpf(*, tun_modules: list[str], seed: int, fuzz: int, cycles: int, object_sha256: str,
                    sig_enforce: bool = False) -> str:
    """The eBPF engine's /init: the module's plan with toa-bpf attach/detach in place of insmod/rmmod."""
    return render_template(
        GUEST_DIR, BPF_INIT_TEMPLATE, tun_modules=tun_modules, seed=seed, fuzz=fuzz,
        fuzz_kinds200=max(1, fuzz // KINDS200_FRACTION), cycles=cycles, object_sha256=object_sha256,
        sig_enforce=sig_enforce,
    )


def build_initramfs(
    path: Path, *, init: str, peer: Path, ko: bytes | None, modules: list[tuple[str, bytes]],
    files: list[tuple[str, bytes, int]] = (), busybox: Path | None = None,
) -> None:
    """The guest: /init, busybox, the peer, toa.ko (if any) as lib/toa.ko, kernel modules under
    lib/modules/, and FILES as (path, bytes, mode)."""
    qemu.write_initramfs(
        path, init=init, directories=("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"), busybox=busybox,
        files=[("bin/toa_peer", peer.read_bytes(), 0o755), *([("lib/toa.ko", ko, 0o644)] if ko is not None else []),
               *((f"lib/modules/{name}", data, 0o644) for name, data in modules), *files])


# ---------------------------------------------------------------- booting


# no_timer_check as for the fleet (toa/guests.py): a starved TCG vCPU can fail the early IO-APIC timer test.
LAB_KERNEL_ARGS = "console=ttyS0 panic=-1 no_timer_check"
LAB_MEMORY_MB = 1024


def qemu_argv(vmlinuz: Path, initrd: Path, extra_cmdline: str = "", extra_qemu: tuple[str, ...] = ()) -> list[str]:
    """The lab's QEMU: the console on stdout (qemu.run_to_exit reads it), and the guest's reboot ends it."""
    return qemu.kernel_argv(vmlinuz, initrd, " ".join(filter(None, [LAB_KERNEL_ARGS, extra_cmdline])),
                            memory_mb=LAB_MEMORY_MB, extra=("-nographic", "-no-reboot", *extra_qemu))


def boot_guest(
    vmlinuz: Path, ko: bytes | None, modules_dir: Path | None, init_for: Callable[[list[str]], str], *,
    log_dir: Path, timeout: float, on_line: Callable[[str], None], say: Callable[[str], None],
    extra_cmdline: str = "", files: list[tuple[str, bytes, int]] = (), extra_qemu: tuple[str, ...] = (),
) -> qemu.BootResult:
    """Boot VMLINUZ with a busybox initramfs holding toa.ko (if any), the test peer, tun.ko (with what
    it depends on), FILES and the /init that INIT_FOR renders for those tun modules; the /init and the
    serial console are kept in LOG_DIR."""
    qemu.find_qemu()  # before the peer is compiled: a missing QEMU or busybox is said first
    qemu.find_busybox()
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toa-lab-") as scratch_name:
        scratch = Path(scratch_name)
        say("compiling the guest test peer")
        peer = build_peer(scratch)
        tun = qemu.modules_with_deps(Path(modules_dir), "tun") if modules_dir else []
        if modules_dir and not tun:
            say("no tun module in the modules directory: assuming the kernel has TUN built in")
        init = init_for([name for name, _ in tun])
        (log_dir / "init.sh").write_text(init)
        initrd = scratch / "initramfs.cpio.gz"
        say("building the initramfs")
        build_initramfs(initrd, init=init, peer=peer, ko=ko, modules=tun, files=files)
        say("booting under QEMU (TCG)")
        return qemu.run_to_exit(qemu_argv(vmlinuz, initrd, extra_cmdline, extra_qemu), log_dir / "serial.log",
                                timeout, on_line)


# ---------------------------------------------------------------- reading the serial console


# trusted= (the sources whose TOA options are believed): unset, set to the peer, set elsewhere,
# changed and refused at run time, refused at load.
TRUST_BAD_VALUES = ["prefix-33", "prefix-129", "host-bits", "host-bits-v6", "octet-256", "octet-leading-zero", "three-octets",
                    "empty-prefix", "plus-prefix", "empty-entry", "leading-comma", "trailing-comma", "space",
                    "name", "v6-triple-colon", "v4-mapped", "port", "too-long", "seventeen"]
TRUST_CASES = (
    ["stats-untrusted-ignored", "trusted-default-empty", "trusted-unset-warning-once", "insmod-trusted",
     "trusted-param", "trusted-set-no-warning", "trusted-basic", "trusted-v4", "trusted-v6-kind253",
     "trusted-v4-mapped", "trusted-basic-untrusted-ignored", "trusted-emptied-warns", "trusted-sixteen-entries",
     "trusted-bad-logged", "trusted-race", "trusted-after-race", "rmmod-trusted", "insmod-untrusted",
     "untrusted-basic", "untrusted-v4", "untrusted-v6-kind254", "untrusted-v4-mapped",
     "untrusted-basic-untrusted-ignored", "untrusted-basic-nothing-read", "rmmod-untrusted",
     "insmod-bad-trusted-prefix", "insmod-bad-trusted-entry", "insmod-bad-trusted-host-bits",
     "insmod-bad-trusted-seventeen", "trusted-flip-restored", "trusted-warnings-total"]
    + [f"trusted-flip-{step}" for step in ("other", "v4-only", "v6-only", "bare", "neighbours", "any", "empty",
                                             "peer")]
    + [f"trusted-bad-{label}" for label in TRUST_BAD_VALUES]
)
# The address table: sized from memory by default, by table_bits= on request.
TABLE_CASES = ["table-bits-auto", "insmod-bad-table-bits", "insmod-table8", "table-bits-param", "table-many-open",
               "rmmod-table8"]


def required_cases(fuzz: int, cycles: int) -> list[str]:
    """CASE lines a complete run must print: a missing one means a step died silently."""
    names = ["tun-available", "kernel-refusal", "before-load-v4-untouched", "insmod", "load-message", "sysfs-module",
             "default-kinds", "stats-readable", "v4", "v6-kind253", "v6-kind254", "v4-mapped",
             "loopback-v4", "multicast-v6", "mapped-loopback-v6", "wrong-length-2-at-end", "basic",
             "basic-malformed-ignored", "rmmod", "unload-message", "after-unload-v4-untouched",
             "insmod-kinds200", "kinds200-param", "hold-open", "hold-rmmod-while-open",
             "hold-after-unload", "hold-close", "after-all-v4-untouched", "load-messages-total"]
    names += TRUST_CASES + TABLE_CASES + ["tfo-v4", "tfo-v6", "netns-stats-fresh", "netns-stats-own",
                                          "netns-init-untouched"]
    # Thousands of callers inside getname at once, with the default hooks and with the kretprobe fallback.
    names += ["hooks-default", "direct-calls", "crowd", "insmod-kretprobe", "hooks-kretprobe",
              "kretprobe-basic", "kretprobe-crowd", "rmmod-kretprobe", "insmod-via-entry", "call-via-entry",
              "via-entry-basic", "via-entry-crowd-unload", "rmmod-via-entry", "insmod-crowd-unload",
              "crowd-unload", "rmmod-crowd-unload"]
    if fuzz:
        names += ["fuzz-kinds2", "fuzz-kinds3"]
    if cycles:
        names.append("cycles")
    return names


def required_cases_bpf(fuzz: int, cycles: int, sig_enforce: bool = False) -> list[str]:
    """CASE lines a complete run of the eBPF engine's guest must print (init_bpf.sh.j2 and the peer)."""
    names = ["tun-available", "kernel-refusal", "bpf-object", "before-attach-v4-untouched", "attach",
             "attach-mounts-bpffs", "attach-own-cgroup2-unmounted", "trusted-unset-warning-once",
             "status-attached", "default-kinds", "trusted-default-empty", "stats-readable", "stats-untrusted-ignored",
             "attach-twice-refused", "v4", "v6-kind253", "v6-kind254", "v4-mapped", "loopback-v4", "multicast-v6",
             "mapped-loopback-v6", "wrong-length-2-at-end", "repeated-v4", "basic", "basic-malformed-ignored",
             "basic-entries-drained", "detach", "detach-nothing-left", "after-detach-v4-untouched",
             "stats-when-detached", "attach-trusted", "attach-uses-cgroup2-mount", "trusted-set-no-warning",
             "trusted-param", "trusted-basic", "tfo-v4", "tfo-v6", "trusted-flip-restored", "trusted-sixteen-entries",
             "trusted-race", "trusted-after-race", "table-many-open", "detach-trusted", "attach-untrusted",
             "untrusted-basic", "untrusted-basic-untrusted-ignored", "untrusted-basic-nothing-read",
             "detach-untrusted", "attach-bad-trusted-prefix", "attach-bad-trusted-entry",
             "attach-bad-trusted-host-bits", "attach-bad-trusted-seventeen", "attach-bad-kinds",
             "attach-bad-kinds-five", "refused-nothing-left", "attach-kinds200", "kinds200-param",
             "kinds-set-at-run-time", "kinds-reset-basic", "kinds-reset-kind200-not-accepted",
             "kinds-bad-set-refused", "detach-kinds200", "attach-hold", "hold-ready", "hold-open",
             "hold-entries-live", "hold-detach-while-open", "hold-after-unload", "hold-close", "hold-exit",
             "hold-nothing-left", "after-all-v4-untouched"]
    names += [f"trusted-flip-{step}" for step in ("other", "v4-only", "v6-only", "bare", "neighbours", "any", "empty",
                                                    "peer")]
    names += [f"trusted-bad-{label}" for label in TRUST_BAD_VALUES]
    if fuzz:
        names += ["fuzz-kinds2", "fuzz-kinds3"]
    if cycles:
        names += ["cycles", "cycles-nothing-left"]
    if sig_enforce:
        names += ["lockdown-integrity", "module-refused"]
    return names


def parse_serial(lines: list[str], *, fuzz: int, cycles: int, required: list[str] | None = None,
                 expected_taint: int = EXPECTED_TAINT) -> list[Check]:
    """Checks from a finished guest's console: its CASE lines plus what the host checks itself.
    REQUIRED: the CASE names a complete run prints (default: the module's); EXPECTED_TAINT: the taint
    flags the engine may set (default: an unsigned out-of-tree module's)."""
    checks: list[Check] = []
    seen: set[str] = set()
    dmesg: list[str] = []
    in_dmesg = False
    began = ended = False
    tainted = None
    for line in lines:
        text = line.strip()
        if text == "TOA-LAB DMESG BEGIN":
            in_dmesg = True
            continue
        if text == "TOA-LAB DMESG END":
            in_dmesg = False
            continue
        if in_dmesg:
            dmesg.append(text)
            continue
        if text.startswith("TOA-LAB BEGIN"):
            began = True
        elif text == "TOA-LAB END":
            ended = True
        elif text.startswith("TOA-LAB TAINTED "):
            tainted = text.split()[-1]
        match = CASE_RE.search(text)
        if match:
            name, verdict, detail = match.groups()
            seen.add(name)
            checks.append(Check(name, verdict == "PASS", detail or ""))
    checks.insert(0, Check("guest-booted", began, "the guest's /init started" if began else "no /init output"))
    missing = [name for name in (required if required is not None else required_cases(fuzz, cycles))
               if name not in seen]
    checks.append(Check("all-steps-ran", not missing, f"missing={','.join(missing)}" if missing else "all present"))
    # The whole console, kernel log dump included; the peer's own lines are not kernel output.
    faults = [line for line in lines if KERNEL_FAULT_RE.search(line) and not CASE_RE.search(line)]
    checks.append(Check(
        "kernel-log-clean", bool(dmesg) and not faults,
        (f"first={faults[0][:200]}" if faults else f"dmesg_lines={len(dmesg)}") if dmesg else "no kernel log dumped",
    ))
    if tainted is None or not tainted.isdigit():
        checks.append(Check("kernel-not-tainted-by-fault", False, f"tainted={tainted}"))
    else:
        unexpected = int(tainted) & ~expected_taint
        checks.append(Check("kernel-not-tainted-by-fault", unexpected == 0, f"tainted={tainted} unexpected_bits={unexpected}"))
    checks.append(Check("guest-finished", ended, "reached poweroff" if ended else "no end marker"))
    return checks


def signature_check(lines: list[str], sig_enforce: bool) -> Check | None:
    """A refused signature named as the cause (insmod's failing checks alone would not say why);
    under sig_enforce, that the kernel accepted toa.ko's signature."""
    rejected = next((line.strip() for line in lines if KEY_REJECTED in line), None)
    if rejected:
        kernel_says = next((match.group() for match in map(SIG_REFUSAL_RE.search, lines) if match), rejected)
        return Check("module-signature", False, (
            f"{KEY_REJECTED} ({kernel_says}): the kernel enforces module signatures and does not trust toa.ko's "
            "signer; sign it with a key the kernel trusts (`invoke sign`, then enroll the certificate with mokutil) "
            "or boot without module.sig_enforce=1"))
    if sig_enforce:
        return Check("module-signature", True, f"{SIG_ENFORCE_CMDLINE}: the kernel accepted toa.ko's signature")
    return None


# ---------------------------------------------------------------- the lab


def verify(
    vmlinuz: Path,
    ko: Path | None,
    release: str,
    modules_dir: Path | None,
    *,
    log_dir: Path,
    timeout: float,
    cycles: int = 100,
    fuzz: int = 1000,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
    sig_enforce: bool = False,
    engine: str = "module",
    bpf=None,
) -> LabReport:
    """Boot `vmlinuz` with `ko` and the test peer; return every check the guest and host made.
    SIG_ENFORCE boots with module.sig_enforce=1: only modules signed by a key the kernel trusts load.

    ENGINE "bpf" proves the eBPF engine instead: BPF (a toa.artifacts.BpfArtifact) puts its object and
    loader in the guest, which attaches, checks and detaches them as the module's guest loads and
    unloads toa.ko. There KO is only for SIG_ENFORCE, which then also locks the kernel down: the
    guest checks that KO (unsigned) is refused and that the engine works all the same."""
    say = progress or (lambda message: None)
    if engine not in ENGINES:
        raise ToaError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    vmlinuz = Path(vmlinuz).resolve()
    if not vmlinuz.is_file():
        raise ToaError(f"kernel image {vmlinuz} not found: pass the path of a vmlinuz/bzImage")
    if engine == "module" and ko is None:
        raise ToaError("the module engine needs toa.ko: build it first or pass --ko")
    if engine == "bpf" and bpf is None:
        raise ToaError("the bpf engine needs its build (toa.engine_bpf.build())")
    if engine == "bpf" and ko is not None and not sig_enforce:
        raise ToaError("with the bpf engine a toa.ko is only used with sig_enforce (to be refused)")
    if engine == "bpf" and sig_enforce and ko is None:
        raise ToaError("with the bpf engine, sig_enforce needs an unsigned toa.ko for the kernel to refuse")
    ko = Path(ko).resolve() if ko is not None else None
    if ko is not None and not ko.is_file():
        raise ToaError(f"module {ko} not found: build toa.ko first or pass --ko")
    if modules_dir is not None and not (Path(modules_dir) / "kernel").is_dir():
        raise ToaError(f"{modules_dir} is not a kernel modules directory (no kernel/ inside): pass lib/modules/<release>")
    if cycles < 0 or fuzz < 0 or timeout <= 0:
        raise ToaError("cycles and fuzz must be >= 0 and timeout > 0")
    ko_bytes = read_module(ko) if ko is not None else None
    if ko_bytes is not None:
        vermagic = modinfo(ko_bytes).get("vermagic", "")
        if vermagic.split(" ", 1)[0] != release:
            raise ToaError(f"{ko} was built for {vermagic.split(' ', 1)[0] or 'an unknown kernel'}, not {release}: build it against {release}'s headers")
    seed = random.randrange(1, 2**63) if seed is None else seed
    serial_log = Path(log_dir) / "serial.log"
    started = time.monotonic()

    def on_line(line: str) -> None:
        match = CASE_RE.search(line)
        if match:
            say(f"{match.group(1)} {match.group(2)}")

    if engine == "bpf":
        files = [("bin/toa-bpf", Path(bpf.loader).read_bytes(), 0o755), ("lib/toa.bpf.o", Path(bpf.object).read_bytes(), 0o644)]
        init_for = lambda tun_modules: render_init_bpf(  # noqa: E731
            tun_modules=tun_modules, seed=seed, fuzz=fuzz, cycles=cycles, object_sha256=bpf.object_sha256,
            sig_enforce=sig_enforce)
        cmdline = f"{SIG_ENFORCE_CMDLINE} {LOCKDOWN_CMDLINE}" if sig_enforce else ""
    else:
        files = []
        init_for = lambda tun_modules: render_init(tun_modules=tun_modules, seed=seed, fuzz=fuzz, cycles=cycles)  # noqa: E731
        cmdline = SIG_ENFORCE_CMDLINE if sig_enforce else ""
    result = boot_guest(
        vmlinuz, ko_bytes, modules_dir, init_for,
        log_dir=Path(log_dir), timeout=timeout, on_line=on_line, say=say, extra_cmdline=cmdline, files=files,
    )

    duration = time.monotonic() - started
    tail = result.lines[-SERIAL_TAIL_LINES:]
    if engine == "bpf":
        # No module is loaded: no taint at all is expected; a refused toa.ko is a check of the guest's own.
        checks = parse_serial(result.lines, fuzz=fuzz, cycles=cycles,
                              required=required_cases_bpf(fuzz, cycles, sig_enforce), expected_taint=0)
    else:
        checks = parse_serial(result.lines, fuzz=fuzz, cycles=cycles)
        signature = signature_check(result.lines, sig_enforce)
        if signature:
            checks.insert(1, signature)
    if result.timed_out:
        checks.append(Check("guest-timeout", False, f"no poweroff within {timeout:.0f}s: QEMU killed; serial log {serial_log}"))
    else:
        checks.append(Check("qemu-exit", result.returncode == 0, f"exit={result.returncode}"))
    return LabReport(release, checks, serial_log, duration, seed, result.timed_out, tail, engine=engine,
                     object_sha256=bpf.object_sha256 if engine == "bpf" else None)
