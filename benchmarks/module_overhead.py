#!/usr/bin/env python3
"""What toa costs the traffic it sits in, module and eBPF engine: a benchmark in a real booted Debian kernel.

One QEMU boot of the kernel runs several rounds; each round measures once without toa (baseline),
once with toa.ko loaded (toa) and once with the eBPF engine attached by its loader (bpf), so drift
of the emulated CPU hits every side alike:

  handshake-plain     handshakes/s without a TOA option (the syn_recv kretprobe on ordinary traffic)
  handshake-toa       handshakes/s with a valid TOA option (parsing and remembering the address)
  getpeername-plain   getpeername()/s on an accepted socket the module holds no address for
  getpeername-toa     getpeername()/s on an accepted socket whose TOA address is returned
  accept-getpeername  connections/s of what a server behind a balancer does, timed as one loop:
                      a handshake with a TOA option, accept(), one getpeername(), abortive close

A handshake is the whole connection: SYN, SYN-ACK, ACK written through the guest's TUN device,
accept() (which asks for the peer address too) and an abortive close. From each round's two TOA
measurements comes one more figure, what a server behind a balancer pays per connection:

  connection          connections/s of accept() plus one getpeername(): one handshake-toa and
                      one getpeername-toa call, seconds per operation added up within the round

The median rate per side and the median of the per-round ratios (with-toa / baseline and
with-bpf / baseline: the sides of a round run back to back) are printed, and written as JSON for benchmarks/report.py. Three of
them are the headline: the connection rate (handshake-toa), the accept()+getpeername() rate
(accept-getpeername) and the getpeername() rate (getpeername-toa). The exit status is non-zero only
when the guest did not boot and finish or a measurement is missing, never because of a ratio.

    python benchmarks/module_overhead.py [--suite bookworm | --kernel RELEASE] [--rounds N] [--ko PATH]

--ko measures another toa.ko built for the same kernel (an older build of this module, or another
TOA implementation that loads as toa.ko) exactly the same way, instead of building this one.
"""

from __future__ import annotations

import argparse
import re
import sys
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This checkout's toa package, whatever else is installed (its guest peer is what is measured).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
import results  # noqa: E402  (a sibling file, found when run as a script or loaded by the tests)

from toa import debian, engine_bpf, lab, prove  # noqa: E402
from toa.errors import ToaError  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
INIT_TEMPLATE = "init.sh.j2"
SIDES = ("baseline", "toa", "bpf")  # no engine, toa.ko loaded, the eBPF engine attached
# --icount: the guest's clock advances 2^0 ns per emulated instruction, and never while it is idle.
ICOUNT_QEMU = ("-icount", "shift=0,sleep=off")
CLOCKS = {
    False: "clock: the host's (other work on this machine moves the rates; --icount counts instructions instead)",
    True: "clock: emulated instructions (QEMU -icount, 1 ns each): rates are per 10^9 instructions, whatever else runs",
}
# Metric -> the unit of its rate.
METRICS = {
    "handshake-plain": "handshakes/s",
    "handshake-toa": "handshakes/s",
    "getpeername-plain": "calls/s",
    "getpeername-toa": "calls/s",
    "accept-getpeername": "connections/s",
}
# Figures derived per round and side from two measurements: name -> (unit, the metrics it adds up).
DERIVED = {"connection": ("connections/s", ("handshake-toa", "getpeername-toa"))}
UNITS = {**METRICS, **{name: unit for name, (unit, _parts) in DERIVED.items()}}
# The connection rate with toa loaded should stay within 1% of the rate without it.
GOAL_CONNECTION_RATIO = 0.99
# The three figures the summary leads with: (metric, what it is).
HEADLINE = (
    ("handshake-toa", "connection rate (handshake with a TOA option, accept(), close)"),
    ("accept-getpeername", "accept()+getpeername() rate (the same plus one getpeername(), one loop)"),
    ("getpeername-toa", "getpeername() rate (on a socket whose TOA address is returned)"),
)
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
    baseline: float  # median rate without the module
    with_toa: float  # median rate with it loaded
    round_ratios: tuple[float, ...]  # with-toa / baseline of each round
    with_bpf: float | None = None  # median rate with the eBPF engine attached
    bpf_round_ratios: tuple[float, ...] = ()  # with-bpf / baseline of each round

    @property
    def ratio(self) -> float:
        """The median of the per-round ratios (TCG is noisy; each round's sides ran back to back)."""
        return statistics.median(self.round_ratios)

    @property
    def bpf_ratio(self) -> float | None:
        return statistics.median(self.bpf_round_ratios) if self.bpf_round_ratios else None


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


def round_rates(samples: list[Sample]) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> side -> round -> rate, the derived figures included where their parts were measured."""
    rates: dict[str, dict[str, dict[int, float]]] = {name: {side: {} for side in SIDES} for name in UNITS}
    seconds_per_op: dict[tuple[str, str, int], float] = {}
    for sample in samples:
        if sample.seconds > 0:
            rates[sample.metric][sample.side][sample.round] = sample.rate
            seconds_per_op[sample.metric, sample.side, sample.round] = sample.seconds / sample.ops
    for name, (_unit, parts) in DERIVED.items():
        for side in SIDES:
            for round_ in {s.round for s in samples}:
                costs = [seconds_per_op.get((part, side, round_)) for part in parts]
                if all(costs):
                    rates[name][side][round_] = 1.0 / sum(costs)
    return rates


def summarize(samples: list[Sample]) -> list[Row]:
    """Median rate per metric and side and the median per-round ratio, for metrics measured on both sides."""
    rows = []
    for metric, by_side in round_rates(samples).items():
        paired = sorted(set(by_side["baseline"]) & set(by_side["toa"]))
        with_bpf = sorted(set(by_side["baseline"]) & set(by_side["bpf"]))
        if paired:
            rows.append(Row(metric, statistics.median(by_side["baseline"].values()),
                            statistics.median(by_side["toa"].values()),
                            tuple(by_side["toa"][r] / by_side["baseline"][r] for r in paired),
                            statistics.median(by_side["bpf"].values()) if with_bpf else None,
                            tuple(by_side["bpf"][r] / by_side["baseline"][r] for r in with_bpf)))
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
    tree: debian.KernelTree, ko: Path, loader: Path, *, rounds: int, handshakes: int, calls: int, timeout: float,
    log_dir: Path, progress: Callable[[str], None], icount: bool = False,
) -> Outcome:
    """Boot the kernel with toa.ko, the eBPF engine's LOADER and the peer in bench mode; read the
    measurements back."""

    def on_line(line: str) -> None:
        match = BENCH_RE.search(line.strip())
        if match:
            progress(f"round {match['round']}/{rounds}: {match['metric']} {match['side']}")

    result = lab.boot_guest(
        tree.vmlinuz, ko.read_bytes(), tree.modules_dir,
        lambda tun_modules: render_init(tun_modules=tun_modules, rounds=rounds, handshakes=handshakes, calls=calls),
        log_dir=log_dir, timeout=timeout, on_line=on_line, say=progress,
        files=[("bin/toa-bpf", Path(loader).read_bytes(), 0o755)],
        extra_qemu=ICOUNT_QEMU if icount else (),
    )
    return evaluate(result.lines, rounds, timed_out=result.timed_out, returncode=result.returncode)


# ---------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure the overhead of toa.ko and of the eBPF engine in a real "
                                                 "Debian kernel under QEMU.")
    results.add_kernel_choice(parser, "bookworm")
    parser.add_argument("--rounds", type=results.positive, default=DEFAULT_ROUNDS,
                        help=f"baseline/toa/bpf rounds in the boot (default: {DEFAULT_ROUNDS})")
    parser.add_argument("--handshakes", type=results.positive, default=DEFAULT_HANDSHAKES,
                        help=f"timed handshakes per metric, side and round (default: {DEFAULT_HANDSHAKES})")
    parser.add_argument("--calls", type=results.positive, default=DEFAULT_CALLS,
                        help=f"timed getpeername() calls per metric, side and round (default: {DEFAULT_CALLS})")
    parser.add_argument("--timeout", type=results.positive, default=DEFAULT_TIMEOUT,
                        help=f"seconds before a guest that has not powered off is killed (default: {DEFAULT_TIMEOUT})")
    parser.add_argument("--icount", action="store_true",
                        help="time by instructions, not the host's clock: QEMU's -icount makes one guest "
                             "nanosecond one emulated instruction, so other work on the host moves no ratio "
                             "(a cost model that counts instructions: memory and caches are not modelled)")
    parser.add_argument("--ko", type=Path,
                        help="measure this toa.ko (built for the same kernel) instead of building toa/module")
    parser.add_argument("--out", type=Path, default=Path("dist"),
                        help="where toa.ko is built and the serial log kept: <out>/<target>/<release>/, and the "
                             "eBPF engine: <out>/bpf/ (default: dist)")
    parser.add_argument("--json", type=Path,
                        help="where to write the results (default: benchmarks/results/module_overhead.json)")
    return parser.parse_args(argv)


def print_outcome(outcome: Outcome, args: argparse.Namespace, console, err_console) -> None:
    from rich.table import Table

    table = Table(title=f"toa overhead on {outcome.release or 'an unknown kernel'}: module and eBPF engine",
                  title_justify="left")
    table.add_column("metric", no_wrap=True)
    table.add_column("baseline", justify="right")
    table.add_column("with-toa", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("ratio range", justify="right")
    table.add_column("with-bpf", justify="right")
    table.add_column("bpf ratio", justify="right")
    table.add_column("bpf range", justify="right")
    table.add_column("unit")
    for row in outcome.rows:
        bpf = ((f"{row.with_bpf:,.0f}", f"{row.bpf_ratio:.3f}",
                f"{min(row.bpf_round_ratios):.3f}-{max(row.bpf_round_ratios):.3f}")
               if row.bpf_ratio is not None else ("-", "-", "-"))
        table.add_row(row.metric, f"{row.baseline:,.0f}", f"{row.with_toa:,.0f}", f"{row.ratio:.3f}",
                      f"{min(row.round_ratios):.3f}-{max(row.round_ratios):.3f}", *bpf, UNITS[row.metric])
    console.print(table)
    rows = {row.metric: row for row in outcome.rows}
    for metric, what in HEADLINE:
        if metric in rows:
            console.print(f"ratio {rows[metric].ratio:.3f}  {what}", markup=False, highlight=False, soft_wrap=True)
    for metric, what in HEADLINE:
        if metric in rows and rows[metric].bpf_ratio is not None:
            console.print(f"bpf ratio {rows[metric].bpf_ratio:.3f}  {what}", markup=False, highlight=False,
                          soft_wrap=True)
    notes = [
        f"kernel {outcome.release or 'unknown'}; {args.rounds} rounds, baseline, toa and bpf in turn in one boot; "
        f"median rate per side; {args.handshakes} handshakes and {args.calls} getpeername() calls per measurement",
        f"module: {args.ko if args.ko else 'toa/module, built for this kernel'}; eBPF engine: toa/bpf, attached "
        "to the root cgroup by toa-bpf",
        "ratio = median over rounds of with-toa / baseline (range: the rounds' lowest and highest): "
        "below 1 means slower with the module loaded; bpf ratio: the same for the eBPF engine",
        "connection = accept() plus one getpeername() per connection: one handshake-toa and one getpeername-toa "
        "call, their seconds per operation added within each round",
        "QEMU emulates the CPU (TCG), which inflates absolute costs: the rates are not those of real "
        "hardware; the ratios, measured within one boot, are what compare",
        CLOCKS[args.icount],
    ]
    connection = next((row for row in outcome.rows if row.metric == "connection"), None)
    if connection is not None:
        verdict = ("met" if connection.ratio >= GOAL_CONNECTION_RATIO
                   else f"missed by {GOAL_CONNECTION_RATIO - connection.ratio:.3f}")
        notes.append(f"goal connection ratio >= {GOAL_CONNECTION_RATIO}: measured {connection.ratio:.3f}, {verdict}")
    for note in notes:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    for problem in outcome.problems:
        err_console.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)


def document(outcome: Outcome, args: argparse.Namespace, machine: dict, argv: list[str] | None = None) -> dict:
    connection = next((row for row in outcome.rows if row.metric == "connection"), None)
    return results.record("module_overhead", machine, {
        "kernel": outcome.release,
        "module": str(args.ko) if args.ko else "toa/module",
        "rounds": args.rounds, "handshakes": args.handshakes, "calls": args.calls,
        "engines": {"toa": "toa.ko", "bpf": "the eBPF engine (toa/bpf, attached by toa-bpf)"},
        "clock": "instructions" if args.icount else "host",
        "rows": [{"metric": row.metric, "unit": UNITS[row.metric], "baseline": row.baseline,
                  "with_toa": row.with_toa, "ratio": row.ratio, "round_ratios": list(row.round_ratios),
                  "with_bpf": row.with_bpf, "bpf_ratio": row.bpf_ratio,
                  "bpf_round_ratios": list(row.bpf_round_ratios)}
                 for row in outcome.rows],
        "goals": {"connection ratio": {"goal": f">= {GOAL_CONNECTION_RATIO}", "measured": connection.ratio,
                                       "met": connection.ratio >= GOAL_CONNECTION_RATIO}} if connection else {},
        "problems": outcome.problems,
    }, argv)


def given_module(path: Path, release: str) -> Path:
    """A toa.ko passed with --ko, checked to be a module built for the kernel being booted."""
    from toa.ko import modinfo, read_module

    path = Path(path).resolve()
    if not path.is_file():
        raise ToaError(f"--ko {path}: no such file")
    try:
        vermagic = modinfo(read_module(path)).get("vermagic", "")
    except Exception as error:  # not an ELF module at all
        raise ToaError(f"--ko {path} is not a kernel module ({error})")
    built_for = vermagic.split(" ", 1)[0]
    if built_for != release:
        raise ToaError(f"--ko {path} was built for {built_for or 'an unknown kernel'}, not {release}: "
                       "pick the kernel with --kernel/--suite or build the module for it")
    return path


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    machine = results.machine()
    console, err_console = Console(), Console(stderr=True)
    if not console.is_terminal:  # a log or a pipe: the whole table, not cells cut to 80 columns
        console = Console(width=160)
    try:
        with err_console.status("starting") as status:
            def progress(message: str) -> None:
                status.update(message)

            fetched = results.fetch_kernel(args, progress, dist=args.out)
            tree = fetched.tree
            if args.ko:
                ko = given_module(args.ko, tree.release)
                log_dir = args.out / tree.release / "bench-ko"
            else:
                ko = prove.build_module(fetched, progress=progress).ko
                log_dir = ko.parent / "bench"
            bpf = engine_bpf.build(args.out / "bpf", progress=lambda message: progress(f"build: {message}"))
            outcome = run_guest(tree, ko, bpf.loader, rounds=args.rounds, handshakes=args.handshakes, calls=args.calls,
                                timeout=float(args.timeout), log_dir=log_dir, progress=progress,
                                icount=args.icount)
    except ToaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_outcome(outcome, args, console, err_console)
    if outcome.rows and not outcome.problems:  # a broken run must not replace the last good results
        print(f"results: {results.write(document(outcome, args, machine, argv), args.json)}")
    if outcome.problems:
        err_console.print(f"serial log: {log_dir / 'serial.log'}", markup=False, highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
