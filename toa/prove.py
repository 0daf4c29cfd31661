"""One proof of toa on a Debian kernel: fetch -> build -> lab, the kernel resolved once.

`invoke verify --kernel/--suite`, `invoke matrix` (one proof per suite) and the benchmarks go through
here. fetch() resolves the kernel on the mirror once (toa.build.plan_debian: the build plan carries the
packages) and fetches exactly those packages; build_module() executes that plan against the fetched
tree; prove() adds the QEMU lab. A stage that fails ends the proof and is named in it, so the matrix
can show which stage broke and `invoke verify` can say it in one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from toa import build, debian, lab
from toa.errors import ToaError

STAGES = ("fetch", "build", "lab")


@dataclass(frozen=True)
class LabSettings:
    fuzz: int = 1000
    cycles: int = 100
    timeout: float = 900.0
    seed: int | None = None


@dataclass(frozen=True)
class Fetched:
    """A Debian kernel resolved once and fetched: the build plan for it and its unpacked tree."""

    plan: build.BuildPlan
    tree: debian.KernelTree

    @property
    def release(self) -> str:
        return self.tree.release


@dataclass
class Proof:
    """How far a proof got: each stage's outcome and time; STAGE and ERROR name the one that failed."""

    fetched: Fetched | None = None
    ko: Path | None = None  # the module the lab loaded (built here, or given)
    built: build.BuildResult | None = None
    report: lab.LabReport | None = None
    stage: str | None = None
    error: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.stage is None and self.report is not None and self.report.ok

    @property
    def release(self) -> str:
        return self.fetched.release if self.fetched else ""

    def raise_failure(self) -> None:
        """The failed stage as one ToaError (a lab that ran and found failures is a report, not an error)."""
        if self.stage:
            raise ToaError(f"{self.stage}: {self.error}")


def fetch(kernel: str | None = None, suite: str | None = None, *, dist: Path = Path("dist"),
          progress: Callable[[str], None] | None = None) -> Fetched:
    """A Debian kernel by full release or by suite (its newest): planned (resolved on the mirror once)
    and fetched into the cache."""
    say = progress or (lambda message: None)
    debian.check_request(kernel, suite)
    say(f"resolve: looking up {kernel or suite} in the package index")
    plan = build.plan_debian(kernel, suite, Path(dist))
    return Fetched(plan, debian.fetch(plan.packages, progress=lambda message: say(f"fetch: {message}")))


def build_module(fetched: Fetched, *, force: bool = False,
                 progress: Callable[[str], None] | None = None) -> build.BuildResult:
    """toa.ko for the fetched kernel: its plan executed against its tree (nothing resolved again)."""
    return build.execute(fetched.plan, tree=fetched.tree, force=force, progress=progress)


def lab_progress(say: Callable[[str], None]) -> Callable[[str], None]:
    """The lab's messages for a status line: a running count of passed and failed checks, then the last one."""
    counts = {"PASS": 0, "FAIL": 0}

    def report(message: str) -> None:
        verdict = message.rsplit(" ", 1)[-1]
        if verdict in counts:
            counts[verdict] += 1
            message = f"{counts['PASS']} passed, {counts['FAIL']} failed; last: {message}"
        say(f"lab: {message}")

    return report


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def prove(
    kernel: str | None = None, suite: str | None = None, *, dist: Path = Path("dist"),
    settings: LabSettings = LabSettings(), engine: str = "module", ko: Path | None = None, bpf=None,
    sig_enforce: bool = False, log_dir: Path | None = None, modules_dir: Path | None = None, force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Proof:
    """Fetch a Debian kernel (by release or suite), build toa.ko for it (unless KO is given, or the eBPF
    engine needs none), boot it in the lab and run every check. FORCE rebuilds (the matrix proves a
    build, not an artifact left by an earlier one). The serial log goes to LOG_DIR, by default lab/
    beside the module (or the eBPF engine's build); MODULES_DIR replaces the kernel's own modules."""
    say = progress or (lambda message: None)
    proof = Proof()
    needs_module = engine == "module" or sig_enforce

    def stage(name, run):
        started = time.monotonic()
        try:
            return run()
        except ToaError as exc:
            proof.stage, proof.error = name, _first_line(exc)
            return None
        finally:
            proof.seconds[name] = time.monotonic() - started

    proof.fetched = stage("fetch", lambda: fetch(kernel, suite, dist=dist, progress=say))
    if proof.fetched is None:
        return proof
    tree = proof.fetched.tree
    if ko is not None:
        proof.ko = Path(ko)
    elif needs_module:
        proof.built = stage("build", lambda: build_module(proof.fetched, force=force, progress=say))
        if proof.built is None:
            return proof
        proof.ko = proof.built.ko
    if log_dir is None:
        log_dir = (bpf.object.parent / "lab" / tree.release if engine == "bpf" and bpf is not None
                   else proof.built.ko.parent / "lab" if proof.built else Path(dist) / tree.release / "lab")
    proof.report = stage("lab", lambda: lab.verify(
        tree.vmlinuz, proof.ko, tree.release, modules_dir or tree.modules_dir, log_dir=Path(log_dir), timeout=settings.timeout,
        cycles=settings.cycles, fuzz=settings.fuzz, seed=settings.seed, progress=lab_progress(say),
        sig_enforce=sig_enforce, engine=engine, bpf=bpf))
    if proof.report is not None:
        proof.seconds["lab"] = proof.report.duration
    return proof
