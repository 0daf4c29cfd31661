#!/usr/bin/env python3
"""What toa.ko costs the traffic it sits in: a benchmark in a real booted Debian kernel.

One QEMU boot of the kernel runs several rounds; each round measures once without the module
(baseline) and once with it loaded (toa), so drift of the emulated CPU hits both sides alike:

  handshake-plain     handshakes/s without a TOA option (the syn_recv kretprobe on ordinary traffic)
  handshake-toa       handshakes/s with a valid TOA option (parsing and remembering the address)
  getpeername-plain   getpeername()/s on an accepted socket the module holds no address for
  getpeername-toa     getpeername()/s on an accepted socket whose TOA address is returned

A handshake is the whole connection: SYN, SYN-ACK, ACK written through the guest's TUN device,
accept() (which asks for the peer address too) and an abortive close. The medians per side and
their ratio (with-toa / baseline) are printed. The exit status is non-zero only when the guest
did not boot and finish or a measurement is missing, never because of a ratio.

    python benchmarks/module_overhead.py --suite bookworm [--rounds N]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from toa import build, debian, lab
from toa.errors import ToaError

BENCH_DIR = Path(__file__).resolve().parent
INIT_TEMPLATE = "init.sh.j2"
SIDES = ("baseline", "toa")
# Metric -> the unit of its rate.
METRICS = {
    "handshake-plain": "handshakes/s",
    "handshake-toa": "handshakes/s",
    "getpeername-plain": "calls/s",
    "getpeername-toa": "calls/s",
}
# One bookworm boot with these stays well under two minutes under TCG.
DEFAULT_ROUNDS = 5
DEFAULT_HANDSHAKES = 10000
DEFAULT_CALLS = 1000000
DEFAULT_TIMEOUT = 600

BENCH_RE = re.compile(
    r"BENCH name=(?P<metric>\S+) side=(?P<side>\S+) round=(?P<round>\d+) ops=(?P<ops>\d+) "
    r"seconds=(?P<seconds>[0-9.]+) rate=[0-9.]+$"
)
ERROR_RE = re.compile(r"(BENCH-ERROR|TOA-BENCH ERROR) (.*)$")


@dataclass(frozen=True)
class Sample:
    """One timed batch from the guest."""

    metric: str
    side: str
    round: int
    ops: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


@dataclass(frozen=True)
class Row:
    metric: str
    baseline: float
    with_toa: float

    @property
    def ratio(self) -> float:
        return self.with_toa / self.baseline


@dataclass
class Outcome:
    """What one benchmark boot produced: a row per metric, or the problems that prevented one."""

    release: str | None
    rows: list[Row]
    problems: list[str]


# ---------------------------------------------------------------- reading the console (pure)


def parse_samples(lines: Iterable[str]) -> list[Sample]:
    """The BENCH lines of a console, wherever kernel noise put them on the line."""
    samples = []
    for line in lines:
        match = BENCH_RE.search(line.strip())
        if match and match["metric"] in METRICS and match["side"] in SIDES:
            samples.append(Sample(match["metric"], match["side"], int(match["round"]), int(match["ops"]),
                                  float(match["seconds"])))
    return samples


def missing_samples(samples: list[Sample], rounds: int) -> list[str]:
    """`metric/side/round` of every measurement the guest should have printed but did not."""
    have = {(s.metric, s.side, s.round) for s in samples if s.seconds > 0}
    return [f"{metric}/{side}/round{r}" for r in range(1, rounds + 1) for metric in METRICS for side in SIDES
            if (metric, side, r) not in have]


def summarize(samples: list[Sample]) -> list[Row]:
    """Median rate per metric and side, for metrics measured on both sides."""
    rows = []
    for metric in METRICS:
        rates = {side: [s.rate for s in samples if s.metric == metric and s.side == side and s.seconds > 0]
                 for side in SIDES}
        if all(rates.values()):
            rows.append(Row(metric, statistics.median(rates["baseline"]), statistics.median(rates["toa"])))
    return rows


def evaluate(lines: list[str], rounds: int, *, timed_out: bool, returncode: int | None) -> Outcome:
    """Rows and problems from a finished guest's console."""
    problems = []
    release = next((line.split("release=", 1)[1].strip() for line in lines if "TOA-BENCH BEGIN release=" in line),
                   None)
    if release is None:
        problems.append("the guest's /init never started")
    if timed_out:
        problems.append("the guest did not power off in time: QEMU was killed")
    elif returncode != 0:
        problems.append(f"QEMU exited with status {returncode}")
    if not any(line.strip() == "TOA-BENCH END" for line in lines):
        problems.append("the guest did not reach the end of its rounds")
    problems += [match[0] for match in map(ERROR_RE.search, lines) if match]
    faults = [line for line in lines if lab.KERNEL_FAULT_RE.search(line) and not BENCH_RE.search(line)]
    if faults:
        problems.append(f"kernel fault on the console: {faults[0].strip()[:200]}")
    samples = parse_samples(lines)
    missing = missing_samples(samples, rounds)
    if missing:
        problems.append(f"{len(missing)} measurements missing, first {', '.join(missing[:4])}")
    return Outcome(release, summarize(samples), problems)


# ---------------------------------------------------------------- running the guest


def render_init(*, tun_modules: list[str], rounds: int, handshakes: int, calls: int) -> str:
    return lab.render_template(BENCH_DIR, INIT_TEMPLATE, tun_modules=tun_modules, rounds=rounds,
                               handshakes=handshakes, calls=calls)


def run_guest(
    tree: debian.KernelTree, ko: Path, *, rounds: int, handshakes: int, calls: int, timeout: float,
    log_dir: Path, progress: Callable[[str], None],
) -> Outcome:
    """Boot the kernel with toa.ko and the peer in bench mode; read the measurements back."""

    def on_line(line: str) -> None:
        match = BENCH_RE.search(line.strip())
        if match:
            progress(f"round {match['round']}/{rounds}: {match['metric']} {match['side']}")

    result = lab.boot_guest(
        tree.vmlinuz, ko.read_bytes(), tree.modules_dir,
        lambda tun_modules: render_init(tun_modules=tun_modules, rounds=rounds, handshakes=handshakes, calls=calls),
        log_dir=log_dir, timeout=timeout, on_line=on_line, say=progress,
    )
    return evaluate(result.lines, rounds, timed_out=result.timed_out, returncode=result.returncode)


# ---------------------------------------------------------------- the command


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure toa.ko's overhead in a real Debian kernel under QEMU.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--suite", help=f"the newest kernel of a Debian suite: {', '.join(debian.suites())}")
    which.add_argument("--kernel", help="one full Debian kernel release, e.g. 6.1.0-56-amd64")
    parser.add_argument("--rounds", type=positive, default=DEFAULT_ROUNDS,
                        help=f"baseline/toa rounds in the boot (default: {DEFAULT_ROUNDS})")
    parser.add_argument("--handshakes", type=positive, default=DEFAULT_HANDSHAKES,
                        help=f"timed handshakes per metric, side and round (default: {DEFAULT_HANDSHAKES})")
    parser.add_argument("--calls", type=positive, default=DEFAULT_CALLS,
                        help=f"timed getpeername() calls per metric, side and round (default: {DEFAULT_CALLS})")
    parser.add_argument("--timeout", type=positive, default=DEFAULT_TIMEOUT,
                        help=f"seconds before a guest that has not powered off is killed (default: {DEFAULT_TIMEOUT})")
    parser.add_argument("--out", type=Path, default=Path("dist"),
                        help="where toa.ko is built and the serial log kept: <out>/<target>/<release>/ (default: dist)")
    return parser.parse_args(argv)


def print_outcome(outcome: Outcome, args: argparse.Namespace, console, err_console) -> None:
    from rich.table import Table

    table = Table(title=f"toa.ko overhead on {outcome.release or 'an unknown kernel'}", title_justify="left")
    table.add_column("metric")
    table.add_column("baseline", justify="right")
    table.add_column("with-toa", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("unit")
    for row in outcome.rows:
        table.add_row(row.metric, f"{row.baseline:,.0f}", f"{row.with_toa:,.0f}", f"{row.ratio:.3f}",
                      METRICS[row.metric])
    console.print(table)
    notes = (
        f"kernel {outcome.release or 'unknown'}; {args.rounds} rounds, baseline and toa alternating in one boot; "
        f"median per side; {args.handshakes} handshakes and {args.calls} getpeername() calls per measurement",
        "ratio = with-toa / baseline: below 1 means slower with the module loaded",
        "QEMU emulates the CPU (TCG), which inflates absolute costs: the rates are not those of real "
        "hardware; the ratios, measured within one boot, are what compare",
    )
    for note in notes:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    for problem in outcome.problems:
        err_console.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console, err_console = Console(), Console(stderr=True)
    try:
        with err_console.status("starting") as status:
            def progress(message: str) -> None:
                status.update(message)

            pkgs, tree = debian.prepare(args.kernel, args.suite, progress=progress)
            ko = build.build_module(tree.headers_dir, tree.release, pkgs.suite, args.out,
                                    progress=lambda message: progress(f"build: {message}")).ko
            log_dir = ko.parent / "bench"
            outcome = run_guest(tree, ko, rounds=args.rounds, handshakes=args.handshakes, calls=args.calls,
                                timeout=float(args.timeout), log_dir=log_dir, progress=progress)
    except ToaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_outcome(outcome, args, console, err_console)
    if outcome.problems:
        err_console.print(f"serial log: {log_dir / 'serial.log'}", markup=False, highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
