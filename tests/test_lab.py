"""The kernel lab end to end: real Debian kernels booted under QEMU with a freshly built toa.ko.

Downloads are cached (toa.debian), the module is built in its suite's container (toa.build), and
every boot is a real TCG boot. Timings are printed (pytest -s shows them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from toa import artifacts, build, debian, engine_bpf, lab, qemu
from toa.errors import ToaError
from tests.cli import json_items

pytestmark = [pytest.mark.lab, pytest.mark.docker, pytest.mark.network]

REPO = Path(__file__).resolve().parent.parent
FULL_TIMEOUT = 900
# The scenarios the brief names, each of which must have run and passed.
KEY_CHECKS = ["tun-available", "kernel-refusal", "insmod", "load-message", "sysfs-module", "stats-readable",
              "v4", "v6-kind253", "v6-kind254", "v4-mapped", "no-option-v4", "wrong-length-10",
              "truncated-length", "repeated-v4", "loopback-v4", "multicast-v4", "broadcast-v4", "loopback-v6",
              "multicast-v6", "mapped-loopback-v6", "wrong-length-2-at-end", "toa-on-syn-only",
              "basic-addresses-returned", "basic-malformed-ignored",
              "fuzz-kinds2", "fuzz-kinds3", "hold-rmmod-while-open", "hold-after-unload", "hold-close",
              "cycles", "load-messages-total", "kernel-log-clean", "kernel-not-tainted-by-fault",
              "guest-finished", "qemu-exit",
              # trusted=: unset warns once; the peer's range changes nothing; another range rewrites
              # nothing and counts; run-time changes rule, races stay whole, bad values are refused.
              "trusted-unset-warning-once", "trusted-basic", "trusted-set-no-warning", "untrusted-basic",
              "untrusted-basic-untrusted-ignored", "untrusted-basic-nothing-read", "trusted-flip-other",
              "trusted-flip-v4-only", "trusted-flip-v6-only", "trusted-flip-peer", "trusted-race",
              "trusted-bad-prefix-33", "trusted-bad-seventeen", "trusted-bad-logged",
              "insmod-bad-trusted-prefix", "insmod-bad-trusted-entry",
              # Fast Open children keep their real peer; counters per namespace; the table's size.
              "tfo-v4", "tfo-v6", "netns-stats-fresh", "netns-stats-own", "netns-init-untouched",
              "table-bits-auto", "table-bits-param", "table-many-open", "insmod-bad-table-bits",
              # 2000 callers inside getname at once: each gets its TOA address, probe_missed stays 0,
              # with the default (ftrace) hooks and with the kretprobe fallback.
              "hooks-default", "direct-calls", "crowd", "hooks-kretprobe", "kretprobe-basic", "kretprobe-crowd",
              # the wrappers' call through the function's entry (the way where the CPU enforces IBT)
              "call-via-entry", "via-entry-basic", "via-entry-crowd-unload",
              # rmmod with 2000 callers asleep inside getname waits for them (direct and ftrace_ops getname)
              "crowd-unload", "rmmod-crowd-unload", "rmmod-via-entry"]


@dataclass(frozen=True)
class LabKernel:
    release: str
    suite: str
    vmlinuz: Path
    modules_dir: Path | None
    ko: Path


_built: dict[str, LabKernel] = {}


def lab_kernel(suite: str, out_dir: Path) -> LabKernel:
    """The newest kernel of a suite, fetched (cached) with a toa.ko built for it once per session."""
    if suite not in _built:
        tree = debian.fetch(debian.resolve_suite(suite))
        result = build.build_module(tree.headers_dir, tree.release, tree.suite, out_dir)
        _built[suite] = LabKernel(tree.release, tree.suite, tree.vmlinuz, tree.modules_dir, result.ko)
    return _built[suite]


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lab-dist")


@pytest.fixture(scope="session")
def bookworm(out_dir) -> LabKernel:
    return lab_kernel("bookworm", out_dir)


def describe(report: lab.LabReport) -> str:
    failed = "\n".join(f"  {c.name}: {c.detail}" for c in report.failed)
    tail = "\n".join(report.serial_tail)
    return f"failed checks:\n{failed}\nserial tail:\n{tail}\nserial log: {report.serial_log}"


# The kernel lines users run: 5.10, 6.1, 6.12 and 7.x (trixie-backports builds in the trixie image; sid in its own).
SUITES = ["bullseye", "bookworm", "trixie", "trixie-backports", "sid"]


@pytest.mark.parametrize("suite", SUITES)
def test_every_check_passes_on_a_real_kernel(suite, out_dir, tmp_path):
    kernel = lab_kernel(suite, out_dir)
    report = lab.verify(kernel.vmlinuz, kernel.ko, kernel.release, kernel.modules_dir,
                        log_dir=tmp_path, timeout=FULL_TIMEOUT, cycles=100, fuzz=1000)
    print(f"\n{kernel.release}: {len(report.checks)} checks in {report.duration:.1f}s (seed {report.seed})")
    assert report.ok, describe(report)
    checks = {check.name: check for check in report.checks}
    missing = [name for name in KEY_CHECKS if name not in checks]
    assert not missing, missing
    assert "cases=1000 mismatches=0" in checks["fuzz-kinds2"].detail
    assert "cases=250 mismatches=0" in checks["fuzz-kinds3"].detail
    assert f"seed={report.seed} " in checks["fuzz-kinds2"].detail
    assert "cycles=100 failures=0" in checks["cycles"].detail
    assert checks["load-messages-total"].detail == "expected=109 got=109"
    # Debian's x86_64 kernels all have what the ftrace hooks need.
    assert checks["hooks-default"].detail == "got=ftrace"
    # ... and ftrace direct calls: exported functions go straight to toa's stubs.
    assert checks["direct-calls"].detail == "got=Y"
    for crowd in ("crowd", "kretprobe-crowd"):
        assert "threads=2000 " in checks[crowd].detail and " probe_missed=0->0 " in checks[crowd].detail
    for crowd in ("crowd-unload", "via-entry-crowd-unload"):
        assert "threads=2000 " in checks[crowd].detail and " unload=waited,ok " in checks[crowd].detail
    assert "handshakes=300 " in checks["trusted-race"].detail and " wrong=0 " in checks["trusted-race"].detail
    assert "connections=300 opened=300 " in checks["table-many-open"].detail
    serial = report.serial_log.read_text()
    assert "TOA-LAB END" in serial and f"TOA-LAB BEGIN release={kernel.release}" in serial
    assert (tmp_path / "init.sh").is_file()


def test_too_short_timeout_kills_the_guest_and_keeps_the_tail(bookworm, tmp_path):
    started = time.monotonic()
    report = lab.verify(bookworm.vmlinuz, bookworm.ko, bookworm.release, bookworm.modules_dir,
                        log_dir=tmp_path, timeout=30, cycles=1_000_000, fuzz=1_000_000)
    assert time.monotonic() - started < 90
    assert report.timed_out and not report.ok
    timeout_check = next(check for check in report.checks if check.name == "guest-timeout")
    assert not timeout_check.passed and "QEMU killed" in timeout_check.detail
    # Lines as the lab wrote them (split at "\n" only): firmware lines carry a bare "\r" of their own.
    logged = report.serial_log.read_bytes().decode("utf-8", errors="replace").split("\n")[:-1]
    assert report.serial_tail and report.serial_tail == logged[-len(report.serial_tail):]
    assert len(report.serial_tail) <= lab.SERIAL_TAIL_LINES
    assert "Linux version" in report.serial_log.read_text()  # the kernel did boot and was cut off
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_lab_qemu(pid, bookworm.vmlinuz)]


def _is_lab_qemu(pid: str, vmlinuz: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # the lab's own guests: their initramfs is in a toa-lab- scratch directory (fleet guests of the
    # same kernel, which other tests may be running, boot another one)
    initrd = argv[argv.index(b"-initrd") + 1] if b"-initrd" in argv[:-1] else b""
    return (bool(argv) and argv[0].endswith(b"qemu-system-x86_64") and str(vmlinuz).encode() in argv
            and b"/toa-lab-" in initrd)


def test_guest_whose_init_hangs_is_cut_off(bookworm, tmp_path):
    """An /init that never powers off: the host stops waiting, keeps what it printed, kills QEMU."""
    initrd = tmp_path / "hang.cpio.gz"
    qemu.write_initramfs(initrd, init="#!/bin/busybox sh\necho guest is hanging now\n/bin/busybox sleep 100000\n",
                         directories=("bin", "dev", "proc"))
    seen = []
    result = qemu.run_to_exit(lab.qemu_argv(bookworm.vmlinuz, initrd), tmp_path / "serial.log",
                              timeout=40, on_line=seen.append)
    assert result.timed_out and result.returncode is None
    assert "guest is hanging now" in seen
    assert "guest is hanging now" in (tmp_path / "serial.log").read_text()
    checks = {c.name: c for c in lab.parse_serial(result.lines, fuzz=0, cycles=0)}
    assert not checks["guest-finished"].passed and not checks["guest-booted"].passed


def test_missing_qemu_is_one_line_error(bookworm, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # gcc, qemu and busybox all out of reach
    with pytest.raises(ToaError) as caught:
        lab.verify(bookworm.vmlinuz, bookworm.ko, bookworm.release, bookworm.modules_dir,
                   log_dir=tmp_path / "log", timeout=60)
    message = str(caught.value)
    assert "\n" not in message and "qemu-system-x86" in message


def test_missing_qemu_through_the_task(bookworm, tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "verify", "--vmlinuz", str(bookworm.vmlinuz), "--ko", str(bookworm.ko),
         "--modules", str(bookworm.modules_dir), "--log-dir", str(tmp_path / "log")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("toa: error: ") and "qemu-system-x86" in lines[-1]
    assert "Traceback" not in result.stderr


def test_own_kernel_through_the_task_as_json(bookworm, tmp_path):
    """--vmlinuz/--modules/--ko: the path for any distro's kernel, read by its bzImage header."""
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "verify", "--vmlinuz", str(bookworm.vmlinuz), "--ko", str(bookworm.ko),
         "--modules", str(bookworm.modules_dir), "--log-dir", str(tmp_path), "--json", "--fuzz", "200",
         "--cycles", "5", "--seed", "4242"],
        cwd=REPO, capture_output=True, text=True, timeout=FULL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [report] = json_items(result, "verify")
    assert report["ok"] and report["release"] == bookworm.release and report["seed"] == 4242
    fuzz = next(check for check in report["checks"] if check["name"] == "fuzz-kinds2")
    assert fuzz["passed"] and "seed=4242 " in fuzz["detail"] and "cases=200 " in fuzz["detail"]
    assert Path(report["serial_log"]) == tmp_path / "serial.log"


def test_module_for_another_kernel_is_refused_before_booting(bookworm, out_dir, tmp_path):
    other = lab_kernel("trixie", out_dir)
    with pytest.raises(ToaError, match=re.escape(f"built for {other.release}, not {bookworm.release}")):
        lab.verify(bookworm.vmlinuz, other.ko, bookworm.release, bookworm.modules_dir, log_dir=tmp_path, timeout=60)


def test_readme_command_prints_a_human_report(bookworm, tmp_path):
    """`invoke verify --suite bookworm`, as the README runs it (fewer fuzz cases and cycles)."""
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "verify", "--suite", "bookworm", "--log-dir", str(tmp_path),
         "--fuzz", "100", "--cycles", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=FULL_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"toa verify: {bookworm.release}" in result.stdout
    assert re.search(r"v4-mapped\s+│\s+PASS", result.stdout)
    summary = result.stderr.strip().splitlines()[-1]
    assert re.match(rf"PASS: (\d+)/\1 checks on {re.escape(bookworm.release)} ", summary), summary


def test_timeout_prints_the_serial_tail_and_fails(bookworm, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "verify", "--vmlinuz", str(bookworm.vmlinuz), "--ko", str(bookworm.ko),
         "--modules", str(bookworm.modules_dir), "--log-dir", str(tmp_path), "--timeout", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert re.search(r"guest-timeout\s+│\s+FAIL", result.stdout)
    assert "last lines of the serial console:" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("FAIL: ")
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- the eBPF engine

# The checks of the module's run that the eBPF engine must pass too, through its loader, plus its own.
BPF_KEY_CHECKS = ["tun-available", "kernel-refusal", "bpf-object", "attach", "attach-mounts-bpffs",
                  "attach-own-cgroup2-unmounted", "status-attached", "default-kinds", "stats-readable",
                  "v4", "v6-kind253", "v6-kind254", "v4-mapped", "no-option-v4", "wrong-length-10", "truncated-length",
                  "repeated-v4", "repeated-mixed-kinds", "loopback-v4", "multicast-v4", "broadcast-v4", "loopback-v6",
                  "multicast-v6", "mapped-loopback-v6", "zero-port", "zero-address", "wrong-length-2-at-end",
                  "toa-on-syn-only", "basic-addresses-returned", "basic-malformed-ignored", "basic-entries-drained",
                  "detach", "detach-nothing-left", "after-detach-v4-untouched", "attach-uses-cgroup2-mount",
                  "fuzz-kinds2", "fuzz-kinds3", "kinds200-param", "kinds-set-at-run-time",
                  "kinds-reset-kind200-not-accepted", "trusted-unset-warning-once", "trusted-basic",
                  "trusted-set-no-warning", "untrusted-basic", "untrusted-basic-untrusted-ignored",
                  "untrusted-basic-nothing-read", "trusted-flip-other", "trusted-flip-v4-only", "trusted-flip-v6-only",
                  "trusted-flip-peer", "trusted-race", "trusted-bad-prefix-33", "trusted-bad-seventeen",
                  "attach-bad-trusted-prefix", "attach-bad-kinds", "refused-nothing-left", "tfo-v4", "tfo-v6",
                  "table-many-open", "hold-entries-live", "hold-detach-while-open", "hold-after-unload", "hold-close",
                  "hold-nothing-left", "cycles", "cycles-nothing-left", "kernel-log-clean",
                  "kernel-not-tainted-by-fault", "guest-finished", "qemu-exit"]
# The verifier's own limit is 1,000,000 instructions: a change that makes the programs much costlier to
# prove on some kernel shows here long before a kernel refuses them.
VERIFIER_BUDGET = 200_000
VERIFIER_RE = re.compile(r"TOA-LAB VERIFIER (\S+) processed (\d+) insns")


@pytest.fixture(scope="session")
def bpf_build(tmp_path_factory) -> artifacts.BpfArtifact:
    """The eBPF engine, built once: every kernel of the session gets this one object."""
    return engine_bpf.build(tmp_path_factory.mktemp("bpf-dist"))


_bpf_objects: dict[str, str] = {}


def verifier_costs(report: lab.LabReport) -> dict[str, int]:
    return {match[1]: int(match[2]) for match in VERIFIER_RE.finditer(report.serial_log.read_text())}


@pytest.mark.parametrize("suite", SUITES)
def test_the_bpf_engine_passes_every_check_with_one_object(suite, bpf_build, tmp_path):
    tree = debian.fetch(debian.resolve_suite(suite))
    object_sha256 = engine_bpf.sha256(bpf_build.object)
    report = lab.verify(tree.vmlinuz, None, tree.release, tree.modules_dir, log_dir=tmp_path, timeout=FULL_TIMEOUT,
                        cycles=100, fuzz=1000, engine="bpf", bpf=bpf_build)
    costs = verifier_costs(report)
    print(f"\n{tree.release}: {len(report.checks)} checks in {report.duration:.1f}s (seed {report.seed}), "
          f"object {object_sha256[:16]}, verifier {costs}")
    assert report.ok, describe(report)
    checks = {check.name: check for check in report.checks}
    missing = [name for name in BPF_KEY_CHECKS if name not in checks]
    assert not missing, missing
    # One object for every kernel: the file this session built, its bytes as the loader carries them.
    assert report.engine == "bpf" and report.object_sha256 == bpf_build.object_sha256 == object_sha256
    assert f"expected={object_sha256} embedded={object_sha256} file={object_sha256} " in checks["bpf-object"].detail
    _bpf_objects[tree.release] = object_sha256
    assert len(set(_bpf_objects.values())) == 1, _bpf_objects
    assert "cases=1000 mismatches=0" in checks["fuzz-kinds2"].detail
    assert "cases=250 mismatches=0" in checks["fuzz-kinds3"].detail
    assert f"seed={report.seed} " in checks["fuzz-kinds2"].detail
    assert "cycles=100 failures=0" in checks["cycles"].detail
    assert "handshakes=300 " in checks["trusted-race"].detail and " wrong=0 " in checks["trusted-race"].detail
    assert "connections=300 opened=300 " in checks["table-many-open"].detail
    assert checks["kernel-not-tainted-by-fault"].detail.startswith("tainted=0 ")
    assert set(costs) == {"toa_sockops", "toa_peer4", "toa_peer6"}
    assert max(costs.values()) < VERIFIER_BUDGET, costs
    serial = report.serial_log.read_text()
    assert "TOA-LAB END" in serial and f"TOA-LAB BEGIN release={tree.release}" in serial


def fuzz_fields(check: lab.Check) -> dict[str, str]:
    return dict(field.split("=", 1) for field in check.detail.split() if "=" in field and field.split("=", 1)[0]
                in ("seed", "kinds", "cases", "mismatches", "refused_by_kernel", "verdicts", "categories"))


def test_one_seed_gives_the_same_fuzz_verdicts_and_counts_with_either_engine(bookworm, bpf_build, tmp_path):
    """The same random handshakes against toa.ko and against the eBPF engine, on one kernel."""
    seed = 20261130
    reports = {
        engine: lab.verify(bookworm.vmlinuz, bookworm.ko if engine == "module" else None, bookworm.release,
                           bookworm.modules_dir, log_dir=tmp_path / engine, timeout=FULL_TIMEOUT, cycles=0,
                           fuzz=1000, seed=seed, engine=engine, bpf=bpf_build if engine == "bpf" else None)
        for engine in lab.ENGINES
    }
    for engine, report in reports.items():
        assert report.ok, f"{engine}: {describe(report)}"
    module, bpf = ({check.name: check for check in report.checks} for report in reports.values())
    for name in ("fuzz-kinds2", "fuzz-kinds3"):
        assert fuzz_fields(module[name]) == fuzz_fields(bpf[name]), (module[name].detail, bpf[name].detail)
        assert fuzz_fields(bpf[name])["mismatches"] == "0" and "verdicts" in fuzz_fields(bpf[name])
        for counter in ("malformed-ignored", "v6-on-v4-ignored", "untrusted-ignored"):
            assert module[f"{name}-{counter}"].detail == bpf[f"{name}-{counter}"].detail, counter
