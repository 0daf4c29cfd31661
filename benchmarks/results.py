"""What every benchmark script records beside its numbers: the machine, the date, the command line,
and the JSON file that benchmarks/report.py turns into BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def machine() -> dict:
    """The machine a measurement ran on, as BENCHMARKS.md names it."""
    return {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "os": os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        # Other work on the machine during the run skews wall times; the report shows it.
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the per-round ratios (each round's two sides measured back to back)."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


class StepFailed(Exception):
    """A step of a benchmark did not do its work: there is no honest number for it (exit status 1)."""


def record(name: str, machine_at_start: dict, measurements: dict, argv: list[str] | None = None) -> dict:
    """The JSON document of one benchmark run (machine() taken when the run started)."""
    return {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", f"benchmarks/{name}.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_at_start,
        **measurements,
    }


def write(document: dict, path: Path | None) -> Path:
    """Write the run's JSON (default benchmarks/results/<name>.json); returns the path."""
    path = Path(path) if path else RESULTS_DIR / f"{document['benchmark']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def run(measure: Callable[[Callable[[str], None]], object], document: Callable[[object, dict], dict],
        print_document: Callable[[dict], None], json_path: Path | None) -> int:
    """A benchmark script's main: MEASURE(say) under a status line, then its DOCUMENT(measurements,
    machine at the start) printed and written. An error of toa's (bad input, a tool missing) is one
    line and exit status 2; a step that did not do its work (the Docker engine refusing one included),
    one line and 1."""
    import docker.errors
    from rich.console import Console

    from toa.errors import ToaError

    machine_at_start = machine()
    try:
        with Console(stderr=True).status("starting") as status:
            measurements = measure(status.update)
    except ToaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StepFailed as failure:
        print(f"failed: {failure}", file=sys.stderr)
        return 1
    except docker.errors.DockerException as error:  # the engine refused a step: a container, an image import
        print(f"failed: the Docker engine: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    doc = document(measurements, machine_at_start)
    print_document(doc)
    print(f"results: {write(doc, json_path)}")
    return 0


def positive(text: str) -> int:
    """An argparse type for the scripts' counts and timeouts."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def add_kernel_choice(parser: argparse.ArgumentParser, default_suite: str) -> None:
    """--suite (the newest kernel of a Debian suite, resolved when the run starts) or --kernel (an exact
    release, pinned on purpose). Debian replaces a suite's kernel ABI every few weeks, so a default
    names a suite, never a release."""
    from toa import debian

    which = parser.add_mutually_exclusive_group()
    which.add_argument("--suite", default=default_suite,
                       help=f"the newest kernel of this Debian suite: {', '.join(debian.suites())} "
                            f"(default: {default_suite})")
    which.add_argument("--kernel", help="one full Debian kernel release instead, as `uname -r` prints it "
                                        "(it must still be on the mirror or in toa's cache)")


def fetch_kernel(args: argparse.Namespace, progress, dist: Path = Path("dist")):
    """The kernel --suite or --kernel names, through toa's one proof pipeline (toa.prove): resolved once,
    fetched, with the build plan that toa.prove.build_module executes."""
    from toa import prove

    return prove.fetch(args.kernel, None if args.kernel else args.suite, dist=dist, progress=progress)


def prepare_kernel(args: argparse.Namespace, progress):
    """fetch_kernel() for the benchmarks that need only the kernel: (KernelPackages, KernelTree)."""
    fetched = fetch_kernel(args, progress)
    return fetched.plan.packages, fetched.tree
