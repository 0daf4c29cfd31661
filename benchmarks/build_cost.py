#!/usr/bin/env python3
"""What `invoke build --local` costs against the operator's own `make -C <headers> M=<src>`.

On one kernel's headers, each round times, back to back:

  bare   make -C <headers> M=<fresh copy of toa/module> modules      (what an operator types)
  cold   invoke build --local --kernel R --headers H --out <empty dir> (a first build: compile,
         check vermagic, write toa.ko and manifest.json)
  warm   the same invoke build again, inputs unchanged (must say "skipped": nothing compiled)

and, to tell where a warm re-run's time goes, each in a fresh interpreter: `python -c pass`, `import
docker` (the SDK toa.build imports), `import toa.build`, `invoke --list` (invoke and toa's task
definitions, no task run), and the up-to-date check called inside this process.
Every result is checked (bare make left a toa.ko for the kernel; cold said built, warm said
skipped), so a step that did nothing cannot look fast. The ratios are medians of per-round ratios;
the exit status is non-zero only when a step failed, never because of a time.

    python benchmarks/build_cost.py [--suite bookworm | --kernel RELEASE] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (a sibling file, found when run as a script or loaded by the tests)

from toa import build, ko  # noqa: E402
from toa.errors import ToaError  # noqa: E402
from toa.kernel import validate_release  # noqa: E402

# bookworm's kernel builds with this host's own gcc-12; older suites' headers want other compilers.
DEFAULT_SUITE = "bookworm"
DEFAULT_ROUNDS = 5
GOALS = {"cold_over_bare": 1.1, "warm_seconds": 0.3}


@dataclass
class Round:
    bare: float
    cold: float
    warm: float
    warm_in_process: float
    python_startup: float
    import_docker: float
    import_build: float
    invoke_startup: float


@dataclass
class Measurement:
    release: str
    headers: str
    rounds: list[Round] = field(default_factory=list)

    def summary(self) -> dict:
        bare = [r.bare for r in self.rounds]
        cold = [r.cold for r in self.rounds]
        return {
            "bare_make_seconds": statistics.median(bare),
            "cold_seconds": statistics.median(cold),
            "warm_seconds": statistics.median(r.warm for r in self.rounds),
            "warm_in_process_seconds": statistics.median(r.warm_in_process for r in self.rounds),
            "python_startup_seconds": statistics.median(r.python_startup for r in self.rounds),
            "import_docker_seconds": statistics.median(r.import_docker for r in self.rounds),
            "import_build_seconds": statistics.median(r.import_build for r in self.rounds),
            "invoke_startup_seconds": statistics.median(r.invoke_startup for r in self.rounds),
            "cold_over_bare": results.median_ratio(cold, bare),
        }


def invoke_build_argv(release: str, headers: Path, out: Path) -> list[str]:
    """`invoke build --local` from the repository's tasks.py, started the way the shell starts it."""
    return [sys.executable, "-m", "invoke", "--search-root", str(results.REPO), "build", "--local",
            "--kernel", release, "--headers", str(headers), "--out", str(out), "--json"]


def timed(argv: list[str], cwd: Path | None = None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    completed = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started, completed


def tail(completed: subprocess.CompletedProcess) -> str:
    return " | ".join((completed.stderr or completed.stdout).strip().splitlines()[-3:])


def bare_make(release: str, headers: Path, scratch: Path) -> float:
    """make -C <headers> M=<src> modules on a fresh copy of the module sources; checked, then timed."""
    source = scratch / "bare-src"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(build.MODULE_SOURCE, source, ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd", "probes.h"))
    seconds, completed = timed(["make", "-C", str(headers), f"M={source}", "modules"])
    if completed.returncode != 0 or not (source / "toa.ko").is_file():
        raise results.StepFailed(f"bare make failed (exit {completed.returncode}): {tail(completed)}")
    vermagic = ko.modinfo(source / "toa.ko").get("vermagic", "")
    if vermagic.split(" ", 1)[0] != release:
        raise results.StepFailed(f"bare make built toa.ko with vermagic {vermagic!r}, not for {release}: "
                                 "check --headers")
    return seconds


def invoke_build(release: str, headers: Path, out: Path, wanted_status: str) -> float:
    seconds, completed = timed(invoke_build_argv(release, headers, out), cwd=results.REPO)
    if completed.returncode != 0:
        raise results.StepFailed(f"invoke build --local failed (exit {completed.returncode}): {tail(completed)}")
    status = json.loads(completed.stdout)["items"][0].get("status")
    if status != wanted_status:
        raise results.StepFailed(f"invoke build --local said {status!r} where {wanted_status!r} was expected")
    return seconds


STARTUP_COMMANDS = (  # in the order of Round's fields
    [sys.executable, "-c", "pass"],
    [sys.executable, "-c", "import docker"],
    [sys.executable, "-c", "import toa.build"],
    [sys.executable, "-m", "invoke", "--search-root", str(results.REPO), "--list"],
)


def startup_costs() -> list[float]:
    """Seconds of each STARTUP_COMMANDS process: the fixed costs inside a warm re-run."""
    costs = []
    for argv in STARTUP_COMMANDS:
        seconds, completed = timed(argv, cwd=results.REPO)
        if completed.returncode != 0:
            raise results.StepFailed(f"{' '.join(argv[1:])} failed (exit {completed.returncode}): {tail(completed)}")
        costs.append(seconds)
    return costs


def warm_in_process(release: str, headers: Path, out: Path) -> float:
    started = time.perf_counter()
    result = build.build(release, local=True, headers=headers, out_dir=out)  # what the task calls
    seconds = time.perf_counter() - started
    if not result.skipped:
        raise results.StepFailed("toa.build.build rebuilt unchanged inputs: the up-to-date check is broken")
    return seconds


def measure(release: str, headers: Path, rounds: int, say=lambda message: None) -> Measurement:
    measurement = Measurement(release, str(headers))
    with tempfile.TemporaryDirectory(prefix="toa-build-bench-") as scratch_name:
        scratch = Path(scratch_name)
        for number in range(1, rounds + 1):
            out = scratch / f"dist-{number}"  # empty: the first invoke build is a real, cold one
            say(f"round {number}/{rounds}: bare make")
            bare = bare_make(release, headers, scratch)
            say(f"round {number}/{rounds}: invoke build --local (cold)")
            cold = invoke_build(release, headers, out, "built")
            say(f"round {number}/{rounds}: invoke build --local (warm)")
            warm = invoke_build(release, headers, out, "skipped")
            measurement.rounds.append(Round(bare, cold, warm, warm_in_process(release, headers, out),
                                            *startup_costs()))
    return measurement


def document(measurement: Measurement, machine: dict, argv: list[str] | None = None) -> dict:
    summary = measurement.summary()
    return results.record("build_cost", machine, {
        "kernel": measurement.release,
        "headers": measurement.headers,
        "rounds": [r.__dict__ for r in measurement.rounds],
        "summary": summary,
        "goals": {
            "cold_over_bare": {"goal": f"<= {GOALS['cold_over_bare']}", "measured": summary["cold_over_bare"],
                               "met": summary["cold_over_bare"] <= GOALS["cold_over_bare"]},
            "warm_seconds": {"goal": f"<= {GOALS['warm_seconds']} s", "measured": summary["warm_seconds"],
                             "met": summary["warm_seconds"] <= GOALS["warm_seconds"]},
        },
    }, argv)


def print_document(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"toa build --local on {doc['kernel']}", title_justify="left")
    for column in ("round", "bare make s", "invoke cold s", "invoke warm s", "cold/bare"):
        table.add_column(column, justify="right")
    for number, row in enumerate(doc["rounds"], 1):
        table.add_row(str(number), f"{row['bare']:.2f}", f"{row['cold']:.2f}", f"{row['warm']:.3f}",
                      f"{row['cold'] / row['bare']:.3f}")
    console.print(table)
    summary = doc["summary"]
    console.print(f"ratio cold/bare = {summary['cold_over_bare']:.3f} (median of {len(doc['rounds'])} rounds; "
                  f"goal <= {GOALS['cold_over_bare']})", markup=False, highlight=False, soft_wrap=True)
    console.print(f"warm re-run = {summary['warm_seconds']:.3f} s (median; goal <= {GOALS['warm_seconds']} s); "
                  f"fresh processes: python -c pass {summary['python_startup_seconds']:.3f} s, import docker "
                  f"{summary['import_docker_seconds']:.3f} s, import toa.build "
                  f"{summary['import_build_seconds']:.3f} s, "
                  f"invoke --list {summary['invoke_startup_seconds']:.3f} s; toa's up-to-date check in-process "
                  f"{summary['warm_in_process_seconds']:.3f} s", markup=False, highlight=False, soft_wrap=True)
    for name, goal in doc["goals"].items():
        if not goal["met"]:
            target = GOALS[name]
            console.print(f"goal missed: {name} {goal['measured']:.3f} against {goal['goal']} "
                          f"({goal['measured'] / target:.2f}x the goal)", markup=False, highlight=False, soft_wrap=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time invoke build --local against a bare make, cold and warm.")
    results.add_kernel_choice(parser, DEFAULT_SUITE)
    parser.add_argument("--headers", type=Path,
                        help="headers tree to build against (default: the kernel's, fetched and cached by toa.debian)")
    parser.add_argument("--rounds", type=results.positive, default=DEFAULT_ROUNDS,
                        help=f"bare/cold/warm rounds (default: {DEFAULT_ROUNDS})")
    parser.add_argument("--json", type=Path,
                        help="where to write the results (default: benchmarks/results/build_cost.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def measured(say) -> Measurement:
        if args.headers:  # any kernel's headers, not only Debian's: --kernel names their release
            if not args.kernel:
                raise ToaError("--headers needs --kernel RELEASE, the release those headers are for")
            release, headers = validate_release(args.kernel), args.headers
        else:
            _pkgs, tree = results.prepare_kernel(args, say)
            release, headers = tree.release, tree.headers_dir
        return measure(release, Path(headers).resolve(), args.rounds, say=say)

    return results.run(measured, lambda measurement, machine: document(measurement, machine, argv),
                       print_document, args.json)


if __name__ == "__main__":
    sys.exit(main())
